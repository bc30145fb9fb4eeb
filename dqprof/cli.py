"""The ``dqprof`` command: one thin command per verb; the work lives in the modules."""

from __future__ import annotations

import contextlib
import datetime as dt
import faulthandler
import json
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from dqprof.analysis.cli import report
from dqprof.errors import DqprofError
from dqprof.fullmodel.cli import model_app
from dqprof.gate.cli import merge, regress
from dqprof.output import Col, FormatOpt, Rows, WideOpt, check_format, col, emit

app = typer.Typer(
    help="Profile quantized GEMM paths (bf16, bitsandbytes NF4, Marlin int4, tinygemm, Triton) "
         "on a model's linear shapes: time, NVML energy, kernels, bytes and roofline.\n\n"
         "Start with `dqprof shapes`, measure with `dqprof bench`, explain with `dqprof report`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", help="Bundled model name (e.g. gemma-4-e4b), "
                                       "a config.json path, or a folder holding config.json.")]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DqprofError(f"--m takes comma-separated integers (got '{text}')") from None


@app.command()
def shapes(model: ModelOpt = "gemma-4-e4b",
           as_json: Annotated[bool, typer.Option("--json", help="Print every field of each "
                                                 "shape as JSON.")] = False,
           fmt: FormatOpt = "table", wide: WideOpt = False) -> None:
    """The model's linear layers as vLLM executes them, with calls per token."""
    from dqprof.models.config import load_config
    from dqprof.models.shapes import linear_shapes

    check_format(fmt)
    cfg = load_config(model)
    rows = linear_shapes(cfg)
    if as_json:
        print(json.dumps([s.as_dict() for s in rows], indent=1))
        return
    params = sum(s.n * s.k * s.calls_per_token for s in rows)
    emit(shape_rows(cfg.name, cfg.source, rows, params), fmt, console, wide)


def shape_rows(name: str, source: str, rows: list, params: int) -> Rows:
    records = [{"layer": s.name, "group": s.group, "n": s.n, "k": s.k,
                "shards": " + ".join(f"{n}:{size}" for n, size
                                     in zip(s.shard_names, s.shards, strict=True))
                if len(s.shards) > 1 else "",
                "calls_per_token": s.calls_per_token, "per_sequence": s.per_sequence,
                "quantized": s.quantized} for s in rows]
    cols = [col("layer"), col("group"), col("n", "N (out)", num=True, short="N"),
            col("k", "K (in)", num=True, short="K"), col("shards", optional=True),
            Col("calls/token", lambda r: f"{r['calls_per_token']}"
                + (" (per sequence in prefill)" if r["per_sequence"] else ""), short="calls"),
            col("quantized", fmt=lambda q: "yes" if q else "bf16", short="quant")]
    return Rows(list(records[0]) if records else [], records, cols,
                title=f"{name}: linear layers per token ({source})",
                notes=[f"linear weights read per decode step: {params / 1e9:.2f} G parameters"])


def _default_run_dir(device: str) -> Path:
    label = "cpu"
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            label = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{label}"


