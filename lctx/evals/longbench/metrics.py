"""LongBench's official metrics (THUDM/LongBench ``metrics.py`` and ``eval.py``), written to give the same numbers.

Per task (:data:`METRICS`): QA F1 (English: SQuAD-style normalization, then whitespace tokens; Chinese: jieba
words, each stripped of punctuation and whitespace), ROUGE-L F (the ``rouge`` package that LongBench uses;
Chinese text is first cut into words with jieba and joined by spaces), the classification score, the
retrieval score (English ``Paragraph N``, Chinese ``段落N``), the count score and code edit similarity. An
example's score is the best over its reference answers; a task's score is the mean ×100 rounded to 2 decimals.
For trec, triviaqa, samsum and lsht only the first line of the prediction is scored (leading newlines dropped).

Behaviours of the official code kept on purpose, because they change the numbers:

* classification: the "remove classes contained in the answer" loop runs over the list it removes from, so the
  class right after a removed one is never checked; and the difflib fallback for a prediction naming no class
  never runs (the official test is ``list != 0``, always true), so such a prediction scores 0.
* ROUGE: any failure of the library scores 0 (the official ``except:``): an empty prediction, and texts whose
  LCS back-tracking recurses past Python's recursion limit (long unpunctuated Chinese summaries).
* code edit similarity: the first line of the prediction that contains none of ``\\```, ``#``, ``//`` (none:
  the empty string) against the reference, by ``fuzzywuzzy.fuzz.ratio``: an integer percentage, 100 for equal
  strings, 0 when one is empty. fuzzywuzzy computes it with difflib's ``SequenceMatcher`` unless
  ``python-Levenshtein`` is installed, when it is the InDel ratio instead (THUDM/LongBench#96);
  ``edit_sim="difflib"`` (the default: LongBench's requirements install fuzzywuzzy alone) or
  ``"levenshtein"`` picks one.
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

# Chinese punctuation removed by LongBench's normalize_zh_answer, character for character (its set has 》 but no 《)
ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
                  "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_EN_PUNCTUATION = set(string.punctuation)
_ALL_PUNCTUATION = set(string.punctuation + ZH_PUNCTUATION)
EDIT_SIM_BACKENDS = ("difflib", "levenshtein")
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


# ---- tokenization ------------------------------------------------------------------------------------------

_jieba = None


def jieba_words(text: str) -> list[str]:
    """jieba's precise-mode words (``cut_all=False``), as LongBench cuts Chinese text."""
    global _jieba
    if _jieba is None:
        import jieba

        jieba.setLogLevel(logging.WARNING)  # it announces loading its dictionary on stderr otherwise
        _jieba = jieba
    return list(_jieba.cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, replace the articles a/an/the by spaces, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCTUATION).split())


# ---- the metrics -------------------------------------------------------------------------------------------


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0 when nothing overlaps."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_: Any) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_: Any) -> float:
    def words(text: str) -> list[str]:
        return [w for w in (normalize_zh_answer(t) for t in jieba_words(text)) if w]

    return token_f1(words(prediction), words(reference))


def rouge_l(prediction: str, reference: str, **_: Any) -> float:
    """ROUGE-L F of the ``rouge`` package (sentences split at '.'); 0 where the library fails (see module doc)."""
    from rouge import Rouge

    try:
        return float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"])
    except (ValueError, RecursionError):
        return 0.0


def rouge_l_zh(prediction: str, reference: str, **_: Any) -> float:
    return rouge_l(" ".join(jieba_words(prediction)), " ".join(jieba_words(reference)))


def classification(prediction: str, reference: str, *, all_classes: Sequence[str] | None = None, **_: Any) -> float:
    """1/k when the reference is among the k classes named in the prediction (after the official pruning)."""
    if not all_classes:
        raise ValueError("the classification score needs the example's all_classes (the list of class names)")
    named = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(named):  # the official for-loop removes from the list it iterates: emulate its skipping
        term = named[i]
        if term in reference and term != reference:
            named.remove(term)
        i += 1
    return 1.0 / len(named) if reference in named else 0.0


