"""Golden fixtures from LongBench's own code: the prompt ids its ``pred.py`` feeds the model (v1) and the text it
sends (v2), for a few tasks, tokenizers and budgets (odd ones included). Run outside the test suite:

    git -C <mirror of THUDM/LongBench> archive 2e00731f8d0bff23dc4325161044d0ed8af94c1e | tar -x -C /tmp/LongBench
    python tests/golden/longbench_official.py /tmp/LongBench [--smollm2 DIR]

It imports the official ``LongBench/pred.py`` (v1) and ``pred.py`` (v2) and calls their own functions:
``get_pred`` with the model replaced by one that records its input ids and answers nothing, and ``query_llm``
with a client that records the message it is sent. What pred.py needs and does not use here (flash-attn,
openai, tiktoken, a GPU, a process group) is stubbed. Nothing of LongBench is copied into lctx or this repository:
the examples below are made here and written, with the official outputs, to tests/data/golden/longbench.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import random
import sys
import types
from pathlib import Path

import torch
import transformers

COMMIT = "2e00731f8d0bff23dc4325161044d0ed8af94c1e"  # THUDM/LongBench, the tree this was run against
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "golden"
TOKENIZERS = {"bpe-512": OUT / "bpe-512", "toy-byte-128": ROOT / "tests" / "data" / "toy-byte-128"}
V1_TASKS = ("narrativeqa", "multifieldqa_zh", "trec", "lcc")
CHAT_TASKS = ("narrativeqa", "multifieldqa_zh")
BUDGETS = (101, 256, 511)
CHAT_MODEL = "llama2-7b-chat-4k"  # build_chat: "[INST]{prompt}[/INST]"; lctx gets the same as a chat template
CHAT_TEMPLATE = "{{ bos_token }}[INST]{{ messages[0]['content'] }}[/INST]"


def examples() -> dict[str, list[dict]]:
    """Two examples per task (a long one and a short one), English, Chinese (multi-byte characters cut by the
    truncation) and code; with LongBench v1's fields, and two LongBench v2 questions."""
    rng = random.Random(18)
    words = ("river stone lantern quiet seven harbor maple ancient signal copper meadow orbit thunder velvet "
             "Zoë café naïve").split()
    hanzi = "北京是中国的首都会议记录总结文章问题回答天气很好我们今天开心😀"

    def english(n: int) -> str:
        return " ".join(rng.choice(words) + ("." if rng.random() < 0.1 else "") for _ in range(n))

    def chinese(n: int) -> str:
        return "".join(rng.choice(hanzi) + ("。" if rng.random() < 0.08 else "") for _ in range(n))

    def code(n: int) -> str:
        return "".join(f"def f{i}(x):\n    return x * {rng.randint(2, 99)}  # {rng.choice(words)}\n" for i in range(n))

    def row(context: str, question: str, answer: str, classes=None) -> dict:
        return {"input": question, "context": context, "answers": [answer], "length": len(context.split()),
                "all_classes": classes, "language": "en", "dataset": "",
                "_id": hashlib.md5(context.encode()).hexdigest()}

    trec = [f"Question: What is {rng.choice(words)}?\nType: {rng.choice(['Animal', 'Food'])}" for _ in range(90)]
    v1 = {
        "narrativeqa": [row(english(900), "Who keeps the lantern?", "the keeper"),
                        row(english(40), "Where is the harbor?", "north")],
        "multifieldqa_zh": [row(chinese(700), "首都是哪里？", "北京"), row(chinese(30), "天气怎么样？", "很好")],
        "trec": [row("\n".join(trec), "Question: What is copper?\nType:", "Food", ["Animal", "Food"]),
                 row("\n".join(trec[:3]), "Question: What is maple?\nType:", "Animal", ["Animal", "Food"])],
        "lcc": [row(code(60), "", "def g(x):"), row(code(2), "", "def g(x):")],
    }
    v2 = [{"_id": f"v2-{i}", "domain": "d", "sub_domain": "s", "difficulty": "easy", "length": "short",
           "question": f" Which word comes first in part {i}? ", "choice_A": " river ", "choice_B": "stone",
           "choice_C": "北京", "choice_D": "café\n", "answer": "A", "context": context}
          for i, context in enumerate(("\n" + english(500) + chinese(200) + "\n", english(60)))]
    return {"v1": v1, "v2": v2}


def stub_modules() -> None:
    """What the official scripts import and never use here."""
    patch = types.ModuleType("llama_flash_attn_monkey_patch")
    patch.replace_llama_attn_with_flash_attn = lambda: None
    openai = types.ModuleType("openai")
    openai.OpenAI = object
    sys.modules.update({"llama_flash_attn_monkey_patch": patch, "openai": openai,
                        "tiktoken": types.ModuleType("tiktoken")})
    transformers.BatchEncoding.to = lambda self, device: self  # pred.py moves the inputs to cuda:RANK


