"""The ``lctx`` command line: argument parsing only; every command calls into the package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lctx import evals, execute, models, options, patches, spec, toy, view
from lctx.view import summaries

app = typer.Typer(
    help="Long-context extrapolation evaluation: patch a model's RoPE and measure it past its training "
    "length.\n\nExample: lctx eval --model smollm2-135m --rope none,yarn:factor=4 --task ppl --lengths 4k,16k",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
app.add_typer(toy.toy_app, name="toy")

# The default comparison: one variant per family (frequency, attention-level) against the model as trained,
# at half, at and 1.5x SmolLM2's 8192-token training length; about 10 minutes on 2 CPU cores.
DEFAULT_ROPES = ["none,yarn:factor=2,rerope"]
DEFAULT_LENGTHS = "4k,8k,12k"


@app.callback()
def _root() -> None:
    """Long-context extrapolation evaluation for HuggingFace decoders."""


@app.command()
def ropes(as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table")) -> None:
    """List the RoPE variants, their parameters and defaults.

    Example: lctx ropes --json
    """
    rows = []
    for name in patches.variant_names():
        variant = patches.REGISTRY[name]
        rows.append({
            "name": name,
            "params": {p.name: p.default for p in variant.all_params},
            "required": [p.name for p in variant.all_params if p.required],
            "bounds": {p.name: p.bounds() for p in variant.all_params if p.bounds()},
            "description": variant.description,
            "reference": variant.reference,
            "kind": variant.kind,
            "family": variant.family,
            "aliases": list(variant.aliases),
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"RoPE variants  (spec grammar: {patches.GRAMMAR})")
    for column in ("name", "family", "parameters (default)", "description", "reference"):
        table.add_column(column, overflow="fold")
    for row in rows:
        params = ", ".join(
            f"{k}={'required' if k in row['required'] else ('auto' if v is None else patches.format_value(v))}"
            for k, v in row["params"].items()
        )
        name = row["name"] + (f" ({', '.join(row['aliases'])})" if row["aliases"] else "")
        table.add_row(name, row["family"], params, row["description"], row["reference"])
    console.print(table)


def _parsed(parse):
    """A typer callback turning a parser's ValueError into a usage error naming the option."""

    def callback(value):
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None

    return callback


