"""The package's shape: no import cycle, no module reaching into another's private names, lm-eval imported only
when an lm-eval task runs, and ``lctx tasks`` listing every task with its declared parameters."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from typer.testing import CliRunner

from lctx import evals
from lctx.cli import app

PACKAGE = Path(__file__).resolve().parent.parent / "lctx"


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"))
    return out


def imported(name: str, tree: ast.Module, known: set[str], top_level: bool) -> set[str]:
    """lctx modules ``name`` imports (at module level only, with ``top_level``)."""
    nodes = tree.body if top_level else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lctx"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return {m for m in found if m in known and m != name}


def test_no_import_cycle_at_module_level() -> None:
    trees = modules()
    graph = {name: imported(name, tree, set(trees), top_level=True) for name, tree in trees.items()}
    # a package imports its submodules' parents implicitly; a module importing its own package is no cycle
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " → ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_module_uses_another_modules_private_names() -> None:
    trees = modules()
    for name, tree in trees.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lctx"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"
                aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name: a.name for a in node.names if a.name.startswith("lctx")}
        modules_here = {alias for alias, target in aliases.items() if target in trees}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules_here
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                raise AssertionError(f"{name} uses {node.value.id}.{node.attr}")


def test_passkey_is_a_task_not_a_library() -> None:
    """No other task module imports from the passkey task (shared pieces live in engine, filler, generation)."""
    trees = modules()
    for name, tree in trees.items():
        if name in ("lctx.evals.passkey", "lctx.evals.niah"):  # niah is passkey's grid with another haystack
            continue
        assert "lctx.evals.passkey" not in imported(name, tree, set(trees), top_level=False), name


def test_lctx_tasks_json_lists_every_task_with_its_parameters() -> None:
    done = CliRunner().invoke(app, ["tasks", "--json"])
    assert done.exit_code == 0, done.output
    rows = {row["name"]: row for row in json.loads(done.output)}
    assert {"ppl", "passkey", "niah", "longbench-v2", "lm-eval:<task>", "synthetic:kv-retrieval",
            "longbench:qasper", "longbench:qasper_e"} <= set(rows)
    assert len([n for n in rows if n.startswith("synthetic:")]) == 9 + 2  # and RULER's two QA tasks
    assert len([n for n in rows if n.startswith("longbench:")]) == 21 + 13
    ppl = {p["name"]: p for p in rows["ppl"]["params"]}
    assert ppl["stride"] == {"name": "stride", "type": "length", "default": None, "required": False, "bounds": "≥ 1",
                             "identity": True, "help": ppl["stride"]["help"]}
    assert ppl["last_k"]["default"] == 256 and rows["ppl"]["metrics"][0] == {"name": "ppl", "higher_is_better": False,
                                                                             "headline": True}
    multikey = {p["name"]: p["default"] for p in rows["synthetic:niah-multikey"]["params"]}
    assert multikey["keys"] == 4 and multikey["haystack"] == "corpus"  # the member's preset
    assert {p["name"] for p in rows["passkey"]["params"]} == {"samples", "seed", "depths", "max_new_tokens",
                                                              "chat_template"}
    assert rows["passkey"]["figures"] == ["heatmap"]
    table = CliRunner().invoke(app, ["tasks"], env={"COLUMNS": "250"})
    assert table.exit_code == 0 and "synthetic:niah-multikey" in table.output


def test_every_listed_task_takes_its_declared_defaults() -> None:
    """A family member's defaults are valid values of its own parameters (the presets are checked data)."""
    for kind in evals.listed():
        for param in kind.params:
            if param.default is not None:
                assert param.convert(param.default, kind.name) == param.default, (kind.name, param.name)
