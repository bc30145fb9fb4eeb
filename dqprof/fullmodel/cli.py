"""``dqprof model``: synthesize checkpoints, run them in vLLM, reconcile with kernel profiles."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dqprof.output import Col, FormatOpt, Rows, WideOpt, check_format, col, emit

model_app = typer.Typer(
    help="Full-model runs: random-weight Gemma 4 checkpoints (bf16, GPTQ, AWQ), vLLM energy "
         "per token under each quantization, and the check against a kernel profile.",
    no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


@model_app.command()
def synth(
    model: Annotated[str, typer.Argument(help="Bundled config name (gemma-4-e4b) or a "
                                         "config.json / folder.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Checkpoint folder to write.")],
    fmt: Annotated[str, typer.Option("--format", help="bf16, gptq (int4 RTN, group 128, sym) "
                                     "or awq (int4 RTN, group 128, zero points).")] = "bf16",
    layers: Annotated[int | None, typer.Option(help="Keep this many decoder layers (the last "
                                               "one full attention). Default: all.")] = None,
    vocab: Annotated[int | None, typer.Option(help="Shrink the vocabulary (tests only: "
                                              "lm_head and PLE energy depend on it).")] = None,
    kv_shared: Annotated[int | None, typer.Option(help="KV-shared layers. Default: the "
                                                  "config's share, scaled and kept valid.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    std: Annotated[float, typer.Option(help="Std of the random weights.")] = 0.02,
    device: Annotated[str, typer.Option(help="Where weights are generated and quantized: "
                                        "auto, cpu, cuda.")] = "auto",
    shard_gb: Annotated[float, typer.Option(help="Max shard size, GB.")] = 4.0,
    no_shared_kv: Annotated[bool, typer.Option(
        "--no-shared-kv-weights",
        help="Leave out k_proj/v_proj/k_norm of KV-shared layers.")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite a checkpoint in OUT.")] = False,
) -> None:
    """Write a random-weight checkpoint with the model's real config."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from dqprof.fullmodel.synth import SynthOptions, synthesize

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    opts = SynthOptions(fmt=fmt, layers=layers, vocab=vocab, kv_shared=kv_shared, seed=seed,
                        std=std, device=device, shard_bytes=int(shard_gb * 1e9),
                        shared_kv_weights=not no_shared_kv, force=force)
    # the bar starts with the first tensor: a bad model name or format is one line, no bar
    bar: Progress | None = None
    task = None

    def progress(done: int, total: int, name: str) -> None:
        nonlocal bar, task
        if bar is None:
            bar = Progress(TextColumn("{task.description}"), BarColumn(),
                           MofNCompleteColumn(), console=err_console)
            bar.start()
            task = bar.add_task("tensors", total=total)
        bar.update(task, completed=done, total=total, description=name[-40:].ljust(40))

    try:
        res = synthesize(model, out, opts, progress)
    finally:
        if bar is not None:
            bar.stop()
    console.print(f"{res.path}: {res.name}, {res.format}, {res.layers} layers "
                  f"({res.kv_shared} KV-shared), vocab {res.vocab}, {len(res.shards)} shards, "
                  f"{res.total_bytes / 1e9:.2f} GB")