def _fail(err: Exception) -> typer.Exit:
    console.print(f"[red]Error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)  # one line, as typed
    return typer.Exit(2)


def run_help(name: str) -> str:
    """A run setting's help, from its declaration (lctx.options.RUN_PARAMS)."""
    return next(p.help for p in options.RUN_PARAMS if p.name == name)


def _task_defaults(**flags) -> dict[str, object]:
    """Run-wide task parameters from the flags that were given (each is an alias of a task parameter)."""
    return {name: value for name, value in flags.items() if value is not None}


@app.command("eval")
def eval_(
    model: list[str] = typer.Option([models.DEFAULT_MODEL], "--model", "-m",
                                    help="model: alias, local directory, .gguf file or hub id (repeatable)"),
    rope: list[str] = typer.Option(DEFAULT_ROPES, "--rope", "-r",
                                   help=f"RoPE specs, comma-separated, repeatable. Grammar: {patches.GRAMMAR}"),
    task: list[str] = typer.Option(["ppl"], "--task", "-t", help="task specs, comma-separated, repeatable, e.g. "
                                   "ppl:stride=512 or synthetic:niah-multikey:keys=4 (lctx tasks lists them): "
                                   + ", ".join(evals.task_names())),
    lengths: str = typer.Option(DEFAULT_LENGTHS, "--lengths", "-l", callback=_parsed(spec.parse_lengths),
                                help="context lengths: 4096, 4k (=4096), 1.5k, 12k; comma-separated"),
    samples: int | None = typer.Option(None, "--samples", "-n", help="task parameter samples, for every task: "
                                       "documents per length (ppl, default 1), trials per cell (passkey/niah/"
                                       "synthetic, default 5) or examples (LongBench, default all)"),
    depths: str | None = typer.Option(None, "--depths", help="task parameter depths (passkey, niah): needle depths "
                                      "in [0, 1], e.g. 0,0.25,0.5,0.75,1"),
    stride: str | None = typer.Option(None, "--stride", help="task parameter stride (ppl): sliding-window mode"),
    last_k: int | None = typer.Option(None, "--last-k", help="task parameter last_k (ppl, default 256)"),
    data_path: str | None = typer.Option(None, "--data", help="task parameter data (ppl, niah, synthetic): a .txt "
                                         "file, a directory of .txt files, a .jsonl file or pydoc-heldout (the toy "
                                         "lab's held-out text) (default: the Python reference manual, offline)"),
    text_field: str | None = typer.Option(None, "--text-field", help="task parameter text_field: text field of a "
                                          ".jsonl corpus or a dataset"),
    dataset: str | None = typer.Option(None, "--dataset", help="task parameter data=hf:NAME[:config][:split]: a "
                                       "corpus from the hub"),
    needle: str | None = typer.Option(None, "--needle", help="task parameter needle (niah): a sentence with {value}"),
    question: str | None = typer.Option(None, "--question", help="task parameter question (niah), ending in an "
                                        "answer prefix"),
    seed: int | None = typer.Option(None, "--seed", help="task parameter seed (default 0)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="task parameter max_new_tokens "
                                              "(generation tasks; default per task)"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="task parameter data_dir (LongBench: its "
                                        "<task>.jsonl files; lm-eval: task YAMLs)"),
    chat_template: bool | None = typer.Option(None, "--chat-template/--no-chat-template",
                                              help="task parameter chat_template (generation tasks)"),
    task_arg: list[str] = typer.Option([], "--task-arg", help="KEY=VALUE: task parameter KEY for every selected "
                                       "task that has it (an unknown KEY is an error); repeatable"),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="results directory"),
    force: bool = typer.Option(False, "--force", help="recompute cells that are already recorded"),
    shard: str | None = typer.Option(None, "--shard", callback=_parsed(options.parse_shard),
                                     help="run shard i of n (0 ≤ i < n), e.g. 0/4; shards write separate files"),
    dtype: str | None = typer.Option(None, "--dtype", help=run_help("dtype")),
    device: str | None = typer.Option(None, "--device", help=run_help("device")),
    attn: str | None = typer.Option(None, "--attn", help=run_help("attn")),
    device_map: str | None = typer.Option(None, "--device-map", help=run_help("device_map")),
    train_len: str | None = typer.Option(None, "--train-len", help=run_help("train_len")),
    target_len: str | None = typer.Option(None, "--target-len", help=run_help("target_len")),
    max_memory: str | None = typer.Option(None, "--max-memory", help=run_help("max_memory")),
    prefill_chunk: str | None = typer.Option(None, "--prefill-chunk", help=run_help("prefill_chunk")),
    batch_size: str | None = typer.Option(None, "--batch-size", help=run_help("batch_size")),
    report: bool = typer.Option(True, "--report/--no-report", help=run_help("report")),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=run_help("trust_remote_code")),
    executor: str | None = typer.Option(None, "--executor", help=run_help("executor")),
    ray_address: str | None = typer.Option(None, "--ray-address", help=run_help("ray_address")),
) -> None:
    """Evaluate models × RoPE variants × tasks × lengths; records each cell as it completes (resumable), then
    writes the tables (table.md) and the report (report/index.html, figures).

    Example: lctx eval --rope none,yarn:factor=4,dynamic-ntk:factor=4 --task ppl,passkey --lengths 4k,12k
    """
    try:
        task_args = options.parse_task_args(task_arg)
        if dataset and data_path:
            raise spec.SpecError("give either --data or --dataset, not both")
        defaults = _task_defaults(samples=samples, depths=depths and f"[{depths}]", stride=stride, last_k=last_k,
                                  data=f"hf:{dataset}" if dataset else data_path, text_field=text_field,
                                  needle=needle, question=question, seed=seed, max_new_tokens=max_new_tokens,
                                  data_dir=data_dir, chat_template=chat_template)
        clash = sorted(set(task_args) & set(defaults))
        if clash:
            raise spec.SpecError(f"--task-arg {clash[0]}=… repeats --{clash[0].replace('_', '-')}; give it once")
        settings = options.run_settings({"dtype": dtype, "device": device, "attn": attn, "device_map": device_map,
                                         "train_len": train_len, "target_len": target_len, "max_memory": max_memory,
                                         "prefill_chunk": prefill_chunk, "batch_size": batch_size,
                                         "executor": executor, "ray_address": ray_address}, "lctx eval")
        run_options = options.RunOptions(models=model, ropes=rope, tasks=task, lengths=lengths,
                                         task_defaults={**defaults, **task_args}, out=out, force=force, shard=shard,
                                         report=report, trust_remote_code=trust_remote_code,
                                         argv=["lctx", *sys.argv[1:]], **settings)
        code = execute.run(run_options, console).code
    except (*execute.USAGE_ERRORS, ValueError) as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted[/] before any cell was computed.")
        raise typer.Exit(execute.EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@app.command("tasks")
def tasks_(as_json: bool = typer.Option(False, "--json", help="print a JSON list instead of a table")) -> None:
    """List the tasks, their parameters (type, bounds, default), metrics and figures.

    Example: lctx tasks --json
    """
    rows = [evals.describe(kind) for kind in evals.listed()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=f"Tasks  (spec grammar: {spec.GRAMMAR})")
    for column in ("name", "parameters (default)", "metrics", "description"):
        table.add_column(column, overflow="fold")
    for row in rows:
        params = ", ".join(f"{p['name']}={'required' if p['required'] else spec.format_value(p['default'])}"
                           for p in row["params"])
        metrics_text = ", ".join(m["name"] + ("↑" if m["higher_is_better"] else "↓") for m in row["metrics"]
                                 if m["headline"])
        table.add_row(escape(row["name"]), escape(params), metrics_text, escape(row["description"]))
    console.print(table)


THRESHOLD_HELP = ("effective length (RULER): the score (percent) every length up to it must beat (RULER: 85.6)")
RELATIVE_HELP = ("relative effective length (NoLiMa): the share of the variant's own score at the shortest length "
                 "every length up to it must keep (NoLiMa: 0.85)")


@app.command("results")
def results_(
    directory: Path = typer.Argument(Path("results"), help="results directory (lctx eval --out)"),
    task: str | None = typer.Option(None, "--task", help="only this task (a name, e.g. ppl or synthetic:cwe)"),
    model: str | None = typer.Option(None, "--model", help="only this model"),
    metric: str | None = typer.Option(None, "--metric", help="metric to tabulate (default: each task's headline "
                                      "metrics); e.g. last_k_ppl, nll, seconds"),
    by_depth: bool = typer.Option(False, "--by-depth", help="passkey/niah: one column per length and depth"),
    threshold: float = typer.Option(summaries.DEFAULT_THRESHOLD, "--threshold", min=0, max=100,
                                    help=THRESHOLD_HELP),
    relative: float = typer.Option(summaries.DEFAULT_RELATIVE, "--relative", min=0, max=1, help=RELATIVE_HELP),
    csv: Path | None = typer.Option(None, "--csv", help="also write every cell as one CSV row"),
) -> None:
    """Print comparison tables (variants × lengths, per task and model) and summaries of a results directory.

    Example: lctx results results/ --task ppl --metric last_k_ppl
    """
    try:
        records, skipped = view.load(directory)
    except view.ReportError as err:
        raise _fail(err) from None
    if task:
        records = [r for r in records if r.get("task") == task or r.get("task_spec") == task]
    if model:
        records = [r for r in records if r.get("model") == model]
    if not records:
        console.print(f"no records in {directory} matching the filters")
        raise typer.Exit(1)
    known = view.tables.metric_names(records)
    if metric and metric not in known:
        raise _fail(ValueError(f"unknown metric {metric!r}; these records have: {', '.join(known)}"))
    if csv:
        try:
            view.frame.frame(view.frame.revive(records)).to_csv(csv, index=False)
        except OSError as err:
            raise _fail(ValueError(f"--csv {str(csv)!r}: {err.strerror}")) from None
        console.print(f"wrote {len(records)} rows to {csv}")
    for item in view.console(records, metric=metric, by_depth=by_depth, threshold=threshold, relative=relative):
        console.print(item)
    if skipped:
        console.print(f"[yellow]warning:[/] {escape(skipped.describe())}")


def _gate_tables(result, fail_on_missing: bool) -> None:
    """Print the gate's verdict with its regressions and unmatched cells (the new ones abridged)."""
    style = "green" if result.passed(fail_on_missing) else "red"
    console.print(f"[{style}]Regression gate {result.verdict(fail_on_missing)}[/]", highlight=False)
    header = ["task", "metric", "model", "variant", "length", "baseline", "current", "change"]
    missing_header = ["task", "metric", "model", "variant", "length", "settings"]
    lists = [("Regressions", header, result.rows(result.regressions), None),
             ("In the baseline, missing from the results", missing_header,
              result.missing_rows(result.missing_in_current), None),
             ("New in the results (not in the baseline)", missing_header,
              result.missing_rows(result.missing_in_baseline), 10)]
    for title, columns, rows, limit in lists:
        if not rows:
            continue
        shown = rows if limit is None else rows[:limit]
        more = f" (first {len(shown)}; gate.md lists all)" if len(shown) < len(rows) else ""
        table = Table(title=f"{title}: {len(rows)}{more}", title_justify="left")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in shown:
            table.add_row(*map(escape, row))
        console.print(table)


@app.command("report")
def report_(
    directory: str = typer.Argument("results", help="results directory (lctx eval --out); also a pack from lctx "
                                    "pack or an https:// URL of one"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="report directory: index.html, tables.md, "
                             "tables.tex, tables/, figures/"),
    baseline: str | None = typer.Option(None, "--baseline", help="results to compare against (a directory, a "
                                        "pack from lctx pack, or an https:// URL of one or of records.jsonl): exit "
                                        "status 1 when a cell regresses beyond --tolerance"),
    history: list[str] = typer.Option([], "--history", help="earlier results (directory, pack or URL; repeatable): "
                                      "their runs join the directory's in the dashboard's history section"),
    tolerance: str = typer.Option("2%", "--tolerance", help="how much worse a cell may get before it counts as "
                                  "a regression: 2% (of the baseline value) or 0.05 (absolute); the floor when "
                                  "--noise widens it"),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="widen each cell's tolerance to the 95% interval "
                               "of its change where the records carry one (Wilson for accuracies, bootstrap over "
                               "documents or examples for perplexity and scores)"),
    fail_on_missing: bool = typer.Option(False, "--fail-on-missing", help="also fail the gate when a baseline "
                                         "cell is missing from the results"),
    summary_md: Path | None = typer.Option(None, "--summary-md", help="also write a compact Markdown summary "
                                           "here (e.g. $GITHUB_STEP_SUMMARY)"),
    title: str | None = typer.Option(None, "--title", help="dashboard title (default: the results directory's "
                                     "name)"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="draw the figures (seconds each on a CPU); "
                                 "--no-figures for tables, dashboard and gate only"),
    threshold: float = typer.Option(summaries.DEFAULT_THRESHOLD, "--threshold", min=0, max=100,
                                    help=THRESHOLD_HELP),
    relative: float = typer.Option(summaries.DEFAULT_RELATIVE, "--relative", min=0, max=1, help=RELATIVE_HELP),
) -> None:
    """Write tables (Markdown, CSV, LaTeX), summaries, figures (PNG, PDF, SVG) and a static index.html; gate on a
    baseline.

    Example: lctx report results/ --out report/ --baseline base.tar.gz --history base.tar.gz --summary-md summary.md
    """
    try:
        written = view.report(directory, out, baseline=baseline, history_sources=history, tolerance=tolerance,
                              fail_on_missing=fail_on_missing, summary_md=summary_md, title=title, draw=figures,
                              threshold=threshold, relative=relative, noise=noise)
    except (view.ReportError, ValueError, OSError) as err:
        raise _fail(err) from None
    for where, skipped in written.skipped.items():
        console.print(f"[yellow]warning:[/] {escape(where)}: {escape(skipped.describe())}")
    console.print(f"Wrote {len(written.tables)} tables and {len(written.figures)} figure files to {written.out}/; "
                  f"dashboard: {written.index}" + (f"; summary: {written.summary}" if written.summary else ""),
                  highlight=False)
    if written.gate is not None:
        _gate_tables(written.gate, fail_on_missing)
    raise typer.Exit(0 if written.passed else 1)