class Recorder:
    """A model whose generate records the input ids and generates nothing."""

    def __init__(self) -> None:
        self.inputs: list[list[int]] = []

    def generate(self, input_ids, **kwargs):
        self.inputs.append(input_ids[0].tolist())
        return input_ids


def official_module(directory: Path) -> types.ModuleType:
    """``directory/pred.py`` imported afresh, with ``directory`` as the working directory (it reads its configs)."""
    os.chdir(directory)
    sys.modules.pop("pred", None)
    sys.path.insert(0, str(directory))
    try:
        return importlib.import_module("pred")
    finally:
        sys.path.remove(str(directory))


def run_v1(longbench: Path, tokenizer, data: dict[str, list[dict]], scratch: Path) -> list[dict]:
    pred = official_module(longbench / "LongBench")  # LongBench v1's pred.py

    prompts = json.load(open("config/dataset2prompt.json", encoding="utf-8"))
    maxlen = json.load(open("config/dataset2maxlen.json", encoding="utf-8"))
    pred.dist.destroy_process_group = lambda: None
    cases = []
    for dataset in V1_TASKS:
        for model_name in ("base", CHAT_MODEL) if dataset in CHAT_TASKS else ("base",):
            for budget in BUDGETS:
                recorder = Recorder()
                pred.load_model_and_tokenizer = lambda path, name, device, model=recorder: (model, tokenizer)
                pred.get_pred(0, 1, data[dataset], budget, maxlen[dataset], prompts[dataset], dataset, "cpu",
                              model_name, {model_name: ""}, str(scratch / "pred.jsonl"))
                for index, ids in enumerate(recorder.inputs):
                    cases.append({"dataset": dataset, "example": index, "max_length": budget,
                                  "chat": model_name == CHAT_MODEL, "ids": ids})
    return cases


def run_v2(longbench: Path, tokenizer, data: list[dict]) -> list[dict]:
    pred = official_module(longbench)  # LongBench v2's pred.py

    template = open("prompts/0shot.txt", encoding="utf-8").read()

    class Client:
        sent: list[str] = []

        class chat:  # noqa: N801 - the OpenAI client's attribute path
            class completions:  # noqa: N801
                @staticmethod
                def create(model, messages, temperature, max_tokens):
                    Client.sent.append(messages[0]["content"])
                    raise KeyboardInterrupt  # stop query_llm after the first try: the prompt is what we want

    cases = []
    for budget in BUDGETS:
        pred.maxlen_map["golden"], pred.model_map["golden"] = budget, "golden"
        for index, item in enumerate(data):
            prompt = template.replace("$DOC$", item["context"].strip()).replace("$Q$", item["question"].strip())
            for letter in "ABCD":
                prompt = prompt.replace(f"$C_{letter}$", item[f"choice_{letter}"].strip())
            try:
                pred.query_llm(prompt, "golden", tokenizer, Client)
            except KeyboardInterrupt:
                pass
            cases.append({"example": index, "max_len": budget, "text": Client.sent[-1]})
    return cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("longbench", type=Path, help="the THUDM/LongBench tree at COMMIT")
    parser.add_argument("--smollm2", type=Path, help="SmolLM2's tokenizer directory: its outputs kept as hashes")
    args = parser.parse_args()
    stub_modules()
    data = examples()
    scratch = Path("/tmp/longbench-golden")
    scratch.mkdir(exist_ok=True)
    tokenizers = dict(TOKENIZERS)
    if args.smollm2:
        tokenizers["smollm2"] = args.smollm2
    fixture: dict = {"official": {"repo": "THUDM/LongBench", "commit": COMMIT, "generator": __doc__.split("\n")[0]},
                     "chat_template": CHAT_TEMPLATE, "data": data, "tokenizers": {}}
    for name, path in tokenizers.items():
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        v1 = run_v1(args.longbench.resolve(), tokenizer, data["v1"], scratch)
        v2 = run_v2(args.longbench.resolve(), tokenizer, data["v2"])
        if name == "smollm2":  # a large tokenizer not in the repository: hashes only
            for case in v1:
                ids = case.pop("ids")
                case.update(tokens=len(ids), sha256=hashlib.sha256(json.dumps(ids).encode()).hexdigest())
            for case in v2:
                case["sha256"] = hashlib.sha256(case.pop("text").encode()).hexdigest()
        fixture["tokenizers"][name] = {"v1": v1, "v2": v2}
    torch.set_num_threads(1)
    (OUT / "longbench.json").write_text(json.dumps(fixture, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"wrote {OUT / 'longbench.json'}")


if __name__ == "__main__":
    main()