@model_app.command()
def run(
    quant: Annotated[str, typer.Option(help="Quantizations, comma-separated: bf16, "
                                       "bitsandbytes, dqprof_nf4, fp8 (these on a bf16 "
                                       "checkpoint), gptq_marlin, awq_marlin; NAME@PATH gives "
                                       "one its own checkpoint.")],
    model: Annotated[Path | None, typer.Option("--model", help="Checkpoint folder (synthetic "
                                               "or a real HF checkpoint).")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8,32,128",
    workload: Annotated[str, typer.Option(help="decode (128 in/512 out), prefill (2048 in/16 "
                                          "out), or IN:OUT; comma-separated.")] = "decode,prefill",
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Run folder. Default: "
                                             "runs/<time>-model/.")] = None,
    window: Annotated[float, typer.Option(help="Minimum steady-state window per phase, "
                                          "seconds (0: one call).")] = 5.0,
    min_ticks: Annotated[int, typer.Option(help="Minimum energy-counter updates per "
                                           "window.")] = 50,
    warmup: Annotated[int, typer.Option(help="Warm-up calls per phase.")] = 1,
    engine: Annotated[str, typer.Option(help="default (torch.compile + CUDA graphs), graphs "
                                        "(CUDA graphs, no compile: faster start), eager.")
                      ] = "default",
    gpu_mem: Annotated[float, typer.Option(help="vLLM gpu_memory_utilization.")] = 0.85,
    budget: Annotated[float | None, typer.Option(help="Time budget for the whole run, "
                                                 "seconds; shared evenly between "
                                                 "quantizations.")] = None,
    timeout: Annotated[float, typer.Option(help="Hard limit per quantization, seconds.")
                       ] = 1800.0,
    no_energy: Annotated[bool, typer.Option("--no-energy", help="Time only.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling and prompt seed.")] = 0,
    in_situ: Annotated[bool, typer.Option("--in-situ/--no-in-situ", help="Profile a few "
                                          "decode and prefill engine steps of every point "
                                          "(torch.profiler), outside the energy windows.")
                       ] = True,
    profile_steps: Annotated[int, typer.Option(help="Decode engine steps per in-situ "
                                               "window (prefill: half as many, at least 1).")
                             ] = 8,
    keep_traces: Annotated[bool, typer.Option("--keep-traces", help="Keep the in-situ "
                                              "Chrome traces (OUT/logs/traces/).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check checkpoints, print the "
                                          "plan, run nothing.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="The summary at the end: table, csv, "
                                     "json or md.")] = "table",
    wide: WideOpt = False,
) -> None:
    """Measure J/token, tokens/s and power in vLLM, one process per quantization."""
    from dqprof.fullmodel.runner import RunConfig, Runner, parse_quants
    from dqprof.fullmodel.workload import (
        WindowRule,
        engine_limits,
        parse_batches,
        parse_workloads,
        plan,
    )

    check_format(fmt)
    quants = parse_quants(quant, model)
    rule = WindowRule(min_s=window, min_ticks=min_ticks if window > 0 else 0)
    run_dir = out or Path("runs") / f"{dt.datetime.now():%Y%m%d-%H%M%S}-model"
    cfg = RunConfig(quants=quants, workloads=parse_workloads(workload),
                    batches=parse_batches(batch), out=run_dir, rule=rule, warmup_calls=warmup,
                    seed=seed, engine_mode=engine, gpu_memory_utilization=gpu_mem,
                    budget_s=budget, timeout_s=timeout, energy=not no_energy,
                    profile={"enabled": in_situ, "decode_steps": max(1, profile_steps),
                             "prefill_steps": max(1, profile_steps // 2),
                             "keep_traces": keep_traces})
    runner = Runner(cfg, progress=lambda msg: err_console.print(f"[dim]{escape(msg)}[/]"))
    if dry_run:
        points = plan(cfg.workloads, cfg.batches)
        for q, p in quants:
            info = runner.infos[p]
            console.print(f"{q}: {p} ({info.name}, {info.format}, {info.quantized} quantized "
                          f"linears)" + "".join(f"\n  warning: {w}" for w in info.warnings))
        console.print("points: " + ", ".join(pt.label for pt in points))
        console.print(f"engine: {engine_limits(points)}")
        return
    counts = runner.run()
    (console if fmt == "table" else err_console).print(
        f"{run_dir}: {counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} "
        f"failed, {counts['already']} already recorded")
    print_run_summary(run_dir, fmt, wide)


@model_app.command("summary")
def summary_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Model run folder (model.jsonl).")],
    fmt: FormatOpt = "table",
    wide: WideOpt = False,
) -> None:
    """The summary `model run` prints at its end: each quantization against bf16."""
    from dqprof.errors import DqprofError
    from dqprof.fullmodel.records import model_path

    check_format(fmt)
    if not model_path(run_dir).exists():
        raise DqprofError(f"{run_dir}: no model.jsonl (not a `dqprof model run` folder)")
    print_run_summary(run_dir, fmt, wide)