@app.command("pack")
def pack_(
    directory: str = typer.Argument("results", help="results directory (lctx eval --out); also a pack or URL"),
    out: Path = typer.Option(Path("results.tar.gz"), "--out", "-o", help="the archive to write"),
    history: list[str] = typer.Option([], "--history", help="earlier results to carry along (directory, pack or "
                                      "URL; repeatable), so that the archive holds their runs too"),
) -> None:
    """Write a results directory's records and manifests as one deterministic .tar.gz, for CI artifacts
    (lctx report --baseline/--history read it back).

    Example: lctx pack results/ -o results.tar.gz --history previous.tar.gz
    """
    from lctx import pack

    try:
        packed = pack.pack(directory, out, history)
    except (pack.PackError, OSError) as err:
        raise _fail(err) from None
    console.print(f"Packed {packed.records} records of {packed.runs} run(s) and {packed.manifests} manifest(s) "
                  f"into {packed.path}", highlight=False)


@app.command("sweep")
def sweep(
    experiment: Path = typer.Argument(..., help="experiment file (TOML: name, description, models, ropes, tasks, "
                                      "lengths, an options table and train tables of toy models to train "
                                      "first); see experiments/"),
    out: Path | None = typer.Option(None, "--out", "-o", help="results directory (default: results/<name>/)"),
    report_out: Path | None = typer.Option(None, "--report", help="report directory (default: report/<name>/)"),
    force: bool = typer.Option(False, "--force", help="recompute cells that are already recorded (and retrain the "
                               "file's train models)"),
    shard: str | None = typer.Option(None, "--shard", callback=_parsed(options.parse_shard),
                                     help="run shard i of n (0 ≤ i < n), e.g. 0/4; shards write separate files"),
    executor: str | None = typer.Option(None, "--executor", help=run_help("executor") + "; overrides the file's"),
    ray_address: str | None = typer.Option(None, "--ray-address", help=run_help("ray_address")),
) -> None:
    """Run an experiment file's models × variants × tasks × lengths (resumable), then write its report.

    Example: lctx sweep experiments/su-table.toml
    """
    from lctx import sweep as sweeps

    try:
        settings = options.run_settings({"executor": executor, "ray_address": ray_address}, "lctx sweep")
        code = sweeps.run(experiment, out=out, report_out=report_out, force=force, shard=shard, console=console,
                          argv=["lctx", *sys.argv[1:]], settings=settings)
    except (sweeps.ExperimentError, *execute.USAGE_ERRORS) as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted[/] before any cell was computed.")
        raise typer.Exit(execute.EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_(ctx: typer.Context) -> None:
    """Run lm-eval's own CLI, unchanged, with the lm-eval model `lctx` registered (any task, any RoPE variant).

    Example: lctx lm-eval --model lctx --model_args pretrained=smollm2-135m,rope=yarn:factor=4 --tasks hellaswag
    """
    from lctx.evals import lm_eval_task

    try:
        bridge = lm_eval_task.bridge()
        code = bridge.cli(list(ctx.args))
    except (*execute.USAGE_ERRORS,) as err:
        raise _fail(err) from None
    except ValueError as err:  # the bridge's ModelArgError, raised while lm-eval builds the model
        raise _fail(err) from None
    raise typer.Exit(code)


@app.command("archs")
def archs_(
    as_json: bool = typer.Option(False, "--json", help="print the full report as JSON"),
    types: list[str] = typer.Option(None, "--type", help="model types to check (repeatable; default: every causal "
                                    "LM of the installed transformers)"),
) -> None:
    """Which model types lctx patches: a live matrix of tiny models (frequency parity, attention exactness).

    Example: lctx archs --json > archs.json   (a few minutes on a CPU)
    """
    from lctx import archs

    with console.status("") as status:
        rows = archs.run(types or None, progress=lambda t: status.update(f"checking {t}…"))
    result = archs.report(rows)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"RoPE causal-LM model types of transformers {result['transformers']}")
    for column in ("model type", "frequency", "attention", "LM head", "RoPE layout", "why not"):
        table.add_column(column, overflow="fold")
    for row in result["types"]:
        why = "; ".join(x for x in (row["frequency_reason"], row["attention_reason"], *row["failures"]) if x)
        table.add_row(row["model_type"], row["frequency"], row["attention"], row["head"], ", ".join(row["layout"]),
                      escape(why))
    console.print(table)
    count = result["rope_types"]
    console.print(f"{count} model types with RoPE: frequency variants pass on {result['frequency']['pass']} "
                  f"({result['frequency']['share']:.0%}), attention-level variants on {result['attention']['pass']} "
                  f"({result['attention']['share']:.0%}).", highlight=False)


