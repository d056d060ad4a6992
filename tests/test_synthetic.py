"""RULER-style synthetic tasks: exact lengths, answers checked in the decoded prompts, scoring, effective length."""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter

import pytest
from rich.console import Console

from lctx import data, engine, evals, patches, results, view
from lctx.engine import Engine
from lctx.evals import Cell, TaskError
from lctx.evals import synthetic as syn
from lctx.evals.synthetic import base
from lctx.execute import run
from lctx.options import RunOptions
from lctx.view import summaries

# lengths the tiny tokenizer (vocab 512, ~1.6 characters per token) can build every member at
SHORT = {"niah-single": 400, "niah-uuid": 500, "niah-multikey": 700, "niah-multivalue": 700,
         "niah-multiquery": 800, "kv-retrieval": 700, "variable-tracking": 1200, "common-words": 1500,
         "frequent-words": 700}


def member(name: str, **params) -> base.SyntheticTask:
    """``synthetic:<name>`` with these parameters (as --task-arg or a spec's key=value would give them)."""
    (task,) = evals.resolve(f"synthetic:{name}", params)
    return task


def light(tokenizer) -> Engine:
    """An engine without weights: prompt building needs only the tokenizer."""
    return Engine(None, tokenizer, 256)


def text(tokenizer, prompt: syn.Prompt) -> str:
    return tokenizer.decode(prompt.ids)


@pytest.fixture(scope="module")
def ctx(tiny_tokenizer) -> Engine:
    return light(tiny_tokenizer)


# ---- prompts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(syn.MEMBERS))
def test_every_member_is_exactly_the_length_and_seeded(ctx, tiny_tokenizer, name):
    task = member(name)
    for length in (SHORT[name], SHORT[name] + 777):
        prompts = [task.build(ctx, length, trial) for trial in range(3)]
        assert all(len(p.ids) == length for p in prompts)
        assert task.build(ctx, length, 1).ids == prompts[1].ids  # rebuilt identically
        assert len({tuple(p.ids) for p in prompts}) == 3  # trials differ
        assert prompts[0].ids[:1] == data.special_prefix(tiny_tokenizer)  # the tokenizer's BOS first
    other_seed = member(name, seed=7)
    assert other_seed.build(ctx, SHORT[name], 0).ids != task.build(ctx, SHORT[name], 0).ids


NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("name", ["niah-single", "niah-uuid", "niah-multikey", "niah-multivalue",
                                  "niah-multiquery"])
def test_niah_answers_are_the_values_of_the_asked_keys(ctx, tiny_tokenizer, name):
    task = member(name)
    for trial in range(3):
        prompt = task.build(ctx, SHORT[name] + 300, trial)
        decoded = text(tiny_tokenizer, prompt)
        found: dict[str, list[str]] = {}
        for kind, key, value in NEEDLE.findall(decoded):
            assert kind == task.args.value_type
            found.setdefault(key, []).append(value)
        assert len(found) == max(task.args.keys, task.args.queries)
        assert all(len(values) == task.args.values for values in found.values())
        query = re.search(r"\nWhat (?:is|are all) the special magic \w+ for (.+?) mentioned", decoded).group(1)
        asked = re.split(r", and |, ", query)
        assert len(asked) == task.args.queries and set(asked) <= set(found)
        expected = [v for key in asked for v in found[key]]
        assert sorted(prompt.answers) == sorted(expected)
        if task.args.value_type == "numbers":
            assert all(re.fullmatch(r"\d{7}", v) for v in expected)
        else:
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                       for v in expected)


def test_niah_wording_follows_ruler(ctx, tiny_tokenizer):
    single = text(tiny_tokenizer, member("niah-single").build(ctx, 600, 0))
    assert "A special magic number is hidden within the following text." in single
    assert single.endswith("mentioned in the provided text is")
    query = text(tiny_tokenizer, member("niah-multiquery").build(ctx, 900, 0)).rsplit("\n", 1)[1]
    assert re.match(r"What are all the special magic numbers for \S+, \S+, \S+, and \S+ mentioned", query)
    assert query.endswith("mentioned in the provided text are")


def test_kv_retrieval_is_a_haystack_of_key_value_needles(ctx, tiny_tokenizer):
    task = member("kv-retrieval")
    prompt = task.build(ctx, 2000, 0)
    decoded = text(tiny_tokenizer, prompt)
    pairs = NEEDLE.findall(decoded)
    assert len(pairs) == prompt.info["distractors"] + 1 and len(pairs) > 10
    asked = re.search(r"What is the special magic uuid for (\S+) mentioned", decoded).group(1)
    values = [value for _, key, value in pairs if key == asked]
    assert values == prompt.answers  # the asked key appears exactly once, with the answer
    assert "pydoc" not in json.dumps(task.identity())  # no corpus involved


