"""`lctx analyze`: Men et al.'s base bound against brute force and the paper, frequencies against patched models,
position maps against the attention patches, the decay bound against a direct sum, and the command line."""

from __future__ import annotations

import cmath
import json
import math
import time

import numpy as np
import pytest
import torch
from tiny import ARCHS, TRAIN_LEN, tiny_config, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from lctx import analyze, patches
from lctx.analyze import bound
from lctx.cli import app
from lctx.patches import rerope
from lctx.patches.arch import rope_info, rotary_modules

runner = CliRunner()
WIDE = {"COLUMNS": "1000", "HF_HUB_OFFLINE": "1"}


def _b_min(base: float, d: int, length: int, theta: np.ndarray | None = None) -> float:
    """min over m in [0, length] of Σ_i cos(m·θ_i), θ_i = base^(−2i/d) unless given, directly."""
    m = np.arange(length + 1, dtype=np.float64)
    theta = base ** (-np.arange(0, d, 2) / d) if theta is None else theta
    return float(np.cos(np.outer(m, theta)).sum(1).min())


def _brute_force(d: int, length: int, k_max: int) -> tuple[int | None, int]:
    """(first admissible k, 1 + last inadmissible k) over the grid 1.001^k, k = 1 … k_max, one base at a time."""
    admissible = [_b_min(1.001 ** k, d, length) >= 0 for k in range(1, k_max + 1)]
    first = next((k for k, ok in enumerate(admissible, 1) if ok), None)
    last_bad = max((k for k, ok in enumerate(admissible, 1) if not ok), default=0)
    return first, last_bad + 1


def _k(base: float | None) -> int | None:
    return None if base is None else round(math.log(base) / math.log(bound.RATIO))


@pytest.mark.parametrize(("d", "length"), [(4, 10), (8, 50), (16, 200), (32, 256), (6, 3)])
def test_bound_matches_brute_force(d: int, length: int) -> None:
    result = bound.base_bound(d, length)
    k_max = _k(result.certified) + 1500  # brute force scans well past where the bound proves every base
    assert (_k(result.lower), _k(result.stable)) == _brute_force(d, length, k_max)
    assert result.lower <= result.stable <= result.certified
    rng = np.random.default_rng(0)  # the proof covers every base beyond `certified`, on the grid or not
    for base in result.certified * np.exp(rng.uniform(0, 8, size=20)):
        assert _b_min(base, d, length) >= 0


def test_bound_with_no_admissible_base() -> None:
    result = bound.base_bound(2, 5)  # B(m) = cos m whatever the base
    assert (result.lower, result.stable, result.certified) == (None, None, None)


def test_bound_matches_the_papers_figures_for_head_dim_128() -> None:
    """Men et al. 2024, Table 1: about 4.3e3 at 1k tokens and 8.4e4 at 8k for d = 128."""
    for length, paper in [(1024, 4.3e3), (8192, 8.4e4)]:
        result = bound.base_bound(128, length)
        assert result.lower == pytest.approx(paper, rel=0.03)
        assert _b_min(result.lower, 128, length) >= 0
        assert _b_min(result.lower / bound.RATIO, 128, length) < 0
        assert result.stable > result.lower  # B is not monotone in the base: windows lie between the two


def test_bound_at_128k_takes_seconds() -> None:
    started = time.perf_counter()
    result = bound.base_bound.__wrapped__(128, 131072)  # uncached
    assert time.perf_counter() - started < 30
    assert 1e6 < result.lower < result.stable < result.certified


def test_smollm2_bound_claims_hold() -> None:
    """The default model (d = 64, base 1e5, trained to 8k) against direct checks of each claim at 8k."""
    try:
        source = analyze.load_source("smollm2-135m")
    except analyze.USAGE_ERRORS as err:
        pytest.skip(f"default model unavailable: {err}")
    info = source.info
    assert (info.theta, info.rotary_dim, info.train_len) == (1e5, 64, 8192)
    result = bound.base_bound(64, 8192)
    assert _b_min(result.lower, 64, 8192) >= 0 > _b_min(result.lower / bound.RATIO, 64, 8192)
    assert _b_min(result.stable / bound.RATIO, 64, 8192) < 0
    for k in np.linspace(_k(result.stable), _k(result.certified), 12).round():
        assert _b_min(bound.RATIO ** k, 64, 8192) >= 0
    assert info.theta < result.lower  # SmolLM2's base is below the bound at its own training length
    assert _b_min(info.theta, 64, 8192) < 0


def test_b_values_matches_a_direct_sum() -> None:
    theta = bound.frequencies(torch.tensor([500.0, 1e4, 3e7]), 32)
    got = bound.b_values(theta, 37, 5000)
    m = np.arange(37, 5001, dtype=np.float64)
    for row, base in zip(got, (500.0, 1e4, 3e7), strict=True):
        expected = np.cos(np.outer(m, base ** (-np.arange(0, 32, 2) / 32))).sum(1)
        np.testing.assert_allclose(row.numpy(), expected, atol=1e-9)


