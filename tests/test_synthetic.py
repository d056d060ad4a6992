"""RULER's synthetic tasks: RULER's layout (fit=ruler, the default) and lctx's exact lengths (fit=exact), answers
checked in the decoded prompts, scoring, effective length. (Equality with RULER's own generator: test_golden_ruler.)"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from pathlib import Path

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

ROOT = Path(__file__).resolve().parent

# lengths the tiny tokenizer (vocab 512, ~1.6 characters per token) can build every member at
SHORT = {"niah-single": 400, "niah-uuid": 500, "niah-multikey": 700, "niah-multivalue": 700,
         "niah-multiquery": 800, "kv-retrieval": 700, "variable-tracking": 1200, "common-words": 1500,
         "frequent-words": 700}


def member(name: str, **params) -> base.SyntheticTask:
    """``synthetic:<name>`` with lctx's exact-length generator (``fit=exact``) and these parameters (as --task-arg
    or a spec's key=value would give them)."""
    (task,) = evals.resolve(f"synthetic:{name}", {"fit": "exact", **params})
    return task


def official(name: str, **params) -> base.SyntheticTask:
    """``synthetic:<name>`` as RULER builds it (the default, ``fit=ruler``)."""
    (task,) = evals.resolve(f"synthetic:{name}", params)
    return task


def light(tokenizer) -> Engine:
    """An engine without weights: prompt building needs only the tokenizer."""
    return Engine(None, tokenizer, 256)


def text(tokenizer, prompt: syn.Prompt) -> str:
    return tokenizer.decode(prompt.ids)