def test_variable_tracking_answers_follow_the_chain(ctx, tiny_tokenizer):
    task = member("variable-tracking")
    for trial in range(3):
        prompt = task.build(ctx, 1800, trial)
        decoded = text(tiny_tokenizer, prompt)
        example, main = decoded.rsplit("Memorize and track the chain(s)", 1)
        assert re.search(r"they are: ([A-Z]{3} ){4}[A-Z]{3}\n\n$", example)  # RULER's worked example, answered
        value = re.search(r"assigned the value (\d+) in the text above", main).group(1)
        holds = {value}
        assignments = re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", main)
        assert len(assignments) == 5
        for name, source in assignments:  # in text order, as the chain was inserted
            if source.removeprefix("VAR ") in holds:
                holds.add(name)
        assert sorted(holds - {value}) == sorted(prompt.answers)
        assert f", 5 variables are assigned the value {value}, they are:" in main


@pytest.mark.parametrize("length,often,rarely", [(1500, 6, 1), (5000, 30, 3)])
def test_common_words_are_the_most_repeated_of_the_list(ctx, tiny_tokenizer, length, often, rarely):
    prompt = member("common-words").build(ctx, length, 0)
    decoded = text(tiny_tokenizer, prompt)
    main = decoded.rsplit("Below is a numbered list of words.", 1)[1].split("\nQuestion:")[0]
    items = re.findall(r" (\d+)\. ([a-z]+)", main)
    assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
    counts = Counter(word for _, word in items)
    top = [word for word, n in counts.items() if n == often]
    assert sorted(top) == sorted(prompt.answers) and len(top) == 10
    assert all(n == rarely for word, n in counts.items() if word not in top)
    assert prompt.info["rare_words"] == len(counts) - 10
    example = decoded.rsplit("Below is a numbered list of words.", 1)[0]
    assert not set(re.findall(r" \d+\. ([a-z]+)", example)) & set(counts)  # the example uses other words


def test_frequent_words_top_three_are_the_answers(ctx, tiny_tokenizer):
    for length in (700, 3000):
        prompt = member("frequent-words").build(ctx, length, 0)
        decoded = text(tiny_tokenizer, prompt)
        body = decoded.split("most frequently appeared coded words.", 1)[1].split("\nQuestion:")[0]
        counts = Counter(word for word in body.split() if word.strip("."))
        ranked = counts.most_common()
        assert sorted(w for w, _ in ranked[:3]) == sorted(prompt.answers)
        assert ranked[2][1] > ranked[3][1]  # the answer is unique
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)


def test_haystack_choices(tiny_tokenizer):
    engine = light(tiny_tokenizer)
    corpus = text(tiny_tokenizer, member("niah-single").build(engine, 900, 0))
    noise = text(tiny_tokenizer, member("niah-single", haystack="noise").build(engine, 900, 0))
    needles = member("niah-single", haystack="needles")
    assert "The grass is green." in noise and "The grass is green." not in corpus
    assert len(NEEDLE.findall(text(tiny_tokenizer, needles.build(engine, 900, 0)))) > 3
    topics = "".join(d.text for d in data.pydoc_corpus().documents(1))
    chunk = corpus.split("\n", 1)[1][:80]  # the haystack starts at a sentence of the corpus
    assert chunk.split(" One of the special")[0] in topics
    assert member("niah-single", haystack="noise").identity()["haystack"] == "noise"
    assert "data" not in member("niah-single", haystack="noise").identity()  # no corpus read, none recorded
    assert member("niah-single").identity()["data"] == "pydoc"
    assert member("variable-tracking").identity()["haystack"] == "noise"  # RULER's default for vt
    assert member("kv-retrieval:haystack=noise").build(engine, 900, 0).info["depths"]  # the preset can change


def test_chat_template_wraps_the_task_at_the_same_length(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<s>[USER] {{ m['content'] }} [/USER]{% endfor %}"
                               "{% if add_generation_prompt %} [BOT]{% endif %}")
    chat = light(tokenizer)
    prompt = member("niah-single", chat_template=True).build(chat, 700, 0)
    assert len(prompt.ids) == 700
    decoded = tokenizer.decode(prompt.ids)
    assert decoded.startswith("<s>[USER] A special magic number is hidden")
    assert "text? [/USER] [BOT]The special magic number for" in decoded
    assert decoded.count("<s>") == 1
    with pytest.raises(engine.ChatTemplateError, match="has no chat template"):
        member("niah-single", chat_template=True).build(light(tiny_tokenizer), 700, 0)


