"""examples/ci: the shell variant of the CI workflow, end to end on the toy model against a worse and a better
baseline (verdicts and exit statuses), and the GitHub Actions workflow's structure (the same steps)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lctx import pack, results

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "examples" / "ci"


def run_script(work: Path, baseline: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORK": str(work), "LCTX": f"{sys.executable} -m lctx", "SUMMARY": str(work / "summary.md"),
           "BASELINE": str(baseline or ""), "INSTALL": "", "GITHUB_STEP_SUMMARY": ""}
    return subprocess.run(["bash", str(CI / "lctx-ci.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def scaled(record: dict, factor: float, run_id: str) -> dict:
    """A copy of a ppl record whose perplexities are ``factor`` × the original, consistently: every document's
    NLL sums shifted by ln(factor) per token, so the bootstrap over documents moves with the values."""
    shift = math.log(factor)
    samples = [{**s, "nll_sum": s["nll_sum"] + shift * s["tokens"],
                "last_k_nll_sum": s["last_k_nll_sum"] + shift * s["last_k_tokens"]} for s in record["samples"]]
    metrics = dict(record["metrics"])
    for name in ("nll", "last_k_nll"):
        metrics[name] += shift
    for name in ("ppl", "last_k_ppl"):
        metrics[name] *= factor
    return {**record, "run_id": run_id, "samples": samples, "metrics": metrics,
            "finished_at": "2025-12-01T00:00:00.000+00:00"}


def baseline_pack(source: Path, out: Path, factor: float, name: str) -> Path:
    """A pack of the first run's records with every perplexity scaled by ``factor`` (another run, a day earlier)."""
    directory = out.parent / name
    store = results.Store(directory)
    for record in pack.load(source).records:
        store.append(scaled(record, factor, name))
    results.write_json(directory / f"manifest-{name}.json", {"run_id": name, "started_at": "2025-12-01T00:00:00",
                                                             "git": {"revision": f"{name}0000000", "dirty": False}})
    return pack.pack(directory, out).path


@pytest.mark.skipif(not (ROOT / "tests/data/toy-byte-128/model.safetensors").is_file(), reason="no toy model")
def test_shell_workflow_gates_against_a_worse_and_a_better_baseline(tmp_path) -> None:
    work = tmp_path / "ci"
    first = run_script(work)  # main's first run: no baseline, no gate
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (work / "report" / "index.html").is_file() and "Regression gate" not in (work / "summary.md").read_text()
    packed = pack.load(work / "results.tar.gz")
    assert len(packed.records) == 4 and len(packed.manifests) == 1  # 2 variants × 2 lengths
    worse = baseline_pack(work / "results.tar.gz", tmp_path / "worse.tar.gz", 2.0, "worse")
    better = baseline_pack(work / "results.tar.gz", tmp_path / "better.tar.gz", 0.5, "better")

    against_worse = run_script(work, worse)  # the results are better than this baseline: pass
    assert against_worse.returncode == 0, against_worse.stdout[-3000:] + against_worse.stderr[-3000:]
    summary = (work / "summary.md").read_text()
    assert "## Regression gate ✅" in summary and "passed: 8 cells compared" in summary
    assert "### Improvements (8)" in summary and "## History" in summary
    assert "gate exit status: 0" in against_worse.stdout

    against_better = run_script(work, better)  # the results are worse than this baseline: fail, exit status 1
    assert against_better.returncode == 1, against_better.stdout[-3000:] + against_better.stderr[-3000:]
    summary = (work / "summary.md").read_text()
    assert "## Regression gate ❌" in summary and "FAILED: 8 of 8 cells regressed" in summary
    assert "gate exit status: 1" in against_better.stdout
    assert re.search(r"2 runs \(.*\); 4 regressions between a cell's consecutive runs", summary)  # ppl
    page = (work / "report" / "index.html").read_text()
    assert 'class="gate fail"' in page and '<section id="history">' in page
    assert len(pack.load(work / "results.tar.gz").records) == 8  # the next baseline carries the history along


def _commands(text: str) -> dict[str, str]:
    """Each lctx subcommand's line (continuations joined) in a script or a workflow's run blocks."""
    text = text.replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        match = re.search(r'(?:^|\s|")(?:lctx|\$\{lctx\[@\]\}")\s+(sweep|pack|report)\b(.*)', line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def test_github_workflow_is_valid_and_runs_the_scripts_steps() -> None:
    workflow = yaml.safe_load((CI / "lctx.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert set(triggers) == {"pull_request", "push"} and triggers["push"]["branches"] == ["main"]
    assert set(workflow["jobs"]) == {"sweep", "pages"}
    for job in workflow["jobs"].values():
        assert isinstance(job["runs-on"], str) and job["steps"]
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), step
            assert set(step) <= {"name", "id", "if", "uses", "run", "with", "env", "continue-on-error"}, step
    steps = workflow["jobs"]["sweep"]["steps"]
    ids = {s["id"] for s in steps if "id" in s}
    for step in steps:  # every step output it reads is one an earlier step writes
        for ref in re.findall(r"steps\.(\w+)\.outputs", str(step.get("if", "")) + str(step.get("run", ""))):
            assert ref in ids
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert {"actions/checkout", "actions/setup-python", "dawidd6/action-download-artifact",
            "actions/upload-artifact", "actions/upload-pages-artifact"} <= set(uses)
    assert workflow["jobs"]["pages"]["needs"] == "sweep"
    assert workflow["env"]["EXPERIMENT"] == "examples/ci/experiment.toml"
    assert (ROOT / workflow["env"]["EXPERIMENT"]).is_file()

    runs, script = "\n".join(s["run"] for s in steps if "run" in s), (CI / "lctx-ci.sh").read_text()
    yml, sh = _commands(runs), _commands(script)
    assert set(yml) == set(sh) == {"sweep", "pack", "report"}  # the same steps
    for name in ("sweep", "pack", "report"):
        flags = lambda text: sorted(re.findall(r"--[a-z-]+", text))  # noqa: E731
        assert flags(yml[name]) == flags(sh[name]), name
    assert '--summary-md "$GITHUB_STEP_SUMMARY"' in yml["report"]
    for text in (runs, script):  # the baseline gates the report and is the history of both the report and the pack
        assert re.search(r"baseline=\(--baseline ", text) and re.search(r"history=\(--history ", text)
        assert '"${baseline[@]}" "${history[@]}"' in text
    assert any(s.get("name") == "Fail on regressions" and "exit 1" in s["run"] for s in steps)
    assert subprocess.run(["bash", "-n", str(CI / "lctx-ci.sh")]).returncode == 0
