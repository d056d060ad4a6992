"""RULER-style synthetic tasks: exact lengths, answers checked in the decoded prompts, scoring, effective length."""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter

import pytest
from rich.console import Console

from lctx import data, evals, models, patches, results, runner
from lctx.evals import Cell, Context, EvalOptions, TaskError, passkey
from lctx.evals import synthetic as syn

# lengths the tiny tokenizer (vocab 512, ~1.6 characters per token) can build every member at
SHORT = {"niah-single": 400, "niah-uuid": 500, "niah-multikey": 700, "niah-multivalue": 700,
         "niah-multiquery": 800, "kv-retrieval": 700, "variable-tracking": 1200, "common-words": 1500,
         "frequent-words": 700}


def options(**kwargs) -> EvalOptions:
    return EvalOptions(models=[], ropes=[], tasks=[], lengths=[], **kwargs)


def light(tokenizer, **kwargs) -> Context:
    """A context without weights: prompt building needs only the tokenizer and the corpus."""
    loaded = models.Loaded(model=None, tokenizer=tokenizer, name="tiny", train_len=256, device=None, dtype=None)
    return Context(loaded=loaded, train_len=256, options=options(**kwargs), corpus=data.open_corpus())


def text(tokenizer, prompt: syn.Prompt) -> str:
    return tokenizer.decode(prompt.ids)


@pytest.fixture(scope="module")
def ctx(tiny_tokenizer) -> Context:
    return light(tiny_tokenizer)


# ---- prompts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("member", list(syn.MEMBERS))
def test_every_member_is_exactly_the_length_and_seeded(ctx, tiny_tokenizer, member):
    task = syn.MEMBERS[member]
    for length in (SHORT[member], SHORT[member] + 777):
        prompts = [task.build(ctx, length, trial) for trial in range(3)]
        assert all(len(p.ids) == length for p in prompts)
        assert task.build(ctx, length, 1).ids == prompts[1].ids  # rebuilt identically
        assert len({tuple(p.ids) for p in prompts}) == 3  # trials differ
        assert prompts[0].ids[:1] == data.special_prefix(tiny_tokenizer)  # the tokenizer's BOS first
    other_seed = light(tiny_tokenizer, seed=7)
    assert task.build(other_seed, SHORT[member], 0).ids != task.build(ctx, SHORT[member], 0).ids


NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("member", ["niah-single", "niah-uuid", "niah-multikey", "niah-multivalue",
                                    "niah-multiquery"])
def test_niah_answers_are_the_values_of_the_asked_keys(ctx, tiny_tokenizer, member):
    task = syn.MEMBERS[member]
    for trial in range(3):
        prompt = task.build(ctx, SHORT[member] + 300, trial)
        decoded = text(tiny_tokenizer, prompt)
        found: dict[str, list[str]] = {}
        for kind, key, value in NEEDLE.findall(decoded):
            assert kind == task.value_type
            found.setdefault(key, []).append(value)
        assert len(found) == max(task.keys, task.queries)
        assert all(len(values) == task.values for values in found.values())
        query = re.search(r"\nWhat (?:is|are all) the special magic \w+ for (.+?) mentioned", decoded).group(1)
        asked = re.split(r", and |, ", query)
        assert len(asked) == task.queries and set(asked) <= set(found)
        expected = [v for key in asked for v in found[key]]
        assert sorted(prompt.answers) == sorted(expected)
        if task.value_type == "numbers":
            assert all(re.fullmatch(r"\d{7}", v) for v in expected)
        else:
            assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                       for v in expected)


def test_niah_wording_follows_ruler(ctx, tiny_tokenizer):
    single = text(tiny_tokenizer, syn.MEMBERS["niah-single"].build(ctx, 600, 0))
    assert "A special magic number is hidden within the following text." in single
    assert single.endswith("mentioned in the provided text is")
    query = text(tiny_tokenizer, syn.MEMBERS["niah-multiquery"].build(ctx, 900, 0)).rsplit("\n", 1)[1]
    assert re.match(r"What are all the special magic numbers for \S+, \S+, \S+, and \S+ mentioned", query)
    assert query.endswith("mentioned in the provided text are")