def plain(tokenizer, prompt: syn.Prompt) -> str:
    """The prompt's text without the tokenizer's special tokens (RULER's prompt text)."""
    return tokenizer.decode(prompt.ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def ctx(tiny_tokenizer) -> Engine:
    return light(tiny_tokenizer)


# ---- prompts as RULER builds them (fit=ruler) ------------------------------------------------------------


def test_ruler_length_convention_prompt_and_answer_within_the_length(ctx, tiny_tokenizer):
    """RULER counts the prompt's tokens (no BOS) + tokens_to_generate against the length; lctx's exact mode makes
    the prompt itself the length."""
    for name, length in (("niah-single:haystack=noise", 700), ("variable-tracking", 1500), ("frequent-words", 900)):
        task = official(name)
        prompts = task.prompts(ctx, length)
        assert len(prompts) == 5 and len({tuple(p.ids) for p in prompts}) == 5
        for prompt in prompts:
            counted = len(prompt.ids) - 1  # the BOS the tokenizer adds, which RULER does not count
            assert prompt.ids[0] == tiny_tokenizer.bos_token_id
            assert counted + task.args.max_new_tokens == prompt.info["ruler_length"] <= length
            assert prompt.info["ruler_length"] > 0.75 * length  # near it: RULER searches the largest haystack
        exact = member(name.split(":")[0], **dict(p.split("=") for p in name.split(":")[1:]))
        assert len(exact.build(ctx, length, 0).ids) == length


def test_ruler_noise_haystack_lines_and_needle_lines(ctx, tiny_tokenizer):
    """Each noise block on its own line, each needle on its own line between them; kv retrieval: needle lines
    only, no filler and no blank line before the question."""
    prompt = official("niah-multikey:haystack=noise").prompts(ctx, 1200)[0]
    lines = plain(tiny_tokenizer, prompt).split("\n")
    body = lines[1:-1]
    assert lines[0].startswith("A special magic number is hidden")  # one asked of 4 keys: RULER's singular
    assert all(line == syn.base.FILLER or NEEDLE.fullmatch(line) for line in body)
    assert sum(bool(NEEDLE.fullmatch(line)) for line in body) == 4
    kv = plain(tiny_tokenizer, official("kv-retrieval").prompts(ctx, 1500)[0]).split("\n")
    assert all(NEEDLE.fullmatch(line) for line in kv[1:-1]) and "" not in kv and len(kv) > 10


def test_ruler_keys_are_wonderwords_pairs_asked_in_random_order(ctx, tiny_tokenizer):
    from lctx.evals.synthetic import ruler_data

    adjectives = set(ruler_data._wonderwords("adjectivelist.txt"))
    nouns = set(ruler_data._wonderwords("nounlist.txt"))
    orders = []
    for prompt in official("niah-multiquery:haystack=noise").prompts(ctx, 1500):
        keys = prompt.info["query_keys"]
        assert all(any(k == f"{a}-{n}" for a in adjectives if k.startswith(a + "-") for n in nouns) for k in keys)
        decoded = plain(tiny_tokenizer, prompt)
        hidden = [key for _, key, _ in NEEDLE.findall(decoded)]
        orders.append([hidden.index(k) for k in keys])
        assert decoded.endswith(f"for {', '.join(keys[:-1])}, and {keys[-1]} mentioned in the provided text are")
    assert any(order != sorted(order) for order in orders)  # asked in RULER's random order, not sorted


def test_ruler_variable_tracking_details(ctx, tiny_tokenizer):
    """One statement per line (``VAR B = VAR A `` with RULER's trailing space), values below 99999, the answer
    prefix ending in a space, the worked example answered on its own line before the task."""
    for prompt in official("variable-tracking").prompts(ctx, 2000):
        decoded = plain(tiny_tokenizer, prompt)
        example, main = decoded.split("\n\nMemorize and track the chain(s)", 1)
        assert re.search(r"they are:  ([A-Z]{3} ){4}[A-Z]{3}$", example)  # prefix "are: " + " " + names
        lines = main.split("\n")
        statements = [line for line in lines if line.startswith("VAR ")]
        assert len(statements) == 5 and all(line in lines for line in statements)
        value = re.fullmatch(r"VAR [A-Z]{5} = (\d{5})", statements[0]).group(1)
        assert 10000 <= int(value) <= 99998
        assert all(re.fullmatch(r"VAR [A-Z]{5} = VAR [A-Z]{5} ", line) for line in statements[1:])
        assert decoded.endswith(f"5 variables are assigned the value {value}, they are: ")


def test_ruler_common_and_frequent_words(ctx, tiny_tokenizer):
    from lctx.evals.synthetic import ruler_data

    vocabulary = set(ruler_data.common_words(42))
    prompt = official("common-words").prompts(ctx, 1500)[0]
    decoded = plain(tiny_tokenizer, prompt)
    main = decoded.rsplit("Below is a numbered list of words.", 1)[1].split("\nQuestion:")[0]
    items = re.findall(r"(?:^|(?<= ))(\d+)\. (\S+(?: \S+)?)(?= \d+\. |$)", main.split("\n", 1)[1])
    assert main.split("\n", 1)[1].startswith("1. ")  # "1. word", not " 1. word"
    counts = Counter(word for _, word in items)
    assert set(counts) <= vocabulary and sorted(w for w, n in counts.items() if n == 6) == sorted(prompt.answers)
    fwe = official("frequent-words").prompts(ctx, 1050)[0]
    body = plain(tiny_tokenizer, fwe).split("coded words. ", 1)[1].split("\nQuestion:")[0]
    assert fwe.info["vocabulary"] == (1050 - 50) // 50  # RULER's vocabulary, (length − 50) // 50 words
    assert len(set(body.split())) <= 20 and Counter(body.split()).most_common(1)[0][0] == "..."


def test_ruler_qa_reads_squad_and_hotpotqa_and_scores_part(ctx, tiny_tokenizer):
    qa_dir = str(ROOT / "data" / "golden" / "qa")
    (squad,) = evals.resolve("synthetic:qa-squad", {"data_dir": qa_dir, "samples": 2})
    prompts = squad.prompts(ctx, 1200)
    decoded = plain(tiny_tokenizer, prompts[1])
    assert "Document 1:\n" in decoded and decoded.endswith(" Answer:")
    assert f"Question: {prompts[1].info['question']} Answer:" in decoded and prompts[1].answers[0] in decoded
    assert squad.spec.endswith(f":data={qa_dir}/squad.json")
    (hotpot,) = evals.resolve("synthetic:qa_2", {"data_dir": qa_dir, "samples": 1})
    assert hotpot.prompts(ctx, 1800)[0].answers[0] in plain(tiny_tokenizer, hotpot.prompts(ctx, 1800)[0])
    assert squad.match("It is the Amber river.", ["amber", "birch"]) == ([True, False], 1.0)
    with pytest.raises(data.DataError, match=r"no squad.json or dev-v2.0.json in --data-dir"):
        evals.resolve("synthetic:qa-squad", {"data_dir": str(ROOT)})


# ---- prompts of lctx's exact-length generator (fit=exact) ---------------------------------------------------


@pytest.mark.parametrize("name", [m for m in syn.MEMBERS if m not in syn.NEEDS_DATA])
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


def test_string_match_part_is_rulers():
    """RULER's string_match_part: per sample the best over its references (1 if any is in the prediction),
    averaged: [1, 0, 1] → 2/3 (RULER: round(2/3 × 100, 2) = 66.67)."""
    outputs = [("Paris, France", ["paris", "lyon"]), ("no idea", ["Rome"]), ("ROME", ["rome", "roma"])]
    scores = [base.string_match_part(o, refs) for o, refs in outputs]
    assert scores == [1.0, 0.0, 1.0] and round(sum(scores) / 3 * 100, 2) == 66.67


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

    def half_right(model, batch, max_new_tokens, stop_ids, min_new_tokens=0, prefill_chunk=None):
        prompts = [next(task.build(ctx, 800, t) for t in range(2) if task.build(ctx, 800, t).ids == ids)
                   for ids in batch]
        return [data.encode(tiny.tokenizer, " " + ", ".join(p.answers[:2]).upper(), special=False) for p in prompts]

    monkeypatch.setattr(engine, "greedy_batch", half_right)
    (outcome,) = task.run(ctx, patches.parse("none"), [Cell(800)], lambda cost: None).values()
    assert [t["found"] for t in outcome.samples] == [[True, True, False, False]] * 2
    assert outcome.metrics["score"] == 0.5 and outcome.metrics["accuracy"] == 0.0


def test_eval_records_on_the_tiny_model(tiny_model_dir, tmp_path):
    """lctx eval end to end (fit=exact): exact prompt lengths, identical prompts for every variant, scores
    recomputed."""
    out = tmp_path / "results"
    opts = RunOptions(models=[str(tiny_model_dir)], ropes=["none,pi:factor=2"], tasks=["synthetic:niah-single,fwe"],
                      lengths=[700, 900], task_defaults={"samples": 2, "max_new_tokens": 6, "fit": "exact"}, out=out,
                      dtype="float32", device="cpu", report=False)
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


def test_eval_records_ruler_lengths_on_the_tiny_model(tiny_model_dir, tmp_path):
    """The default fit=ruler end to end: prompt + answer within the length, RULER's length recorded per trial."""
    out = tmp_path / "results"
    opts = RunOptions(models=[str(tiny_model_dir)], ropes=["none"], tasks=["synthetic:niah-single:haystack=noise,qa_1"],
                      lengths=[1200], task_defaults={"samples": 2, "data_dir": str(ROOT / "data" / "golden" / "qa")},
                      out=out, dtype="float32", device="cpu", report=False)
    assert run(opts, Console(quiet=True)).code == 0
    records = {r["task"]: r for r in view.newest(results.Store(out).read())}
    assert set(records) == {"synthetic:niah-single", "synthetic:qa-squad"}
    for record in records.values():
        assert record["data"]["fit"] == "ruler"
        for sample in record["samples"]:
            new_tokens = record["config"]["max_new_tokens"]
            assert sample["prompt_tokens"] - 1 + new_tokens == sample["ruler_length"] <= 1200
    assert ":fit=ruler" in records["synthetic:niah-single"]["task_spec"]  # QA has RULER's generator only
    qa = records["synthetic:qa-squad"]
    assert qa["data"]["metric"] == "string_match_part"
    assert all(s["score"] == float(any(s["found"])) for s in qa["samples"])


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