def _number_share(prediction: str, target: str) -> float:
    """The share of the numbers in the prediction that equal ``target``; 0 when it has none."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def count(prediction: str, reference: str, **_: Any) -> float:
    return _number_share(prediction, str(reference))


def _retrieval(pattern: str, prediction: str, reference: str) -> float:
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"retrieval answer {reference!r} does not name a paragraph (pattern {pattern!r})")
    return _number_share(prediction, found[0])


def retrieval(prediction: str, reference: str, **_: Any) -> float:
    return _retrieval(r"Paragraph (\d+)", prediction, reference)


def retrieval_zh(prediction: str, reference: str, **_: Any) -> float:
    return _retrieval(r"段落(\d+)", prediction, reference)


def _lcs_length(a: str, b: str) -> int:
    """Length of the longest common subsequence of two strings (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for ch in a:
        diagonal = 0
        for j, other in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if ch == other else max(row[j], row[j - 1])
    return row[-1]


def fuzz_ratio(a: str, b: str, backend: str = "difflib") -> int:
    """``fuzzywuzzy.fuzz.ratio``: 100 if equal, 0 if either is empty, else round(100 × similarity)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    if backend == "difflib":
        similarity = difflib.SequenceMatcher(None, a, b).ratio()
    elif backend == "levenshtein":  # InDel: 1 - (insertions + deletions) / total length
        total = len(a) + len(b)
        similarity = 1.0 - (total - 2 * _lcs_length(a, b)) / total
    else:
        raise ValueError(f"unknown edit similarity backend {backend!r}; choose one of {', '.join(EDIT_SIM_BACKENDS)}")
    return int(round(100 * similarity))


def first_code_line(prediction: str) -> str:
    """The first line (leading newlines dropped) with no backtick, '#' or '//'; '' when there is none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim(prediction: str, reference: str, *, edit_sim: str = "difflib", **_: Any) -> float:
    return fuzz_ratio(first_code_line(prediction), reference, edit_sim) / 100


Metric = Callable[..., float]

METRICS: dict[str, Metric] = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_l_zh,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "vcsum": rouge_l_zh,
    "trec": classification, "triviaqa": qa_f1, "samsum": rouge_l, "lsht": classification,
    "passage_count": count, "passage_retrieval_en": retrieval, "passage_retrieval_zh": retrieval_zh,
    "lcc": code_sim, "repobench-p": code_sim,
}


def score_example(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None,
                  edit_sim: str = "difflib") -> float:
    """One example's score in [0, 1]: the best over its answers, after the first-line cut for few-shot tasks."""
    metric = METRICS[dataset]
    if dataset in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for answer in answers:
        best = max(best, metric(prediction, answer, all_classes=all_classes, edit_sim=edit_sim))
    return best


def task_score(scores: Sequence[float]) -> float | None:
    """The task score as LongBench reports it: 100 × mean, rounded to 2 decimals; None without examples."""
    return round(100 * sum(scores) / len(scores), 2) if scores else None


# LongBench-E length buckets, by the example's ``length`` field (words, or characters for Chinese)
BUCKETS = ("0-4k", "4-8k", "8k+")


def bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def bucket_scores(scores: Sequence[float], lengths: Sequence[int]) -> dict[str, float | None]:
    """Task score per LongBench-E bucket (None for an empty bucket)."""
    grouped: dict[str, list[float]] = {name: [] for name in BUCKETS}
    for score, length in zip(scores, lengths, strict=True):
        grouped[bucket(length)].append(score)
    return {name: task_score(values) for name, values in grouped.items()}


# ---- LongBench v2 ------------------------------------------------------------------------------------------


def extract_choice(response: str) -> str | None:
    """LongBench v2's answer extraction: "The correct answer is (X)" or "... is X" after removing '*'."""
    response = response.strip().replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response) or re.search(
        r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None