def test_kv_retrieval_is_a_haystack_of_key_value_needles(ctx, tiny_tokenizer):
    task = syn.MEMBERS["kv-retrieval"]
    prompt = task.build(ctx, 2000, 0)
    decoded = text(tiny_tokenizer, prompt)
    pairs = NEEDLE.findall(decoded)
    assert len(pairs) == prompt.info["distractors"] + 1 and len(pairs) > 10
    asked = re.search(r"What is the special magic uuid for (\S+) mentioned", decoded).group(1)
    values = [value for _, key, value in pairs if key == asked]
    assert values == prompt.answers  # the asked key appears exactly once, with the answer
    assert "pydoc" not in json.dumps(task.config(ctx.options))  # no corpus involved


def test_variable_tracking_answers_follow_the_chain(ctx, tiny_tokenizer):
    task = syn.MEMBERS["variable-tracking"]
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
    prompt = syn.MEMBERS["common-words"].build(ctx, length, 0)
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
        prompt = syn.MEMBERS["frequent-words"].build(ctx, length, 0)
        decoded = text(tiny_tokenizer, prompt)
        body = decoded.split("most frequently appeared coded words.", 1)[1].split("\nQuestion:")[0]
        counts = Counter(word for word in body.split() if word.strip("."))
        ranked = counts.most_common()
        assert sorted(w for w, _ in ranked[:3]) == sorted(prompt.answers)
        assert ranked[2][1] > ranked[3][1]  # the answer is unique
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)


def test_haystack_choices(tiny_tokenizer):
    task = syn.MEMBERS["niah-single"]
    corpus = text(tiny_tokenizer, task.build(light(tiny_tokenizer), 900, 0))
    noise = text(tiny_tokenizer, task.build(light(tiny_tokenizer, task_args={"haystack": "noise"}), 900, 0))
    needles = light(tiny_tokenizer, task_args={"haystack": "needles"})
    assert "The grass is green." in noise and "The grass is green." not in corpus
    assert len(NEEDLE.findall(text(tiny_tokenizer, task.build(needles, 900, 0)))) > 3
    topics = "".join(d.text for d in data.pydoc_corpus().documents(1))
    chunk = corpus.split("\n", 1)[1][:80]  # the haystack starts at a sentence of the corpus
    assert chunk.split(" One of the special")[0] in topics
    assert task.config(options(task_args={"haystack": "noise"}))["haystack"] == "noise"
    assert task.config(options())["data"] == "pydoc"
    assert syn.MEMBERS["variable-tracking"].config(options())["haystack"] == "noise"  # RULER's default for vt


