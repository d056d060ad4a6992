"""``python -m benchmarks.scale``: wall time of a sweep on a local Ray cluster against the same sweep in one process.

Issue 16's target: on a local 2-worker Ray cluster, the toy sweep takes no more than 1.3× the serial run's wall
time, with identical records. Each run is the whole command, ``python -m lctx sweep FILE``, in a fresh process
(interpreter start, imports, planning, model loads, the cells, tables), timed from outside; the serial and Ray
runs alternate, ``--repeats`` times, so that changes of load on a shared machine hit both alike:

* ``serial``: ``--executor local`` (one process, torch's default threads);
* ``serial, 1 thread``: the same with ``OMP_NUM_THREADS=1``, as each Ray worker runs (Ray gives a 1-CPU worker
  one thread); on a loaded machine, two threads can be slower than one;
* ``ray, cluster up``: ``--executor ray --ray-address ADDR`` on a 2-CPU cluster this script started beforehand
  (``ray.init(num_cpus=2)``, timed once on its own): two workers of one CPU (one thread) each;
* ``ray, own cluster``: ``--executor ray --ray-address local``: the command starts (and stops) a local cluster
  itself, of every CPU of the machine, so its time includes Ray's start.

Every other run's records are compared with the serial run's (status, metrics, samples, data). The Markdown block
replaces its own section (``<!-- begin scale -->``) of ``--out`` (default BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lctx import provenance, results

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "su-table.toml"
TARGET = 1.3


def sweep(experiment: Path, out: Path, *extra: str, threads: int | None = None) -> float:
    """Wall seconds of one ``lctx sweep`` in a fresh process (this checkout's lctx)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "lctx", "sweep", str(experiment), "--out", str(out), "--report",
               str(out / "report"), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                         f"{done.stderr[-3000:]}")
    return seconds


def values(out: Path) -> dict[str, tuple]:
    """What each cell computed, by key (one record per cell expected)."""
    rows = results.Store(out).read()
    keyed = {results.cell_key(r): (r["status"], r["metrics"], r["samples"], r["data"]) for r in rows}
    if len(keyed) != len(rows):
        raise SystemExit(f"{out}: a cell was recorded twice")
    return keyed


def block(command: str, started: str, minutes: float, times: dict[str, list[float]], cluster_starts: list[float],
          identical: bool, cells: int) -> str:
    git = provenance.git_revision() or {}
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    serial = statistics.median(times["serial"])
    lines = ["<!-- begin scale -->", "## Scaling out: a sweep on a local Ray cluster against one process", "",
             f"`{command}` — {started}, {minutes:.1f} min", "",
             f"- CPU: {provenance.device_info(None)['name']}, {os.cpu_count()} logical cores; {platform.platform()}",
             f"- lctx at {git.get('revision', 'unknown')[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"
             f"; load average (1/5/15 min) at the end: {load} — other jobs shared the machine when this is above "
             "the core count",
             f"- The sweep: {cells} cells; each run is the whole `lctx sweep` command in a fresh process, runs "
             "alternating", "",
             "| run | wall time of each repeat (s) | median (s) | median / serial |", "|---|---|---|---|"]
    for name, label in (("serial", "serial: `--executor local`, one process, torch's default threads"),
                        ("serial1", "serial, `OMP_NUM_THREADS=1`"),
                        ("cluster", "`--executor ray`, cluster already up (2 workers × 1 CPU)"),
                        ("own", "`--executor ray --ray-address local`: starts its own cluster")):
        median = statistics.median(times[name])
        lines.append(f"| {label} | {', '.join(f'{t:.1f}' for t in times[name])} | {median:.1f} | "
                     f"{median / serial:.2f}× |")
    ratio = statistics.median(times["cluster"]) / serial
    ratio1 = statistics.median(times["cluster"]) / statistics.median(times["serial1"])
    lines += ["", f"Starting the 2-CPU cluster (`ray.init`) took {', '.join(f'{t:.1f}' for t in cluster_starts)} s, "
              "not counted in the \"cluster already up\" row.",
              f"Records of every other run identical to the serial run's (status, metrics, samples, data): "
              f"{'yes' if identical else 'NO'}.",
              f"Target (cluster up: ≤ {TARGET}× serial): {'met' if ratio <= TARGET else 'missed'} ({ratio:.2f}×; "
              f"{ratio1:.2f}× the 1-thread serial run).",
              "<!-- end scale -->"]
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    """Replace the scale block of ``path`` (or append it), keeping the rest."""
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    begin, end = "<!-- begin scale -->", "<!-- end scale -->"
    if begin in current and end in current:
        current = current[:current.index(begin)] + text + current[current.index(end) + len(end):]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(current.rstrip("\n") + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, default=EXPERIMENT, help="experiment file (default: the toy "
                        "su-table sweep)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update")
    args = parser.parse_args(argv)
    import ray

    started, t0 = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), time.perf_counter()
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    times: dict[str, list[float]] = {"serial": [], "serial1": [], "cluster": [], "own": []}
    identical, cluster_starts = True, []
    with tempfile.TemporaryDirectory(prefix="lctx-scale-") as tmp:
        for repeat in range(args.repeats):
            out = Path(tmp) / f"serial-{repeat}"
            times["serial"].append(sweep(args.experiment, out, "--executor", "local"))
            reference = values(out)
            print(f"serial: {times['serial'][-1]:.1f} s", flush=True)
            out = Path(tmp) / f"serial1-{repeat}"
            times["serial1"].append(sweep(args.experiment, out, "--executor", "local", threads=1))
            identical &= values(out) == reference
            print(f"serial, 1 thread: {times['serial1'][-1]:.1f} s", flush=True)
            out = Path(tmp) / f"own-{repeat}"
            times["own"].append(sweep(args.experiment, out, "--executor", "ray", "--ray-address", "local"))
            identical &= values(out) == reference
            print(f"ray, own cluster: {times['own'][-1]:.1f} s", flush=True)
            start = time.perf_counter()
            context = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
            cluster_starts.append(time.perf_counter() - start)
            try:
                out = Path(tmp) / f"cluster-{repeat}"
                times["cluster"].append(sweep(args.experiment, out, "--executor", "ray", "--ray-address",
                                              context.address_info["gcs_address"]))
            finally:
                ray.shutdown()
            identical &= values(out) == reference
            print(f"ray, cluster up: {times['cluster'][-1]:.1f} s (cluster start {cluster_starts[-1]:.1f} s)",
                  flush=True)
    command = shlex.join(["python", "-m", "benchmarks.scale", *argv])
    text = block(command, started, (time.perf_counter() - t0) / 60, times, cluster_starts, identical,
                 len(reference))
    write(args.out, text)
    print(text)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
