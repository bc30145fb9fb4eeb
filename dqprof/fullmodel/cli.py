"""``dqprof model``: synthesize checkpoints, run them in vLLM, reconcile with kernel profiles."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=err_console) as bar:
        task = bar.add_task("tensors", total=None)
        res = synthesize(model, out, opts,
                         lambda done, total, name: bar.update(task, completed=done, total=total,
                                                              description=name[-40:].ljust(40)))
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
    runner = Runner(cfg, progress=lambda msg: err_console.print(f"[dim]{msg}[/]"))
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
    console.print(f"{run_dir}: {counts['ok']} ok, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed, {counts['already']} already recorded")


@model_app.command("reconcile")
def reconcile_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Model run folder (model.jsonl).")],
    kernels: Annotated[Path, typer.Option(help="Kernel profile folder or kernels.jsonl.")],
    model: Annotated[str | None, typer.Option(help="Config for the shapes (default: the "
                                              "first record's checkpoint).")] = None,
    above_idle: Annotated[bool, typer.Option(help="Compare energy above idle.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Also write the figure here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measured J/token vs the linear layers' energy predicted from a kernel profile."""
    from dqprof.errors import DqprofError
    from dqprof.fullmodel.reconcile import reconcile
    from dqprof.fullmodel.records import latest, load_model_records
    from dqprof.models.config import load_config
    from dqprof.models.shapes import linear_shapes
    from dqprof.results import load_records

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
    t = Table(title=f"linear layers predicted from {kernels} vs measured in {run_dir}")
    for col in ("quant", "workload", "B", "phase", "M", "measured J/tok", "linear J/tok",
                "explained", "remainder J/tok", "interp"):
        t.add_column(col)

    def f(v: float | None, fmt: str = ".3g") -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        interp = ", ".join(f"{k} {v}" for k, v in sorted(r.methods.items()))
        interp += "".join(f"; {b} for {k}" for k, b in r.proxies.items())
        t.add_row(r.quant, r.workload, str(r.batch), r.phase, str(r.m),
                  f(r.measured_j_per_token), f(r.predicted_j_per_token),
                  f(r.explained_fraction, ".0%"), f(r.remainder_j_per_token), interp)
    console.print(t)
    console.print("remainder: " + ", ".join(rows[0].remainder_parts) if rows else "")
    profiled = [r for r in rows if r.in_situ]
    if profiled:
        s = Table(title="in situ (torch.profiler), us per token; energy split is an estimate")
        for col in ("quant", "workload", "B", "phase", "linears predicted", "linears in situ",
                    "pred/in situ", "attention", "other", "idle", "named+idle"):
            s.add_column(col)
        for r in profiled:
            v = r.in_situ
            if v.get("status") != "ok":
                s.add_row(r.quant, r.workload, str(r.batch), r.phase, "-", "-", "-", "-", "-",
                          "-", f"failed: {v.get('reason')}")
                continue
            rest = v["rest_s_per_token"]
            s.add_row(r.quant, r.workload, str(r.batch), r.phase,
                      f(r.predicted_s_per_token and r.predicted_s_per_token * 1e6),
                      f(v["linear_s_per_token"] * 1e6), f(v.get("predicted_over_in_situ")),
                      f(rest.get("attention", 0.0) * 1e6),
                      f(sum(x for c, x in rest.items() if c != "attention") * 1e6),
                      f(v["idle_s_per_token"] * 1e6), f(v.get("named_fraction"), ".0%"))
        console.print(s)