def test_chat_template_wraps_the_task_at_the_same_length(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = ("{% for m in messages %}<s>[USER] {{ m['content'] }} [/USER]{% endfor %}"
                               "{% if add_generation_prompt %} [BOT]{% endif %}")
    chat = light(tokenizer, chat_template=True)
    prompt = syn.MEMBERS["niah-single"].build(chat, 700, 0)
    assert len(prompt.ids) == 700
    decoded = tokenizer.decode(prompt.ids)
    assert decoded.startswith("<s>[USER] A special magic number is hidden")
    assert "text? [/USER] [BOT]The special magic number for" in decoded
    assert decoded.count("<s>") == 1
    with pytest.raises(TaskError, match="has no chat template"):
        syn.MEMBERS["niah-single"].build(light(tiny_tokenizer, chat_template=True), 700, 0)


# ---- errors -----------------------------------------------------------------------------------------------


def test_bad_names_and_arguments_are_named(ctx):
    with pytest.raises(TaskError, match=r"unknown synthetic task 'needle'. Valid: synthetic:<niah-single\|"):
        evals.expand("synthetic:needle")
    assert evals.expand("synthetic:cwe") == [syn.MEMBERS["common-words"]]
    assert len(evals.expand("synthetic:all")) == 9
    assert evals.parse_tasks("synthetic:niah-single,fwe,ppl") == [
        syn.MEMBERS["niah-single"], syn.MEMBERS["frequent-words"], evals.TASKS["ppl"]]
    task = syn.MEMBERS["niah-single"]
    with pytest.raises(TaskError, match=r"threshold='high' must be a score in percent, in \(0, 100\]"):
        task.validate(options(task_args={"threshold": "high"}))
    with pytest.raises(TaskError, match=r"threshold='150'"):
        task.validate(options(task_args={"threshold": "150"}))
    with pytest.raises(TaskError, match=r"haystack='essay' is not a haystack; choose one of corpus, noise, needles"):
        task.validate(options(task_args={"haystack": "essay"}))
    with pytest.raises(TaskError, match=r"haystack=needles applies to the niah tasks only; variable-tracking takes"):
        syn.MEMBERS["variable-tracking"].validate(options(task_args={"haystack": "needles"}))
    with pytest.raises(TaskError, match=r"synthetic:niah-multiquery: length 150 is too short; the prompt without"):
        syn.MEMBERS["niah-multiquery"].check(ctx, [Cell(150), Cell(1000)])
    with pytest.raises(TaskError, match=r"common-words: the 10 common words repeated 6× take \d+ tokens"):
        syn.MEMBERS["common-words"].check(ctx, [Cell(700)])


def test_a_corpus_too_small_is_a_data_error(tiny_tokenizer, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A short text. It has few words. " * 20)
    ctx = light(tiny_tokenizer)
    ctx.corpus = data.open_corpus(str(small))
    with pytest.raises(data.DataError, match=r"haystack needs \d+ tokens but .*small.txt.* has only \d+"):
        syn.MEMBERS["niah-single"].build(ctx, 2000, 0)
    with pytest.raises(data.DataError, match=r"the corpus has only \d+ distinct words"):
        syn.MEMBERS["common-words"].build(ctx, 1500, 0)


# ---- scoring ----------------------------------------------------------------------------------------------


def test_string_match_all_and_cell_metrics():
    assert syn.string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "1111111"]) == [True, False]
    assert syn.string_match_all("ANSWER: Tashrm", ["tashrm"]) == [True]
    trials = [{"score": 1.0, "correct": True}, {"score": 0.5, "correct": False}, {"score": 0.0, "correct": False}]
    metrics = syn.cell_metrics(trials)
    assert metrics["score"] == pytest.approx(0.5) and metrics["accuracy"] == pytest.approx(1 / 3)
    z, n, p = 1.959963984540054, 3, 1 / 3  # Wilson 95% interval, written out
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert metrics["ci_low"] == pytest.approx(center - half) and metrics["ci_high"] == pytest.approx(center + half)


def test_scores_come_from_what_the_model_outputs(tiny, monkeypatch):
    """With the generation replaced by a model that returns two of four values, every trial scores 1/2."""
    task = syn.MEMBERS["niah-multivalue"]
    ctx = Context(loaded=tiny, train_len=tiny.train_len, options=options(samples=2), corpus=data.open_corpus())

    def half_right(model, ids, max_new_tokens, stop_ids, min_new_tokens=0, prefill_chunk=None):
        prompt = next(task.build(ctx, 800, t) for t in range(2) if task.build(ctx, 800, t).ids == ids)
        return data.encode(tiny.tokenizer, " " + ", ".join(prompt.answers[:2]).upper(), special=False)

    monkeypatch.setattr(passkey, "greedy", half_right)
    (outcome,) = task.run(ctx, patches.parse("none"), [Cell(800)], lambda cost: None).values()
    assert [t["found"] for t in outcome.samples] == [[True, True, False, False]] * 2
    assert outcome.metrics["score"] == 0.5 and outcome.metrics["accuracy"] == 0.0


