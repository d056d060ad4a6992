"""The lm-eval bridge, offline: local task YAMLs over local JSON files, the tiny random Llama.

References are computed here from the model's own logits with lm-eval's documented request encoding (the
context's trailing spaces move to the continuation; inputs are left-truncated to ``max_length`` + 1 tokens).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager
from rich.console import Console
from typer.testing import CliRunner

from lctx import cli, evals, models, patches, results, view
from lctx.engine import greedy
from lctx.evals import TaskError
from lctx.evals import lm_eval_bridge as bridge
from lctx.execute import run
from lctx.options import RunOptions

LONG = " ".join(["The interpreter reads the statement, then it evaluates the expression in order."] * 4)
MC_DOCS = [
    {"question": "The keyword that defines a function is", "choices": ["def", "class", "lambda"], "answer": 0},
    {"question": "A list is written with", "choices": ["square brackets", "braces", "quotes"], "answer": 0},
    {"question": LONG + " So the value None is", "choices": ["a singleton", "a number", "a string"], "answer": 0},
    {"question": "Exceptions are raised with the statement ", "choices": ["raise", "throw", "yield"], "answer": 1},
]
GEN_DOCS = [{"prompt": "Repeat after me: abc abc abc", "answer": "abc"},
            {"prompt": " ".join([LONG] * 3) + " Now say the word:", "answer": "class"}]
MAX_GEN = 6


def write_task(directory: Path, name: str, docs: list[dict], body: str) -> None:
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A multiple-choice and a generation task, as lm-eval YAMLs over local JSON-lines files."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    write_task(directory, "lctx_mc", MC_DOCS, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
               'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
               "    aggregation: mean\n    higher_is_better: true\n")
    write_task(directory, "lctx_gen", GEN_DOCS, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
               'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
               f"  max_gen_toks: {MAX_GEN}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
               "    aggregation: mean\n    higher_is_better: true\n")
    return directory


@pytest.fixture(scope="module")
def manager(task_dir) -> TaskManager:
    return TaskManager(include_path=str(task_dir), include_defaults=False)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return models.load(str(tiny_model_dir), dtype="float32", device="cpu")


def reference_ll(loaded, context: str, continuation: str, max_length: int = 10**9) -> float:
    """Log-probability of ``continuation`` after ``context``, encoded and truncated as lm-eval does."""
    tok = loaded.tokenizer
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation)["input_ids"]
    head = tok(context)["input_ids"]
    cont = whole[len(head):]
    inp = (head + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([inp])).logits[0, -len(cont):]
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[i, t] for i, t in enumerate(cont)))


def reference_accuracy(loaded, rope: str, max_length: int = 10**9) -> tuple[float, list[list[float]]]:
    with patches.apply(loaded.model, rope):
        lls = [[reference_ll(loaded, d["question"], " " + c, max_length) for c in d["choices"]] for d in MC_DOCS]
    right = [max(range(len(ll)), key=ll.__getitem__) == d["answer"] for ll, d in zip(lls, MC_DOCS, strict=True)]
    return sum(right) / len(right), lls


def evaluate(model, manager, tasks, **kwargs) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, **kwargs)


def logged_lls(out: dict, task: str = "lctx_mc") -> list[list[float]]:
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[ll for ll, _ in s["filtered_resps"]] for s in samples]


# ---- the model class --------------------------------------------------------------------------------------


def test_registered_under_lctx_and_none_equals_plain_hflm(tiny_model_dir, manager):
    assert get_model("lctx") is bridge.LctxLM and issubclass(bridge.LctxLM, get_model("hf"))
    ours = evaluate("lctx", manager, ["lctx_mc"], model_args=f"pretrained={tiny_model_dir},rope=none,device=cpu")
    plain = evaluate("hf", manager, ["lctx_mc"], model_args=f"pretrained={tiny_model_dir},device=cpu,dtype=float32")
    assert logged_lls(ours) == logged_lls(plain)
    assert ours["results"]["lctx_mc"]["acc,none"] == plain["results"]["lctx_mc"]["acc,none"]
    assert ours["config"]["lctx_rope"] == "none:logn=false"


def test_a_variant_changes_the_loglikelihoods_as_the_patch_does(loaded, manager):
    with bridge.LctxLM(loaded, rope="pi:factor=4") as lm:
        out = evaluate(lm, manager, ["lctx_mc"])
    expected_acc, expected = reference_accuracy(loaded, "pi:factor=4")
    assert torch.allclose(torch.tensor(logged_lls(out)), torch.tensor(expected), atol=1e-4)
    _, unpatched = reference_accuracy(loaded, "none")
    assert (torch.tensor(logged_lls(out)) - torch.tensor(unpatched)).abs().max() > 5e-3  # 50x the tolerance above
    assert out["results"]["lctx_mc"]["acc,none"] == expected_acc  # recomputed from the model's own logits


def test_closing_restores_the_model_bit_exactly(loaded):
    ids = torch.tensor([loaded.tokenizer("The interpreter reads the statement.")["input_ids"]])
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
        lm = bridge.LctxLM(loaded, rope="yarn:factor=4")
        patched = loaded.model(input_ids=ids).logits
        lm.close()
        after = loaded.model(input_ids=ids).logits
    assert not torch.equal(before, patched) and torch.equal(before, after)


def dynamic_inv_freq(length: int, factor: float, train_len: int, theta: float, dim: int) -> torch.Tensor:
    """Dynamic NTK's frequencies, from its formula: b' = b·((s·ℓ/L) − (s − 1))^(d/(d−2)) past L."""
    base = theta if length <= train_len else theta * ((factor * length / train_len) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def test_dynamic_scaling_per_request_and_frozen_for_generation(loaded, manager):
    rotary = loaded.model.model.rotary_emb
    seen: list[torch.Tensor] = []
    hook = rotary.register_forward_hook(lambda module, args, output: seen.append(module.inv_freq.double().clone()))
    dim = 2 * rotary.inv_freq.numel()
    try:
        with bridge.LctxLM(loaded, rope="dynamic-ntk:factor=4", max_length=1024) as lm:
            generated = evaluate(lm, manager, ["lctx_gen"])
            prompt = len(loaded.tokenizer(GEN_DOCS[1]["prompt"])["input_ids"])
            assert prompt > loaded.train_len  # the long prompt is past the training length: scaling is on
            frozen = dynamic_inv_freq(prompt + MAX_GEN, 4.0, loaded.train_len, 10000.0, dim)
            assert any(torch.allclose(f, frozen, rtol=1e-6) for f in seen)  # prefill and decoding: prompt + new
            assert not any(torch.allclose(f, dynamic_inv_freq(prompt, 4.0, loaded.train_len, 10000.0, dim),
                                          rtol=1e-6) for f in seen)
            seen.clear()
            context = " ".join([LONG] * 3)
            request = len(loaded.tokenizer(context + " x")["input_ids"]) - 1  # the forward drops the last token
            ll = lm.loglikelihood([Instance("loglikelihood", {}, (context, " x"), 0)])[0][0]
            assert request > loaded.train_len
            assert torch.allclose(seen[-1], dynamic_inv_freq(request, 4.0, loaded.train_len, 10000.0, dim), rtol=1e-6)
        with patches.apply(loaded.model, "dynamic-ntk:factor=4"):
            assert ll == pytest.approx(reference_ll(loaded, context, " x"), abs=1e-4)
        with patches.apply(loaded.model, "dynamic-ntk:factor=4", seq_len=prompt + MAX_GEN):
            ids = loaded.tokenizer(GEN_DOCS[1]["prompt"])["input_ids"]
            tokens = greedy(loaded.model, ids, MAX_GEN, {loaded.tokenizer.eos_token_id})
            expected = loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        response = next(s for s in generated["samples"]["lctx_gen"] if s["doc_id"] == 1)["resps"][0][0]
        assert response == expected.split("\n")[0]
    finally:
        hook.remove()


def test_bad_model_arguments_are_named(tiny_model_dir):
    with pytest.raises(bridge.ModelArgError, match=r"unknown model argument\(s\) 'ropee'\. Valid: pretrained, rope, "):
        bridge.LctxLM(str(tiny_model_dir), ropee="yarn:factor=4")
    with pytest.raises(patches.SpecError, match=r"unknown RoPE variant 'warp'\. Valid variants: .*yarn"):
        bridge.LctxLM(str(tiny_model_dir), rope="warp", device="cpu")
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        bridge.LctxLM("./no/such/model")
    lm = bridge.LctxLM(str(tiny_model_dir), rope=None, device="cuda:0", target_len=512)  # lm-eval's "none" → None
    assert lm.spec.canonical == "none:logn=false" and lm.max_length == 512 and lm.device.type == "cpu"
    lm.close()


# ---- lm-eval tasks in lctx eval ---------------------------------------------------------------------------


def test_lctx_eval_stores_lm_eval_metrics_per_length(tiny_model_dir, task_dir, loaded, tmp_path):
    out = tmp_path / "results"
    result = CliRunner().invoke(cli.app, [
        "eval", "--model", str(tiny_model_dir), "--rope", "pi:factor=4", "--task", "lm-eval:lctx_mc,lctx_gen",
        "--data-dir", str(task_dir), "--lengths", "64,512", "--dtype", "float32", "--device", "cpu",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = {(r["task"], r["rope"], r["length"]): r for r in view.newest(results.Store(out).read())}
    assert len(records) == 4 and all(r["status"] == "ok" for r in records.values())
    long_doc = len(loaded.tokenizer(MC_DOCS[2]["question"] + " a singleton")["input_ids"])
    assert long_doc > 64  # so the 64-token cell truncates it
    for rope in ("pi:factor=4",):
        canonical = patches.parse(rope).resolve(loaded.train_len).canonical
        for length in (64, 512):
            record = records[("lm-eval:lctx_mc", canonical, length)]
            expected, _ = reference_accuracy(loaded, rope, max_length=length)
            assert record["metrics"]["acc"] == pytest.approx(expected)
            assert record["metrics"]["score"] == record["metrics"]["acc"] and record["data"]["score_metric"] == "acc"
            assert record["data"]["max_length"] == length and record["data"]["documents"] == {"lctx_mc": 4}
            assert record["config"]["include"] == str(task_dir.resolve())
            generated = records[("lm-eval:lctx_gen", canonical, length)]
            assert generated["metrics"]["score"] == generated["metrics"]["exact_match"]
            assert 0 <= generated["metrics"]["exact_match"] <= 1


def test_lm_eval_task_errors_are_specific(task_dir, tmp_path):
    with pytest.raises(TaskError, match=r"lm-eval:lctx_mc: num_fewshot=some is not valid: num_fewshot \(int ≥ 0"):
        evals.resolve("lm-eval:lctx_mc", {"num_fewshot": "some"})
    with pytest.raises(TaskError, match=r"data_dir '.*missing' is not a directory"):
        evals.resolve("lm-eval:lctx_mc", {"data_dir": str(tmp_path / "missing")})
    (task,) = evals.resolve("lm-eval:lctx_mc:num_fewshot=2", {"data_dir": str(task_dir)})
    assert task.spec == f"lm-eval:lctx_mc:seed=0:chat_template=false:num_fewshot=2:batch_size=1:include={task_dir}"


def test_importing_lctx_does_not_import_lm_eval():
    import subprocess
    import sys

    code = ("import sys; import lctx.evals, lctx.cli, lctx.view, lctx.execute; lctx.evals.resolve('lm-eval:x,ppl'); "
            "lctx.evals.listed(); print('lm_eval' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


def test_flatten_and_headline_follow_lm_eval_naming():
    entry = {"alias": "gsm", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
             "word_perplexity,none": 12.0, "acc,none": 0.5, "acc_stderr,none": "N/A", "sample_len": 4}
    flat = bridge.flatten(entry)
    assert flat == {"exact_match:strict-match": 0.25, "exact_match_stderr:strict-match": 0.1,
                    "word_perplexity": 12.0, "acc": 0.5}
    assert bridge.headline(flat, {"exact_match": True, "word_perplexity": False, "acc": True}) == \
        "exact_match:strict-match"
    assert bridge.headline({"word_perplexity": 12.0}, {"word_perplexity": False}) is None


# ---- lctx lm-eval ------------------------------------------------------------------------------------------


def test_lctx_lm_eval_hands_arguments_to_lm_eval_unchanged():
    result = CliRunner().invoke(cli.app, ["lm-eval", "--help"])
    assert result.exit_code == 0 and "Language Model Evaluation Harness" in result.output
    result = CliRunner().invoke(cli.app, ["lm-eval", "run", "--no-such-flag"])
    assert result.exit_code == 2


@pytest.mark.slow  # lm-eval's CLI indexes its ~15k built-in tasks first (~15 s of CPU)
def test_lctx_lm_eval_runs_a_task_under_a_variant(tiny_model_dir, task_dir, loaded, tmp_path, capsys):
    code = bridge.cli(["run", "--model", "lctx", "--model_args",
                       f"pretrained={tiny_model_dir},rope=pi:factor=4", "--device", "cpu", "--tasks", "lctx_mc",
                       "--include_path", str(task_dir), "--output_path", str(tmp_path / "out")])
    assert code == 0
    (written,) = (tmp_path / "out").rglob("results_*.json")
    saved = json.loads(written.read_text())
    expected, _ = reference_accuracy(loaded, "pi:factor=4")
    assert math.isclose(saved["results"]["lctx_mc"]["acc,none"], expected)
    assert saved["config"]["lctx_rope"] == "pi:factor=4:logn=false"
    assert "lctx_mc" in capsys.readouterr().out  # lm-eval's own results table
    # a name neither the --data-dir YAMLs nor lm-eval's own tasks have (lm-eval's index is built by now)
    with pytest.raises(TaskError, match=r"unknown lm-eval task 'lctx_mcq'; close: lctx_mc.*has no such task YAML"):
        bridge.task_manager(task_dir, "lctx_mcq")


def test_samples_limit_the_documents_and_tables_show_the_score(tiny_model_dir, task_dir, loaded, tmp_path):
    opts = RunOptions(models=[str(tiny_model_dir)], ropes=["none"], tasks=["lm-eval:lctx_mc"], lengths=[512],
                      task_defaults={"data_dir": str(task_dir), "samples": 2}, out=tmp_path, dtype="float32",
                      device="cpu", report=False)
    console = Console(record=True, width=300)
    assert run(opts, console).code == 0
    (record,) = view.newest(results.Store(tmp_path).read())
    assert record["config"]["samples"] == 2 and record["data"]["documents"] == {"lctx_mc": 2}
    _, lls = reference_accuracy(loaded, "none")
    first_two = [max(range(3), key=ll.__getitem__) == d["answer"] for ll, d in zip(lls[:2], MC_DOCS, strict=False)]
    assert record["metrics"]["score"] == record["metrics"]["acc"] == sum(first_two) / 2
    output = console.export_text()
    score = view.tables.format_number(record["metrics"]["score"], evals.Metric("score", True))
    assert f"lm-eval:lctx_mc · none · 0.5k: score {score}" in output
    assert re.search(rf"│ none\s+│ {score} │", output)  # the table tabulates the score
