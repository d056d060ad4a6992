"""LongBench's prompts as its official code builds them: templates, answer budgets, categories, truncation.

From THUDM/LongBench: ``config/dataset2prompt.json`` (templates), ``config/dataset2maxlen.json`` (answer
budgets), the paper's six categories, ``pred.py``'s rule of which tasks are not chat-wrapped and its middle
truncation (v1: ``int(max_length/2)`` ids at each end, each half decoded and the text re-encoded, the chat
wrapper added after; v2: ``max_len//2`` first and ``-max_len//2`` last ids decoded as one text), and LongBench
v2's ``prompts/0shot.txt``. :func:`exact_prompt` is lctx's own convention (``budget=exact``): ids sliced to
exactly the budget, the chat wrapper counted in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lctx.engine import Engine
from lctx.evals.longbench.data import ChoiceExample, Example

# config/dataset2prompt.json
PROMPTS = {
    "narrativeqa": (
        # "asconcisely" (no space, twice) is the official text in every version of dataset2prompt.json: kept, so
        # that narrativeqa's prompts are the ones LongBench's published scores were measured with
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story asconcisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "qasper": (
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in "
        "the article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the "
        "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
        "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
        "explanation.\n\nQuestion: {input}\n\nAnswer:"),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\n"
        "Answer:"),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答："),
    "hotpotqa": (
        "Answer the question based on the given passages. Only give me the answer and do not output any other "
        "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
        "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:"),
    "dureader": "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n"
                "问题：{input}\n回答：",
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:"),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:"),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:"),
    "vcsum": "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
    "trec": ("Please determine the type of the question below. Here are some examples of questions.\n\n"
             "{context}\n{input}"),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other "
        "words. The following are some examples.\n\n{context}\n\n{input}"),
    "samsum": ("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
               "{context}\n\n{input}"),
    "lsht": "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the "
        "final count of unique paragraphs after removing duplicates. The output format should only contain the "
        "number, such as 1, 2, 3, and so on.\n\nThe final answer is: "),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number "
        "of the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", "
        "\"Paragraph 2\", etc.\n\nThe answer is: "),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        "请输入摘要所属段落的编号。答案格式必须是\"段落1\"，\"段落2\"等格式\n\n答案是："),
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
PROMPTS["2wikimqa"] = PROMPTS["musique"] = PROMPTS["hotpotqa"]

# config/dataset2maxlen.json
MAX_NEW_TOKENS = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32,
    "2wikimqa": 32, "musique": 32, "dureader": 128, "gov_report": 512, "qmsum": 512, "multi_news": 512,
    "vcsum": 512, "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64, "passage_count": 32,
    "passage_retrieval_en": 32, "passage_retrieval_zh": 32, "lcc": 64, "repobench-p": 64,
}

# the six categories of the LongBench paper, in its order
CATEGORIES = {
    "single-doc QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi-doc QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few-shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
CATEGORY = {task: category for category, tasks in CATEGORIES.items() for task in tasks}
DATASETS = tuple(CATEGORY)  # the 21 tasks, in LongBench's order
CHINESE = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
E_DATASETS = ("qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "gov_report", "multi_news", "trec", "triviaqa",
              "samsum", "passage_count", "passage_retrieval_en", "lcc", "repobench-p")
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})  # pred.py: no chat wrapping
CODE = frozenset({"lcc", "repobench-p"})

# prompts/0shot.txt of LongBench v2
V2_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>\n\nWhat is the "
    "correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\nFormat your "
    "response as follows: \"The correct answer is (insert answer here)\"."
)
V2_MAX_NEW_TOKENS = 128




@dataclass
class PromptIds:
    ids: list[int]
    full_tokens: int  # the whole prompt's ids before truncation (the tokenizer's special tokens included)
    chat: bool
    truncated: bool


def v1_budget(length: int) -> int:
    """The official prompt budget for a cell ``length``: pred.py's ``max_length`` of a model of that context.

    model2maxlen.json gives 3500, 7500, 15500 and 31500 to its 4k, 8k, 16k and 32k models: thousands of the
    context in k (×1024) tokens, less 500. The same rule at any length: ⌊length·1000/1024⌋ − 500.
    """
    return length * 1000 // 1024 - 500


def v2_budget(length: int) -> int:
    """LongBench v2's official ``max_len`` (model2maxlen.json: 120000 for its 128k models), in proportion."""
    return length * 120_000 // 131_072


