"""The results store (append, merge, resume keys) and the comparison tables."""

from __future__ import annotations

import json

import pytest

from lctx import results


def rec(rope="none:logn=false", length=1024, task="ppl", status="ok", depth=None, finished="2026-01-01T00:00:00",
        config=None, **metrics):
    return {
        "schema": 1, "model": "m", "rope": rope, "rope_input": rope.split(":")[0], "task": task, "length": length,
        "depth": depth, "train_len": 2048, "dtype": "float32", "attn": "sdpa",
        "config": config or {"mode": "truncated", "samples": 1}, "status": status,
        "error": None if status == "ok" else "OutOfMemoryError: boom", "metrics": metrics,
        "finished_at": finished,
    }


def test_append_flushes_one_line_per_record_and_reads_back(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=10.0))
    assert store.path == tmp_path / "records.jsonl"
    lines = store.path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["metrics"] == {"ppl": 10.0}
    store.append(rec(length=2048, ppl=float("inf")))  # not JSON: written as a string, file stays parseable
    assert [r["length"] for r in results.Store(tmp_path).records()] == [1024, 2048]
    assert json.loads(store.path.read_text().splitlines()[1])["metrics"]["ppl"] == "inf"


def test_shards_write_separate_files_merged_on_read(tmp_path) -> None:
    a, b = results.Store(tmp_path, (0, 2)), results.Store(tmp_path, (1, 2))
    assert a.path.name == "records-shard-0-of-2.jsonl" and b.path.name == "records-shard-1-of-2.jsonl"
    a.append(rec(length=1024, ppl=1.0))
    b.append(rec(length=2048, ppl=2.0))
    assert sorted(r["length"] for r in results.Store(tmp_path).records()) == [1024, 2048]
    assert len(results.Store(tmp_path, (0, 2)).completed()) == 2  # any store reads every file


def test_latest_record_wins_and_errors_are_not_completed(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=5.0, finished="2026-01-01T00:00:01"))
    store.append(rec(ppl=6.0, finished="2026-01-01T00:00:02"))  # --force recomputed it
    store.append(rec(length=4096, status="error", finished="2026-01-01T00:00:03"))
    store.append(rec(length=8192, status="oom", finished="2026-01-01T00:00:04"))
    (merged,) = [r for r in store.records() if r["length"] == 1024]
    assert merged["metrics"]["ppl"] == 6.0
    done = store.completed()
    assert results.cell_key(rec(length=1024)) in done
    assert results.cell_key(rec(length=8192)) in done  # oom is an outcome: not recomputed without --force
    assert results.cell_key(rec(length=4096)) not in done  # errors are retried


def test_cut_short_line_is_ignored(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=5.0))
    with store.path.open("a") as handle:
        handle.write('{"model": "m", "rope": "no')  # a crash mid-write
    assert len(store.records()) == 1 and store.bad_lines == 1


def test_cell_key_includes_config_depth_and_settings() -> None:
    base = results.cell_key(rec())
    assert results.cell_key(rec()) == base
    assert results.cell_key(rec(config={"samples": 1, "mode": "truncated"})) == base  # key order irrelevant
    assert results.cell_key(rec(config={"mode": "truncated", "samples": 2})) != base
    assert results.cell_key(rec(depth=0.5)) != base
    assert results.cell_key({**rec(), "dtype": "bfloat16"}) != base
    assert results.cell_key({**rec(), "seconds": 3.0, "metrics": {"ppl": 1}}) == base  # outcomes are not keys


def test_tables_pivot_variants_by_length_with_status_and_markers() -> None:
    records = [
        rec("none:logn=false", 1024, ppl=10.0, last_k_ppl=11.0),
        rec("none:logn=false", 4096, ppl=123.456, last_k_ppl=500.0),
        rec("yarn:factor=4:logn=false", 1024, ppl=10.5, last_k_ppl=11.5),
        rec("yarn:factor=4:logn=false", 4096, status="oom"),
    ]
    named = results.tables(records)
    assert [title.split(" · ")[1] for title, _ in named] == ["ppl", "last_k_ppl"]
    table = named[0][1]
    assert list(table.columns) == ["1k", "4k*"]  # 4096 > train_len 2048
    assert list(table.index) == ["none", "yarn"]
    assert table.loc["none", "1k"] == "10.00" and table.loc["none", "4k*"] == "123.46"
    assert table.loc["yarn", "4k*"] == "OOM"
    assert named[1][1].loc["none", "4k*"] == "500.00"
    markdown = results.to_markdown(named)
    assert "| `none` | 10.00 | 123.46 |" in markdown and "OOM" in markdown
    assert results.tables(records, metric="nll") and results.metric_names(records) == ["last_k_ppl", "ppl", "seconds"]


def test_accuracy_pools_depths_with_wilson_interval() -> None:
    records = [rec(task="passkey", depth=d, config={"samples": 5}, accuracy=c / 5, correct=c, trials=5)
               for d, c in ((0.0, 5), (0.5, 3))]
    ((title, table),) = results.tables(records)
    assert "all depths pooled" in title
    assert table.loc["none", "1k"] == "80% [49–94]"  # 8/10 → Wilson (0.490, 0.943)
    ((_, by_depth),) = results.tables(records, by_depth=True)
    assert list(by_depth.columns) == ["1k @0", "1k @0.5"]
    assert by_depth.loc["none", "1k @0"].startswith("100%")


def test_same_typed_spec_resolved_twice_shows_canonical_names() -> None:
    records = [rec("yarn:factor=2:logn=false", ppl=1.0), rec("yarn:factor=4:logn=false", ppl=2.0)]
    ((_, table), _) = results.tables(records)
    assert list(table.index) == ["yarn:factor=2:logn=false", "yarn:factor=4:logn=false"]


@pytest.mark.parametrize("n, text", [(1024, "1k"), (1536, "1.5k"), (12288, "12k"), (1000, "1000")])
def test_format_length(n: int, text: str) -> None:
    assert results.format_length(n) == text
