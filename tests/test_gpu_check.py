"""scripts/gpu_check.py (with scripts/gpu_parity.py), the one-command GPU check: its dry run (the same code on CPU
at tiny sizes) and the ways it must report trouble, since the GPU run happens once, on a machine lent for minutes.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lctx.patches import rerope

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
GROUPS = ("frequency", "identity", "attention", "padding", "decode")
VARIANTS = ("none", "yarn:factor=16", "dynamic-ntk:factor=16", "rerope")
DRY_LENGTHS = (256, 512)


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch):
    """A fresh copy of the script as a module (its budget clock starts now), one torch thread as its dry run uses."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield module
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """``python scripts/gpu_check.py --dry --out DIR``, as CI would call it."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    return proc, out


def test_dry_run_passes_and_writes_its_outputs(dry_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    proc, out = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "gpu-check.json").read_text())
    markdown = (out / "gpu-check.md").read_text()
    assert markdown in proc.stdout
    assert "parity decode:" in (out / "gpu-check.log").read_text()

    parity = result["parity"]
    assert parity["status"] == "passed" and parity["failed"] == 0
    assert {(c["group"], c["dtype"]) for c in parity["checks"]} == {(g, d) for g in GROUPS
                                                                   for d in ("float32", "bfloat16")}
    bench = result["benchmark"]
    assert bench["status"] == "done"
    assert [(c["variant"], c["length"], c["status"]) for c in bench["cells"]] == [
        (v, n, "ok") for n in DRY_LENGTHS for v in VARIANTS]
    assert all(c["prefill_s"] > 0 and c["decode_tokens_per_s"] > 0 for c in bench["cells"])
    assert bench["largest_fit"] == dict.fromkeys(VARIANTS, 512)

    lines = markdown.splitlines()
    assert lines[0] == "<!-- begin gpu -->" and lines[-1] == "<!-- end gpu -->"
    assert f"**{len(parity['checks'])} of {len(parity['checks'])} checks passed**" in markdown
    for group in GROUPS:
        (row,) = [line for line in lines if line.startswith(f"| {group} |")]
        assert row.count(" pass") == 2, row  # float32 and bfloat16 columns
    rows = [line for line in lines if line.startswith("| `")]
    assert [tuple(cell.strip() for cell in row.split("|")[1:3]) for row in rows] == [
        (f"`{v}`", str(n)) for n in DRY_LENGTHS for v in VARIANTS]
    assert all(len(row.split("|")) == 10 and row.split("|")[3].strip().endswith(" s") for row in rows)
    assert all(row.split("|")[4].strip() == "1.00×" for row in rows if row.startswith("| `none`"))


# A machine with the wheels the GPU machine lacks hidden from imports (find_spec says None, as when not installed).
BARE = textwrap.dedent("""
    import importlib.util, json, sys
    HIDDEN = {"lm_eval", "gguf", "datasets", "pytest", "jieba", "rouge", "scipy"}

    class Hide:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            return None if name.split(".")[0] in HIDDEN else self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
    spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
    module = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = {"hidden_imported": sorted({m.split(".")[0] for m in sys.modules} & HIDDEN)}
    try:
        module.engine_greedy()
        result["engine"] = "ok"
    except ImportError as err:
        result["engine"] = str(err)
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def bare() -> dict:
    proc = subprocess.run([sys.executable, "-c", BARE, str(SCRIPT)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]  # the script and lctx.patches import without them
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_imports_on_a_bare_machine(bare: dict) -> None:
    assert bare["hidden_imported"] == []


def test_generation_helper_imports_on_a_bare_machine(bare: dict) -> None:
    assert bare["engine"] == "ok"


def test_a_wrong_merge_fails_the_attention_checks(gpu_check, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second of two merged key sets weighted e^-0.5 too little: every input with a far part fails, in float32
    and bf16 (inside the window the near band's own segments may be merged too, so those may fail as well)."""
    merge = rerope._merge
    monkeypatch.setattr(rerope, "_merge", lambda o1, lse1, o2, lse2: merge(o1, lse1, o2, lse2 - 0.5))
    p = gpu_check.gpu_parity.Parity(gpu_check.DRY, torch.device("cpu"))
    dict(gpu_check.gpu_parity.parity_groups(p))["attention"]()
    far = [c for c in p.checks if " 12 tokens" not in c.name]
    assert far and not any(c.passed for c in far), [c for c in far if c.passed]
    assert {c.dtype for c in far} == {"float32", "bfloat16"}


def test_a_wrong_token_fails_the_decode_checks(gpu_check, monkeypatch: pytest.MonkeyPatch) -> None:
    greedy = gpu_check.engine_greedy()

    def last_token_wrong(*args, **kwargs) -> list[int]:
        out = greedy(*args, **kwargs)
        return out[:-1] + [3 + (out[-1] - 2) % 125]  # another id of the tiny vocabulary, never EOS (2)

    monkeypatch.setattr(gpu_check.gpu_parity, "engine_greedy", lambda: last_token_wrong)
    p = gpu_check.gpu_parity.Parity(gpu_check.DRY, torch.device("cpu"))
    dict(gpu_check.gpu_parity.parity_groups(p))["decode"]()
    failed = {(c.name, c.dtype) for c in p.checks if not c.passed}
    assert failed == {(c.name, c.dtype) for c in p.checks if "lctx greedy" in c.name}
    assert {c.dtype for c in p.checks if not c.passed} == {"float32", "bfloat16"}


@pytest.mark.parametrize(("error", "status", "code"), [(torch.cuda.OutOfMemoryError, "oom", 0),
                                                       (RuntimeError, "error", 2)])
def test_benchmark_failures_stay_in_their_cells(gpu_check, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                error: type[Exception], status: str, code: int) -> None:
    """An OOM is a result (exit 0), any other exception a crash (exit 2); the other cells run and are written."""
    greedy = gpu_check.engine_greedy()

    def failing_at_512(model, ids, *args, **kwargs) -> list[int]:
        if len(ids) >= 512:
            raise error("simulated")
        return greedy(model, ids, *args, **kwargs)

    monkeypatch.setattr(gpu_check, "engine_greedy", lambda: failing_at_512)
    assert gpu_check.main(["--dry", "--only", "benchmark", "--out", str(tmp_path)]) == code
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    cells = {(c["variant"], c["length"]): c["status"] for c in result["benchmark"]["cells"]}
    assert cells == {**{(v, 256): "ok" for v in VARIANTS}, **{(v, 512): status for v in VARIANTS}}
    assert result["benchmark"]["largest_fit"] == dict.fromkeys(VARIANTS, 256)
    assert result["parity"]["status"] == "not run"
    assert f"| `rerope` | 512 | {status}:" in (tmp_path / "gpu-check.md").read_text()


def test_a_spent_budget_skips_the_benchmark_and_still_writes(gpu_check, tmp_path: Path) -> None:
    assert gpu_check.main(["--dry", "--only", "benchmark", "--budget", "0", "--out", str(tmp_path)]) == 0
    cells = json.loads((tmp_path / "gpu-check.json").read_text())["benchmark"]["cells"]
    assert [c["status"] for c in cells] == ["budget"] * len(VARIANTS) + ["skipped"] * len(VARIANTS)
    assert "| `none` | 256 | budget: time budget" in (tmp_path / "gpu-check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_full_run_without_cuda_says_so(gpu_check, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device here; --dry" in capsys.readouterr().err