@app.command()
def bench(
    model: Annotated[str | None, typer.Option("--model", help="Bundled model name, a "
                                              "config.json path, or a folder holding one. "
                                              "Default: gemma-4-e4b.")] = None,
    shapes: Annotated[str | None, typer.Option(help="Only these shapes: comma-separated names "
                                               "or groups (e.g. gate_up,attn.o).")] = None,
    m: Annotated[str | None, typer.Option("--m", help="Token counts M, comma-separated. Default: "
                                          "1,2,4,...,4096.")] = None,
    backends: Annotated[str | None, typer.Option(help="Backends, comma-separated; options in "
                                                 "brackets: marlin-gptq[use_fp32_reduce=false]. "
                                                 "Default: all (see `dqprof backends`).")] = None,
    device: Annotated[str, typer.Option(help="cuda, or cpu for a timing-only run of the "
                                           "CPU-capable backends.")] = "cuda",
    quick: Annotated[bool, typer.Option(help="M = 1,16,256,2048, 5 repeats, energy "
                                        "windows of at most 0.5 s.")] = False,
    hot: Annotated[bool, typer.Option(help="One weight copy (L2-resident) instead of rotating "
                                      "copies past L2.")] = False,
    repeats: Annotated[int | None, typer.Option(help="Timing samples per point.")] = None,
    window: Annotated[float | None, typer.Option(
        help="Longest energy window per point, seconds (default 1; --quick 0.5). A window "
             "closes sooner once its energy per call is known to --energy-precision.")] = None,
    window_min: Annotated[float | None, typer.Option(
        help="Shortest energy window, seconds (default 0.3); a window also spans at least 3 "
             "counter updates.")] = None,
    energy_precision: Annotated[str | None, typer.Option(
        help="Relative precision (one standard deviation) at which a window stops, e.g. "
             "0.5% (the default) or 0.005.")] = None,
    l2_factor: Annotated[float, typer.Option(help="Rotated weight copies span this many "
                                             "times the L2 size.")] = 3.0,
    no_energy: Annotated[bool, typer.Option("--no-energy", help="Skip NVML energy.")] = False,
    no_attribution: Annotated[bool, typer.Option("--no-attribution",
                                                 help="Skip the per-kernel profile.")] = False,
    point_timeout: Annotated[float | None, typer.Option(
        help="Seconds after which a point that has not finished (a kernel that never "
             "returns) is recorded failed and the sweep exits 4; --resume goes on with the "
             "next point. Default: 120 on cuda.")] = None,
    suite: Annotated[Path | None, typer.Option(
        help="A suite file (TOML) setting model, shapes, M, backends and method; flags "
             "override it.")] = None,
    shard: Annotated[str, typer.Option(help="Run part i of n of the plan (i/n), e.g. one "
                                       "process per GPU; join with `dqprof merge`. A part "
                                       "takes whole shapes (every backend of a shape on one "
                                       "board).")] = "1/1",
    gpus: Annotated[str | None, typer.Option(
        help="Spread the sweep over GPUs: 'all' or indices like 0,2; one worker process per "
             "GPU on shard i/n, one merged run folder (--resume continues it on any number "
             "of GPUs).")] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Run folder. Default: "
                                             "runs/<time>-<gpu>/.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run folder: recorded "
                                         "points are kept, the rest measured.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="With --resume: measure failed points "
                                               "again (their old records are dropped).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every point's phases "
                                          "(quantize, check, capture, attribution, timing, "
                                          "energy) with their seconds to stderr: where a slow "
                                          "or stuck sweep spends its time.")] = False,
) -> None:
    """Measure every shape x M x backend: time, energy, kernels, bytes (writes a run folder)."""
    if verbose:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                            format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        logging.getLogger("dqprof").setLevel(logging.DEBUG)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dqprof.eta import Eta, EtaColumn
    from dqprof.sweep import QUICK_M, Sweep, SweepConfig, load_suite, parse_shard

    cfg = SweepConfig(device=device, hot=hot, l2_factor=l2_factor, seed=seed,
                      energy=not no_energy, attribution=not no_attribution,
                      shard=parse_shard(shard))
    if quick:
        cfg.m, cfg.repeats, cfg.window_s = QUICK_M, 5, 0.5
    if suite is not None:
        cfg = load_suite(suite, cfg)
    # explicit flags win over the suite and --quick
    if m is not None:
        cfg.m = _ints(m)
    if energy_precision is not None:
        from dqprof.gate.compare import parse_fraction

        try:
            cfg.energy_precision = parse_fraction(energy_precision)
        except DqprofError as e:
            raise DqprofError(f"--energy-precision: {e}") from None
    for name, value in (("model", model), ("shapes", shapes), ("backends", backends),
                        ("repeats", repeats), ("window_s", window), ("window_min_s", window_min),
                        ("point_timeout_s", point_timeout)):
        if value is not None:
            setattr(cfg, name, value)
    run_dir = out or _default_run_dir(device)
    if gpus is not None:
        _bench_gpus(cfg, run_dir, gpus, resume, retry_failed)
    sweep = Sweep(cfg, run_dir, resume=resume, retry_failed=retry_failed)  # plan errors first
    weights = _point_weights(sweep, run_dir if resume else None, retry_failed)
    eta = Eta(sum(weights))
    with Progress(TextColumn("{task.description}"), BarColumn(bar_width=20),
                  MofNCompleteColumn(), TimeElapsedColumn(), EtaColumn(eta), console=err_console,
                  transient=False) as bar:
        task = bar.add_task("measuring", total=None)

        last_line = [time.monotonic()]

        def progress(done: int, total: int, label: str) -> None:
            eta.advance(weights.pop(0) if weights else 1.0)
            width = max(16, min(48, err_console.width - 52))  # the bar's line fits the width
            bar.update(task, completed=done, total=total,
                       description=escape(label[:width].ljust(width)))
            # CI logs are no terminal: a plain line every 30 s instead of a live bar
            if not err_console.is_terminal and time.monotonic() - last_line[0] > 30:
                last_line[0] = time.monotonic()
                err_console.print(f"{done}/{total} points, {eta.text()}, last: {escape(label)}",
                                  highlight=False)

        sweep.progress = progress
        counts = sweep.run()
    for w in sweep.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(w)}")
    console.print(f"{run_dir}: {counts['ok']} ok, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed, {counts['resumed']} already recorded")


