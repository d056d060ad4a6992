"""The results store (append, merge, newest wins, torn lines, schemas, one writer) and the view's tables."""

from __future__ import annotations

import json

import pytest

from lctx import results, view
from lctx.spec import format_length
from lctx.view import tables


def rec(rope="none:logn=false", length=1024, task="ppl", status="ok", depth=None, finished="2026-01-01T00:00:00",
        config=None, **metrics):
    """A schema-1 record (as lctx wrote before task specs): the view and the planner upgrade it."""
    return {
        "schema": 1, "model": "m", "rope": rope, "rope_input": rope.split(":")[0], "task": task, "length": length,
        "depth": depth, "train_len": 2048, "dtype": "float32", "attn": "sdpa",
        "config": config or {"mode": "truncated", "stride": None, "last_k": 256, "samples": 1, "data": "pydoc"},
        "status": status, "error": None if status == "ok" else "OutOfMemoryError: boom", "metrics": metrics,
        "finished_at": finished,
    }


def test_append_syncs_one_line_per_record_and_reads_back(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=10.0))
    assert store.path == tmp_path / "records.jsonl"
    lines = store.path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["metrics"] == {"ppl": 10.0}
    store.append(rec(length=2048, ppl=float("inf")))  # not JSON: written as a string, file stays parseable
    assert [r["length"] for r in results.Store(tmp_path).read()] == [1024, 2048]
    assert json.loads(store.path.read_text().splitlines()[1])["metrics"]["ppl"] == "inf"


def test_shards_write_separate_files_merged_on_read(tmp_path) -> None:
    a, b = results.Store(tmp_path, (0, 2)), results.Store(tmp_path, (1, 2))
    assert a.path.name == "records-shard-0-of-2.jsonl" and b.path.name == "records-shard-1-of-2.jsonl"
    a.append(rec(length=1024, ppl=1.0))
    b.append(rec(length=2048, ppl=2.0))
    assert sorted(r["length"] for r in results.Store(tmp_path, (0, 2)).read()) == [1024, 2048]  # every file


def test_newest_record_wins_and_errors_are_not_completed(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=5.0, finished="2026-01-01T00:00:01"))
    store.append(rec(ppl=6.0, finished="2026-01-01T00:00:02"))  # --force recomputed it
    store.append(rec(length=4096, status="error", finished="2026-01-01T00:00:03"))
    store.append(rec(length=8192, status="oom", finished="2026-01-01T00:00:04"))
    newest = view.newest(store.read())
    (merged,) = [r for r in newest if r["length"] == 1024]
    assert merged["metrics"]["ppl"] == 6.0
    done = results.completed({results.cell_key(r): r for r in newest})
    keys = {r["length"]: results.cell_key(r) for r in newest}
    assert keys[1024] in done and keys[8192] in done  # oom is an outcome: not recomputed without --force
    assert keys[4096] not in done  # errors are retried


def test_a_torn_last_line_is_skipped_and_ended_before_the_next_append(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=5.0))
    with store.path.open("a") as handle:
        handle.write('{"model": "m", "rope": "no')  # a crash mid-write
    assert len(store.read()) == 1 and "records.jsonl:2: not JSON" in store.skipped.describe()
    store.append(rec(length=2048, ppl=6.0))  # the next run's first record must not be glued onto the torn line
    assert [r["length"] for r in store.read()] == [1024, 2048] and len(store.skipped.lines) == 1


def test_records_of_a_newer_schema_or_bad_types_are_skipped_and_named(tmp_path) -> None:
    store = results.Store(tmp_path)
    store.append(rec(ppl=5.0))
    store.append({**rec(length=2048), "schema": 99})
    store.append({**rec(length=4096), "length": "4k"})
    store.append({**rec(length=8192), "config": "samples=1"})
    assert [r["length"] for r in store.read()] == [1024]
    text = store.skipped.describe()
    assert "schema 99" in text and "field 'length' is str" in text and "field 'config' is str" in text
    with pytest.raises(results.StoreError, match="newer schema than this lctx writes"):
        with store.writing():
            pass


