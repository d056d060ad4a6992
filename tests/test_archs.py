"""The architecture matrix: every causal-LM model type of the installed transformers, as a tiny random model.

Each type runs through :func:`lctx.archs.check_type`: frequency variants against transformers' own RoPE types on
the same weights, the attention-level variants against the naive reference that materialises the relative
positions, identity settings, exact restore, cached decoding, the LM head. A test fails on any measured
mismatch; a type lctx refuses must be refused up front (``lctx.patches.check``) with one line. The most used
families run by default and must pass everything; the long tail is marked slow.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lctx import archs, matrix
from lctx.cli import app

# The most used RoPE families (and every architecture the issue names): each must pass every check.
POPULAR = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "gemma3", "phi", "phi3", "gpt_neox", "olmo", "olmo2", "olmoe", "deepseek_v2", "deepseek_v3", "smollm3", "glm",
    "glm4", "stablelm", "starcoder2", "granite", "granitemoe", "cohere", "cohere2", "gpt_oss", "persimmon",
    "exaone4", "seed_oss", "helium", "glm4_moe", "ernie4_5",
)
ALLOWED = {"pass", "refused", "untested", "no-rope"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _params() -> list:
    return [pytest.param(t, marks=() if t in POPULAR else pytest.mark.slow) for t in archs.causal_lm_types()]


@pytest.mark.parametrize("model_type", _params())
def test_matrix(model_type: str) -> None:
    row = archs.check_type(model_type)
    assert not row.failures, f"{model_type}: {row.failures}"
    for part in ("frequency", "attention", "head"):
        status = getattr(row, part)
        assert status in ALLOWED, (model_type, part, status)
        reason = getattr(row, f"{part}_reason")
        if status == "refused":
            assert reason and "\n" not in reason and "Traceback" not in reason, (model_type, part, reason)
    if model_type in POPULAR:
        assert (row.frequency, row.attention, row.head) == ("pass", "pass", "pass"), row
        measured = {k: v for k, v in row.errors.items() if "no reference" not in k}
        assert len(measured) >= 10 and all(v <= matrix.TOL for v in measured.values()), measured


@pytest.mark.slow
def test_counts_meet_the_targets() -> None:
    counts = archs.summary(archs.run())
    assert counts["rope_types"] >= 100
    assert counts["frequency"]["share"] >= 0.9, counts
    assert counts["attention"]["share"] >= 0.8, counts
    assert counts["frequency"]["fail"] == counts["attention"]["fail"] == 0, counts


def test_archs_command_reports_rows_and_types_without_rope() -> None:
    result = CliRunner().invoke(app, ["archs", "--json", "--type", "llama", "--type", "gpt2", "--type", "phimoe"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    rows = {row["model_type"]: row for row in report["types"]}
    assert report["rope_types"] == 2 and report["without_rope"] == ["gpt2"]
    assert rows["llama"]["frequency"] == rows["llama"]["attention"] == "pass"
    assert rows["phimoe"]["frequency"] == "refused"
    assert "without reading its inv_freq buffer" in rows["phimoe"]["frequency_reason"]
    assert report["frequency"]["pass"] == 1 and report["attention"]["pass"] == 2
