"""Golden fixtures from RULER's own generator: the prompts its ``scripts/data/prepare.py`` writes for a few tasks,
tokenizers and lengths (odd ones included). Run outside the test suite:

    git -C <mirror of NVIDIA/RULER> archive c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a | tar -x -C /tmp/RULER
    python tests/golden/ruler_official.py /tmp/RULER

It runs RULER's prepare.py (which runs niah.py, variable_tracking.py, common_words_extraction.py,
freq_words_extraction.py and qa.py) with ``--tokenizer_type hf`` on tokenizers committed here, with wonderwords
as installed (its version is recorded). Stubbed, on PYTHONPATH for those processes only: ``tenacity`` (imported,
unused) and ``nltk``, whose punkt model is not installable offline: its ``sent_tokenize`` is replaced by lctx's
documented rule (split after . ! ? and whitespace) so that the essay layout can be compared; RULER's essay file is
tests/data/golden/essay.txt (written into the scratch tree as PaulGrahamEssays.json), and its QA files are the
small SQuAD/HotpotQA-shaped files made here (tests/data/golden/qa/). Nothing of RULER is copied into lctx or this
repository; the prompts' SHA-256, RULER's lengths and answers go to tests/data/golden/ruler.json (with the full
text of the first sample of a few cases).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

COMMIT = "c3f5e3b4f87f97e048793bb510a3a6b19a46bf3a"  # NVIDIA/RULER, the tree this was run against
ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "golden"
TOKENIZERS = {"bpe-512": OUT / "bpe-512", "toy-byte-128": ROOT / "tests" / "data" / "toy-byte-128"}
SAMPLES = 3
# (RULER task of synthetic.yaml, lctx spec, model template, lengths per tokenizer)
CASES = [
    ("niah_single_1", "synthetic:niah-single:haystack=noise", "base",
     {"bpe-512": [1000, 1537], "toy-byte-128": [1500]}),
    ("niah_single_1", "synthetic:niah-single:haystack=noise:chat_template=true", "meta-chat", {"bpe-512": [1200]}),
    ("niah_single_2", "synthetic:niah-single:data=tests/data/golden/essay.txt", "base", {"bpe-512": [4000]}),
    ("niah_multikey_2", "synthetic:niah-single:haystack=needles", "base", {"bpe-512": [1301], "toy-byte-128": [2000]}),
    ("niah_multikey_3", "synthetic:kv-retrieval", "base", {"bpe-512": [1500]}),
    ("niah_multivalue", "synthetic:niah-multivalue:data=tests/data/golden/essay.txt", "base", {"bpe-512": [5001]}),
    ("niah_multiquery", "synthetic:niah-multiquery:data=tests/data/golden/essay.txt", "base", {"bpe-512": [4500]}),
    # not on the byte tokenizer: its worked example cannot fit RULER's 500 tokens, and RULER then retries forever
    ("vt", "synthetic:variable-tracking", "base", {"bpe-512": [1500, 2101]}),
    ("vt", "synthetic:variable-tracking:chat_template=true", "meta-chat", {"bpe-512": [1700]}),
    ("cwe", "synthetic:common-words", "base", {"bpe-512": [1500, 4500, 8000], "toy-byte-128": [3000]}),
    ("fwe", "synthetic:frequent-words", "base", {"bpe-512": [1000, 2049], "toy-byte-128": [2000]}),
    ("qa_1", "synthetic:qa-squad", "base", {"bpe-512": [1200, 2001]}),
    ("qa_2", "synthetic:qa-hotpotqa", "base", {"bpe-512": [1500]}),
]
CHAT_TEMPLATES = {"meta-chat": "[INST] {{ messages[0]['content'] }} [/INST]"}  # template.py's, for lctx

STUB_NLTK = '''
import re
class _Data:
    @staticmethod
    def find(name):
        return name
data = _Data()
def download(*args, **kwargs):
    return True
'''
STUB_TOKENIZE = '''
import re
def sent_tokenize(text):
    return [s for s in re.split(r"(?<=[.!?])\\s+", text) if s]
'''
STUB_TENACITY = '''
def retry(*args, **kwargs):
    return lambda f: f
stop_after_attempt = wait_fixed = wait_random = lambda *a, **k: 0
'''


def qa_files() -> None:
    """Small SQuAD 2.0- and HotpotQA-shaped files (questions about made-up towns), committed with the fixture."""
    rng = random.Random(18)
    towns = [f"Town{chr(65 + i)}{chr(97 + j)}" for i in range(10) for j in range(4)]
    rivers = ["Amber", "Birch", "Cobalt", "Dune", "Ember", "Fjord", "Garnet", "Heron"]

    def paragraph(town: str) -> tuple[str, str]:
        river = rng.choice(rivers)
        people = rng.randint(1000, 99999)
        day, year = rng.choice(["Monday", "Friday", "Sunday"]), rng.randint(1200, 1900)
        return (f"{town} lies on the river {river}. It has {people} inhabitants and a market held every {day}. "
                f"Its oldest bridge was built in {year}.", river)

    articles = []
    for a in range(8):
        paragraphs = []
        for town in towns[a * 5:a * 5 + 5]:
            text, river = paragraph(town)
            paragraphs.append({"context": text, "qas": [
                {"question": f"On which river does {town} lie?", "id": f"{town}-q", "is_impossible": False,
                 "answers": [{"text": river, "answer_start": text.index(river)}]},
                {"question": f"Who founded {town}?", "id": f"{town}-x", "is_impossible": True, "answers": []}]})
        articles.append({"title": f"Region {a}", "paragraphs": paragraphs})
    (OUT / "qa").mkdir(exist_ok=True)
    (OUT / "qa" / "squad.json").write_text(json.dumps({"version": "v2.0", "data": articles}), encoding="utf-8")
    hotpot = []
    for i in range(12):
        pair = rng.sample(towns, 4)
        context = [[t, [paragraph(t)[0] + " ", "It is twinned with " + rng.choice(towns) + "."]] for t in pair]
        hotpot.append({"_id": f"h{i}", "question": f"Which town is twinned with the town on the {rivers[i % 8]}?",
                       "answer": pair[0], "context": context, "supporting_facts": [], "type": "bridge",
                       "level": "easy"})
    (OUT / "qa" / "hotpotqa.json").write_text(json.dumps(hotpot), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ruler", type=Path, help="the NVIDIA/RULER tree at COMMIT")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ruler-golden"))
    args = parser.parse_args()
    scratch = args.scratch.resolve()  # kept between runs: prepare.py skips the cases it has written
    tree = scratch / "RULER"
    shutil.copytree(args.ruler, tree, dirs_exist_ok=True)
    stubs = scratch / "stubs"
    (stubs / "nltk").mkdir(parents=True, exist_ok=True)
    (stubs / "nltk" / "__init__.py").write_text(STUB_NLTK)
    (stubs / "nltk" / "tokenize.py").write_text(STUB_TOKENIZE)
    (stubs / "tenacity.py").write_text(STUB_TENACITY)
    qa_files()
    data = tree / "scripts" / "data" / "synthetic" / "json"
    essay = (OUT / "essay.txt").read_text(encoding="utf-8")
    (data / "PaulGrahamEssays.json").write_text(json.dumps({"text": essay}), encoding="utf-8")
    shutil.copy(OUT / "qa" / "squad.json", data / "squad.json")
    shutil.copy(OUT / "qa" / "hotpotqa.json", data / "hotpotqa.json")
    # english_words.json is a Git LFS file (not in the tree): common_words_extraction.py loads it at start and
    # samples from it only past wonderwords' words, which no case here reaches; an empty list stands for it
    (data / "english_words.json").write_text("{}", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(stubs)}
    fixture: dict = {"official": {"repo": "NVIDIA/RULER", "commit": COMMIT, "generator": __doc__.split("\n")[0],
                                  "wonderwords": importlib.metadata.version("wonderwords")},
                     "samples": SAMPLES, "chat_templates": CHAT_TEMPLATES, "cases": []}
    for task, spec, template, lengths in CASES:
        for name, sizes in lengths.items():
            for length in sizes:
                out = scratch / "out" / f"{name}-{template}-{length}"
                done = subprocess.run([sys.executable, "prepare.py", "--save_dir", str(out), "--benchmark", "synthetic",
                                "--task", task, "--tokenizer_path", str(TOKENIZERS[name]), "--tokenizer_type", "hf",
                                "--max_seq_length", str(length), "--model_template_type", template,
                                "--num_samples", str(SAMPLES)], cwd=tree / "scripts" / "data", env=env, check=True,
                                      capture_output=True, text=True)
                if "Error" in done.stdout:  # prepare.py prints its script's failure and goes on
                    raise SystemExit(done.stdout[-3000:])
                rows = [json.loads(line) for line in (out / task / "validation.jsonl").read_text().splitlines()]
                if len(rows) != SAMPLES:
                    raise SystemExit(f"{task} {name} {length}: RULER wrote {len(rows)} samples")
                samples = [{"sha256": hashlib.sha256((r["input"] + r["answer_prefix"]).encode()).hexdigest(),
                            "length": r["length"], "outputs": r["outputs"]} for r in rows]
                if length == min(sizes) and name == "bpe-512":
                    samples[0]["text"] = rows[0]["input"] + rows[0]["answer_prefix"]
                fixture["cases"].append({"task": task, "spec": spec, "template": template, "tokenizer": name,
                                         "length": length, "samples": samples})
                print(task, spec, name, length, [s["length"] for s in samples])
    (OUT / "ruler.json").write_text(json.dumps(fixture, indent=0) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
