"""Scaling out, on the committed toy model: ``--executor ray`` on a local 2-CPU Ray cluster gives the same records
as a serial run, every cell recorded once when a worker is killed mid-run, a killed driver's store resumed by the
next run; ``torchrun --nproc-per-node 2`` (gloo, CPU) gives the same records, rank 0 writes the tables; the
Slurm job-array script runs as documented. Plus the parts that need no cluster: a worker's resources from the
memory estimate, a duplicate result dropped, a launcher's environment read, the message without Ray installed."""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from lctx import execute, options, results
from lctx.cli import app
from lctx.execute import cluster, launch

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "tests" / "data" / "toy-byte-128")
ROPES = ["none", "ntk:factor=4", "rerope:window=64", "dynamic-ntk:factor=4"]  # 5 units (dynamic: one per length)
TASK = "ppl:last_k=32:samples=2"
LENGTHS = [128, 512]
CELLS = len(ROPES) * len(LENGTHS)
GiB = 2**30


@pytest.fixture(autouse=True)
def wide_console(monkeypatch) -> None:
    """Long paths and messages on one line each, as on a wide terminal."""
    from lctx import cli

    monkeypatch.setattr(cli.console, "width", 250)


def run_options(out: Path, **settings) -> options.RunOptions:
    settings = {"device": "cpu", **settings}
    return options.RunOptions(models=[TOY], ropes=ROPES, tasks=[TASK], lengths=LENGTHS, out=out, report=False,
                              **settings)


def cli_args(out: Path) -> list[str]:
    """The grid as ``lctx eval`` arguments."""
    return ["eval", "--model", TOY, "--rope", ",".join(ROPES), "--task", TASK, "--lengths", ",".join(map(str, LENGTHS)),
            "--device", "cpu", "--out", str(out), "--no-report"]


def env() -> dict[str, str]:
    """A subprocess environment importing this checkout's lctx."""
    previous = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([previous] if previous else [])])}


def run_group(command: list[str], extra_env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command that starts processes of its own (a launcher's ranks) in a session of its own: on a timeout,
    the whole session is killed, so no rank outlives the test."""
    process = subprocess.Popen(command, env={**env(), **(extra_env or {})}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def lines(out: Path) -> list[dict]:
    """Every line of every records file."""
    return [json.loads(line) for path in sorted(out.glob("records*.jsonl")) for line in path.read_text().splitlines()]


def values(rows: list[dict]) -> dict[str, tuple]:
    """What a cell computed (not when, where or how fast), by cell key; asserts each cell has one record."""
    keyed = {results.cell_key(r): (r["status"], r["metrics"], r["samples"], r["data"], r.get("shared_forward"))
             for r in rows}
    assert len(keyed) == len(rows), "a cell was recorded twice"
    return keyed


@pytest.fixture(scope="module")
def serial(tmp_path_factory) -> dict[str, tuple]:
    """The grid computed in this process, the reference."""
    out = tmp_path_factory.mktemp("serial")
    assert execute.run(run_options(out), quiet()).code == 0
    return values(lines(out))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs whose workers import this checkout's lctx; yields its address."""
    ray = pytest.importorskip("ray")
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([previous] if previous else [])])  # inherited by workers
    context = ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        if previous is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = previous


