"""The up-front memory estimate against real models, and the --max-memory guard of `lctx eval`."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCHS, tiny_model
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import DynamicCache
from typer.testing import CliRunner

from lctx import memory, patches
from lctx.cli import app

TOY = "tests/data/toy-byte-128"


@pytest.mark.parametrize(("text", "expected"), [("3GiB", 3 * 2**30), ("2.5G", int(2.5 * 2**30)),
                                                 ("800MiB", 800 * 2**20), ("24GB", 24 * 10**9), ("4096", 4096)])
def test_sizes_parse(text: str, expected: int) -> None:
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["3XB", "lots", "-1G", "0GiB"])
def test_bad_sizes_name_the_value_and_the_forms(text: str) -> None:
    with pytest.raises(memory.SizeError, match=rf"--max-memory '{text}'.*(3GiB|positive)"):
        memory.parse_size(text)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_equals_the_models(arch: str) -> None:
    model = tiny_model(arch)
    assert memory.parameters(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "gemma"])
def test_formula_fallback_is_exact_for_bias_free_gated_decoders(arch: str) -> None:
    model = tiny_model(arch)
    assert memory.formula_parameters(model.config) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_kv_cache_estimate_equals_the_filled_cache(arch: str) -> None:
    model = tiny_model(arch)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.randint(3, 128, (1, 300)), cache=cache, use_cache=True)
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    assert memory.estimate(model.config, 300, profile="prefill").cache == sum(t.nbytes for t in tensors)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors created inside the block and still alive (storages tracked by weak refs)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                self.storages.setdefault(storage.data_ptr(), (StorageWeakRef(storage), storage.nbytes()))
        self.storages = {k: v for k, v in self.storages.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.storages.values()))
        return out


@pytest.mark.parametrize(("spec", "chunked"), [("none", False), ("rerope:window=64", True)])
def test_activation_estimate_bounds_the_live_tensors_of_a_forward(spec: str, chunked: bool) -> None:
    """Hidden states of a 1024-token forward: what ppl keeps; the estimate must cover it without doubling it."""
    model = tiny_model("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=3)
    ids = torch.randint(3, 128, (1, 1024))
    with torch.inference_mode(), patches.apply(model, spec, train_len=64):
        with LiveBytes() as live:
            model.model(ids, use_cache=False)
    estimate = memory.estimate(model.config, 1024, profile="loss", chunked=chunked)
    assert live.peak <= estimate.activations + estimate.attention <= 2 * live.peak, (live.peak, estimate)


def test_estimates_by_profile_and_attention() -> None:
    model = tiny_model("llama")
    config, n = model.config, 2048
    loss, prefill, logits = (memory.estimate(config, n, profile=p) for p in memory.PROFILES)
    assert (loss.cache, prefill.cache, logits.cache) == (0, prefill.cache, 0) and prefill.cache > 0
    assert (loss.logits, prefill.logits, logits.logits) == (1024 * 2 * 128 * 4, 128 * 4, n * 2 * 128 * 4)
    assert memory.estimate(config, n, attention="eager").attention == 2 * 4 * n * n * 4  # heads × n² fp32, twice
    assert memory.estimate(config, n, batch=3).cache == 3 * prefill.cache
    assert memory.estimate(config, n, dtype_bytes=2).weights == prefill.weights // 2
    with pytest.raises(ValueError, match="memory profile 'full'.*loss, prefill, logits"):
        memory.estimate(config, n, profile="full")


def eval_args(out, *extra: str) -> list[str]:
    return ["eval", "--model", TOY, "--rope", "none,rerope", "--task", "ppl,passkey", "--lengths", "256,512",
            "--depths", "0.5", "--samples", "1", "--out", str(out), *extra]


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_max_memory_skips_cells_over_budget_and_a_larger_budget_runs_them(tmp_path) -> None:
    runner = CliRunner()
    budget = memory.estimate(_toy_config(), 512, profile="prefill").total - 1  # only passkey at 512 is over it
    result = runner.invoke(app, eval_args(tmp_path, "--max-memory", str(budget)))
    assert result.exit_code == 0, result.output
    assert "memory estimate: largest cell passkey" in result.output
    first = records(tmp_path)
    skipped = [r for r in first if r.get("over_budget")]
    assert {(r["task"], r["length"]) for r in skipped} == {("passkey", 512)}
    for r in skipped:
        assert r["status"] == "oom" and r["metrics"] == {} and r["seconds"] == 0
        assert r["error"].startswith("MemoryBudgetExceeded: estimated") and "> --max-memory" in r["error"]
        assert r["memory_estimate_bytes"] > budget
    ok = [r for r in first if r["status"] == "ok"]
    assert len(ok) == 6 and all(r["memory_estimate_bytes"] <= budget for r in ok)
    assert all(r["process_peak_bytes"] >= r["peak_memory_bytes"] for r in ok)

    again = runner.invoke(app, eval_args(tmp_path))  # no budget: only the skipped cells are computed
    assert again.exit_code == 0, again.output
    assert "6 already recorded" in again.output and "2 to compute" in again.output
    latest = {(r["task"], r["rope"], r["length"]): r for r in records(tmp_path)}
    assert all(r["status"] == "ok" for r in latest.values()) and len(latest) == 8


def test_bad_max_memory_is_a_usage_error(tmp_path) -> None:
    result = CliRunner().invoke(app, eval_args(tmp_path, "--max-memory", "3XB"))
    assert result.exit_code == 2
    assert "'3XB' is not a size" in result.output and not (tmp_path / "records.jsonl").exists()


def _toy_config():
    from lctx import models

    return models.load_config(TOY)


@pytest.mark.parametrize(("chunk", "batch"), [(None, 1), (256, 1), (None, 3), (256, 3)])
def test_prefill_estimate_bounds_the_live_tensors_with_and_without_chunks(chunk: int | None, batch: int) -> None:
    """A cached prefill (what generation tasks run): activations, KV cache and the chunk's mask, per batch row."""
    from lctx.engine import prefill

    model = tiny_model("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=3)
    ids = [torch.randint(3, 128, (1024,)).tolist() for _ in range(batch)]
    with LiveBytes() as live:
        out = prefill(model, ids, chunk)
    del out
    e = memory.estimate(model.config, 1024, profile="prefill", prefill_chunk=chunk, batch=batch)
    assert live.peak <= e.total - e.weights <= 2 * live.peak, (live.peak, e)


def test_over_budget_generation_cells_suggest_prefill_chunks_that_fit(tmp_path, monkeypatch) -> None:
    from lctx import plan
    from lctx.execute import local

    monkeypatch.setattr(plan, "HINT_CHUNK", 128)
    monkeypatch.setattr(local, "HINT_CHUNK", 128)
    whole = memory.estimate(_toy_config(), 512, profile="prefill").total
    chunked = memory.estimate(_toy_config(), 512, profile="prefill", prefill_chunk=128).total
    assert chunked < whole
    args = ["eval", "--model", TOY, "--rope", "none", "--task", "passkey", "--lengths", "512", "--depths", "0.5",
            "--samples", "1", "--out", str(tmp_path), "--max-memory", str(chunked)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (record,) = records(tmp_path)
    assert record["over_budget"] and "(with --prefill-chunk 128: " in record["error"]
    result = CliRunner().invoke(app, [*args, "--prefill-chunk", "128"])
    assert result.exit_code == 0, result.output
    latest = records(tmp_path)[-1]
    assert latest["status"] == "ok" and latest["memory_estimate_bytes"] == chunked and "over_budget" not in latest
    result = CliRunner().invoke(app, [*args, "--prefill-chunk", "128", "--batch-size", "3", "--force"])
    assert result.exit_code == 0, result.output
    assert records(tmp_path)[-1]["memory_estimate_bytes"] == memory.estimate(
        _toy_config(), 512, profile="prefill", prefill_chunk=128, batch=3).total > chunked


def test_decoding_keeps_within_the_prefill_estimate() -> None:
    """Greedy decoding writes into the reserved cache: no step holds a second copy of it."""
    from lctx.engine import greedy

    model = tiny_model("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=3)
    ids = torch.randint(3, 128, (1024,)).tolist()
    with LiveBytes() as live:
        greedy(model, ids, 8, set())
    e = memory.estimate(model.config, 1024 + 8, profile="prefill")
    assert live.peak <= e.total - e.weights <= 2 * live.peak, (live.peak, e)
