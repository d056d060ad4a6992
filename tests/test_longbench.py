"""LongBench v1/E/v2: the official metrics on hand-computed cases, prompts, exact middle truncation, end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from lctx import data, engine, evals, results, view
from lctx.cli import app
from lctx.engine import Engine, greedy
from lctx.evals import TaskError
from lctx.evals import longbench as lb
from lctx.evals.longbench import data as lbdata
from lctx.evals.longbench import metrics as lm
from lctx.evals.longbench import prompts
from lctx.view import summaries

cli = CliRunner()


def flat(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())
Z = 1.959963984540054


# ---- metrics, English -----------------------------------------------------------------------------------------


def test_qa_f1_normalizes_like_squad() -> None:
    # "The Cat sat on the mat." -> "cat sat on mat"; "a cat on a mat" -> "cat on mat"
    # overlap 3: precision 3/4, recall 3/3, F1 = 2·0.75·1 / 1.75 = 6/7
    assert lm.qa_f1("The Cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert lm.qa_f1("dog", "a cat") == 0.0
    # repeated tokens count as a multiset: "paris paris" vs "paris": overlap 1, P = 1/2, R = 1, F1 = 2/3
    assert lm.qa_f1("Paris, Paris!", "Paris") == pytest.approx(2 / 3)


def test_rouge_l_uses_the_rouge_package_semantics() -> None:
    # one sentence each; the package counts unique words: reference {the, cat, is, on, mat} m = 5, prediction
    # {the, cat, sat, on, mat} n = 5; the LCS "the cat on the mat" as a set is {the, cat, on, mat}: 4
    # R = P = 4/5, F = 2·0.64 / (1.6 + 1e-8)
    assert lm.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(2 * 0.64 / (1.6 + 1e-8))
    # sentences split at '.': "a b. c" vs "c. a b": each reference sentence's LCS with the prediction's
    # sentences: "c" -> {c}, "a b" -> {a, b}; union 3 of m = n = 3 words -> F = 2·1 / (2 + 1e-8)
    assert lm.rouge_l("a b. c", "c. a b") == pytest.approx(2 / (2 + 1e-8))
    assert lm.rouge_l("", "a summary") == 0.0  # the library raises on an empty hypothesis: official 0
    assert lm.rouge_l("...", "a summary") == 0.0  # only dots: no sentence left


def test_classification_score_and_its_official_quirks() -> None:
    classes = ["Animal", "Food", "Description", "Abbreviation"]
    assert lm.classification("Animal", "Animal", all_classes=classes) == 1.0
    assert lm.classification("Animal or Food", "Animal", all_classes=classes) == 0.5  # two named: 1/2
    assert lm.classification("Food", "Animal", all_classes=classes) == 0.0
    # a prediction naming no class scores 0: the official difflib fallback never runs
    assert lm.classification("animals", "Animal", all_classes=classes) == 0.0
    # "New" is contained in the answer "New York" and removed; the official loop then skips "York" (the list
    # shifted under it), so the named classes stay ["York", "New York"]: 1/2, not 1
    assert lm.classification("New York", "New York", all_classes=["New", "York", "New York"]) == 0.5
    # "York" first: removed, and "New" right after it is skipped: same 1/2
    assert lm.classification("New York", "New York", all_classes=["York", "New", "New York"]) == 0.5
    # with nothing after the removed class to skip, the pruning is complete: ["New York"] -> 1/1
    assert lm.classification("New York", "New York", all_classes=["New", "New York"]) == 1.0
    with pytest.raises(ValueError, match="all_classes"):
        lm.classification("x", "y", all_classes=None)


def test_retrieval_and_count_scores() -> None:
    assert lm.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert lm.retrieval("Paragraph 3 or Paragraph 12", "Paragraph 3") == 0.5  # numbers [3, 12]: 1 of 2
    assert lm.retrieval("I do not know", "Paragraph 3") == 0.0  # no number at all
    with pytest.raises(ValueError, match="does not name a paragraph"):
        lm.retrieval("3", "the third")
    assert lm.count("There are 7 unique paragraphs out of 12", "7") == 0.5  # [7, 12]: 1 of 2
    assert lm.count("7, 7 and 8", "7") == pytest.approx(2 / 3)  # [7, 7, 8]: 2 of 3
    assert lm.count("seven", "7") == 0.0


def test_code_edit_similarity_both_fuzzywuzzy_backends() -> None:
    # the first line without ``` / # / //: "x = foo(1)" vs "x = foo(2)": 9 of 10 characters match in both
    # backends: 2·9 / 20 = 0.9
    prediction = "\n```python\n# the next line\nx = foo(1)  \nmore"
    assert lm.first_code_line(prediction) == "x = foo(1)  "
    assert lm.code_sim("x = foo(1)", "x = foo(2)") == 0.9
    assert lm.code_sim("x = foo(1)", "x = foo(2)", edit_sim="levenshtein") == 0.9
    # "cadb" vs "abc": difflib finds one matching block ("c"), 2·1/7 = 0.2857 -> 29; the InDel ratio uses the
    # longest common subsequence "ab": 2·2/7 = 0.5714 -> 57
    assert lm.fuzz_ratio("cadb", "abc") == 29
    assert lm.fuzz_ratio("cadb", "abc", "levenshtein") == 57
    # "abcdefgh" vs "abcdexyz": 2·5/16 = 62.5, rounded half to even like fuzzywuzzy's int(round(...)): 62
    assert lm.fuzz_ratio("abcdefgh", "abcdexyz") == 62
    assert lm.fuzz_ratio("same", "same") == 100 and lm.fuzz_ratio("", "x") == 0
    assert lm.code_sim("# only a comment\n// and another", "return x") == 0.0  # no code line: "" -> 0
    with pytest.raises(ValueError, match="difflib, levenshtein"):
        lm.fuzz_ratio("a", "b", "bogus")


def test_scoring_takes_first_line_for_few_shot_tasks_and_best_answer() -> None:
    classes = ["Animal", "Food"]
    # trec scores only the first line (after leading newlines): "Animal" -> 1; the whole text names both: 1/2
    assert lm.score_example("trec", "\nAnimal\nFood", ["Animal"], classes) == 1.0
    assert lm.classification("\nAnimal\nFood", "Animal", all_classes=classes) == 0.5
    # qasper keeps every line: "yes\nno" vs "no" -> tokens [yes, no] vs [no]: P 1/2, R 1, F1 2/3
    assert lm.score_example("qasper", "yes\nno", ["no"]) == pytest.approx(2 / 3)
    # the best over the answers: "blue" vs "dark blue" (F1 2/3) and "blue" (1)
    assert lm.score_example("hotpotqa", "blue", ["dark blue", "blue"]) == 1.0


def test_task_score_and_longbench_e_buckets() -> None:
    # (1 + 0.5 + 0) / 3 × 100 = 50.0; 1/3 × 100 = 33.333… -> 33.33
    assert lm.task_score([1.0, 0.5, 0.0]) == 50.0
    assert lm.task_score([1.0, 0.0, 0.0]) == 33.33
    assert lm.task_score([]) is None
    # lengths 3999 | 4000 | 8000 fall in 0-4k | 4-8k | 8k+ (bounds as eval.py: < 4000, < 8000)
    assert lm.bucket_scores([1.0, 0.5, 0.25], [3999, 4000, 8000]) == {"0-4k": 100.0, "4-8k": 50.0, "8k+": 25.0}
    assert lm.bucket_scores([1.0], [10]) == {"0-4k": 100.0, "4-8k": None, "8k+": None}


# ---- metrics, Chinese ---------------------------------------------------------------------------------------


def test_qa_f1_zh_uses_jieba_words() -> None:
    # jieba: 北京/是/中国/的/首都/。 -> [北京, 是, 中国, 的, 首都] (。 removed); 首都/是/北京
    # overlap 3: P 3/5, R 3/3, F1 = 2·0.6 / 1.6 = 0.75
    assert lm.jieba_words("北京是中国的首都。") == ["北京", "是", "中国", "的", "首都", "。"]
    assert lm.qa_f1_zh("北京是中国的首都。", "首都是北京") == pytest.approx(0.75)
    # 北京/，/中国 -> [北京, 中国]; 中国/首都: overlap 1, P = R = 1/2, F1 = 0.5
    assert lm.qa_f1_zh("北京，中国", "中国首都") == pytest.approx(0.5)


def test_rouge_zh_and_retrieval_zh() -> None:
    # 我们/今天/很/开心 vs 今天/我们/很/开心: LCS 3 words of m = n = 4: R = P = 3/4, F = 2·0.5625 / (1.5 + 1e-8)
    assert lm.rouge_l_zh("我们今天很开心", "今天我们很开心") == pytest.approx(2 * 0.5625 / (1.5 + 1e-8))
    assert lm.retrieval_zh("段落5，不是段落15", "段落5") == 0.5  # numbers [5, 15]: 1 of 2
    assert lm.retrieval_zh("答案是段落5", "段落5") == 1.0
    # lsht-style classification in Chinese: both classes named, the answer among them: 1/2
    assert lm.score_example("lsht", "财经\n体育", ["财经"], ["体育", "财经"]) == 1.0  # first line only
    assert lm.classification("财经或体育", "财经", all_classes=["体育", "财经"]) == 0.5


# ---- LongBench v2 scoring -----------------------------------------------------------------------------------


def test_v2_answer_extraction() -> None:
    assert lm.extract_choice("The correct answer is (B)") == "B"
    assert lm.extract_choice("  **The correct answer is C**, because…") == "C"  # '*' removed first
    assert lm.extract_choice("The correct answer is (E)") is None
    assert lm.extract_choice("Answer: D") is None


def wilson_reference(k: int, n: int) -> tuple[float, float]:
    p = k / n
    center = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return max(0.0, center - half), min(1.0, center + half)


def test_v2_metrics_by_difficulty_and_length() -> None:
    rows = [
        {"difficulty": "easy", "length": "short", "correct": True, "prediction": "A", "empty": False},
        {"difficulty": "easy", "length": "long", "correct": False, "prediction": None, "empty": False},
        {"difficulty": "hard", "length": "short", "correct": True, "prediction": "C", "empty": False},
        {"difficulty": "hard", "length": "short", "correct": False, "prediction": "B", "empty": False},
    ]
    metrics = lb.v2_metrics(rows)
    assert (metrics["accuracy"], metrics["correct"], metrics["trials"]) == (0.5, 2, 4)  # 2 of 4
    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_reference(2, 4))
    assert metrics["accuracy_easy"] == 0.5 and metrics["accuracy_hard"] == 0.5  # 1/2 each
    assert metrics["accuracy_short"] == pytest.approx(2 / 3) and metrics["trials_short"] == 3
    assert metrics["accuracy_long"] == 0.0 and metrics["accuracy_medium"] is None  # none medium
    assert (metrics["ci_low_short"], metrics["ci_high_short"]) == pytest.approx(wilson_reference(2, 3))
    assert metrics["unanswered"] == 1
    assert metrics["accuracy_strict"] == 0.5 and metrics["excluded"] == 0  # nothing empty: both conventions agree


def test_v2_empty_outputs_are_excluded_officially_and_wrong_strictly() -> None:
    """pred.py writes no result for an empty output and result.py divides by those left: 2 correct of the 3
    answered (2/3); counted wrong, 2 of 4. The easy group: 1 answered of 2: 1/1 officially, 1/2 strictly."""
    rows = [
        {"difficulty": "easy", "length": "short", "correct": True, "prediction": "A", "empty": False},
        {"difficulty": "easy", "length": "long", "correct": False, "prediction": None, "empty": True},
        {"difficulty": "hard", "length": "short", "correct": True, "prediction": "C", "empty": False},
        {"difficulty": "hard", "length": "short", "correct": False, "prediction": "B", "empty": False},
    ]
    metrics = lb.v2_metrics(rows)
    assert (metrics["accuracy"], metrics["correct"], metrics["trials"]) == (pytest.approx(2 / 3), 2, 3)
    assert (metrics["accuracy_strict"], metrics["trials_strict"]) == (0.5, 4)
    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_reference(2, 3))
    assert (metrics["ci_low_strict"], metrics["ci_high_strict"]) == pytest.approx(wilson_reference(2, 4))
    assert metrics["excluded"] == 1 and metrics["unanswered"] == 1
    assert metrics["accuracy_easy"] == 1.0 and metrics["accuracy_strict_easy"] == 0.5
    assert metrics["accuracy_long"] is None and metrics["accuracy_strict_long"] == 0.0  # result.py: division by 0
    everything_empty = lb.v2_metrics([{**r, "empty": True, "correct": False} for r in rows])
    assert everything_empty["accuracy"] is None and everything_empty["accuracy_strict"] == 0.0


# ---- prompts and truncation ---------------------------------------------------------------------------------


def example(**fields) -> lbdata.Example:
    base = {"id": "x", "input": "Who?", "context": "Alice met Bob.", "answers": ("Bob",), "length": 3,
            "all_classes": None}
    return lbdata.Example(**{**base, **fields})


def test_prompt_templates_are_filled_as_in_longbench() -> None:
    assert prompts.v1_text("hotpotqa", example()) == (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\nAlice met Bob.\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other words.\n\nQuestion: Who?\nAnswer:")
    assert prompts.v1_text("trec", example(context="Q1\nType: A", input="Q2\nType:")) == (
        "Please determine the type of the question below. Here are some examples of questions.\n\nQ1\nType: A\n"
        "Q2\nType:")
    assert prompts.v1_text("lcc", example(context="def f():\n")) == \
        "Please complete the code given below. \ndef f():\nNext line of code:\n"
    # braces in the data are text, not format fields
    assert "{x}" in prompts.v1_text("multifieldqa_zh", example(context="{x}"))
    v2 = lbdata.ChoiceExample(id="q", question=" Which? ", choices=(" a ", "b", "c", "d\n"), answer="A",
                          context="\nDOC\n", difficulty="easy", length="short")
    assert prompts.v2_text(v2) == (
        "Please read the following text and answer the question below.\n\n<text>\nDOC\n</text>\n\nWhat is the "
        "correct answer to this question: Which?\nChoices:\n(A) a\n(B) b\n(C) c\n(D) d\n\nFormat your response "
        "as follows: \"The correct answer is (insert answer here)\".")


def test_middle_truncation_keeps_head_and_tail() -> None:
    ids = list(range(10))
    assert prompts.middle_truncate(ids, 5) == [0, 1, 7, 8, 9]  # ⌊5/2⌋ = 2 first, 3 last
    assert prompts.middle_truncate(ids, 4) == [0, 1, 8, 9]
    assert prompts.middle_truncate(ids, 10) == ids and prompts.middle_truncate(ids, 50) == ids


def test_exact_budget_cuts_exactly_in_token_space(tiny_tokenizer) -> None:
    text = prompts.v1_text("hotpotqa", example(context=" ".join(f"Passage {i}: the number is {i}." for i in range(60))))
    full = tiny_tokenizer(text)["input_ids"]  # the tokenizer's own encoding, BOS included
    assert full[0] == tiny_tokenizer.bos_token_id and len(full) > 300
    for budget in (99, 100, 257):
        prompt = prompts.exact_prompt(Engine(None, tiny_tokenizer, 256), text, budget, chat=False)
        assert len(prompt.ids) == budget and prompt.truncated and prompt.full_tokens == len(full)
        assert prompt.ids == full[:budget // 2] + full[len(full) - (budget - budget // 2):]
    whole = prompts.exact_prompt(Engine(None, tiny_tokenizer, 256), text, 10_000, chat=False)
    assert whole.ids == full and not whole.truncated


def test_exact_budget_counts_the_chat_template(tiny_tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    with pytest.raises(engine.ChatTemplateError, match="no chat template.*without --chat-template"):
        prompts.exact_prompt(Engine(None, tok, 256), "hello", 50, chat=True)
    tok.chat_template = ("{% for m in messages %}<s>[USER] {{ m['content'] }} [/USER]{% endfor %}"
                         "{% if add_generation_prompt %} [BOT]{% endif %}")
    before = tok("<s>[USER] ", add_special_tokens=False)["input_ids"]
    after = tok(" [/USER] [BOT]", add_special_tokens=False)["input_ids"]
    body = tok("word " * 200, add_special_tokens=False)["input_ids"]
    prompt = prompts.exact_prompt(Engine(None, tok, 256), "word " * 200, 80, chat=True)
    room = 80 - len(before) - len(after)
    assert len(prompt.ids) == 80 and prompt.chat
    assert prompt.ids == before + body[:room // 2] + body[len(body) - (room - room // 2):] + after
    short = prompts.exact_prompt(Engine(None, tok, 256), "hi", 80, chat=True)
    assert short.ids == before + tok("hi", add_special_tokens=False)["input_ids"] + after


def test_greedy_min_new_tokens_blocks_stop_tokens_first(tiny) -> None:
    ids = data.encode(tiny.tokenizer, "The grass is green.", special=True)
    with torch.no_grad():
        logits = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    assert greedy(tiny.model, ids, 3, {first}) == [first]  # stops at once
    assert greedy(tiny.model, ids, 1, {first}, min_new_tokens=1) == [second]  # the best non-stop token


# ---- end to end ---------------------------------------------------------------------------------------------


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def v1_rows(n: int, dataset: str = "hotpotqa", **extra) -> list[dict]:
    # U+2028 (a line separator to str.splitlines, not to JSON Lines) occurs in LongBench texts
    return [{"input": f"Where does person {i} live?", "context": "Town list\u2028" + " ".join(
        f"Passage {j}: person {j} lives in town {j * 7}." for j in range(15 * (i + 1))),
        "answers": [f"town {i * 7}"], "length": 40 * (i + 1) * 15 * 5, "dataset": dataset, "language": "en",
        "all_classes": None, "_id": f"id{i}", **extra} for i in range(n)]


def eval_args(model_dir, out, data_dir, *extra) -> list[str]:
    return ["eval", "--model", str(model_dir), "--rope", "none", "--out", str(out), "--data-dir", str(data_dir),
            "--device", "cpu", "--dtype", "fp32", *extra]


def test_longbench_eval_end_to_end_records(tmp_path, tiny_model_dir, tiny) -> None:
    """budget=exact: prompts of length − max_new_tokens ids at most, sliced in token space."""
    write_jsonl(tmp_path / "hotpotqa.jsonl", v1_rows(3))
    out = tmp_path / "out"
    result = cli.invoke(app, eval_args(tiny_model_dir, out, tmp_path, "--task", "longbench:hotpotqa:budget=exact",
                                       "--lengths", "96,2000", "--samples", "2"))
    assert result.exit_code == 0, result.output
    records = {r["length"]: r for r in view.newest(results.Store(out).read())}
    assert set(records) == {96, 2000}
    tok = tiny.tokenizer
    for length, record in records.items():
        assert record["task"] == "longbench:hotpotqa" and record["status"] == "ok"
        assert record["config"] == {"samples": 2, "data": str(tmp_path), "chat_template": False,
                                    "max_new_tokens": 32, "budget": "exact"}
        assert record["metrics"]["examples"] == 2 and len(record["samples"]) == 2
        for i, sample in enumerate(record["samples"]):
            full = tok(prompts.v1_text("hotpotqa", lbdata.parse_v1(v1_rows(3)[i], "t", "hotpotqa")))["input_ids"]
            ids = prompts.middle_truncate(full, length - 32)
            assert sample["prompt_tokens"] == len(ids) == min(len(full), length - 32)
            assert sample["truncated"] == (len(full) > length - 32)
            # the same answer from transformers' own greedy generate
            with torch.no_grad():
                reference = tiny.model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            assert sample["prediction"] == tok.decode(reference[0, len(ids):], skip_special_tokens=True)
            assert sample["answers"] == [f"town {i * 7}"]
            assert sample["score"] == lm.qa_f1(sample["prediction"], f"town {i * 7}")
        scores = [s["score"] for s in record["samples"]]
        assert record["metrics"]["score"] == round(100 * sum(scores) / 2, 2)
    assert records[96]["metrics"]["truncated"] == 2 and records[2000]["metrics"]["truncated"] == 0
    assert records[96]["data"]["source"] == str(tmp_path / "hotpotqa.jsonl")
    # the same command again finds both cells recorded
    again = cli.invoke(app, eval_args(tiny_model_dir, out, tmp_path, "--task", "longbench:hotpotqa:budget=exact",
                                      "--lengths", "96,2000", "--samples", "2"))
    assert again.exit_code == 0 and "2 already recorded" in flat(again)


def test_longbench_official_budget_end_to_end(tmp_path, tiny_model_dir, tiny) -> None:
    """The default, budget=official: pred.py's max_length for the length, each half decoded, the text encoded
    again (written out here as pred.py does it); the answer generated after it."""
    write_jsonl(tmp_path / "hotpotqa.jsonl", v1_rows(2))
    out = tmp_path / "out"
    result = cli.invoke(app, eval_args(tiny_model_dir, out, tmp_path, "--task", "longbench:hotpotqa",
                                       "--lengths", "700,3000", "--max-new-tokens", "3"))
    assert result.exit_code == 0, result.output
    records = {r["length"]: r for r in view.newest(results.Store(out).read())}
    tok = tiny.tokenizer
    for length, max_length in ((700, 683 - 500), (3000, 2929 - 500)):  # ⌊length·1000/1024⌋ − 500
        record = records[length]
        assert record["task_spec"].endswith(":budget=official") and record["data"]["prompt_budget"] == max_length
        for i, sample in enumerate(record["samples"]):
            text = prompts.v1_text("hotpotqa", lbdata.parse_v1(v1_rows(2)[i], "t", "hotpotqa"))
            ids = tok(text).input_ids
            if len(ids) > max_length:
                half = int(max_length / 2)
                text = tok.decode(ids[:half], skip_special_tokens=True) + tok.decode(ids[-half:],
                                                                                     skip_special_tokens=True)
            reference = tok(text).input_ids
            assert sample["prompt_tokens"] == len(reference) and sample["full_tokens"] == len(ids)
            assert sample["truncated"] == (len(ids) > max_length)
            with torch.no_grad():
                answer = tiny.model.generate(torch.tensor([reference]), max_new_tokens=3, do_sample=False,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            assert sample["prediction"] == tok.decode(answer[0, len(reference):], skip_special_tokens=True)
    assert records[700]["metrics"]["truncated"] == 2 and records[3000]["metrics"]["truncated"] == 0


def test_longbench_e_records_length_buckets(tmp_path, tiny_model_dir) -> None:
    classes = ["Animal", "Food", "Location"]
    rows = [{"input": f"Q{i}\nType:", "context": "Q: what eats grass?\nType: Animal\n" * 3, "answers": [c],
             "length": length, "all_classes": classes, "_id": str(i)}
            for i, (c, length) in enumerate([("Animal", 100), ("Food", 5000), ("Animal", 9000)])]
    write_jsonl(tmp_path / "trec_e.jsonl", rows)
    out = tmp_path / "out"
    result = cli.invoke(app, eval_args(tiny_model_dir, out, tmp_path, "--task", "longbench:trec_e", "--lengths",
                                       "200", "--max-new-tokens", "4", "--task-arg", "budget=exact"))
    assert result.exit_code == 0, result.output
    (record,) = view.newest(results.Store(out).read())
    metrics, samples = record["metrics"], record["samples"]
    assert record["task"] == "longbench:trec_e" and metrics["examples"] == 3
    assert [s["score"] for s in samples] == [lm.score_example("trec", s["prediction"], s["answers"], classes)
                                             for s in samples]
    for i, name in enumerate(("0-4k", "4-8k", "8k+")):  # one example per bucket, by its length field
        assert metrics[f"score_{name}"] == round(100 * samples[i]["score"], 2)
        assert metrics[f"examples_{name}"] == 1


def test_longbench_v2_end_to_end(tmp_path, tiny_model_dir) -> None:
    rows = [{"_id": str(i), "domain": "d", "sub_domain": "s", "difficulty": difficulty, "length": length,
             "question": f"Which town is number {i}?", "choice_A": "one", "choice_B": "two", "choice_C": "three",
             "choice_D": "four", "answer": "ABCD"[i], "context": "Town one. Town two. " * 20}
            for i, (difficulty, length) in enumerate([("easy", "short"), ("hard", "short"), ("hard", "long")])]
    write_jsonl(tmp_path / "longbench_v2_short.jsonl", rows)  # any one .jsonl of v2 questions
    write_jsonl(tmp_path / "hotpotqa.jsonl", v1_rows(1))  # v1 files beside it are not v2 files
    out = tmp_path / "out"
    result = cli.invoke(app, eval_args(tiny_model_dir, out, tmp_path, "--task", "longbench-v2:budget=exact",
                                       "--lengths", "150", "--max-new-tokens", "6"))
    assert result.exit_code == 0, result.output
    (record,) = view.newest(results.Store(out).read())
    metrics, samples = record["metrics"], record["samples"]
    assert [s["answer"] for s in samples] == ["A", "B", "C"] and all(s["prompt_tokens"] == 144 for s in samples)
    assert [s["prediction"] for s in samples] == [lm.extract_choice(s["response"]) for s in samples]
    correct = sum(s["correct"] for s in samples)
    assert (metrics["correct"], metrics["trials"], metrics["accuracy"]) == (correct, 3, correct / 3)
    assert (metrics["ci_low"], metrics["ci_high"]) == pytest.approx(wilson_reference(correct, 3))
    assert metrics["trials_hard"] == 2 and metrics["trials_easy"] == 1 and metrics["trials_long"] == 1
    assert metrics["trials_medium"] == 0 and metrics["accuracy_medium"] is None
    assert record["data"]["source"] == str(tmp_path / "longbench_v2_short.jsonl")
    write_jsonl(tmp_path / "other_v2.jsonl", rows)
    with pytest.raises(data.DataError, match=r"several LongBench v2 files \(longbench_v2_short.jsonl, other_v2"):
        task("longbench-v2", tmp_path)


# ---- errors -------------------------------------------------------------------------------------------------


def test_unknown_member_lists_the_valid_ones(tiny_model_dir, tmp_path) -> None:
    result = cli.invoke(app, eval_args(tiny_model_dir, tmp_path, tmp_path, "--task", "longbench:qaspr"))
    assert result.exit_code == 2
    assert "unknown LongBench task 'qaspr'" in flat(result)
    for name in ("all_e", "narrativeqa", "repobench-p", "qasper_e"):
        assert name in flat(result)
    with pytest.raises(TaskError, match="LongBench-E has no 'narrativeqa'.*qasper_e"):
        evals.expand("longbench:narrativeqa_e")
    assert len(evals.expand("longbench:all")) == 21 and len(evals.expand("longbench:all_e")) == 13


def task(name: str, data_dir) -> evals.Task:
    """The task, created (and so validated: its data read) with this data directory."""
    (found,) = evals.resolve(name, {"data_dir": None if data_dir is None else str(data_dir)})
    return found


def test_missing_data_file_and_offline_hub_name_data_dir(tmp_path, monkeypatch) -> None:
    with pytest.raises(data.DataError, match=r"no data file .*hotpotqa\.jsonl.*--data-dir"):
        task("longbench:hotpotqa", tmp_path)
    with pytest.raises(data.DataError, match="data_dir .* is not a directory"):
        task("longbench:hotpotqa", tmp_path / "nowhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(data.DataError, match=r"no --data-dir given and the HuggingFace hub is offline.*--data-dir"):
        task("longbench:hotpotqa", None)
    with pytest.raises(data.DataError, match="longbench_v2.jsonl nor data.json nor another .jsonl"):
        task("longbench-v2", tmp_path)


def test_bad_jsonl_is_named_by_line_and_field(tmp_path) -> None:
    good = json.dumps(v1_rows(1)[0])
    (tmp_path / "hotpotqa.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(data.DataError, match=r"hotpotqa\.jsonl:2 is not valid JSON"):
        task("longbench:hotpotqa", tmp_path)
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps({"input": "q", "context": "c", "length": 1}) + "\n")
    with pytest.raises(data.DataError, match=r"hotpotqa\.jsonl:1: missing field 'answers'.*found: input, context"):
        task("longbench:hotpotqa", tmp_path)
    (tmp_path / "hotpotqa.jsonl").write_text(json.dumps({**v1_rows(1)[0], "answers": "town 0"}) + "\n")
    with pytest.raises(data.DataError, match="field 'answers' must be a list of strings"):
        task("longbench:hotpotqa", tmp_path)
    (tmp_path / "trec.jsonl").write_text(good + "\n")  # all_classes null: a classification task needs them
    with pytest.raises(data.DataError, match="trec is a classification task; its lines need 'all_classes'"):
        task("longbench:trec", tmp_path)
    (tmp_path / "longbench_v2.jsonl").write_text(json.dumps(
        {"question": "q", "choice_A": "a", "choice_B": "b", "choice_C": "c", "choice_D": "d", "answer": "E",
         "context": "c", "difficulty": "easy", "length": "short"}) + "\n")
    with pytest.raises(data.DataError, match="field 'answer' is 'E'; valid: A, B, C, D"):
        task("longbench-v2", tmp_path)


def test_option_errors(tmp_path, tiny_model_dir) -> None:
    write_jsonl(tmp_path / "hotpotqa.jsonl", v1_rows(1))
    write_jsonl(tmp_path / "lcc.jsonl", v1_rows(1, "lcc"))
    result = cli.invoke(app, eval_args(tiny_model_dir, tmp_path / "o", tmp_path, "--task",
                                       "longbench:hotpotqa:budget=exact", "--lengths", "32"))
    assert result.exit_code == 2
    assert "length 32 leaves no room for the prompt: 32 tokens are kept for the answer" in flat(result)
    result = cli.invoke(app, eval_args(tiny_model_dir, tmp_path / "o", tmp_path, "--task", "longbench:hotpotqa",
                                       "--lengths", "500"))
    assert result.exit_code == 2
    assert "length 500 leaves no prompt under LongBench's official budget (⌊length·1000/1024⌋ − 500 = -12" in \
        flat(result)
    result = cli.invoke(app, eval_args(tiny_model_dir, tmp_path / "o", tmp_path, "--task", "longbench:lcc",
                                       "--task-arg", "edit_sim=exact"))
    assert result.exit_code == 2 and "edit_sim=exact is not valid" in flat(result)
    assert "one of difflib, levenshtein" in flat(result)
    result = cli.invoke(app, eval_args(tiny_model_dir, tmp_path / "o", tmp_path, "--task", "longbench:hotpotqa",
                                       "--chat-template", "--lengths", "2000"))
    assert result.exit_code == 2 and "no chat template" in flat(result)


# ---- aggregation --------------------------------------------------------------------------------------------


def record(task: str, score: float | None, *, rope="none", length=4096, status="ok", max_new_tokens=32,
           **metrics) -> dict:
    """A schema-1 LongBench record (answer budgets differ between tasks: they do not split the averages)."""
    return {"task": f"longbench:{task}", "model": "m", "rope": rope, "rope_input": rope, "length": length,
            "depth": None, "train_len": 2048, "dtype": "float32", "attn": "sdpa", "status": status,
            "config": {"samples": "all", "data": "d", "chat_template": False, "max_new_tokens": max_new_tokens},
            "metrics": {"score": score, "examples": 10, **metrics}, "finished_at": "2026-01-01T00:00:00"}


def test_category_averages_then_overall() -> None:
    records = [record("narrativeqa", 20.0), record("qasper", 40.0), record("hotpotqa", 10.0),
               record("lcc", 50.0), record("musique", 99.0, status="error"),  # errors are left out
               record("narrativeqa", 70.0, rope="yarn")]
    rows = {row["rope"]: row for row in summaries.category_rows(view.newest(records))}
    # none: single-doc (20 + 40)/2 = 30, multi-doc 10, code 50; overall (30 + 10 + 50)/3 = 30
    assert rows["none"]["categories"] == {"single-doc QA": 30.0, "multi-doc QA": 10.0, "code": 50.0}
    assert rows["none"]["overall"] == 30.0 and rows["none"]["suite"] == "LongBench"
    assert rows["yarn"]["categories"] == {"single-doc QA": 70.0} and rows["yarn"]["overall"] == 70.0
    e = [record("qasper_e", 30.0, **{"score_0-4k": 40.0, "score_4-8k": 20.0, "score_8k+": None}),
         record("trec_e", 60.0, **{"score_0-4k": 80.0, "score_4-8k": 50.0, "score_8k+": 10.0})]
    (row,) = summaries.category_rows(view.newest(e))
    # categories single-doc 30, few-shot 60: overall 45; 0-4k (40 + 80)/2 = 60; 8k+ only few-shot: 10
    assert row["suite"] == "LongBench-E" and row["overall"] == 45.0
    assert row["buckets"]["0-4k"]["overall"] == 60.0 and row["buckets"]["4-8k"]["overall"] == 35.0
    assert row["buckets"]["8k+"] == {"categories": {"single-doc QA": None, "few-shot": 10.0}, "overall": 10.0}


def test_results_and_report_print_the_same_category_tables(tmp_path, monkeypatch) -> None:
    from lctx import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 250)
    store = results.Store(tmp_path)
    for rec in (record("narrativeqa", 20.0), record("qasper", 40.0, max_new_tokens=128), record("lcc", 50.0)):
        store.append(rec)
    records = view.newest(store.read())
    titles = [t.title for t in view.tables.build(records)]
    assert any(title.startswith("longbench:qasper · score ↑ ·") for title in titles)  # the score, not perplexity
    (summary,) = summaries.build(records)
    assert summary.title.startswith("LongBench by category") and "3 tasks: lcc, narrativeqa, qasper" in summary.title
    assert summary.columns == ["variant", "single-doc QA", "code", "overall"]
    assert summary.rows == [["none", "30.00", "50.00", "40.00"]]  # (20+40)/2; 50; (30+50)/2
    result = cli.invoke(app, ["results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "│ none    │ 30.00         │ 50.00 │ 40.00   │" in result.output  # the category table is printed
    done = cli.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "rep"), "--no-figures"])
    assert done.exit_code == 0, done.output
    assert "| none | 30.00 | 50.00 | 40.00 |" in (tmp_path / "rep" / "tables.md").read_text()