def official_v1(engine: Engine, text: str, max_length: int, chat: bool) -> PromptIds:
    """LongBench v1's pred.py: over ``max_length`` ids (special tokens included), the first and the last
    ``int(max_length/2)`` are decoded separately (special tokens skipped) and the joined text is the prompt,
    wrapped in the chat template if ``chat`` and tokenized again; the wrapper is not counted."""
    ids = engine.encode(text)
    truncated = len(ids) > max_length
    if truncated:
        half = max_length // 2  # int(max_length/2): one id fewer than an odd budget
        text = engine.decode(ids[:half]) + engine.decode(ids[-half:])
    return PromptIds(engine.chat(text) if chat else engine.encode(text), len(ids), chat, truncated)


def official_v2(engine: Engine, text: str, max_len: int, chat: bool) -> PromptIds:
    """LongBench v2's pred.py: over ``max_len`` ids, ``ids[:max_len//2] + ids[-max_len//2:]`` (the tail keeps
    ⌈max_len/2⌉: ``-max_len//2`` floors the negative) decoded as one text; the chat template comes after."""
    ids = engine.encode(text)
    text = official_v2_text(engine, text, max_len, ids)
    return PromptIds(engine.chat(text) if chat else engine.encode(text), len(ids), chat, len(ids) > max_len)


def official_v2_text(engine: Engine, text: str, max_len: int, ids: list[int] | None = None) -> str:
    """The text LongBench v2's pred.py sends for ``text`` (``ids``: its ids with special tokens, if known)."""
    ids = engine.encode(text) if ids is None else ids
    if len(ids) <= max_len:
        return text
    return engine.decode(ids[:max_len // 2] + ids[-max_len // 2:])


def middle_truncate(ids: list[int], budget: int) -> list[int]:
    """The first ⌊budget/2⌋ and last ⌈budget/2⌉ ids when there are more than ``budget``."""
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):]


def exact_prompt(engine: Engine, text: str, budget: int, chat: bool) -> PromptIds:
    """lctx's convention: ``text`` as ids of at most ``budget`` tokens, cut in the middle in token space (never
    decoded and re-encoded); wrapped in the chat template if ``chat``, the wrapper counted in the budget.

    Without the chat template the ids are the tokenizer's own prefix (BOS) and the text; with it, the
    template's ids around the text, whose middle is cut so that the whole fits.
    """
    if chat:
        before, after = engine.chat_wrapper()
        body = engine.encode(text, special=False)
        room = budget - len(before) - len(after)
        full = len(before) + len(body) + len(after)
        return PromptIds(before + middle_truncate(body, room) + after, full, True, full > budget)
    ids = engine.prefix + engine.encode(text, special=False)
    return PromptIds(middle_truncate(ids, budget), len(ids), False, len(ids) > budget)


def v1_text(dataset: str, example: Example) -> str:
    return PROMPTS[dataset].format(context=example.context, input=example.input)


def v2_text(example: ChoiceExample) -> str:
    """prompts/0shot.txt filled as LongBench v2's pred.py does (successive replaces of stripped fields)."""
    text = V2_TEMPLATE.replace("$DOC$", example.context.strip()).replace("$Q$", example.question.strip())
    for letter, choice in zip("ABCD", example.choices, strict=True):
        text = text.replace(f"$C_{letter}$", choice.strip())
    return text
