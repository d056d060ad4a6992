"""RULER's synthetic tasks (``synthetic:<member>``).

The tasks are RULER's (Hsieh et al. 2024, arXiv:2404.06654; NVIDIA/RULER ``scripts/data/synthetic``), with
RULER's scoring (``string_match_all``: a trial scores the fraction of its answers found, case-insensitively, in
the output; ``string_match_part`` for QA: 1 when any answer is found). ``fit`` says how a prompt is built:

* ``fit=ruler`` (default): as RULER's scripts build it (:mod:`lctx.evals.synthetic.ruler`): its templates,
  haystack layouts, word lists and random draws (``seed=42`` is RULER's), the prompt tokenized as one text, and
  prompt + answer (``max_new_tokens``, RULER's budgets) within the cell's length, so prompts are shorter than it.
* ``fit=exact``: lctx's own generator: the prompt **exactly** the cell's length, assembled in token space, the
  answer generated after it (so prompt + answer pass the length); its own layout (see :mod:`.base`).

As in RULER's ``synthetic.yaml``, members are *data*: presets of a few generators' parameters, so
``synthetic:niah-multikey`` is the needle generator with ``keys=4`` and ``synthetic:niah-multikey:keys=8``
changes it.

=====================  ==========================================  =============================================
member                 RULER task                                  preset
=====================  ==========================================  =============================================
``niah-single``        niah_single_2                               needles: one word key, one 7-digit number
``niah-uuid``          niah_single_3                               needles, ``value_type=uuids``
``niah-multikey``      niah_multikey_1                             needles, ``keys=4`` (one asked)
``niah-multivalue``    niah_multivalue                             needles, ``values=4``
``niah-multiquery``    niah_multiquery                             needles, ``keys=4:queries=4``
``kv-retrieval``       niah_multikey_3                             needles, UUID keys and values, ``haystack=needles``
``variable-tracking``  vt                                          a chain of ``hops=4`` assignments
``common-words``       cwe                                         the ``common=10`` most repeated words
``frequent-words``     fwe                                         the 3 most frequent coded words (Zipf α=2)
``qa-squad``           qa_1                                        QA over SQuAD 2.0 documents (``--data-dir``)
``qa-hotpotqa``        qa_2                                        QA over HotpotQA documents (``--data-dir``)
=====================  ==========================================  =============================================

``all`` runs every member that needs no data files (all but the QA tasks); ``cwe``, ``fwe``, ``qa_1`` and
``qa_2`` are aliases. Haystacks: ``corpus`` (the task's ``data``, default
the Python reference manual; RULER's "essay"), ``noise`` (RULER's ``The grass is green. …``) or ``needles``
(distractor needles one per line). Each length records ``score`` (mean over trials, a fraction; RULER reports
100×) and ``accuracy`` (trials with every answer found) with a Wilson 95% interval. RULER's effective length is a
summary of the view (``lctx results`` / ``lctx report``, ``--threshold``).
"""

from __future__ import annotations

from lctx.evals import TaskError, TaskFamily, TaskType
from lctx.evals.synthetic.needles import Needles
from lctx.evals.synthetic.qa import QuestionAnswering
from lctx.evals.synthetic.tracking import VariableTracking
from lctx.evals.synthetic.words import CommonWords, FrequentWords

PREFIX = "synthetic"
# member -> (generator, parameter preset, RULER task, description)
PRESETS = {
    "niah-single": (Needles, {}, "niah_single_2", "one key's 7-digit number hidden in the haystack"),
    "niah-uuid": (Needles, {"value_type": "uuids"}, "niah_single_3", "one key's UUID hidden in the haystack"),
    "niah-multikey": (Needles, {"keys": 4}, "niah_multikey_1", "four keys' numbers hidden, one of them asked"),
    "niah-multivalue": (Needles, {"values": 4}, "niah_multivalue", "four numbers of one key hidden, all asked"),
    "niah-multiquery": (Needles, {"keys": 4, "queries": 4}, "niah_multiquery",
                        "four keys' numbers hidden, all asked"),
    "kv-retrieval": (Needles, {"key_type": "uuids", "value_type": "uuids", "haystack": "needles"}, "niah_multikey_3",
                     "the value of one UUID key among UUID key-value needles"),
    "variable-tracking": (VariableTracking, {}, "variable_tracking",
                          "every variable of an assignment chain that holds a value"),
    "common-words": (CommonWords, {}, "common_words_extraction", "the 10 most repeated words of a numbered list"),
    "frequent-words": (FrequentWords, {}, "freq_words_extraction",
                       "the 3 most frequent coded words of Zipf-distributed text"),
    "qa-squad": (QuestionAnswering, {}, "qa_1", "a SQuAD question answered among distractor paragraphs"),
    "qa-hotpotqa": (QuestionAnswering, {"dataset": "hotpotqa"}, "qa_2",
                    "a HotpotQA question answered among distractor paragraphs"),
}
ALIASES = {"cwe": "common-words", "fwe": "frequent-words", "qa_1": "qa-squad", "qa_2": "qa-hotpotqa"}
NEEDS_DATA = ("qa-squad", "qa-hotpotqa")
MEMBERS = {member: TaskType(f"{PREFIX}:{member}", cls, tuple(preset.items()), f"RULER {ruler}: {description}",
                            (("ruler", ruler),))
           for member, (cls, preset, ruler, description) in PRESETS.items()}


def members() -> str:
    return "|".join([*MEMBERS, *ALIASES, "all"])


def resolve(member: str) -> list[TaskType]:
    """``all``, a member name or an alias → task types."""
    if member == "all":
        return [kind for name, kind in MEMBERS.items() if name not in NEEDS_DATA]
    name = ALIASES.get(member, member)
    if name not in MEMBERS:
        raise TaskError(f"unknown synthetic task {member!r}. Valid: {PREFIX}:<{members()}>")
    return [MEMBERS[name]]


FAMILY = TaskFamily(PREFIX, members(), resolve, lambda: list(MEMBERS.values()), figure="tasks_by_length",
                    summary="effective_length")
