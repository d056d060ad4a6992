"""LongBench prompts equal the official code's, id for id: tests/data/golden/longbench.json was written by
tests/golden/longbench_official.py, which runs LongBench's own pred.py (v1 and v2) on the examples it holds."""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cache
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lctx import evals
from lctx.engine import Engine
from lctx.evals.longbench import data as lbdata
from lctx.evals.longbench import prompts

ROOT = Path(__file__).resolve().parent
GOLDEN = json.loads((ROOT / "data" / "golden" / "longbench.json").read_text(encoding="utf-8"))
TOKENIZERS = {"bpe-512": ROOT / "data" / "golden" / "bpe-512", "toy-byte-128": ROOT / "data" / "toy-byte-128"}


@cache
def engine(name: str, chat: bool) -> Engine:
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZERS[name]))
    if chat:  # pred.py's build_chat for llama2 ("[INST]{prompt}[/INST]", tokenized with the special tokens)
        tokenizer = copy.deepcopy(tokenizer)
        bos = "{{ bos_token }}" if Engine(None, tokenizer, 0).prefix else ""
        tokenizer.chat_template = bos + "[INST]{{ messages[0]['content'] }}[/INST]"
    return Engine(None, tokenizer, 0)


def v1_text(case: dict) -> str:
    row = GOLDEN["data"]["v1"][case["dataset"]][case["example"]]
    return prompts.v1_text(case["dataset"], lbdata.parse_v1(row, "golden", case["dataset"]))


def v2_text(case: dict) -> str:
    return prompts.v2_text(lbdata.parse_v2(GOLDEN["data"]["v2"][case["example"]], "golden"))


def test_the_fixture_was_made_from_the_official_repository():
    assert GOLDEN["official"]["repo"] == "THUDM/LongBench" and len(GOLDEN["official"]["commit"]) == 40
    cases = GOLDEN["tokenizers"]["bpe-512"]["v1"]
    assert {c["max_length"] for c in cases} == {101, 256, 511}  # odd budgets among them
    # the re-encoding at the join: Chinese cut inside a character re-encodes to more ids than the budget
    assert any(len(c["ids"]) > c["max_length"] for c in cases if not c["chat"])


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_v1_prompt_ids_equal_pred_py(name):
    cases = GOLDEN["tokenizers"][name]["v1"]
    assert len(cases) == 36
    for case in cases:
        prompt = prompts.official_v1(engine(name, case["chat"]), v1_text(case), case["max_length"], case["chat"])
        assert prompt.ids == case["ids"], (case["dataset"], case["example"], case["max_length"], case["chat"])
        assert prompt.truncated == (prompt.full_tokens > case["max_length"])


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_v2_prompt_text_equals_pred_py(name):
    for case in GOLDEN["tokenizers"][name]["v2"]:
        text = prompts.official_v2_text(engine(name, False), v2_text(case), case["max_len"])
        assert text == case["text"], (case["example"], case["max_len"])
        prompt = prompts.official_v2(engine(name, False), v2_text(case), case["max_len"], chat=False)
        assert prompt.ids == engine(name, False).encode(case["text"])


def test_smollm2_prompts_equal_pred_py():
    """The same on SmolLM2's tokenizer (a 49k BPE), when it is installed; the fixture keeps hashes."""
    from lctx import models

    try:
        tokenizer = models.load_tokenizer(models.DEFAULT_MODEL)
    except Exception as err:  # noqa: BLE001 - any failure to find the package means: not installed here
        pytest.skip(f"SmolLM2 unavailable: {err}")
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = "[INST]{{ messages[0]['content'] }}[/INST]"  # it adds no BOS
    for case in GOLDEN["tokenizers"]["smollm2"]["v1"]:
        ctx = Engine(None, chat if case["chat"] else tokenizer, 0)
        ids = prompts.official_v1(ctx, v1_text(case), case["max_length"], case["chat"]).ids
        assert (len(ids), hashlib.sha256(json.dumps(ids).encode()).hexdigest()) == (case["tokens"], case["sha256"])
    for case in GOLDEN["tokenizers"]["smollm2"]["v2"]:
        text = prompts.official_v2_text(Engine(None, tokenizer, 0), v2_text(case), case["max_len"])
        assert hashlib.sha256(text.encode()).hexdigest() == case["sha256"]


def test_the_task_uses_the_official_budget_of_its_length(tmp_path):
    """longbench:<task> at a length: pred.py's truncation at ⌊length·1000/1024⌋ − 500 (model2maxlen.json's 3500,
    7500, 15500 and 31500 at 4k, 8k, 16k and 32k); longbench-v2 at ⌊length·120000/131072⌋ (120000 at 128k)."""
    assert [prompts.v1_budget(n) for n in (4096, 8192, 16384, 32768)] == [3500, 7500, 15500, 31500]
    assert prompts.v2_budget(131072) == 120000 and prompts.v2_budget(4096) == 3750
    rows = GOLDEN["data"]["v1"]["narrativeqa"]
    (tmp_path / "narrativeqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (task,) = evals.resolve("longbench:narrativeqa", {"data_dir": str(tmp_path)})
    ctx = engine("bpe-512", False)
    case = next(c for c in GOLDEN["tokenizers"]["bpe-512"]["v1"]
                if c["dataset"] == "narrativeqa" and c["max_length"] == 511 and not c["chat"] and c["example"] == 0)
    # length 1036: ⌊1036·1000/1024⌋ − 500 = 1011 − 500 = 511
    assert task.prompt(ctx, task.examples[0], 1036).ids == case["ids"]
    assert "asconcisely" in prompts.PROMPTS["narrativeqa"]  # the official template's typo, kept