def test_one_writer_per_records_file(tmp_path) -> None:
    first, second = results.Store(tmp_path), results.Store(tmp_path)
    with first.writing():
        with pytest.raises(results.StoreError, match=r"records.jsonl is being written by pid \d+"):
            with second.writing():
                pass
        with results.Store(tmp_path, (0, 2)).writing():  # a shard writes its own file: no conflict
            pass
    with second.writing():  # released
        pass


def test_cell_key_is_the_task_spec_depth_and_settings() -> None:
    base = results.cell_key({**rec(), "task_spec": "ppl:samples=1"})
    assert results.cell_key({**rec(), "task_spec": "ppl:samples=2"}) != base
    assert results.cell_key({**rec(depth=0.5), "task_spec": "ppl:samples=1"}) != base
    assert results.cell_key({**rec(), "dtype": "bfloat16", "task_spec": "ppl:samples=1"}) != base
    assert results.cell_key({**rec(), "seconds": 3.0, "metrics": {"ppl": 1}, "task_spec": "ppl:samples=1"}) == base


def test_schema_1_records_get_todays_task_spec() -> None:
    (upgraded,) = view.newest([rec(ppl=1.0)])
    assert upgraded["task_spec"] == "ppl:samples=1:last_k=256:data=pydoc"  # the derived 'mode' key is gone
    assert upgraded["config"] == {"samples": 1, "stride": None, "last_k": 256, "data": "pydoc"}
    (passkey,) = view.newest([rec(task="passkey", config={"samples": 5, "seed": 0, "max_new_tokens": 8})])
    assert passkey["task_spec"] == "passkey:samples=5:seed=0:max_new_tokens=8:chat_template=false"


def test_tables_pivot_variants_by_length_with_status_and_markers() -> None:
    records = [
        rec("none:logn=false", 1024, ppl=10.0, last_k_ppl=11.0),
        rec("none:logn=false", 4096, ppl=123.456, last_k_ppl=500.0),
        rec("yarn:factor=4:logn=false", 1024, ppl=10.5, last_k_ppl=11.5),
        rec("yarn:factor=4:logn=false", 4096, status="oom"),
    ]
    built = tables.build(records)
    assert [t.metric.name for t in built] == ["ppl", "last_k_ppl"]
    table = built[0]
    assert [table.header(j) for j in range(2)] == ["1k", "4k*"]  # 4096 > train_len 2048
    assert table.variants == ["none", "yarn"]
    assert table.text(0, 0) == "10.00" and table.text(0, 1) == "123.46" and table.text(1, 1) == "OOM"
    assert table.best(0) == {0} and table.best(1) == set()  # lower is better; one value alone is no contest
    assert built[1].text(0, 1) == "500.00"
    markdown = tables.to_markdown(built)
    assert "| `none` | **10.00** | 123.46 |" in markdown and "OOM" in markdown
    assert tables.build(records, metric="nll") and tables.metric_names(records) == ["last_k_ppl", "ppl", "seconds"]


def test_accuracy_pools_depths_with_wilson_interval() -> None:
    records = [rec(task="passkey", depth=d, config={"samples": 5}, accuracy=c / 5, correct=c, trials=5)
               for d, c in ((0.0, 5), (0.5, 3))]
    (table,) = tables.build(records)
    assert "all depths pooled" in table.title
    assert table.text(0, 0, interval=True) == "80% [49–94]"  # 8/10 → Wilson (0.490, 0.943)
    (by_depth,) = tables.build(records, by_depth=True)
    assert [by_depth.header(j) for j in range(2)] == ["1k @0", "1k @0.5"]
    assert by_depth.text(0, 0).startswith("100%")


def test_same_typed_spec_resolved_twice_shows_canonical_names() -> None:
    records = [rec("yarn:factor=2:logn=false", ppl=1.0), rec("yarn:factor=4:logn=false", ppl=2.0)]
    table = tables.build(records)[0]
    assert table.variants == ["yarn:factor=2:logn=false", "yarn:factor=4:logn=false"]


@pytest.mark.parametrize("n, text", [(1024, "1k"), (1536, "1.5k"), (12288, "12k"), (1000, "1000")])
def test_format_length(n: int, text: str) -> None:
    assert format_length(n) == text
