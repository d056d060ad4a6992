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


def test_ropes_table_and_help_show_examples() -> None:
    result = runner.invoke(app, ["ropes"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "dynamic-ntk" in result.output and "arXiv:2309.00071" in result.output
    help_text = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "Example: lctx eval" in help_text
    assert "Example: lctx ropes --json" in runner.invoke(app, ["ropes", "--help"], env={"COLUMNS": "200"}).output