def workers() -> list:
    """This test's Ray workers computing lctx units (children of the cluster this process started)."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "LctxWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_ray_sweep_records_what_the_serial_run_records(ray_cluster, serial, tmp_path) -> None:
    experiment = tmp_path / "exp.toml"
    experiment.write_text(f'name = "toy"\nmodels = ["{TOY}"]\nropes = {json.dumps(ROPES)}\ntasks = ["{TASK}"]\n'
                          f'lengths = {json.dumps(LENGTHS)}\n\n[options]\ndevice = "cpu"\nexecutor = "ray"\n')
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["sweep", str(experiment), "--out", str(out), "--report", str(tmp_path / "rep")])
    assert done.exit_code == 0, done.output
    assert "ray: 1 node(s), 2 CPUs, 0 GPUs; cells run on cpu" in done.output
    assert "up to 2 worker(s) of 1 CPU" in done.output  # 5 units, 2 CPUs: two workers, each loading the model once
    assert done.output.count("loaded " + TOY) == 2
    rows = lines(out)
    assert values(rows) == serial  # exactly: metrics, samples, data
    (manifest,) = [json.loads(p.read_text()) for p in out.glob("manifest-*.json")]
    assert manifest["executor"] == "ray" and manifest["options"]["executor"] == "ray"
    assert len(manifest["ray"]["workers"]) == 2 and manifest["cells"]["ok"] == CELLS
    assert {r["run_id"] for r in rows} == {manifest["run_id"]} and all(r["device"] == "cpu" for r in rows)
    assert (tmp_path / "rep" / "index.html").is_file()


def test_a_worker_killed_mid_run_leaves_every_cell_recorded_once(ray_cluster, serial, tmp_path) -> None:
    out = tmp_path / "out"
    ran: dict = {}
    console = quiet()
    driver = threading.Thread(target=lambda: ran.update(result=execute.run(run_options(out, executor="ray"),
                                                                           console)))
    driver.start()
    records = out / "records.jsonl"
    computing: list = []

    def a_worker_computes_after_a_first_record() -> bool:
        if not (records.is_file() and records.read_text().count("\n") >= 1):
            return False
        computing[:] = [p for p in workers() if "LctxWorker.compute" in " ".join(p.cmdline())]
        return bool(computing)

    wait_for(a_worker_computes_after_a_first_record)
    victim = computing[0]
    victim.kill()  # SIGKILL, by pid, while it computes a unit
    driver.join(timeout=300)
    assert not driver.is_alive()
    result = ran["result"]
    assert result.code == 0 and result.summary.ok == CELLS
    assert victim.pid not in [p.pid for p in workers()]
    assert f"was restarted (pid {victim.pid} → " in console.file.getvalue()  # Ray ran its unit again
    assert values(lines(out)) == serial  # every cell once, the same values


@pytest.mark.slow
def test_a_killed_driver_leaves_a_store_the_next_run_resumes(ray_cluster, serial, tmp_path) -> None:
    out = tmp_path / "out"
    args = [*cli_args(out), "--executor", "ray"]
    driver = subprocess.Popen([sys.executable, "-m", "lctx", *args, "--ray-address", ray_cluster], env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "records.jsonl"
    try:
        wait_for(lambda: records.is_file() and records.read_text().count("\n") >= 1 or driver.poll() is not None)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=60)
    first = lines(out)
    assert 1 <= len(first) < CELLS, "the driver was killed after the run"
    resumed = CliRunner().invoke(app, args)  # this process is connected to the same cluster
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(first)} already recorded" in resumed.output
    rows = lines(out)
    assert rows[:len(first)] == first  # nothing recomputed that was recorded
    assert len({r["run_id"] for r in rows[len(first):]}) == 1 and rows[-1]["run_id"] != first[0]["run_id"]
    # the same values; a unit whose first cell was recorded before the kill has its other cells computed alone
    # (no shared_forward), as after any interrupted run
    assert {k: v[:4] for k, v in values(rows).items()} == {k: v[:4] for k, v in serial.items()}


def test_worker_resources_follow_the_memory_estimate() -> None:
    cpu = cluster.resources(2 * GiB, None)
    assert (cpu.num_cpus, cpu.num_gpus, cpu.memory) == (1, 0, int(2 * GiB * cluster.HEADROOM) + cluster.PROCESS_BYTES)
    assert cpu.capacity({"CPU": 8, "memory": 10 * GiB}) == 2  # memory-bound: 3.4 GiB each
    assert cpu.capacity({"CPU": 2, "memory": 100 * GiB}) == 2  # CPU-bound
    small = cluster.resources(10 * GiB, 80 * GiB)  # 12 GiB of 80: six workers share a GPU
    assert small.num_gpus == pytest.approx(1 / 6) and small.device_map is None
    assert small.capacity({"CPU": 64, "GPU": 2}) == 12
    tiny = cluster.resources(1 * GiB, 80 * GiB)
    assert tiny.num_gpus == pytest.approx(1 / cluster.MAX_PACK)
    big = cluster.resources(140 * GiB, 80 * GiB)  # 168 GiB: three GPUs, the model spread over them
    assert (big.num_gpus, big.device_map) == (3, "auto") and big.capacity({"CPU": 16, "GPU": 8}) == 2
    assert big.ray_options() == {"num_cpus": 1, "num_gpus": 3}
    assert cluster.resources(None, 80 * GiB).num_gpus == 1  # no estimate: a whole GPU
    assert cluster.resources(1 * GiB, 80 * GiB, "auto").num_gpus == 1  # --device-map auto: a whole GPU at least


def test_workers_run_where_the_cluster_has_devices(tmp_path) -> None:
    """The device and dtype come from the cluster, not from the driver's machine (so the cells' keys are those of
    a run on the workers' devices)."""
    gpus, cpus = {"CPU": 16, "GPU": 2}, {"CPU": 16}
    on_gpus = cluster.worker_options(run_options(tmp_path, device="auto", dtype="auto"), gpus)
    assert (on_gpus.device, on_gpus.dtype) == ("cuda", "bfloat16")
    on_cpus = cluster.worker_options(run_options(tmp_path, device="auto", dtype="auto"), cpus)
    assert (on_cpus.device, on_cpus.dtype) == ("cpu", "float32")
    assert cluster.worker_options(run_options(tmp_path, device="cpu", dtype="bf16"), gpus).device == "cpu"
    from lctx.plan import plan

    assert {u.base["dtype"] for u in plan(on_gpus).units} == {"bfloat16"}  # planned here, without CUDA
    for device, cluster_resources, message in (("cuda:1", gpus, "Ray gives each worker its GPUs"),
                                               ("cuda", cpus, "has no GPU"), ("mps", gpus, "use auto, cpu or cuda")):
        with pytest.raises(execute.USAGE_ERRORS, match=message):
            cluster.worker_options(run_options(tmp_path, device=device), cluster_resources)


