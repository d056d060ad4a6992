"""The train-short/test-long lab: real extrapolation behaviour of the committed toy checkpoint, and training."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lctx import models, patches, toy

CHECKPOINT = Path(__file__).parent / "data" / "toy-byte-128"
SU_TABLE = Path(__file__).parents[1] / "experiments" / "su-table.toml"
WINDOWS = 8  # held-out windows of 4L tokens; the same text is cut into 4 × 8 windows of L
TINY = ["--layers", "1", "--dim", "32", "--heads", "2", "--batch-size", "4", "--warmup", "1"]

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint() -> models.Loaded:
    return models.load(str(CHECKPOINT))


@pytest.fixture(scope="module")
def held_out(checkpoint: models.Loaded) -> torch.Tensor:
    """The first 8 · 4L (+1) held-out bytes: text the checkpoint never trained on."""
    text = toy.corpus()[1]
    ids = checkpoint.tokenizer(text, add_special_tokens=False).input_ids
    return torch.tensor(ids[: WINDOWS * 4 * checkpoint.train_len + 1])


def perplexity(model: torch.nn.Module, ids: torch.Tensor, length: int) -> float:
    """Token-weighted PPL of ``ids`` cut into consecutive windows of ``length`` (plain cross-entropy)."""
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, length):
        window = ids[start: start + length + 1][None]
        with torch.no_grad():
            logits = model(window[:, :-1]).logits[0]
        total += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def baseline(checkpoint: models.Loaded, held_out: torch.Tensor) -> dict[int, float]:
    """PPL of the unpatched model at the training length L and at 4L, on the same held-out text."""
    big_l = checkpoint.train_len
    return {n: perplexity(checkpoint.model, held_out, n) for n in (big_l, 4 * big_l)}


def test_checkpoint_is_a_byte_level_model_trained_at_128(checkpoint: models.Loaded) -> None:
    assert checkpoint.train_len == 128
    assert checkpoint.model.config.model_type == "llama"
    text = "assert x == 'é'\n"
    ids = checkpoint.tokenizer(text).input_ids
    assert ids == list(text.encode()), "one token per byte, no BOS"
    assert checkpoint.tokenizer.decode(ids) == text
    readme = (CHECKPOINT / "README.md").read_text()
    assert "lctx toy train --context 128 --out tests/data/toy-byte-128" in readme


def test_baseline_fails_beyond_the_training_length(baseline: dict[int, float]) -> None:
    ppl_l, ppl_4l = baseline.values()
    assert ppl_l < 8, "the checkpoint has learnt the language"
    assert ppl_4l >= 1.5 * ppl_l, f"no extrapolation failure: PPL {ppl_l:.2f} at L, {ppl_4l:.2f} at 4L"


# dynamic-ntk scales the base from the actual length; factor is its strength at ℓ = 4L (base × 13 here)
@pytest.mark.parametrize("spec", ["dynamic-ntk:factor=4", "yarn:factor=4", "rerope"])
def test_extrapolating_variants_hold_at_4x(checkpoint: models.Loaded, held_out: torch.Tensor,
                                           baseline: dict[int, float], spec: str) -> None:
    ppl_l = baseline[checkpoint.train_len]
    with patches.apply(checkpoint.model, spec):
        ppl_4l = perplexity(checkpoint.model, held_out, 4 * checkpoint.train_len)
    assert ppl_4l <= 1.3 * ppl_l, f"{spec}: PPL {ppl_4l:.2f} at 4L vs baseline {ppl_l:.2f} at L"


def test_byte_tokenizer_round_trips_every_byte() -> None:
    tokenizer = toy.byte_tokenizer()
    data = bytes(range(256)).decode("latin-1")  # every code point below 256, multi-byte in UTF-8 above 127
    ids = tokenizer(data).input_ids
    assert ids == list(data.encode())
    assert tokenizer.decode(ids) == data
    assert tokenizer.convert_tokens_to_ids([toy.BOS, toy.EOS]) == [256, 257]


def test_train_command_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    result = runner.invoke(toy.toy_app, ["train", "--context", "16", "--out", str(out), "--steps", "3", *TINY])
    assert result.exit_code == 0, result.output
    loaded = models.load(str(out))
    assert loaded.train_len == 16 and loaded.model.config.vocab_size == toy.VOCAB_SIZE
    readme = (out / "README.md").read_text()
    assert toy.command(16, out, 3, 0, toy.ToyConfig(layers=1, dim=32, heads=2, batch_size=4, warmup=1),
                       "float32") in readme
    with patches.apply(loaded.model, "yarn:factor=4"):  # a trained toy model is patchable like any other
        loaded.model(torch.tensor([list(b"x" * 64)]))


def test_train_command_help_and_bad_dtype(tmp_path: Path) -> None:
    help_text = runner.invoke(toy.toy_app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "Example: lctx toy train" in help_text
    result = runner.invoke(toy.toy_app, ["train", "--context", "16", "--out", str(tmp_path), "--steps", "1",
                                         "--save-dtype", "int8", *TINY])
    assert result.exit_code == 2 and "--save-dtype" in result.output


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    config = toy.ToyConfig(layers=1, dim=32, heads=2, batch_size=4, warmup=1)

    def weights(seed: int, name: str) -> dict[str, torch.Tensor]:
        out = toy.train(16, tmp_path / name, steps=4, seed=seed, config=config, progress=False)
        return load_file(out / "model.safetensors")

    first, again, other = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_su_table_experiment_is_well_formed() -> None:
    experiment = tomllib.loads(SU_TABLE.read_text())
    assert set(experiment) == {"name", "description", "models", "ropes", "tasks", "lengths", "options"}
    for model in experiment["models"]:
        assert (SU_TABLE.parents[1] / model / "config.json").is_file(), model
    specs = [patches.parse(spec) for spec in experiment["ropes"]]
    assert {s.name for s in specs} >= {"none", "ntk", "rerope", "leaky-rerope"}
    assert any(s.name == "ntk" and s.kwargs.get("logn") for s in specs)
    assert any(s.name == "rerope" and s.kwargs.get("logn") for s in specs)
    assert experiment["tasks"] == ["ppl"] and experiment["lengths"][0] == 128


# ---- training under a RoPE variant (Su's inverse Leaky ReRoPE) ---------------------------------------------------

INVERSE = "leaky-rerope:window=4:k=0.25"


def test_train_under_a_variant_records_it_where_evaluation_reads_it(tmp_path: Path) -> None:
    plain, under = tmp_path / "plain", tmp_path / "under"
    for out, extra in ((plain, []), (under, ["--rope", INVERSE])):
        result = runner.invoke(toy.toy_app, ["train", "--context", "16", "--out", str(out), "--steps", "2", *TINY,
                                             "--threads", "1", *extra])
        assert result.exit_code == 0, result.output
    canonical = patches.parse(INVERSE).resolve(16).canonical
    loaded = models.load(str(under))
    assert loaded.train_rope == canonical and models.load(str(plain)).train_rope is None
    assert "lctx_train_rope" not in (plain / "config.json").read_text()
    readme = (under / "README.md").read_text()
    assert f"Trained under the RoPE variant `{canonical}`" in readme and f"--rope {canonical}" in readme
    assert f"under `{canonical}`" in readme and "with plain RoPE" in readme
    # the same seed and data order: the weights differ only because training ran under the variant
    before, after = load_file(plain / "model.safetensors"), load_file(under / "model.safetensors")
    assert before.keys() == after.keys() and not all(torch.equal(before[k], after[k]) for k in before)


def test_training_under_none_is_plain_training(tmp_path: Path) -> None:
    config = toy.ToyConfig(layers=1, dim=32, heads=2, batch_size=4, warmup=1)
    plain = toy.train(16, tmp_path / "a", steps=2, config=config, threads=1, progress=False)
    none = toy.train(16, tmp_path / "b", steps=2, config=config, rope="none", threads=1, progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (plain / name).read_bytes() == (none / name).read_bytes(), name


@pytest.mark.parametrize(("spec", "words"), [
    ("leaky-rerope:k=0", ["k=0 is not valid", "> 0"]),
    ("leaky-rerope:k=-2", ["k=-2 is not valid", "> 0"]),
    ("dynamic-ntk:factor=4", ["dynamic-ntk depends on the length of each forward", "--context 16"]),
    ("pi", ["give factor=…", "no target length"]),
    ("ropy", ["unknown RoPE variant 'ropy'"]),
])
def test_train_refuses_specs_that_cannot_train_in_one_line(tmp_path: Path, spec: str, words: list[str]) -> None:
    out = tmp_path / "never"
    result = runner.invoke(toy.toy_app, ["train", "--context", "16", "--out", str(out), "--steps", "1", *TINY,
                                         "--rope", spec], env={"COLUMNS": "400"})
    assert result.exit_code == 2 and result.output.startswith("Error:") and result.output.count("\n") == 1
    for word in words:
        assert word in result.output
    assert not out.exists(), "refused before any work"


def test_heldout_corpus_is_the_text_training_never_sees() -> None:
    from pydoc_data.topics import topics

    from lctx import data, evals

    train_text, held_out = toy.corpus()
    corpus = data.corpus("pydoc-heldout")
    parts = [doc.text for doc in corpus.documents(32)]
    assert len(parts) == 32 and "".join(parts) == held_out and len({len(p) for p in parts[:-1]}) == 1
    assert train_text + held_out == "".join(topics[key] for key in sorted(topics))
    assert "never trained on" in corpus.describe(32)
    (ppl,) = evals.resolve(["ppl:data=pydoc-heldout"])
    assert ppl.identity()["data"] == "pydoc-heldout"