def print_run_summary(run_dir: Path, fmt: str = "table", wide: bool = False) -> None:
    """Each quantization against bf16 at the same workload and batch (model.jsonl's ok
    records; nothing when there are none)."""
    from dqprof.fullmodel.headline import relative_to_bf16
    from dqprof.fullmodel.records import latest, load_model_records, model_path

    if not model_path(run_dir).exists():
        return
    rel = relative_to_bf16(latest(load_model_records(run_dir)))
    if rel:
        emit(run_summary_rows(rel, f"{run_dir}: J/token and tokens/s against bf16"), fmt,
             console, wide)


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def run_summary_rows(rel: list, title: str) -> Rows:
    records = [{**asdict(r), "throttle": ", ".join(r.throttle)} for r in rel]
    cols = [col("quant"), col("workload"), col("batch", "B", num=True), col("phase"),
            col("j_per_token", "J/token", num=True),
            col("j_vs_bf16", "J vs bf16", fmt=_ratio, num=True, short="J ×bf16"),
            col("j_above_idle_vs_bf16", "above idle", fmt=_ratio, num=True, optional=True),
            col("j_per_output_token_vs_bf16", "J/output token", fmt=_ratio, num=True,
                optional=True),
            col("tokens_per_s_vs_bf16", "tok/s vs bf16", fmt=_ratio, num=True,
                short="tok/s ×bf16"),
            col("throttle", optional=True)]
    return Rows(list(records[0]) if records else [], records, cols, title,
                ["J/token and tok/s of the phase the workload is made of (decode-heavy: "
                 "decode; prefill-heavy: prompt tokens); J/output token: the whole call"])


@model_app.command("reconcile")
def reconcile_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Model run folder (model.jsonl).")],
    kernels: Annotated[Path, typer.Option(help="Kernel profile folder or kernels.jsonl.")],
    model: Annotated[str | None, typer.Option(help="Config for the shapes (default: the "
                                              "first record's checkpoint).")] = None,
    above_idle: Annotated[bool, typer.Option(help="Compare energy above idle.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Also write the figure here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every field of each row "
                                          "(terms by layer group, stand-ins) as JSON.")
                       ] = False,
    fmt: FormatOpt = "table",
    wide: WideOpt = False,
) -> None:
    """Measured J/token vs the linear layers' energy predicted from a kernel profile."""
    from dqprof.errors import DqprofError
    from dqprof.fullmodel.reconcile import reconcile
    from dqprof.fullmodel.records import latest, load_model_records
    from dqprof.models.config import load_config
    from dqprof.models.shapes import linear_shapes
    from dqprof.results import load_records

    check_format(fmt)
    recs = latest(load_model_records(run_dir))
    ok = [r for r in recs if r["status"] == "ok"]
    if not ok:
        raise DqprofError(f"{run_dir}: no ok model records to reconcile")
    if model is None:  # the checkpoint where it was run, else its config by name (bundled)
        ck = Path(str(ok[0].get("checkpoint", "")))
        model = str(ck) if (ck / "config.json").exists() else ok[0]["model"]
    shapes = linear_shapes(load_config(model))
    krecs = load_records(kernels)
    rows = reconcile(ok, krecs, shapes, above_idle)
    if plot is not None:
        from dqprof.fullmodel.plot import plot_reconciliation

        for wl in sorted({r.workload for r in rows}):
            plot_reconciliation(ok, krecs, shapes, wl, above_idle,
                                plot.with_name(f"{plot.stem}-{wl.replace(':', '_')}{plot.suffix}"))
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=1))
        return
    table = reconcile_rows(rows, f"linear layers predicted from {kernels} vs measured in "
                                 f"{run_dir}")
    situ = in_situ_rows(rows) if any(r.in_situ for r in rows) else None
    if situ is not None and fmt != "table":  # one document: the in-situ columns joined
        table = joined(table, situ, "in_situ_")
        situ = None
    emit(table, fmt, console, wide)
    if situ is not None:
        emit(situ, fmt, console, wide)


KEY_FIELDS = ("quant", "workload", "batch", "phase")


