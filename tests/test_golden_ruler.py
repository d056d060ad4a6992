"""RULER prompts equal RULER's own generator's: tests/data/golden/ruler.json was written by
tests/golden/ruler_official.py, which runs RULER's prepare.py (and through it its task scripts) on tokenizers
committed here. Same templates, layouts, word lists, random draws and length accounting: the same texts."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import math
from functools import cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lctx import evals
from lctx.engine import Engine
from lctx.evals.synthetic import ruler, ruler_data

ROOT = Path(__file__).resolve().parent
GOLDEN = json.loads((ROOT / "data" / "golden" / "ruler.json").read_text(encoding="utf-8"))
TOKENIZERS = {"bpe-512": ROOT / "data" / "golden" / "bpe-512", "toy-byte-128": ROOT / "data" / "toy-byte-128"}
CASES = GOLDEN["cases"]


@cache
def engine(name: str, template: str) -> Engine:
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS[name]))
    if template != "base":
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = GOLDEN["chat_templates"][template]
    return Engine(None, tokenizer, 0)


def task(spec: str) -> evals.Task:
    spec = spec.replace("data=tests/data/", f"data={ROOT / 'data'}/")
    defaults = {"samples": GOLDEN["samples"]}
    if ":qa-" in spec:
        defaults["data_dir"] = str(ROOT / "data" / "golden" / "qa")
    (found,) = evals.resolve(spec, defaults)
    return found


def test_the_fixture_was_made_from_the_official_repository():
    assert GOLDEN["official"]["repo"] == "NVIDIA/RULER" and len(GOLDEN["official"]["commit"]) == 40
    assert {c["task"] for c in CASES} >= {"niah_single_1", "niah_multikey_3", "vt", "cwe", "fwe", "qa_1", "qa_2"}
    assert any(c["length"] % 2 for c in CASES)  # odd lengths among them


# cwe at 4500 on the 512-token BPE: no list fits but RULER's smallest (10 words), which RULER draws again and again
# until one fits (thousands of times here); lctx does the same, which takes a minute and a half
SLOW = {("cwe", "bpe-512", 4500)}
# the tasks whose prompts hold wonderwords' words (niah's keys, cwe's words): its lists changed between releases
WORDS = {"niah_single_1", "niah_single_2", "niah_multikey_2", "niah_multivalue", "niah_multiquery", "cwe"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow)
                                  if (c["task"], c["tokenizer"], c["length"]) in SLOW else c for c in CASES],
                         ids=[f"{c['task']}-{c['tokenizer']}-{c['template']}-{c['length']}" for c in CASES])
def test_prompts_equal_rulers(case):
    """Each sample's text (RULER's input + answer_prefix) by its SHA-256, RULER's length (prompt tokens +
    tokens_to_generate) and its answers; the first sample of some cases in full."""
    if case["task"] in WORDS and importlib.metadata.version("wonderwords") != GOLDEN["official"]["wonderwords"]:
        pytest.skip(f"made with wonderwords {GOLDEN['official']['wonderwords']}, whose word lists this one may not "
                    "have (tests/golden/ruler_official.py remakes the fixture)")
    ctx = engine(case["tokenizer"], case["template"])
    found = task(case["spec"]).ruler_texts(ctx, case["length"])
    if "text" in case["samples"][0]:
        assert found[0].text == case["samples"][0]["text"]
    for sample, official in zip(found, case["samples"], strict=True):
        assert hashlib.sha256(sample.text.encode()).hexdigest() == official["sha256"]
        assert sample.tokens + task(case["spec"]).args.max_new_tokens == official["length"] <= case["length"]
        assert sample.answers == official["outputs"]


def test_prompt_ids_are_the_texts_own_encoding():
    """fit=ruler tokenizes each prompt as one text (BOS as the tokenizer adds it): decoding and encoding again
    gives the same ids, and prompt + answer stay within the length (lctx's pieces could re-encode to length + 1)."""
    ctx = engine("bpe-512", "base")
    for spec, length in (("synthetic:variable-tracking", 1500), ("synthetic:niah-single:haystack=noise", 1000)):
        current = task(spec)
        for prompt in current.prompts(ctx, length):
            assert ctx.encode(ctx.tokenizer.decode(prompt.ids, skip_special_tokens=True)) == prompt.ids
            assert len(prompt.ids) - 1 + current.args.max_new_tokens <= length  # less the BOS RULER does not count


def test_key_words_index_rulers_sorted_list():
    """niah.py's keys are sorted(set(f"{adjective}-{noun}")) (6 million); KeyWords indexes them without building
    them. On part of the lists, the interleaving adjectives (blue and blue-eyed, …) among them, it is that list."""
    adjectives = ruler_data._wonderwords("adjectivelist.txt")
    nouns = ruler_data._wonderwords("nounlist.txt")
    some = [a for a in adjectives if a.split("-")[0] in ("blue", "high", "old", "wide", "teeny")] + adjectives[::40]
    part = nouns[::25] + [n for n in nouns if n.startswith(("eyed", "fashioned", "pitched"))]
    naive = sorted({f"{a}-{n}" for a in some for n in part})
    keys = ruler_data.KeyWords(some, part)
    assert len(keys) == len(naive) and keys[:] == naive
    everything = ruler_data.key_words()
    assert len(everything) == len({a for a in adjectives}) * len(set(nouns)) - 0  # no pair repeats in the full lists
    sampled = [everything[i] for i in range(0, len(everything), 997)]
    assert sampled == sorted(sampled)


@pytest.mark.parametrize("alpha,scipy", [(1.5, 2.612375348685488), (2.0, 1.6449340668482264),
                                         (2.5, 1.3414872572509173), (3.0, 1.2020569031595942)])
def test_zeta_is_scipys(alpha, scipy):
    """RULER divides by scipy.special.zeta(alpha) (these are its values): at RULER's α = 2 to the last bit,
    elsewhere within one unit in the last place."""
    if alpha == 2.0:
        assert ruler.zeta(alpha) == scipy
    assert abs(ruler.zeta(alpha) - scipy) <= math.ulp(scipy)