@app.command("analyze")
def analyze_(
    model: str | None = typer.Option(None, "--model", "-m", help="model whose config to read (no weights): alias, "
                                     f"local directory, .gguf file or hub id; default {models.DEFAULT_MODEL}"),
    lengths: str = typer.Option("8k,32k,128k", "--lengths", "-l",
                                help="target lengths: 4096, 4k (=4096), 1.5k; comma-separated"),
    rope: list[str] = typer.Option(["pi,ntk,yarn,rerope"], "--rope", "-r", help="RoPE specs, comma-separated, "
                                   f"repeatable; a factor left out is target / training length. Grammar: "
                                   f"{patches.GRAMMAR}"),
    theta: str | None = typer.Option(None, "--theta", help="what-if without a model: the RoPE base (with "
                                     "--rotary-dim and --train-len)"),
    rotary_dim: str | None = typer.Option(None, "--rotary-dim", help="what-if: the rotary dimension d"),
    train_len: str | None = typer.Option(None, "--train-len", help="what-if: the training length; with a model, "
                                         "overrides its own"),
    as_json: bool = typer.Option(False, "--json", help="print the analysis as JSON instead of tables"),
    out: Path | None = typer.Option(None, "--out", "-o", help="write analysis.json, analysis.md and figures/ here"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="with --out: draw the figures (PNG, PDF, SVG)"),
) -> None:
    """RoPE arithmetic from a config alone: Men et al.'s base bound, wavelengths, what each variant does, decay.

    Example: lctx analyze --model smollm2-135m --lengths 8k,32k --rope yarn,ntk:alpha=8 --out analysis/
    """
    from lctx import analyze

    try:
        analysis = analyze.from_options(model=model, lengths=lengths, ropes=rope, theta=theta,
                                        rotary_dim=rotary_dim, train_len=train_len)
        written = analyze.write(analysis, out, figures) if out is not None else []
    except analyze.USAGE_ERRORS as err:
        raise _fail(err) from None
    if as_json:
        typer.echo(json.dumps(analysis, indent=1))
        return
    analyze.print_tables(analysis, console)
    if written:
        console.print(f"Wrote {len(written)} files to {out}/ (analysis.json, analysis.md, figures/)", highlight=False)
