"""Corpora for perplexity and needle-in-a-haystack: an offline default, local files, or a HuggingFace dataset.

* default (no ``--data``/``--dataset``): ``pydoc_data.topics``, the Python reference manual shipped with
  CPython (~113k SmolLM2 tokens). The topics are sorted by name and joined with blank lines into one text;
  with ``--samples N`` that text is split at topic boundaries into N contiguous parts of near-equal size,
  one document per sample (so sample 1 always starts at the beginning of the manual, and samples never
  overlap).
* ``pydoc-heldout``: the toy lab's held-out text, the last 10% of the same topics concatenated without
  separators (:func:`pydoc_split`), which ``lctx toy train`` never trains on; ``--samples N`` splits it into N
  contiguous parts of equal size. Toy models trained on the rest are evaluated on it.
* ``--data PATH``: a ``.txt`` file (one document), a directory of ``.txt`` files (one document each, sorted
  by name) or a ``.jsonl`` file (one document per line, text under ``--text-field``, default ``text``).
* ``--dataset NAME[:config][:split]``: streamed through ``datasets`` (split defaults to ``test``); needs the
  hub, and fails offline with a message pointing to ``--data``.

Documents are tokenized with the model's tokenizer as is (:func:`encode`). A document shorter than the
requested length is skipped (and counted), never padded; :func:`select` raises :class:`DataError` naming
the longest available length when no document is long enough.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CORPUS = "pydoc"
HELDOUT_CORPUS = "pydoc-heldout"
HELDOUT_FRACTION = 0.1  # of the toy lab's text: its last 10% (~46 kB) is never trained on
DATASET_SPLIT = "test"


class DataError(ValueError):
    """A corpus that cannot be read, or that has no document long enough, with what to do about it."""


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass
class Corpus:
    """A source of documents. ``id`` goes into cell keys; ``describe(samples)`` into records."""

    id: str
    _documents: Callable[[int], Iterator[Document]]
    _describe: Callable[[int], str]
    _cache: dict = field(default_factory=dict, repr=False)

    def documents(self, samples: int = 1) -> Iterator[Document]:
        """The documents in a fixed order (for the default corpus, the split into ``samples`` parts)."""
        return self._documents(max(1, samples))

    def describe(self, samples: int = 1) -> str:
        return self._describe(max(1, samples))

    def encode(self, tokenizer, doc: Document, *, special: bool = True) -> list[int]:
        """Token ids of a document (cached per tokenizer); ``special`` adds BOS/EOS as the tokenizer does.

        The cache entry keeps its tokenizer alive and is checked by identity: an ``id()`` alone can be reused
        by the next model's tokenizer once the previous one is freed.
        """
        key = (id(tokenizer), doc.name, len(doc.text), special)
        cached = self._cache.get(key)
        if cached is None or cached[0] is not tokenizer:
            cached = self._cache[key] = (tokenizer, encode(tokenizer, doc.text, special=special))
        return cached[1]


def encode(tokenizer, text: str, *, special: bool = True) -> list[int]:
    """``tokenizer(text).input_ids`` without the "sequence longer than the model" warning."""
    return list(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before the text (BOS), as it does by itself; [] when it adds none."""
    with_special = encode(tokenizer, "a", special=True)
    plain = encode(tokenizer, "a", special=False)
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


# ---- sources -----------------------------------------------------------------------------------------------


def _pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def _split_parts(topics: list[tuple[str, str]], parts: int) -> list[list[tuple[str, str]]]:
    """Contiguous groups of topics whose character counts are as close to total/parts as boundaries allow."""
    parts = min(parts, len(topics))
    sizes = [len(text) + 2 for _, text in topics]
    total = sum(sizes)
    groups: list[list[tuple[str, str]]] = [[] for _ in range(parts)]
    cumulative = 0
    for (name, text), size in zip(topics, sizes, strict=True):
        midpoint = cumulative + size / 2
        index = min(int(midpoint * parts / total), parts - 1)
        groups[index].append((name, text))
        cumulative += size
    return [g for g in groups if g]


def pydoc_corpus() -> Corpus:
    version = ".".join(map(str, sys.version_info[:3]))

    def documents(samples: int) -> Iterator[Document]:
        groups = _split_parts(_pydoc_topics(), samples)
        for i, group in enumerate(groups):
            name = "pydoc" if len(groups) == 1 else f"pydoc-part-{i + 1}-of-{len(groups)}"
            yield Document(name, "\n\n".join(text for _, text in group))

    def describe(samples: int) -> str:
        split = ("one document" if samples == 1 else
                 f"split at topic boundaries into {samples} contiguous near-equal documents, one per sample")
        return (f"pydoc_data.topics (Python {version} reference manual): topics sorted by name, joined with "
                f"blank lines, {split}")

    return Corpus(DEFAULT_CORPUS, documents, describe)