def joined(rows: Rows, extra: Rows, prefix: str) -> Rows:
    """``rows`` with ``extra``'s fields (prefixed) added to the record of the same key."""
    by_key = {tuple(e[k] for k in KEY_FIELDS): e for e in extra.records}
    names = [f for f in extra.fields if f not in KEY_FIELDS]
    records = [{**r, **{prefix + f: by_key.get(tuple(r[k] for k in KEY_FIELDS), {}).get(f)
                        for f in names}} for r in rows.records]

    def unprefixed(c: Col) -> Col:  # the column reads its field under the prefix
        return replace(c, cell=lambda r: c.cell({k.removeprefix(prefix): v
                                                 for k, v in r.items()}))

    cols = rows.cols + [unprefixed(c) for c in extra.cols
                        if c.header not in ("quant", "workload", "B", "phase")]
    return Rows(rows.fields + [prefix + f for f in names], records, cols, rows.title,
                rows.notes)


def in_situ_rows(rows: list) -> Rows:
    """The step measured in situ (torch.profiler) next to the kernel profile's prediction:
    us per token; the energy split by device-time share is an estimate."""
    records = []
    for r in rows:
        v = r.in_situ
        if not v:
            continue
        ok = v.get("status") == "ok"
        rest = v.get("rest_s_per_token") or {}
        records.append({
            "quant": r.quant, "workload": r.workload, "batch": r.batch, "phase": r.phase,
            "linears_predicted_us": r.predicted_s_per_token and r.predicted_s_per_token * 1e6,
            "linears_in_situ_us": v["linear_s_per_token"] * 1e6 if ok else None,
            "predicted_over_in_situ": v.get("predicted_over_in_situ") if ok else None,
            "attention_us": rest.get("attention", 0.0) * 1e6 if ok else None,
            "other_us": sum(x for c, x in rest.items() if c != "attention") * 1e6
            if ok else None,
            "idle_us": v["idle_s_per_token"] * 1e6 if ok else None,
            "named_fraction": v.get("named_fraction") if ok else None,
            "failure": None if ok else v.get("reason")})
    cols = [col("quant"), col("workload"), col("batch", "B", num=True), col("phase"),
            col("linears_predicted_us", "linears predicted us", num=True, short="pred. us"),
            col("linears_in_situ_us", "linears in situ us", num=True, short="in situ us"),
            col("predicted_over_in_situ", "pred/in situ", num=True, short="p/i"),
            col("attention_us", "attention us", num=True, short="attn us"),
            col("other_us", "other us", num=True),
            col("idle_us", "idle us", num=True),
            col("named_fraction", "named+idle", fmt=_pct, num=True, short="named"),
            col("failure", optional=True)]
    title = "in situ (torch.profiler), us per token; energy split is an estimate"
    return Rows(list(records[0]) if records else [], records, cols, title, [])


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.0%}"


def reconcile_rows(rows: list, title: str) -> Rows:
    """One record per (quantization, workload, batch, phase): measured J/token, the linear
    layers' predicted share, and how each term was found (``interp``)."""
    records = []
    for r in rows:
        interp = ", ".join(f"{k} {v}" for k, v in sorted(r.methods.items()))
        interp += "".join(f"; {b} for {k}" for k, b in r.proxies.items())
        records.append({"quant": r.quant, "workload": r.workload, "batch": r.batch,
                        "phase": r.phase, "m": r.m, "basis": r.basis,
                        "measured_j_per_token": r.measured_j_per_token,
                        "predicted_j_per_token": r.predicted_j_per_token,
                        "explained_fraction": r.explained_fraction,
                        "remainder_j_per_token": r.remainder_j_per_token,
                        "measured_s_per_token": r.measured_s_per_token,
                        "predicted_s_per_token": r.predicted_s_per_token, "interp": interp})
    cols = [col("quant"), col("workload"), col("batch", "B", num=True),
            col("phase"), col("m", "M", num=True),
            col("measured_j_per_token", "measured J/tok", num=True, short="meas. J/tok"),
            col("predicted_j_per_token", "linear J/tok", num=True, short="linear J/tok"),
            col("explained_fraction", "explained", fmt=_pct, num=True, short="expl."),
            col("remainder_j_per_token", "remainder J/tok", num=True, short="rest J/tok"),
            col("interp", optional=True)]
    notes = ["remainder: " + ", ".join(rows[0].remainder_parts)] if rows else []
    return Rows(list(records[0]) if records else [], records, cols, title, notes)
