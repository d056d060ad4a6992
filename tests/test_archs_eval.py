"""``lctx eval --rope yarn:factor=4,rerope`` end to end on tiny models of the architectures issue 15 names:
Gemma 3 (per-layer-type RoPE, also as its multimodal class), Mixtral and Qwen3-MoE (MoE), DeepSeek-V3 (MLA),
SmolLM3 (NoPE layers), GLM-4 (interleaved), Phi-2 (partial rotary), Cohere 2 (logit scale, NoPE global layers)
and gpt-oss (sinks, sliding windows)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from lctx import matrix
from lctx.cli import app

EAGER_ONLY = {"gpt_oss": "eager"}  # transformers has no SDPA path for gpt-oss's sinks
NAMED = ("gemma3_text", "gemma3", "mixtral", "qwen3_moe", "deepseek_v3", "smollm3", "glm4", "phi", "cohere2",
         "gpt_oss")


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("docs")
    for name in ("attribute-access", "comparisons", "customization"):
        (folder / f"{name}.txt").write_text(topics[name])
    return folder


def save_tiny(model_type: str, tokenizer, path) -> None:
    """The matrix's tiny model with the shared tokenizer's vocabulary and special tokens."""
    config = matrix.matrix_config(model_type)
    d = config.to_dict()
    text = d["text_config"] if isinstance(d.get("text_config"), dict) else d
    text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    with matrix.quiet():
        model = matrix.build(type(config).from_dict(d))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.mark.parametrize("model_type", NAMED)
def test_eval_runs_yarn_and_rerope(model_type: str, tiny_tokenizer, tmp_path, docs, one_thread) -> None:
    save_tiny(model_type, tiny_tokenizer, tmp_path / "model")
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "model"), "--rope", "yarn:factor=4,rerope",
                                      "--task", "ppl", "--lengths", "96,160", "--samples", "2", "--data", str(docs),
                                      "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "float32",
                                      "--attn", EAGER_ONLY.get(model_type, "sdpa")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for path in sorted((tmp_path / "out").glob("records*.jsonl"))
            for line in path.read_text().splitlines()]
    cells = {(r["rope"].split(":")[0], r["length"]): r for r in rows}
    assert set(cells) == {(rope, n) for rope in ("yarn", "rerope") for n in (96, 160)}, sorted(cells)
    for cell in cells.values():
        assert cell["status"] == "ok", cell
        assert math.isfinite(cell["metrics"]["ppl"]), cell