# ---- errors -----------------------------------------------------------------------------------------------


def test_bad_names_and_arguments_are_named(ctx):
    with pytest.raises(TaskError, match=r"unknown synthetic task 'needle'. Valid: synthetic:<niah-single\|"):
        evals.expand("synthetic:needle")
    assert evals.expand("synthetic:cwe") == [syn.MEMBERS["common-words"]]
    assert len(evals.expand("synthetic:all")) == 9
    assert [t.name for t in evals.resolve("synthetic:niah-single,fwe,ppl")] == [
        "synthetic:niah-single", "synthetic:frequent-words", "ppl"]
    with pytest.raises(TaskError, match=r"haystack=essay is not valid: haystack \(text one of corpus, noise, needles"):
        member("niah-single", haystack="essay")
    with pytest.raises(TaskError, match=r"haystack=needles is not valid: haystack \(text one of corpus, noise,"):
        member("variable-tracking", haystack="needles")
    with pytest.raises(TaskError, match=r"unknown parameter 'haystak'"):
        member("niah-single:haystak=noise")
    with pytest.raises(TaskError, match=r"no selected task has a parameter 'threshold'"):  # a report option now
        member("niah-single", threshold="50")
    with pytest.raises(TaskError, match=r"synthetic:niah-multiquery: length 150 is too short; the prompt without"):
        member("niah-multiquery").check(ctx, [Cell(150), Cell(1000)])
    with pytest.raises(TaskError, match=r"common-words: the 10 common words repeated 6× take \d+ tokens"):
        member("common-words").check(ctx, [Cell(700)])