def test_eval_records_on_the_tiny_model(tiny_model_dir, tmp_path):
    """lctx eval end to end: exact prompt lengths, identical prompts for every variant, scores recomputed."""
    out = tmp_path / "results"
    opts = EvalOptions(models=[str(tiny_model_dir)], ropes=["none,pi:factor=2"],
                       tasks=["synthetic:niah-single,fwe"], lengths=[700, 900], samples=2, max_new_tokens=6,
                       out=out, dtype="float32", device="cpu", task_args={"threshold": "50"})
    assert runner.run(opts, Console(quiet=True)) == 0
    records = results.Store(out).records()
    assert len(records) == 2 * 2 * 2 and all(r["status"] == "ok" for r in records)
    by_cell: dict[tuple, list[dict]] = {}
    for r in records:
        assert r["data"]["threshold"] == 50.0 and r["config"]["samples"] == 2
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
    ctx = Context(loaded=smollm2, train_len=smollm2.train_len, options=options(samples=2, max_new_tokens=12),
                  corpus=data.open_corpus())
    (outcome,) = syn.MEMBERS["niah-single"].run(ctx, patches.parse("none"), [Cell(1024)], lambda c: None).values()
    assert outcome.metrics["score"] == 1.0, [s["output"] for s in outcome.samples]


# ---- effective length -------------------------------------------------------------------------------------


def record(task: str, length: int, score: float | None, rope: str = "none", status: str = "ok",
           threshold: float | None = None) -> dict:
    return {"model": "m", "rope": rope, "rope_input": rope, "task": task, "length": length, "depth": None,
            "train_len": 2048, "dtype": "float32", "attn": "sdpa", "config": {"samples": 5}, "status": status,
            "metrics": {} if score is None else {"score": score},
            "data": {} if threshold is None else {"threshold": threshold}, "finished_at": f"t{length}"}


def test_effective_length_is_rulers_definition():
    a, b = "synthetic:niah-single", "synthetic:common-words"
    records = [record(a, 1024, 0.95), record(a, 2048, 0.90), record(a, 4096, 0.80), record(a, 8192, 0.99),
               record(b, 1024, 0.70), record(b, 2048, 0.99), record(b, 4096, 0.99), record(b, 8192, None, status="oom"),
               record(a, 1024, 0.50, rope="pi:factor=2"), record("passkey", 1024, 1.0)]
    rows = {(r["task"], r["rope"]): r for r in syn.effective_length(records)}
    assert rows[(a, "none")]["effective_length"] == 2048  # 8k is above again, but 4k is not: stops at 2k
    assert rows[(b, "none")]["effective_length"] is None  # below at the shortest length
    assert rows[(a, "pi:factor=2")]["effective_length"] is None
    assert ("passkey", "none") not in rows
    mean = rows[("synthetic:mean", "none")]  # RULER's headline: the mean of the tasks at each length
    assert mean["scores"] == {1024: pytest.approx(0.825), 2048: pytest.approx(0.945), 4096: pytest.approx(0.895),
                              8192: None}
    assert mean["effective_length"] is None  # 82.5 < 85.6
    lower = {(r["task"], r["rope"]): r for r in syn.effective_length(records, threshold=75)}
    assert lower[(a, "none")]["effective_length"] == 8192 and lower[(b, "none")]["effective_length"] is None
    assert lower[("synthetic:mean", "none")]["effective_length"] == 4096  # 8k: one task out of memory
    recorded = [record(a, 1024, 0.8, threshold=70.0), record(a, 2048, 0.72, threshold=70.0)]
    (row,) = syn.effective_length(recorded)
    assert row["threshold"] == 70.0 and row["effective_length"] == 2048


def test_lctx_results_prints_effective_lengths(tmp_path):
    store = results.Store(tmp_path)
    for length, score in ((1024, 0.9), (2048, 0.88), (4096, 0.5)):
        store.append({**record("synthetic:niah-single", length, score), "schema": 1,
                      "metrics": {"score": score, "accuracy": score, "correct": 1, "trials": 1}})
    console = Console(record=True, width=250)
    assert runner.show_results(tmp_path, console) == 0
    output = console.export_text()
    assert "effective length" in output and "synthetic:niah-single" in output
    row = next(line for line in output.splitlines() if "synthetic:niah-single" in line and "85.6" in line)
    assert " 2k " in row and "4k: 50.0" in row