def _bench_gpus(cfg: Any, run_dir: Path, gpus: str, resume: bool, retry_failed: bool) -> None:
    """`bench --gpus`: the workers' progress as one line (every 30 s where stderr is a log)."""
    from dqprof.parallel import Runner

    runner = Runner(cfg, run_dir, gpus, resume, retry_failed)  # bad --gpus: exit 2 here
    for note in runner.notes:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    last = [0.0]

    def show(line: str) -> None:
        if err_console.is_terminal:
            status.update(escape(line))
        elif time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            err_console.print(line, highlight=False, markup=False)

    with err_console.status(f"starting {len(runner.workers)} worker(s)") as status:
        runner.show = show
        code = runner.run()
    for problem in runner.problems():
        err_console.print(f"[red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    counts = {s: 0 for s in ("ok", "skipped", "failed")}
    from dqprof.results import load_records

    for rec in load_records(run_dir):
        counts[rec["status"]] += 1
    console.print(f"{run_dir}: {counts['ok']} ok, {counts['skipped']} skipped, "
                  f"{counts['failed']} failed on {len(runner.workers)} GPU(s) "
                  f"(shards in {runner.session_dir})")
    raise typer.Exit(code)


@app.command()
def tune(
    backend: Annotated[str, typer.Argument(help="The path to tune (only triton-nf4 has tiles).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Table to write "
                      "(default: dqprof/kernels/configs/<gpu>.json, which triton-nf4 reads).")]
    = None,
    model: ModelOpt = "gemma-4-e4b",
    shapes: Annotated[str | None, typer.Option(help="Only these shapes (names or groups).")]
    = None,
    m: Annotated[str | None, typer.Option("--m", help="M buckets to time (default "
                 "1,2,4,...,4096); each bucket's config serves M up to it.")] = None,
    stats: Annotated[str, typer.Option(help="NF4 statistics: nested (bitsandbytes' default), "
                     "fp16 or fp32.")] = "nested",
    decodes: Annotated[str, typer.Option(help="Decodes to search (comma separated): table "
                       "(GEMV v3; the MMA's table gather), table4 (GEMV v4, table), shfl "
                       "(GEMV v4, shuffle; the MMA's shuffle per word), shfl1 (the MMA's "
                       "shuffle per nibble), direct (the MMA's per-weight loads; not by "
                       "default: 1.3-3x slower on the H200). The GEMV at M <= 16, the MMA "
                       "beyond M = 4.")]
    = "table,table4,shfl,shfl1",
) -> None:
    """Time triton-nf4's tile candidates on this GPU and write the tuned table it reads.

    Every candidate is checked against the fp32 reference, then timed as the sweep times a
    point (CUDA graph, weights rotated past L2). Every timing goes to <output>.log.jsonl. An
    existing table of this GPU at <output> keeps its entries for the shapes and M buckets
    this tune does not time (--shapes mlp.gate_up_proj --m 1 refreshes only those).
    """
    from dqprof import tune as tuning
    from dqprof.kernels.triton_nf4 import DECODES, STATS
    from dqprof.kernels.tuned import CONFIG_DIR

    if backend != "triton-nf4":
        raise DqprofError(f"dqprof tune takes triton-nf4 (got '{backend}'): no other path has "
                          "tiles to choose")
    if stats not in STATS:
        raise DqprofError(f"--stats takes one of {', '.join(STATS)} (got '{stats}')")
    searched = tuple(d.strip() for d in decodes.split(",") if d.strip())
    if not searched or set(searched) - set(DECODES):
        raise DqprofError(f"--decodes takes some of {', '.join(DECODES)} (got '{decodes}')")
    buckets = _ints(m) if m else tuning.BUCKETS
    if output is None:
        import torch

        if not torch.cuda.is_available():
            raise DqprofError("dqprof tune needs a CUDA GPU", exit_code=3)
        slug = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
        output = CONFIG_DIR / f"{slug.removeprefix('nvidia-')}.json"
    log_path = output.with_suffix(".log.jsonl")
    t0 = time.perf_counter()

    def progress(done: int, total: int, label: str) -> None:
        eta = (time.perf_counter() - t0) / done * (total - done)
        err_console.print(f"[{done}/{total}] {label}  (eta {eta:.0f} s)", highlight=False,
                          markup=False)

    output.parent.mkdir(parents=True, exist_ok=True)
    try:  # an existing table of this GPU keeps its entries for what this tune does not time
        previous = json.loads(output.read_text()) if output.exists() else None
    except (OSError, ValueError):
        previous = None

    def write(table: dict) -> None:  # after every shape: an interrupted tune keeps its shapes
        output.write_text(json.dumps(tuning.merge(table, previous), indent=1) + "\n")

    table = tuning.tune(model, shapes, buckets, stats, log_path, progress, searched, write)
    write(table)
    us = lambda v: "failed" if v is None else f"{v * 1e6:.2f}"  # noqa: E731
    cols = [col("layer"), col("m", "M", num=True),
            col("heuristic_s", "heuristic us", fmt=us, num=True, short="heur. us"),
            col("best_s", "tuned us", fmt=us, num=True), col("best", "tuned config")]
    records = list(tuning.summarize(log_path))
    emit(Rows(list(records[0]) if records else [], records, cols,
              f"triton-nf4 tuned on {table['gpu']} -> {output}", []), "table", console, False)

def _point_weights(sweep, resumed_from: Path | None, retry_failed: bool) -> list[float]:
    """What each point the sweep will report costs, in its order: 1 measured, 0 skipped
    (backend unavailable here, shape unsupported): the ETA's pace is over measured points."""
    from dqprof.results import kernels_path, load_records

    done: set[str] = set()
    if resumed_from is not None and kernels_path(resumed_from).exists():
        done = {r["key"] for r in load_records(resumed_from)
                if not (retry_failed and r["status"] == "failed")}
    weights: list[float] = []
    for g in sweep.groups:
        skip = g.backend.unavailable(sweep.cfg.device) or g.backend.supports(g.shape)
        weights += [0.0 if skip else 1.0 for key in g.keys if key not in done]
    return weights


@app.command()
def backends(fmt: FormatOpt = "table", wide: WideOpt = False) -> None:
    """The registered GEMM paths: what each runs, its options, where it comes from (dqprof
    or another package's `dqprof.backends` entry point) and whether it can run here."""
    import torch

    from dqprof.kernels import backend_names, backend_origin, create, load_failures

    check_format(fmt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    records = []
    for name in backend_names():
        b = create(name)
        records.append({"name": name, "description": b.description,
                        "options": ", ".join(f"{k}={v}" for k, v in b.options.items()),
                        "origin": backend_origin(name), "loaded": True,
                        "here": b.unavailable(device) or "ok"})
    for where, why in load_failures().items():  # entry points that gave no backend
        records.append({"name": where.split(" = ")[0].removeprefix("entry point "),
                        "description": "", "options": "", "origin": where, "loaded": False,
                        "here": f"not loaded: {why}"})
    cols = [col("name"), col("description", "what it runs", optional=True),
            col("options", optional=True), col("origin", "from"),
            Col(f"on {device}", lambda r: r["here"],
                style=lambda r: "" if r["here"] == "ok" else "yellow")]
    emit(Rows(list(records[0]), records, cols, title=f"backends (availability on {device})"),
         fmt, console, wide)


@app.command()
def env() -> None:
    """GPU, driver, clocks, power limit, NVML energy support and library versions."""
    import torch

    from dqprof.measure.environment import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = environment(device)
    if device == "cuda":
        from dqprof.measure.nvml import open_nvml

        nvml, why = open_nvml(0)
        info["nvml"] = {**nvml.static_info(), "state": nvml.state()} if nvml else {"error": why}
    else:
        info["note"] = ("no CUDA GPU: `dqprof bench --device cpu` runs a timing-only sweep; "
                        "`dqprof report` reads the committed H200 profile")
    print(json.dumps(info, indent=1, default=str))


# -- commands defined in other modules -----------------------------------------------
app.command()(report)
app.command()(regress)
app.command()(merge)
app.add_typer(model_app, name="model")


def main() -> None:
    if hasattr(signal, "SIGUSR1"):
        # `kill -USR1 <pid>` (or `timeout --signal=USR1`) prints where a long sweep or vLLM
        # run is stuck, to stderr, and lets it go on; not where stderr is no real file
        with contextlib.suppress(OSError, ValueError):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except DqprofError as e:
        # markup off: messages quote user input and pip extras like ".[vllm]" verbatim
        err_console.print(f"error: {e}", style="red", markup=False, highlight=False,
                          soft_wrap=True)
        sys.exit(e.exit_code)
