"""Portable results: ``lctx pack`` writes a results directory's records and manifests as one deterministic
``.tar.gz``, and :func:`load` reads results from wherever a CI job finds them.

A **pack** holds ``records.jsonl`` (every readable record, oldest first) and ``manifest-<run_id>.json`` (one per
run: revision, versions, device), nothing else. The same inputs give the same bytes (members sorted, times,
owners and modes fixed, no gzip timestamp), so a pack can be cached, hashed and compared; ``--history`` carries
the records of earlier packs along, so one archive holds a branch's history of runs.

A **source** (``lctx report DIR``, ``--baseline``, ``--history``, ``lctx pack``) is a results directory, a pack
(or any tar archive holding ``records*.jsonl`` and ``manifest-*.json`` files, at any depth), a ``records*.jsonl``
file, or an ``http(s)://`` URL of a pack or of a ``records.jsonl`` (a static site, an artifact store). Archives
are read in memory, never extracted, so a member's path cannot write anywhere.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

from lctx import results

URL_TIMEOUT = 30  # seconds to wait for a download to start
RECORDS_GLOB, MANIFEST_GLOB = "records*.jsonl", "manifest-*.json"
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PackError(ValueError):
    """A source that does not exist, cannot be fetched or read, or holds no records."""


@dataclass
class Bundle:
    """Everything one source holds: its records (every run's), its manifests by run id, what could not be read."""

    source: str
    records: list[dict[str, Any]]
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: results.Skipped = field(default_factory=results.Skipped)
    directory: Path | None = None  # a local results directory (where lctx analyze outputs may be found)


def is_url(text: str) -> bool:
    return str(text).startswith(("http://", "https://"))


def name(source: str | Path) -> str:
    """A source's file or directory name, without a query or an archive suffix (``results.tar.gz`` -> ``results``)."""
    base = PurePosixPath(str(source).split("?", 1)[0].rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".jsonl"):
        base = base.removesuffix(suffix)
    return base or str(source)


def load(source: str | Path, what: str = "results") -> Bundle:
    """Read a directory, an archive, a records file or a URL of one (see the module docstring)."""
    text = str(source)
    if is_url(text):
        return _from_bytes(_download(text), text)
    path = Path(source)
    if path.is_dir():
        store = results.Store(path)
        records = store.read()
        manifests: dict[str, dict[str, Any]] = {}
        for file in sorted(path.glob(MANIFEST_GLOB)):
            with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
                _add_manifest(manifests, file.name, json.loads(file.read_text(encoding="utf-8")))
        return Bundle(text, records, manifests, store.skipped, path)
    if path.is_file():
        try:
            content = path.read_bytes()
        except OSError as err:
            raise PackError(f"{what} {text!r}: cannot read it ({err.strerror})") from None
        return _from_bytes(content, text)
    raise PackError(f"{what} {text!r} does not exist (give a results directory, a pack or an http(s) URL)")


def _download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "lctx"})
    try:
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        raise PackError(f"cannot fetch {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise PackError(f"cannot fetch {url}: {reason} (no network? download it in an earlier step and pass the "
                        "file)") from None


def _from_bytes(content: bytes, source: str) -> Bundle:
    """A records file's bytes (a name ending in .jsonl, or text that starts like JSON) or an archive's."""
    skipped = results.Skipped()
    label = PurePosixPath(source.split("?", 1)[0]).name or source
    if label.endswith(".jsonl") or content.lstrip()[:1] == b"{":
        return Bundle(source, results.parse(content, label, skipped), {}, skipped)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(content), mode="r:*")
    except (tarfile.TarError, EOFError, OSError):
        raise PackError(f"{source}: neither a tar archive (lctx pack writes .tar.gz) nor a records .jsonl "
                        "file") from None
    records: list[dict[str, Any]] = []
    manifests: dict[str, dict[str, Any]] = {}
    try:
        with archive:
            members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
            for member in members:
                base = PurePosixPath(member.name).name
                if not (fnmatch(base, RECORDS_GLOB) or fnmatch(base, MANIFEST_GLOB)):
                    continue
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if fnmatch(base, RECORDS_GLOB):
                    records += results.parse(data, f"{label}:{member.name}", skipped)
                else:
                    with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
                        _add_manifest(manifests, base, json.loads(data.decode("utf-8")))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise PackError(f"{source}: a damaged archive ({err})") from None
    return Bundle(source, records, manifests, skipped)


def _add_manifest(manifests: dict[str, dict[str, Any]], name: str, manifest: Any) -> None:
    if isinstance(manifest, dict):
        run_id = str(manifest.get("run_id") or name.removeprefix("manifest-").removesuffix(".json"))
        manifests.setdefault(run_id, manifest)


def identity(record: dict[str, Any]) -> str:
    """What makes two copies of a record the same record (the same run wrote the same cell at the same time)."""
    return json.dumps([record.get("run_id"), results.cell_key(record), record.get("finished_at")], default=str)


def merge(bundles: list[Bundle]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The records of every bundle, each once (the first copy), oldest first (stable); manifests by run id (the
    first bundle's win)."""
    seen: set[str] = set()
    records = []
    manifests: dict[str, dict[str, Any]] = {}
    for bundle in bundles:
        for record in bundle.records:
            key = identity(record)
            if key not in seen:
                seen.add(key)
                records.append(record)
        for run_id, manifest in bundle.manifests.items():
            manifests.setdefault(run_id, manifest)
    records.sort(key=lambda r: str(r.get("finished_at") or ""))
    return records, manifests


@dataclass
class Packed:
    path: Path
    records: int
    runs: int
    manifests: int


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def pack(source: str | Path, out: str | Path, history: list[str | Path] = ()) -> Packed:
    """Write ``source``'s records and manifests (and those of the ``history`` sources) as a deterministic
    ``.tar.gz`` at ``out``; PackError when there is no record."""
    bundles = [load(source), *(load(h, "history source") for h in history)]
    records, manifests = merge(bundles)
    if not records:
        raise PackError(f"{source} has no records (records*.jsonl): nothing to pack")
    lines = "".join(json.dumps(results.json_safe(r), ensure_ascii=False) + "\n" for r in records)
    members = [_member("records.jsonl", lines.encode("utf-8"))]
    for run_id in sorted(manifests):
        if _RUN_ID.fullmatch(run_id):
            text = json.dumps(results.json_safe(manifests[run_id]), indent=2, ensure_ascii=False, sort_keys=True,
                              default=str) + "\n"
            members.append(_member(f"manifest-{run_id}.json", text.encode("utf-8")))
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as zipped:
        with tarfile.open(fileobj=zipped, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for info, data in members:
                archive.addfile(info, data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    runs = len({r.get("run_id") for r in records})
    return Packed(out, len(records), runs, len(members) - 1)
