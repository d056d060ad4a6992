"""Runs started by a launcher (``torchrun``, ``accelerate launch``): one shard per process, one writer of the
tables.

A launcher starts WORLD_SIZE copies of the command and tells each its ``RANK`` and ``LOCAL_RANK`` (its index on
its machine). Each process runs shard RANK/WORLD_SIZE of the plan (the split every process computes alike, as
``--shard`` does), on ``cuda:LOCAL_RANK`` when it runs on CUDA (``--device cpu`` stays on the CPU), and writes
its own records file, ``records-shard-RANK-of-WORLD_SIZE.jsonl``. When its cells are done, every process waits
at a barrier; then rank 0 alone writes table.md and the report from every shard's records, so ``--out`` must be
a directory every process sees (one machine, or a shared filesystem).

The barrier is torch.distributed's, over a gloo process group (CPU tensors: it works on CPU-only machines and
next to CUDA alike) initialised from the launcher's environment (``MASTER_ADDR``/``MASTER_PORT``, or torchrun's
own store) when the run starts, so a broken launch fails before any cell is computed. Ranks finish at very
different times (a shard's cells are balanced by estimated cost, not measured), so its timeout is long
(:data:`BARRIER_TIMEOUT`); a rank that dies makes the launcher stop the others, as torchrun does by default. An
interrupted rank does not wait at the barrier (the others may never reach it) and writes no report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from lctx.options import RunOptions
from lctx.plan import PlanError

BARRIER_TIMEOUT = dt.timedelta(days=30)


@dataclass(frozen=True)
class Launch:
    """This process's place in a launched group."""

    rank: int
    world: int
    local_rank: int

    @property
    def lead(self) -> bool:
        """Rank 0 writes the tables and the report."""
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The group a launcher started this process in (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); None outside a
    launcher or in a group of one."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return None
    try:
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise PlanError(f"RANK={environ['RANK']!r}, WORLD_SIZE={environ['WORLD_SIZE']!r}, "
                        f"LOCAL_RANK={environ.get('LOCAL_RANK')!r}: a launcher sets them to integers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise PlanError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return Launch(rank, world, local_rank)


def apply(launch: Launch, options: RunOptions) -> RunOptions:
    """The options of this rank: its shard and its device."""
    if options.shard is not None:
        raise PlanError(f"--shard {options.shard[0]}/{options.shard[1]} under a launcher (RANK/WORLD_SIZE set): "
                        f"each of its {launch.world} processes already runs shard RANK/WORLD_SIZE; drop --shard")
    if options.executor != "local":
        raise PlanError(f"--executor {options.executor} starts its own workers: run it once, not under torchrun or "
                        "accelerate launch")
    device = options.device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        device = f"cuda:{launch.local_rank}"
    return replace(options, shard=(launch.rank, launch.world), device=device)


@contextlib.contextmanager
def group(launch: Launch) -> Iterator[None]:
    """A process group for the barrier, for the block: the caller's if it has one, else gloo from the env."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method="env://", rank=launch.rank, world_size=launch.world,
                            timeout=BARRIER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank has reached this point (all records written)."""
    import torch.distributed as dist

    dist.barrier()
