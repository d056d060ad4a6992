"""The ``lctx`` command line: argument parsing only; every command calls into the package."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lctx import evals, memory, models, patches, runner, toy

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
            "description": variant.description,
            "reference": variant.reference,
            "kind": variant.kind,
            "aliases": list(variant.aliases),
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"RoPE variants  (spec grammar: {patches.GRAMMAR})")
    for column in ("name", "parameters (default)", "description", "reference"):
        table.add_column(column, overflow="fold")
    for row in rows:
        params = ", ".join(
            f"{k}={'required' if k in row['required'] else ('auto' if v is None else patches.format_value(v))}"
            for k, v in row["params"].items()
        )
        name = row["name"] + (f" ({', '.join(row['aliases'])})" if row["aliases"] else "")
        table.add_row(name, params, row["description"], row["reference"])
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
    console.print(f"[red]Error:[/] {escape(str(err))}", highlight=False)  # messages quote user text: no markup
    return typer.Exit(2)


@app.command("eval")
def eval_(
    model: list[str] = typer.Option([models.DEFAULT_MODEL], "--model", "-m",
                                    help="model: alias, local directory, .gguf file or hub id (repeatable)"),
    rope: list[str] = typer.Option(DEFAULT_ROPES, "--rope", "-r",
                                   help=f"RoPE specs, comma-separated, repeatable. Grammar: {patches.GRAMMAR}"),
    task: list[str] = typer.Option(["ppl"], "--task", "-t", help="tasks, comma-separated, repeatable: "
                                   + ", ".join(evals.task_names())),
    lengths: str = typer.Option(DEFAULT_LENGTHS, "--lengths", "-l", callback=_parsed(runner.parse_lengths),
                                      help="context lengths: 4096, 4k (=4096), 1.5k, 12k; comma-separated"),
    samples: int | None = typer.Option(None, "--samples", "-n", min=1,
                                       help="documents per length (ppl, default 1), trials per cell "
                                       "(passkey/niah, default 5) or examples per task (LongBench, default all)"),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", callback=_parsed(runner.parse_depths),
                               help="needle depths in [0, 1] (passkey, niah)"),
    stride: int | None = typer.Option(None, "--stride", help="ppl: sliding-window mode with this stride"),
    last_k: int = typer.Option(256, "--last-k", help="ppl: also report the loss on the last k positions"),
    data_path: str | None = typer.Option(None, "--data", help="corpus: a .txt file, a directory of .txt files "
                                         "or a .jsonl file (default: the Python reference manual, offline)"),
    text_field: str = typer.Option("text", "--text-field", help="text field of --data .jsonl / --dataset"),
    dataset: str | None = typer.Option(None, "--dataset", help="corpus from the hub: NAME[:config][:split]"),
    needle: str | None = typer.Option(None, "--needle", help="niah: needle sentence containing {value}"),
    question: str | None = typer.Option(None, "--question", help="niah: question (end it with an answer "
                                        "prefix)"),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="results directory"),
    force: bool = typer.Option(False, "--force", help="recompute cells that are already recorded"),
    shard: str | None = typer.Option(None, "--shard", callback=_parsed(runner.parse_shard),
                                     help="run shard i of n (0 ≤ i < n), e.g. 0/4; shards write separate files"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    attn: str = typer.Option("sdpa", "--attn", help="attention implementation: sdpa, eager, flash_attention_2"),
    device_map: str | None = typer.Option(None, "--device-map", help="'auto' to spread a large model over "
                                          "the available devices (accelerate)"),
    train_len: int | None = typer.Option(None, "--train-len", min=2,
                                         help="override the model's training length"),
    target_len: str | None = typer.Option(None, "--target-len", callback=_parsed(runner.parse_length),
                                          help="length the variants scale for: factor = target / training "
                                          "length where a spec gives none"),
    seed: int = typer.Option(0, "--seed", help="seed for passkey/niah keys and filler offsets"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", min=1,
                                              help="generation tasks: tokens to generate (default per task)"),
    prefill_chunk: str | None = typer.Option(None, "--prefill-chunk", callback=_parsed(runner.parse_length),
                                             help="generation tasks: feed the prompt through the KV cache this "
                                             "many tokens at a time (e.g. 4k): activation memory scales with "
                                             "the chunk, not the prompt; results are the same"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="task data files, e.g. LongBench's "
                                         "<task>.jsonl files"),
    chat_template: bool = typer.Option(False, "--chat-template/--no-chat-template",
                                       help="wrap generation prompts in the tokenizer's chat template"),
    task_arg: list[str] = typer.Option([], "--task-arg",
                                       help="KEY=VALUE option for the tasks that read KEY (repeatable)"),
    max_memory: str | None = typer.Option(None, "--max-memory", callback=_parsed(memory.parse_size),
                                          help="skip (record as oom) cells whose up-front memory estimate, "
                                          "weights included, is over this size, e.g. 3GiB; the estimate of "
                                          "the largest cell is printed either way"),
) -> None:
    """Evaluate models × RoPE variants × tasks × lengths; records each cell as it completes, resumable.

    Example: lctx eval --rope none,yarn:factor=4,dynamic-ntk:factor=4 --task ppl,passkey --lengths 4k,12k
    """
    # parsed here: a callback's dict would be turned back into a list (of its keys) by typer
    task_args = _parsed(runner.parse_task_args)(task_arg)
    options = evals.EvalOptions(
        models=model, ropes=rope, tasks=task, lengths=lengths, samples=samples, depths=depths, stride=stride,
        last_k=last_k, data=data_path, text_field=text_field, dataset=dataset, needle=needle, question=question,
        out=out, force=force, shard=shard, dtype=dtype, device=device, attn=attn, device_map=device_map,
        train_len=train_len, target_len=target_len, seed=seed, max_new_tokens=max_new_tokens,
        data_dir=data_dir, chat_template=chat_template, task_args=task_args, max_memory=max_memory,
        prefill_chunk=prefill_chunk, argv=["lctx", *sys.argv[1:]],
    )
    try:
        code = runner.run(options, console)
    except runner.USAGE_ERRORS as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted[/] before any cell was computed.")
        raise typer.Exit(runner.EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@app.command("results")
def results_(
    directory: Path = typer.Argument(Path("results"), help="results directory (lctx eval --out)"),
    task: str | None = typer.Option(None, "--task", help="only this task"),
    model: str | None = typer.Option(None, "--model", help="only this model"),
    metric: str | None = typer.Option(None, "--metric", help="metric to tabulate (default: ppl or accuracy); "
                                      "e.g. last_k_ppl, nll, seconds"),
    by_depth: bool = typer.Option(False, "--by-depth", help="passkey/niah: one column per length and depth"),
    csv: Path | None = typer.Option(None, "--csv", help="also write every cell as one CSV row"),
) -> None:
    """Print comparison tables (variants × lengths, per task and model) of the records in a directory.

    Example: lctx results results/ --task ppl --metric last_k_ppl
    """
    try:
        code = runner.show_results(directory, console, task=task, model=model, metric=metric,
                                   by_depth=by_depth, csv=csv)
    except runner.USAGE_ERRORS as err:
        raise _fail(err) from None
    raise typer.Exit(code)


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
    directory: Path = typer.Argument(Path("results"), help="results directory (lctx eval --out)"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="report directory: index.html, tables.md, "
                             "tables.tex, tables/, figures/"),
    baseline: Path | None = typer.Option(None, "--baseline", help="results directory to compare against: exit "
                                         "status 1 when a cell regresses beyond --tolerance"),
    tolerance: str = typer.Option("2%", "--tolerance", help="how much worse a cell may get before it counts as "
                                  "a regression: 2% (of the baseline value) or 0.05 (absolute)"),
    fail_on_missing: bool = typer.Option(False, "--fail-on-missing", help="also fail the gate when a baseline "
                                         "cell is missing from the results"),
    summary_md: Path | None = typer.Option(None, "--summary-md", help="also write a compact Markdown summary "
                                           "here (e.g. $GITHUB_STEP_SUMMARY)"),
    title: str | None = typer.Option(None, "--title", help="dashboard title (default: the results directory's "
                                     "name)"),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="draw the figures (seconds each on a CPU); "
                                 "--no-figures for tables, dashboard and gate only"),
) -> None:
    """Write tables (Markdown, CSV, LaTeX), figures (PNG, PDF, SVG) and a static index.html; gate on a baseline.

    Example: lctx report results/ --out report/ --baseline base-results/ --tolerance 2% --summary-md summary.md
    """
    from lctx import report

    try:
        written = report.report(directory, out, baseline=baseline, tolerance=tolerance,
                                fail_on_missing=fail_on_missing, summary_md=summary_md, title=title,
                                figures=figures)
    except (report.ReportError, ValueError) as err:
        raise _fail(err) from None
    console.print(f"Wrote {len(written.tables)} tables and {len(written.figures)} figure files to {written.out}/; "
                  f"dashboard: {written.index}" + (f"; summary: {written.summary}" if written.summary else ""),
                  highlight=False)
    if written.gate is not None:
        _gate_tables(written.gate, fail_on_missing)
    raise typer.Exit(0 if written.passed else 1)


@app.command("sweep")
def sweep(
    experiment: Path = typer.Argument(..., help="experiment file (TOML: name, description, models, ropes, tasks, "
                                      "lengths and an options table); see experiments/"),
    out: Path | None = typer.Option(None, "--out", "-o", help="results directory (default: results/<name>/)"),
    report_out: Path | None = typer.Option(None, "--report", help="report directory (default: report/<name>/)"),
    force: bool = typer.Option(False, "--force", help="recompute cells that are already recorded"),
    shard: str | None = typer.Option(None, "--shard", callback=_parsed(runner.parse_shard),
                                     help="run shard i of n (0 ≤ i < n), e.g. 0/4; shards write separate files"),
) -> None:
    """Run an experiment file's models × variants × tasks × lengths (resumable), then write its report.

    Example: lctx sweep experiments/su-table.toml
    """
    from lctx.report import sweep as sweeps

    try:
        code = sweeps.run(experiment, out=out, report_out=report_out, force=force, shard=shard, console=console,
                          argv=["lctx", *sys.argv[1:]])
    except (sweeps.ExperimentError, *runner.USAGE_ERRORS) as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted[/] before any cell was computed.")
        raise typer.Exit(runner.EXIT_INTERRUPTED) from None
    raise typer.Exit(code)


@app.command("lm-eval", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lm_eval_(ctx: typer.Context) -> None:
    """Run lm-eval's own CLI, unchanged, with the lm-eval model `lctx` registered (any task, any RoPE variant).

    Example: lctx lm-eval --model lctx --model_args pretrained=smollm2-135m,rope=yarn:factor=4 --tasks hellaswag
    """
    from lctx.evals import lm_eval_bridge

    try:
        code = lm_eval_bridge.cli(list(ctx.args))
    except (lm_eval_bridge.ModelArgError, *runner.USAGE_ERRORS) as err:
        raise _fail(err) from None
    raise typer.Exit(code)


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