def test_a_worker_spreading_its_model_with_device_map_computes_the_same_records(serial, tmp_path,
                                                                             monkeypatch) -> None:
    """The worker as Ray runs it, here in this process, told to spread its model (as for a model larger than one
    GPU): it loads with device_map="auto" (on a CPU-only machine that places every layer on the CPU)."""
    from lctx import models

    real, calls = models.load, []
    monkeypatch.setattr(models, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    worker = cluster.LctxWorker(run_options(tmp_path, executor="ray"), os.getcwd(), "auto")
    keys = [k for k in serial if json.loads(k)[results.KEY_FIELDS.index("rope")].startswith("none")]
    pid, events = worker.compute(TOY, 128, keys, "run", check=True)
    assert pid == os.getpid() and [c["device_map"] for c in calls] == ["auto"]
    worker.compute(TOY, 128, keys[:1], "run", check=False)
    assert len(calls) == 1  # loaded once
    done = {results.cell_key(e.record): e.record for e in events}
    assert set(done) == set(keys)
    for key, record in done.items():
        assert (record["status"], record["metrics"], record["samples"]) == serial[key][:3]


def test_a_duplicate_result_is_dropped(tmp_path) -> None:
    from lctx.execute.compute import Done
    from lctx.plan import plan

    pytest.importorskip("ray")
    runner = cluster.RayRunner(run_options(tmp_path, executor="ray"), quiet())  # not connected: recording only
    unit = plan(run_options(tmp_path)).units[0]
    cell = unit.cells[0]
    record = {**unit.record_base(cell), "status": "ok", "metrics": {}, "seconds": 0.0, "peak_memory_bytes": None}
    with runner.store.writing():
        assert runner.accept(unit, Done(cell, record)) is True
        assert runner.accept(unit, Done(cell, dict(record))) is False
    assert len(lines(tmp_path)) == 1 and runner.duplicates == 1 and runner.summary.ok == 1


def test_without_ray_the_executor_says_how_to_install_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    done = CliRunner().invoke(app, ["eval", "--model", TOY, "--rope", "none", "--lengths", "128", "--out",
                                    str(tmp_path), "--executor", "ray"])
    assert done.exit_code == 2
    assert done.output.strip() == "Error: --executor ray needs Ray, which is not installed: pip install 'lctx[ray]'"
    assert not any(tmp_path.iterdir())
    bad = CliRunner().invoke(app, ["eval", "--model", TOY, "--lengths", "128", "--executor", "dask"])
    assert bad.exit_code == 2 and "executor" in bad.output and "local, ray" in bad.output


# ---- torchrun / accelerate launch -------------------------------------------------------------------------------


def test_torchrun_ranks_run_shards_and_rank_0_writes_the_tables(serial, tmp_path) -> None:
    out = tmp_path / "out"
    done = run_group([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                      "lctx", *cli_args(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(p.name for p in out.glob("records*.jsonl"))
    assert files == ["records-shard-0-of-2.jsonl", "records-shard-1-of-2.jsonl"]
    assert all((out / name).read_text() for name in files)  # both ranks computed cells
    assert values(lines(out)) == serial
    assert "rank 0/2: waiting for the other ranks" in done.stdout and "Tables and report: written by rank 0" in \
        done.stdout
    table = (out / "table.md").read_text()  # rank 0, after the barrier: every rank's cells
    assert all(f"| `{rope}` |" in table for rope in ROPES)
    manifests = [json.loads(p.read_text()) for p in out.glob("manifest-*.json")]
    assert sorted(m["shard"] for m in manifests) == [[0, 2], [1, 2]]
    assert all(m["status"] == "finished" and m["options"]["device"] == "cpu" for m in manifests)


def test_a_launchers_environment_gives_the_shard_and_the_device(tmp_path) -> None:
    assert launch.from_env({}) is None and launch.from_env({"RANK": "0", "WORLD_SIZE": "1"}) is None
    launched = launch.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert launched == launch.Launch(1, 4, 1) and not launched.lead
    applied = launch.apply(launched, run_options(tmp_path))
    assert (applied.shard, applied.device) == ((1, 4), "cpu")  # --device cpu stays on the CPU
    assert launch.apply(launched, run_options(tmp_path, device="cuda")).device == "cuda:1"
    with pytest.raises(execute.USAGE_ERRORS, match="drop --shard"):
        launch.apply(launched, run_options(tmp_path, shard=(0, 2)))
    with pytest.raises(execute.USAGE_ERRORS, match="not under torchrun"):
        launch.apply(launched, run_options(tmp_path, executor="ray"))
    with pytest.raises(execute.USAGE_ERRORS, match="outside WORLD_SIZE"):
        launch.from_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_shards(serial, tmp_path) -> None:
    out = tmp_path / "out"
    done = run_group(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "lctx", *cli_args(out)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(list(out.glob("records-shard-*-of-2.jsonl"))) == 2 and values(lines(out)) == serial


# ---- Slurm ----------------------------------------------------------------------------------------------------


SLURM_SCRIPT = ROOT / "scripts" / "slurm-array.sh"


def toy_experiment(path: Path) -> Path:
    path.write_text(f'name = "toy"\nmodels = ["{TOY}"]\nropes = {json.dumps(ROPES)}\ntasks = ["{TASK}"]\n'
                    f'lengths = {json.dumps(LENGTHS)}\n\n[options]\ndevice = "cpu"\n')
    return path


def test_the_slurm_scripts_lctx_commands_run_as_written(serial, tmp_path) -> None:
    """Its two lctx command lines, with Slurm's variables filled in for a 2-task array, run here in-process."""
    report, shards = [line.split("exec lctx ", 1)[1] for line in SLURM_SCRIPT.read_text().splitlines()
                      if "exec lctx " in line]
    assert shards == 'sweep "$experiment" --out "$out" --shard "$index/$SLURM_ARRAY_TASK_COUNT"'
    assert report == 'report "$out" --out "$out/report"'
    experiment, out = toy_experiment(tmp_path / "exp.toml"), tmp_path / "out"

    def expand(command: str, **variables: str) -> list[str]:
        for name, value in variables.items():
            command = command.replace(f"${name}", value)
        assert "$" not in command
        return shlex.split(command)

    for index in (0, 1):
        done = CliRunner().invoke(app, expand(shards, experiment=str(experiment), out=str(out), index=str(index),
                                              SLURM_ARRAY_TASK_COUNT="2"))
        assert done.exit_code == 0, done.output
        assert "no report written" in done.output and f"lctx report {out}" in done.output
    assert values(lines(out)) == serial
    done = CliRunner().invoke(app, [*expand(report, out=str(out)), "--no-figures"])
    assert done.exit_code == 0 and (out / "report" / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lctx") is None, reason="the lctx command is not on PATH")
def test_the_slurm_array_script_runs_shards_then_the_report(serial, tmp_path) -> None:
    """scripts/slurm-array.sh itself as two array tasks (the variables Slurm sets), then its report step."""
    experiment = toy_experiment(tmp_path / "exp.toml")
    script, out = SLURM_SCRIPT, tmp_path / "out"
    assert "#SBATCH" in script.read_text()
    for task_id in (1, 2):  # an array submitted as --array=1-2
        array = {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
        done = run_group(["bash", str(script), str(experiment), str(out)], array)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"(shard {task_id - 1}/2)" in done.stdout and "no report written" in done.stdout
    assert sorted(p.name for p in out.glob("records*.jsonl")) == ["records-shard-0-of-2.jsonl",
                                                                  "records-shard-1-of-2.jsonl"]
    assert values(lines(out)) == serial
    report = run_group(["bash", str(script), "--report", str(out)])
    assert report.returncode == 0, report.stdout + report.stderr
    assert (out / "report" / "index.html").is_file()
    no_array = run_group(["bash", str(script), str(experiment), str(out)])
    assert no_array.returncode != 0 and "not a job array task" in no_array.stderr
