"""lctx pack: deterministic archives of records and manifests, and results read from directories, archives and
URLs (a local HTTP server; a refused connection stands for no network)."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lctx import pack, results
from lctx.cli import app


def record(run: str, length: int, ppl: float, when: str, rope: str = "none:logn=false") -> dict:
    return {"schema": 2, "run_id": run, "model": "m", "rope": rope, "rope_input": rope.split(":")[0], "task": "ppl",
            "task_spec": "ppl:samples=1", "length": length, "depth": None, "train_len": 1024, "dtype": "float32",
            "attn": "sdpa", "config": {"samples": 1}, "status": "ok", "metrics": {"ppl": ppl, "nll": float("inf")},
            "finished_at": when}


def results_dir(path: Path, run: str = "run-1", when: str = "2026-01-02T00:00:00", scale: float = 1.0) -> Path:
    store = results.Store(path)
    for n in (1024, 2048):
        store.append(record(run, n, scale * n / 100, when))
    results.Store(path, (0, 2)).append(record(run, 4096, scale * 50.0, when, rope="pi:factor=2:logn=false"))
    results.write_json(path / f"manifest-{run}.json", {"run_id": run, "started_at": when, "git": {"revision": "abc"}})
    (path / "table.md").write_text("not packed")
    (path / "report").mkdir(exist_ok=True)
    (path / "report" / "index.html").write_text("not packed")
    return path


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch) -> None:
    """urllib honours proxy variables: the local server must be reached directly."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_pack_is_deterministic_and_holds_records_and_manifests_only(tmp_path) -> None:
    source = results_dir(tmp_path / "res")
    first = pack.pack(source, tmp_path / "a.tar.gz")
    os.utime(source / "records.jsonl", (1, 1))  # other file times, another output name: the same bytes
    second = pack.pack(source, tmp_path / "b.tar.gz")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert (first.records, first.runs, first.manifests) == (3, 1, 1)
    raw = first.path.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip without a timestamp
    with tarfile.open(first.path) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == ["records.jsonl", "manifest-run-1.json"]
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
        lines = archive.extractfile("records.jsonl").read().decode().splitlines()
    assert [json.loads(line)["length"] for line in lines] == [4096, 1024, 2048]  # both records files, in file order
    assert json.loads(lines[0])["metrics"]["nll"] == "inf"  # written as the store writes it
    loaded = pack.load(first.path)
    assert loaded.records == results.Store(source).read() and set(loaded.manifests) == {"run-1"}


def test_history_is_carried_along_once(tmp_path) -> None:
    old = pack.pack(results_dir(tmp_path / "old", "run-0", "2026-01-01T00:00:00", 2.0), tmp_path / "old.tar.gz")
    new = results_dir(tmp_path / "new")
    both = pack.pack(new, tmp_path / "both.tar.gz", [old.path, old.path, new])  # duplicates are dropped
    assert (both.records, both.runs, both.manifests) == (6, 2, 2)
    loaded = pack.load(both.path)
    assert [r["run_id"] for r in loaded.records] == ["run-0"] * 3 + ["run-1"] * 3  # oldest first
    assert pack.pack(new, tmp_path / "again.tar.gz", [both.path]).path.read_bytes() == both.path.read_bytes()


def test_archives_are_read_in_memory_whatever_their_member_paths(tmp_path) -> None:
    evil = tmp_path / "evil.tar.gz"
    line = (json.dumps(record("x", 1024, 3.0, "2026-01-01T00:00:00")) + "\n").encode()
    with tarfile.open(evil, "w:gz") as archive:
        for name in ("../../escaped/records.jsonl", "/abs/manifest-x.json", "deep/dir/records-shard-0-of-2.jsonl"):
            info = tarfile.TarInfo(name)
            data = line if name.endswith(".jsonl") else b'{"run_id": "x"}'
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    loaded = pack.load(evil)
    assert len(loaded.records) == 2 and set(loaded.manifests) == {"x"}
    assert not (tmp_path.parent / "escaped").exists() and not Path("/abs").exists()
    (tmp_path / "junk.tar.gz").write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(pack.PackError, match="neither a tar archive"):
        pack.load(tmp_path / "junk.tar.gz")
    big = tmp_path / "big.tar.gz"
    with tarfile.open(big, "w:gz") as archive:
        data = line * 2000
        info = tarfile.TarInfo("records.jsonl")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    (tmp_path / "cut.tar.gz").write_bytes(big.read_bytes()[: big.stat().st_size // 2])  # a download cut short
    with pytest.raises(pack.PackError, match="damaged archive"):
        pack.load(tmp_path / "cut.tar.gz")


@pytest.fixture
def server(tmp_path):
    """A static HTTP server on localhost serving ``tmp_path/site``."""
    site = tmp_path / "site"
    site.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # the output under test is lctx's, not the server's
            pass

    handler = functools.partial(Quiet, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield site, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_report_takes_baselines_and_history_from_archives_and_urls(tmp_path, server) -> None:
    site, url = server
    base = results_dir(tmp_path / "base", "run-0", "2026-01-01T00:00:00", 0.5)  # half the perplexity: better
    runner = CliRunner(env={"COLUMNS": "200"})
    done = runner.invoke(app, ["pack", str(base), "-o", str(site / "results.tar.gz")])
    assert done.exit_code == 0 and "Packed 3 records of 1 run(s) and 1 manifest(s)" in done.output
    (site / "records.jsonl").write_bytes((base / "records.jsonl").read_bytes())
    current = results_dir(tmp_path / "cur")
    for baseline, compared in ((str(site / "results.tar.gz"), 3), (f"{url}/results.tar.gz", 3),
                               (f"{url}/records.jsonl", 2)):
        done = runner.invoke(app, ["report", str(current), "--out", str(tmp_path / "rep"), "--baseline", baseline,
                                   "--history", f"{url}/results.tar.gz", "--no-figures"])
        assert done.exit_code == 1, done.output  # perplexity doubled: every compared cell regressed
        assert f"FAILED: {compared} of {compared} cells regressed" in done.output
        page = (tmp_path / "rep" / "index.html").read_text()
        assert '<section id="history">' in page and "run-0" in page and "run-1" in page
    done = runner.invoke(app, ["report", f"{url}/results.tar.gz", "--out", str(tmp_path / "rep2"), "--no-figures"])
    assert done.exit_code == 0, done.output  # an archive is reported too, titled by its name without the suffix
    assert "<h1>results</h1>" in (tmp_path / "rep2" / "index.html").read_text()
    for bad, message in ((f"{url}/missing.jsonl", "HTTP 404"), ("http://127.0.0.1:9/records.jsonl", "cannot fetch"),
                         (str(tmp_path / "nowhere.tar.gz"), "does not exist")):
        done = runner.invoke(app, ["report", str(current), "--out", str(tmp_path / "rep3"), "--baseline", bad])
        assert done.exit_code == 2 and message in done.output, done.output
        assert done.output.startswith("Error: ") and "Traceback" not in done.output
        assert len(" ".join(done.output.split()).split("Error: ")) == 2  # one message
    done = runner.invoke(app, ["pack", str(tmp_path / "empty"), "-o", str(tmp_path / "x.tar.gz")])
    assert done.exit_code == 2 and "does not exist" in done.output
    (tmp_path / "empty").mkdir()
    done = runner.invoke(app, ["pack", str(tmp_path / "empty"), "-o", str(tmp_path / "x.tar.gz")])
    assert done.exit_code == 2 and "has no records" in done.output and not (tmp_path / "x.tar.gz").exists()