def pydoc_split() -> tuple[str, str]:
    """(train, held-out) text of the toy lab: pydoc topics concatenated in sorted key order, the tail held out."""
    text = "".join(text for _, text in _pydoc_topics())
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    return text[:cut], text[cut:]


def heldout_corpus() -> Corpus:
    """The toy lab's held-out text, cut into ``samples`` contiguous parts of equal size (characters)."""
    version = ".".join(map(str, sys.version_info[:3]))

    def documents(samples: int) -> Iterator[Document]:
        text = pydoc_split()[1]
        size = -(-len(text) // samples)
        for i in range(samples):
            yield Document(f"{HELDOUT_CORPUS}-part-{i + 1}-of-{samples}", text[i * size:(i + 1) * size])

    def describe(samples: int) -> str:
        return (f"the last {HELDOUT_FRACTION:.0%} of pydoc_data.topics (Python {version} reference manual, topics "
                f"sorted by name, concatenated), never trained on by lctx toy train, in {samples} equal parts")

    return Corpus(HELDOUT_CORPUS, documents, describe)


def content_fingerprint(files: list[Path]) -> str:
    """A hash of the files' bytes (names, sizes and content), cached under lctx's cache directory by path, size and
    modification time, so a large corpus is read once, not at every run."""
    cache = Path(os.environ.get("LCTX_CACHE", Path.home() / ".cache" / "lctx")) / "fingerprints.json"
    try:
        known = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    stamp = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    if stamp in known:
        return known[stamp]
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
    value = digest.hexdigest()[:12]
    with contextlib.suppress(OSError):  # a cache that cannot be written only costs a re-hash next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({**known, stamp: value}), encoding="utf-8")
        tmp.replace(cache)
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {str(path)!r}: {err}") from None


def file_corpus(path: str | Path, text_field: str = "text") -> Corpus:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {str(path)!r} does not exist; give a .txt file, a directory of .txt files "
                        "or a .jsonl file")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise DataError(f"--data directory {str(path)!r} has no .txt files")

        def documents(samples: int) -> Iterator[Document]:
            for file in files:
                yield Document(file.name, _read_text(file))

        return Corpus(f"{path}@{content_fingerprint(files)}", documents,
                      lambda s: f"{path}: directory of {len(files)} .txt files, one document each, sorted by name")
    if path.suffix == ".txt":
        return Corpus(f"{path}@{content_fingerprint([path])}", lambda s: iter([Document(path.name, _read_text(path))]),
                      lambda s: f"{path}: one .txt document")
    if path.suffix == ".jsonl":
        def documents(samples: int) -> Iterator[Document]:
            with path.open("rb") as lines:
                for number, raw in enumerate(lines, 1):
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise DataError(f"{path}:{number} is not UTF-8 text; convert the file (e.g. iconv -t utf-8)") \
                            from None
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}:{number} is not valid JSON ({err.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                        keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                        raise DataError(f"{path}:{number} has no string field {text_field!r} (found: {keys}); "
                                        "choose the field with --text-field")
                    yield Document(f"{path.name}:{number}", row[text_field])

        return Corpus(f"{path}#{text_field}@{content_fingerprint([path])}", documents,
                      lambda s: f"{path}: one document per line, field {text_field!r}")
    raise DataError(f"--data {str(path)!r}: expected a .txt file, a directory of .txt files or a .jsonl file")


def parse_dataset(spec: str) -> tuple[str, str | None, str]:
    """``NAME[:config][:split]`` → (name, config, split)."""
    parts = spec.split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts[1:]):
        raise DataError(f"--dataset {spec!r}: expected NAME[:config][:split], e.g. emozilla/pg19-test or "
                        "wikitext:wikitext-103-raw-v1:test")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else None
    return name, config, split or DATASET_SPLIT


def dataset_corpus(spec: str, text_field: str = "text") -> Corpus:
    name, config, split = parse_dataset(spec)
    label = ":".join(p for p in (name, config, split) if p)
    stream = None

    def load():
        nonlocal stream
        if stream is None:
            import datasets

            try:
                stream = datasets.load_dataset(name, config, split=split, streaming=True)
            except Exception as err:  # datasets raises many types (ConnectionError, OSError, ValueError...)
                message = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise DataError(
                    f"cannot load dataset {label!r} through `datasets` ({type(err).__name__}: {message}). "
                    "The HuggingFace hub may be unreachable (offline, or HF_HUB_OFFLINE=1); use --data PATH with "
                    "a local .txt file, a directory of .txt files or a .jsonl file instead"
                ) from None
        return stream

    def documents(samples: int) -> Iterator[Document]:
        for number, row in enumerate(load()):
            if text_field not in row:
                raise DataError(f"dataset {label!r} has no field {text_field!r} (fields: {', '.join(row)}); "
                                "choose one with --text-field")
            yield Document(f"{label}[{number}]", str(row[text_field]))

    return Corpus(f"hf:{label}#{text_field}", documents,
                  lambda s: f"HuggingFace dataset {label} (streamed, field {text_field!r}), documents in order")


def open_corpus(data: str | Path | None = None, dataset: str | None = None, text_field: str = "text") -> Corpus:
    """The corpus the options name; nothing is read until documents are requested."""
    if data is not None and dataset is not None:
        raise DataError("give either --data or --dataset, not both")
    if dataset is not None:
        return dataset_corpus(dataset, text_field)
    if data is not None:
        return file_corpus(data, text_field)
    return pydoc_corpus()


# ---- selection ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """Up to ``samples`` documents of at least ``length`` tokens, in corpus order."""

    length: int
    docs: list[tuple[str, list[int]]]
    skipped: int  # documents seen before enough were found that were shorter than ``length``
    requested: int


def select(corpus: Corpus, tokenizer, length: int, samples: int, *, scan_limit: int = 100_000) -> Selection:
    """The first ``samples`` documents with at least ``length`` tokens (BOS included when the tokenizer adds one).

    Raises :class:`DataError` naming the longest document when none is long enough.
    """
    docs: list[tuple[str, list[int]]] = []
    skipped = longest = seen = 0
    for doc in corpus.documents(samples):
        ids = corpus.encode(tokenizer, doc)
        seen += 1
        if len(ids) >= length:
            docs.append((doc.name, ids))
            if len(docs) == samples:
                break
        else:
            skipped += 1
            longest = max(longest, len(ids))
        if seen >= scan_limit:
            break
    if not docs:
        if seen == 0:
            raise DataError(f"corpus {corpus.id!r} has no documents")
        raise DataError(
            f"no document in {corpus.describe(samples)} has {length} tokens: the longest has {longest} tokens "
            f"({seen} documents scanned). Use shorter --lengths (≤ {longest}), fewer --samples, or a longer "
            "corpus (--data / --dataset)"
        )
    return Selection(length, docs, skipped, samples)


@dataclass
class Stream:
    """Documents' ids (no special tokens) joined by the ids of a blank line until ``min_tokens`` are reached: a
    haystack to cut windows from. The last document is kept whole, so it may run past ``min_tokens``."""

    ids: list[int]
    names: list[str]  # the documents used
    tokenizer: Any = field(repr=False)
    _texts: dict[int, str] | None = field(default=None, repr=False)

    def texts(self) -> dict[int, str]:
        """Each distinct token id decoded on its own (for sentence boundaries)."""
        if self._texts is None:
            self._texts = token_texts(self.tokenizer, self.ids)
        return self._texts

    def ends(self, suffixes: tuple[str, ...]) -> list[bool]:
        """Per token: does its text (trailing spaces dropped) end with one of ``suffixes``?"""
        texts = self.texts()
        flags = {i: t.rstrip(" ").endswith(suffixes) for i, t in texts.items()}
        return [flags[i] for i in self.ids]


def token_texts(tokenizer, ids: list[int]) -> dict[int, str]:
    """Each distinct id of ``ids`` decoded alone."""
    return {i: tokenizer.decode([i]) for i in set(ids)}


def token_stream(corpus: Corpus, tokenizer, min_tokens: int) -> Stream:
    """The corpus as one :class:`Stream` of at least ``min_tokens`` (fewer when the corpus is shorter); cached on
    the corpus per tokenizer and size."""
    key = ("stream", id(tokenizer), min_tokens)
    cached = corpus._cache.get(key)
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    separator = encode(tokenizer, "\n\n", special=False)
    ids: list[int] = []
    names: list[str] = []
    for doc in corpus.documents(1):
        if ids:
            ids.extend(separator)
        ids.extend(corpus.encode(tokenizer, doc, special=False))
        names.append(doc.name)
        if len(ids) >= min_tokens:
            break
    stream = Stream(ids, names, tokenizer)
    corpus._cache[key] = (tokenizer, stream)
    return stream


def corpus(ref: str = DEFAULT_CORPUS, text_field: str = "text") -> Corpus:
    """The corpus a task's ``data`` parameter names: ``pydoc``, ``pydoc-heldout``, a path, or
    ``hf:NAME[:config][:split]``.

    The same object for the same source (a file's size and modification time included), so every task of a
    process shares its tokenized documents."""
    path = Path(ref).expanduser()
    stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    return _corpus(ref, text_field, stamp)


@functools.lru_cache(maxsize=8)
def _corpus(ref: str, text_field: str, stamp: tuple[int, int] | None) -> Corpus:
    if ref == DEFAULT_CORPUS:
        return pydoc_corpus()
    if ref == HELDOUT_CORPUS:
        return heldout_corpus()
    if ref.startswith("hf:"):
        return dataset_corpus(ref.removeprefix("hf:"), text_field)
    return file_corpus(ref, text_field)