def test_decay_matches_a_direct_sum() -> None:
    d, base = 16, 10000.0
    theta = [base ** (-2 * i / d) for i in range(d // 2)]
    distances = [0, 1, 7, 100, 2500.5]
    got = bound.su_decay(torch.tensor(theta, dtype=torch.float64), torch.tensor(distances))
    for m, value in zip(distances, got.tolist(), strict=True):
        partial, total = 0j, 0.0
        for t in theta:
            partial += cmath.exp(1j * m * t)
            total += abs(partial)
        assert value == pytest.approx(total / (d // 2), rel=1e-12)
    assert got[0] == pytest.approx((d // 2 + 1) / 2)  # |S_j| = j at m = 0
    assert got[3] < got[1]  # it decays


# ---- frequencies: the same bits a patched model holds ---------------------------------------------------------

FREQUENCY_SPECS = ["pi:factor=4", "pi", "ntk:alpha=3", "ntk", "ntk-mixed:factor=4", "dynamic-ntk:factor=2",
                   "ntk-by-parts:factor=4", "yarn:factor=4:beta_fast=16", "yarn", "dynamic-yarn",
                   "llama3:factor=4", "base:theta=50000", "none"]


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_info_from_config_matches_the_loaded_model(arch: str) -> None:
    config = tiny_config(arch)
    from_config, rope_type = analyze.rope_info_from_config(config)
    loaded = rope_info(tiny_model(arch))
    assert rope_type == "default"
    for field in ("theta", "rotary_dim", "head_dim", "train_len", "attention_scaling"):
        assert getattr(from_config, field) == getattr(loaded, field), field
    assert torch.equal(from_config.inv_freq, loaded.inv_freq)


@pytest.mark.parametrize("text", FREQUENCY_SPECS)
def test_effective_theta_is_what_the_patched_rotary_module_holds(text: str) -> None:
    length = 4 * TRAIN_LEN
    model = tiny_model("llama")
    source = analyze.Source("tiny", "directory", *analyze.rope_info_from_config(model.config))
    applied = analyze.apply_variant(source, patches.parse(text), length)
    (rotary,) = rotary_modules(model)
    with patches.apply(model, text, target_len=length, seq_len=length) as resolved:
        assert resolved == applied.spec
        assert torch.equal(applied.theta.float(), rotary.inv_freq)
        assert applied.attention_scaling == rotary.attention_scaling


def test_model_with_its_own_scaling_keeps_it_under_none() -> None:
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=512, rope_parameters=rope)
    model = LlamaForCausalLM(config)
    info, rope_type = analyze.rope_info_from_config(config)
    assert (rope_type, info.train_len, info.theta) == ("llama3", 64, 500000.0)
    assert torch.equal(info.inv_freq, rotary_modules(model)[0].inv_freq)
    assert not torch.equal(info.inv_freq, torch.tensor(500000.0) ** (-torch.arange(0, 32, 2) / 32))


def test_position_maps_match_the_attention_patches() -> None:
    """fq(i) − gk(j) of lctx's attention variants, for every pair beyond the window, is the analysed position."""
    far = {"rerope": rerope._rerope_far, "leaky-rerope": rerope._leaky_far, "self-extend": rerope._self_extend_far}
    pos = torch.arange(300)
    for text in ["rerope:window=40", "leaky-rerope:window=40:k=6", "leaky-rerope:window=40:k=0.25",
                 "self-extend:window=40:group=8"]:
        spec = patches.parse(text).resolve(256)
        fq, gk = far[spec.name](pos, pos, spec.kwargs)
        for j in (0, 8, 16):  # SelfExtend depends on where the key sits in its group: j a multiple of G here
            i = pos[pos - j >= 40]
            expected = (fq[i] - gk[j]).double()
            assert torch.allclose(analyze.relative_position(spec, (i - j).double()), expected), (text, j)
        near = torch.arange(40.0)
        assert torch.equal(analyze.relative_position(spec, near), near)


# ---- what reaches a length ------------------------------------------------------------------------------------


def test_reach_parameters_do_what_they_say() -> None:
    source = analyze.what_if(10000.0, 32, 256)
    analysis = analyze.analyze(source, [1024], [("ntk", patches.parse("ntk"))])
    reach = analysis["reach"][0]
    assert reach["factor"] == 4 and reach["specs"]["yarn"] == "yarn:factor=4"

    def ood_pairs(alpha: float) -> int:
        at = analyze.analyze(source, [1024], [("x", patches.parse(f"ntk:alpha={alpha}"))])["variants"][0]["at"][0]
        return at["ood_pairs"]

    assert ood_pairs(reach["ntk_alpha"]) == 0 < ood_pairs(reach["ntk_alpha"] / 1.05)
    assert analysis["variants"][0]["at"][0]["ood_pairs"] > 0  # plain NTK (α = factor) leaves some out
    base = reach["base_for_bound"]
    assert _b_min(base, 32, 1024) >= 0
    assert _b_min(10000.0 * reach["ntk_alpha_for_bound"] ** (32 / 30), 32, 1024) >= 0


def test_analysis_of_a_what_if() -> None:
    source = analyze.what_if(10000.0, 128, 4096)
    ropes = [(t, patches.parse(t)) for t in ["pi", "rerope", "leaky-rerope:k=8", "none"]]
    analysis = analyze.analyze(source, [4096, 16384], ropes)
    assert analysis["dimensions"]["critical_dimension"] == 92  # Liu et al.'s figure for Llama 2 (4k, base 1e4)
    assert [v["label"] for v in analysis["variants"]] == ["pi", "rerope", "leaky-rerope:k=8"]  # none = the model
    model, pi = analysis["model"][1], analysis["variants"][0]["at"][1]
    assert model["ood_pairs"] == 64 - 46 and pi["ood_pairs"] == 0
    assert pi["effective_base"] == pytest.approx(10000 * 4 ** (64 / 63), rel=1e-5)
    held = source.info.inv_freq.double().numpy()  # the float32 frequencies a model holds
    assert model["b_min"] == pytest.approx(_b_min(0, 128, 16384, held), abs=1e-5)
    assert not model["admissible"] and model["meets_lower_bound"] is False
    leaky = analysis["variants"][2]["at"][1]
    assert leaky["max_position"] == 1024 + (16383 - 1024) / 8
    json.dumps(analysis)  # JSON-ready


# ---- command line ---------------------------------------------------------------------------------------------

WHAT_IF = ["analyze", "--theta", "10000", "--rotary-dim", "32", "--train-len", "256", "--lengths", "256,1k"]


def test_cli_json_parses_and_out_writes_everything(tmp_path) -> None:
    result = runner.invoke(app, [*WHAT_IF, "--rope", "yarn,rerope", "--json", "--out", str(tmp_path)], env=WIDE)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["schema"] == analyze.SCHEMA and printed["lengths"] == [256, 1024]
    assert printed == json.loads((tmp_path / "analysis.json").read_text())
    assert [f["stem"] for f in printed["figures"]] == ["analysis-wavelengths", "analysis-b", "analysis-decay"]
    for figure in printed["figures"]:
        for fmt in ("png", "svg", "pdf"):
            assert (tmp_path / figure["files"][fmt]).stat().st_size > 1000
    assert "Base lower bound" in (tmp_path / "analysis.md").read_text()


def test_cli_help_has_an_example() -> None:
    result = runner.invoke(app, ["analyze", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "Example: lctx analyze --model" in result.output


def test_cli_tables_on_a_config_directory(tmp_path) -> None:
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert config.head_dim == 128
    config.save_pretrained(tmp_path)
    result = runner.invoke(app, ["analyze", "--model", str(tmp_path), "--lengths", "1k", "--rope", "ntk"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "4.3e+03" in result.output and "critical dimension" in result.output


@pytest.mark.parametrize(("args", "words"), [
    (["--rope", "nosuch"], ["'nosuch'", "Valid variants", "yarn"]),
    (["--lengths", "12q"], ["'12q'", "1.5k"]),
    (["--lengths", "2m"], ["2097152", "1m"]),
    (["--model", "/no/such/dir"], ["'/no/such/dir'"]),
    (["--model", "x", "--theta", "5e5"], ["--model", "--theta", "conflicts"]),
    (["--theta", "5e5"], ["missing", "--rotary-dim", "--train-len"]),
    (["--theta", "abc", "--rotary-dim", "64", "--train-len", "4k"], ["--theta", "'abc'"]),
    (["--theta", "1", "--rotary-dim", "64", "--train-len", "4k"], ["--theta", "> 1"]),
    (["--theta", "1e4", "--rotary-dim", "7", "--train-len", "4k"], ["--rotary-dim", "even"]),
    (["--rope", "base"], ["base", "theta"]),
])
def test_cli_errors_are_one_line_with_exit_2(args: list[str], words: list[str]) -> None:
    result = runner.invoke(app, ["analyze", "--lengths", "1k", *args] if "--lengths" not in args
                           else ["analyze", *args], env=WIDE)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    for word in words:
        assert word in result.output, (word, result.output)


def test_report_shows_an_analysis_found_in_the_results_directory(tmp_path) -> None:
    """lctx analyze --out <results>/analysis, then lctx report <results>: the dashboard gains the analysis."""
    from lctx import results, view

    out = tmp_path / "results"
    results.Store(out).append({"schema": 2, "model": "m", "rope": "none:logn=false", "task": "ppl", "length": 1024,
                               "depth": None, "train_len": 512, "dtype": "float32", "attn": "sdpa",
                               "config": {"samples": 1}, "status": "ok", "metrics": {"ppl": 3.0},
                               "finished_at": "2026-01-01T00:00:00"})
    done = CliRunner().invoke(app, ["analyze", "--theta", "10000", "--rotary-dim", "128", "--train-len", "512",
                                    "--lengths", "1k", "--rope", "yarn", "--out", str(out / "analysis")])
    assert done.exit_code == 0, done.output
    written = view.report(out, tmp_path / "report", draw=False)
    page = written.index.read_text()
    assert 'id="analysis"' in page and "base lower bound" in page
    assert page.count("data:image/svg+xml;base64,") == 3  # the analysis's three figures (no others drawn)
    assert "4.3e+03" in page  # d = 128 at 1024: Men et al.'s figure
