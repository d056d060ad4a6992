"""`lctx ropes` and the top-level help."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lctx import patches
from lctx.cli import app

runner = CliRunner()


def test_ropes_json_lists_every_registered_variant() -> None:
    result = runner.invoke(app, ["ropes", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == patches.variant_names()
    yarn = next(r for r in rows if r["name"] == "yarn")
    assert yarn["params"] == {"factor": None, "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None,
                              "layers": None, "logn": False}
    assert yarn["description"].startswith("NTK-by-parts")
    assert yarn["bounds"] == {"factor": "≥ 1", "beta_fast": "> 0", "beta_slow": "> 0", "attention_factor": "> 0",
                              "layers": "one of all, full, sliding"}


def test_ropes_lists_leaky_rerope_for_training_with_k_below_one() -> None:
    """Su's inverse use (k < 1 at training time) is documented and accepted; k must stay positive."""
    rows = json.loads(runner.invoke(app, ["ropes", "--json"]).output)
    leaky = next(r for r in rows if r["name"] == "leaky-rerope")
    assert leaky["params"]["k"] == 16.0 and leaky["bounds"]["k"] == "> 0"
    assert "k < 1" in leaky["description"] and "kexue.fm/archives/9728" in leaky["reference"]
    assert patches.parse("leaky-rerope:k=0.0625").kwargs == {"k": 0.0625}
    for bad in ("k=0", "k=-1"):
        result = runner.invoke(app, ["eval", "--model", "m", "--rope", f"leaky-rerope:{bad}", "--lengths", "128"])
        assert result.exit_code == 2 and f"{bad} is not valid" in result.output and "> 0" in result.output
        assert result.output.count("\n") <= 2, result.output


def test_ropes_table_and_help_show_examples() -> None:
    result = runner.invoke(app, ["ropes"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "dynamic-ntk" in result.output and "arXiv:2309.00071" in result.output
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "Example: lctx eval" in help_text
    assert "Example: lctx ropes --json" in runner.invoke(app, ["ropes", "--help"], env={"COLUMNS": "200"}).output