def test_a_corpus_too_small_is_a_data_error(tiny_tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A short text. It has few words. " * 20)
    ctx = light(tiny_tokenizer)
    with pytest.raises(data.DataError, match=r"haystack needs \d+ tokens but .*small.txt.* has only \d+"):
        member("niah-single", data=str(small)).build(ctx, 2000, 0)
    with pytest.raises(data.DataError, match=r"the corpus has only \d+ distinct words"):
        member("common-words", data=str(small)).build(ctx, 1500, 0)


# ---- scoring ----------------------------------------------------------------------------------------------


def test_string_match_all_and_cell_metrics():
    assert base.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "1111111"]) == [True, False]
    assert base.string_match_all("ANSWER: Tashrm", ["tashrm"]) == [True]
    trials = [{"score": 1.0, "correct": True}, {"score": 0.5, "correct": False}, {"score": 0.0, "correct": False}]
    metrics = base.cell_metrics(trials)
    assert metrics["score"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(1 / 3)
    z, n, p = 1.959963984540054, 3, 1 / 3  # Wilson 95% interval, written out
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert metrics["ci_low"] == pytest.approx(center - half) and metrics["ci_high"] == pytest.approx(center + half)


def test_scores_come_from_what_the_model_outputs(tiny, monkeypatch):
    """With the generation replaced by a model that returns two of four values, every trial scores 1/2."""
    task = member("niah-multivalue", samples=2)
    ctx = Engine.from_loaded(tiny)

    def half_right(model, ids, max_new_tokens, stop_ids, min_new_tokens=0, prefill_chunk=None):
        prompt = next(task.build(ctx, 800, t) for t in range(2) if task.build(ctx, 800, t).ids == ids)
        return data.encode(tiny.tokenizer, " " + ", ".join(prompt.answers[:2]).upper(), special=False)

    monkeypatch.setattr(engine, "greedy", half_right)
    (outcome,) = task.run(ctx, patches.parse("none"), [Cell(800)], lambda cost: None).values()
    assert [t["found"] for t in outcome.samples] == [[True, True, False, False]] * 2
    assert outcome.metrics["score"] == 0.5 and outcome.metrics["accuracy"] == 0.0


def test_eval_records_on_the_tiny_model(tiny_model_dir, tmp_path):
    """lctx eval end to end: exact prompt lengths, identical prompts for every variant, scores recomputed."""
    out = tmp_path / "results"
    opts = RunOptions(models=[str(tiny_model_dir)], ropes=["none,pi:factor=2"], tasks=["synthetic:niah-single,fwe"],
                      lengths=[700, 900], task_defaults={"samples": 2, "max_new_tokens": 6}, out=out, dtype="float32",
                      device="cpu", report=False)
    assert run(opts, Console(quiet=True)).code == 0
    records = view.newest(results.Store(out).read())
    assert len(records) == 2 * 2 * 2 and all(r["status"] == "ok" for r in records)
    by_cell: dict[tuple, list[dict]] = {}
    for r in records:
        assert r["config"]["samples"] == 2 and r["config"]["max_new_tokens"] == 6
        for sample in r["samples"]:
            assert sample["prompt_tokens"] == r["length"]
            found = [a.lower() in sample["output"].lower() for a in sample["answers"]]
            assert sample["found"] == found and sample["score"] == sum(found) / len(found)
        assert r["metrics"]["score"] == pytest.approx(sum(s["score"] for s in r["samples"]) / 2)
        assert r["metrics"]["correct"] == sum(all(s["found"]) for s in r["samples"])
        by_cell.setdefault((r["task"], r["length"]), []).append(r)
    for cell in by_cell.values():  # the same prompts (answers, depths) for both variants
        none, pi = sorted(cell, key=lambda r: r["rope"])
        strip = [{k: v for k, v in s.items() if k in ("answers", "depths", "keys")} for s in none["samples"]]
        assert strip == [{k: v for k, v in s.items() if k in ("answers", "depths", "keys")} for s in pi["samples"]]


@pytest.mark.slow
def test_smollm2_finds_a_single_needle_at_1k(smollm2):
    task = member("niah-single", samples=2, max_new_tokens=12)
    (outcome,) = task.run(Engine.from_loaded(smollm2), patches.parse("none"), [Cell(1024)], lambda c: None).values()
    assert outcome.metrics["score"] == 1.0, [s["output"] for s in outcome.samples]


# ---- effective length -------------------------------------------------------------------------------------


def record(task: str, length: int, score: float | None, rope: str = "none", status: str = "ok") -> dict:
    return {"model": "m", "rope": rope, "rope_input": rope, "task": task, "length": length, "depth": None,
            "train_len": 2048, "dtype": "float32", "attn": "sdpa", "config": {"samples": 5}, "status": status,
            "metrics": {} if score is None else {"score": score}, "finished_at": f"t{length}"}


def test_effective_length_is_rulers_definition():
    a, b = "synthetic:niah-single", "synthetic:common-words"
    records = [record(a, 1024, 0.95), record(a, 2048, 0.90), record(a, 4096, 0.80), record(a, 8192, 0.99),
               record(b, 1024, 0.70), record(b, 2048, 0.99), record(b, 4096, 0.99), record(b, 8192, None, status="oom"),
               record(a, 1024, 0.50, rope="pi:factor=2")]
    rows = {(r["task"], r["rope"]): r for r in summaries.effective_length(records)}
    assert rows[(a, "none")]["effective_length"] == 2048  # 8k is above again, but 4k is not: stops at 2k
    assert rows[(b, "none")]["effective_length"] is None  # below at the shortest length
    assert rows[(a, "pi:factor=2")]["effective_length"] is None
    mean = rows[("synthetic:mean", "none")]  # RULER's headline: the mean of the tasks at each length
    assert mean["scores"] == {1024: pytest.approx(0.825), 2048: pytest.approx(0.945), 4096: pytest.approx(0.895),
                              8192: None}
    assert mean["effective_length"] is None  # 82.5 < 85.6
    lower = {(r["task"], r["rope"]): r for r in summaries.effective_length(records, threshold=75)}
    assert lower[(a, "none")]["effective_length"] == 8192 and lower[(b, "none")]["effective_length"] is None
    assert lower[("synthetic:mean", "none")]["effective_length"] == 4096  # 8k: one task out of memory
    passkey = {**record("passkey", 1024, None), "metrics": {"accuracy": 1.0, "correct": 5, "trials": 5}}
    built = summaries.build([*records, passkey, record("longbench:qasper", 1024, 30.0)])
    assert {s.kind for s in built} == {"categories", "effective_length"}
    tasks = {row[0] for s in built if s.kind == "effective_length" for row in s.rows}  # success rates only
    assert tasks == {a, b, "synthetic:mean", "passkey"}


def test_lctx_results_prints_effective_lengths_with_the_threshold_asked(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lctx import cli
    from lctx.cli import app

    monkeypatch.setattr(cli.console, "width", 250)
    store = results.Store(tmp_path)
    for length, score in ((1024, 0.9), (2048, 0.88), (4096, 0.5)):
        store.append({**record("synthetic:niah-single", length, score), "schema": 1,
                      "metrics": {"score": score, "accuracy": score, "correct": 1, "trials": 1}})

    def row(*args) -> str:
        done = CliRunner().invoke(app, ["results", str(tmp_path), *args])
        assert done.exit_code == 0, done.output
        return next(line for line in done.output.splitlines() if "synthetic:niah-single" in line and "1k:" in line)

    assert " 85.6 " in row() and " 2k " in row() and "4k: 50.0" in row()
    assert " 40 " in row("--threshold", "40") and " 4k " in row("--threshold", "40")
