"""`osdsim calibrate`: registered lazily by osdsim/cli.py. No torch at import time."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from osdsim.errors import InputError
from osdsim.real._deps import MissingDependency

err_console = Console(stderr=True, highlight=False)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/bold red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(2)


def _command(gpu: str | None, device: str, out: Path | None, force: bool, quick: bool, threads: int,
             backend: str = "torch") -> str:
    parts = ["osdsim", "calibrate"]
    parts += ["--gpu", gpu] if gpu else ["--device", device]
    if backend != "torch":
        parts += ["--backend", backend]
    parts += ["--threads", str(threads)]
    if quick:
        parts.append("--quick")
    if force:
        parts.append("--force")
    if out is not None:
        parts += ["--out", str(out)]
    return shlex.join(parts)


def _errors_table(heldout: dict[str, dict[str, float]], insample: dict[str, dict[str, float]]) -> Table:
    t = Table(title="cost-model fit error (absolute % error of pass time)", title_justify="left")
    for col in ("pass/dtype", "held-out median", "held-out max", "n", "fit median", "fit max"):
        t.add_column(col, justify="left" if col == "pass/dtype" else "right")
    for key in sorted(set(heldout) | set(insample), key=lambda k: (k.startswith("all"), k == "all", k)):
        h, f = heldout.get(key, {}), insample.get(key, {})
        t.add_row(
            key, f"{h['median_ape_pct']:.1f}%" if h else "—", f"{h['max_ape_pct']:.1f}%" if h else "—",
            str(int(h["n"])) if h else "—",
            f"{f['median_ape_pct']:.1f}%" if f else "—", f"{f['max_ape_pct']:.1f}%" if f else "—",
        )
    return t


def calibrate(
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help="Device to calibrate: a100, a100-40g, a100-80g, h100, h200, l4, l40s, a10g, t4, "
                                   "v100 or cpu. Checked against what torch sees."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto (whatever is here, profile named after it), cpu, cuda or cuda:N.")
    ] = "auto",
    out: Annotated[
        Path | None, typer.Option("--out", help="Profile YAML (or a directory for <name>.yaml); default calibration/<name>.yaml.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing profile (else it is kept as <name>.prev.yaml).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Reduced grid (seconds on a CPU; for tests).")] = False,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads on a CPU.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    backend: Annotated[
        str,
        typer.Option("--backend", help="torch (transformers passes of random-weight models, the default) or "
                                       "llamacpp (llama.cpp passes of the packaged SmolLM2 GGUF and its 2-layer "
                                       "draft at batch 1 and batched; CPU only; writes calibration/cpu-llamacpp-<cpu>.yaml)."),
    ] = "torch",
    from_: Annotated[
        Path | None,
        typer.Option("--from", help="Fit on measured kernel timings instead of measuring here: a directory or file "
                                    "of Vidur profiling CSVs (mlp, attention, all_reduce, send_recv, cpu_overheads) "
                                    "or osdsim raw calibration CSVs. Needs --gpu (a100, h100, a40; h200 is derived "
                                    "from h100's tables)."),
    ] = None,
) -> None:
    """Measure this device with torch (or import measurements: --from), fit the cost model, write a profile."""
    from osdsim.calibrate import devices
    from osdsim.calibrate import run as cal

    if backend not in ("torch", "llamacpp"):
        raise _fail(f"--backend {backend!r}: must be torch or llamacpp")
    if from_ is not None:
        if backend != "torch":
            raise _fail("--from imports kernel timings for the torch cost model; it does not combine with --backend")
        _calibrate_from(from_, gpu, out, force, quiet, as_json)
        return
    try:
        if backend == "llamacpp" and ((gpu or "cpu").strip().lower() != "cpu" or device not in ("auto", "cpu")):
            raise InputError("--backend llamacpp: calibrates the CPU only (use --gpu cpu)")
        if gpu is not None and gpu.strip().lower() not in devices.KNOWN_NAMES:
            raise InputError(
                f"--gpu {gpu!r}: unknown device name; known: {', '.join(devices.KNOWN_NAMES)} (or --device auto)"
            )
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise InputError(f"--device {device!r}: must be auto, cpu, cuda or cuda:N")
        torch = cal.import_torch()
        want_cpu = (gpu or "").lower() == "cpu" or device == "cpu"
        if want_cpu:
            dev = "cpu"
        elif device.startswith("cuda"):
            dev = device
        else:
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and not torch.cuda.is_available():
            info = cal.detect(torch, "cpu", threads)
            raise InputError(f"--device {device}: no CUDA device here (torch sees only the {info.describe()})")
        info = cal.detect(torch, dev, threads)
        name = devices.check_requested(gpu, info) if gpu is not None else devices.profile_name(info)
        if backend == "llamacpp":
            from osdsim.calibrate import llamacpp as lcal

            name = lcal.profile_name(name)
        path = cal.resolve_out(name, out)
        cal.check_writable(path)
        opts = cal.Options(dev, name, quick, threads, _command(gpu, device, out, force, quick, threads, backend))
        if backend == "llamacpp":
            outcome = _measure_llamacpp(opts, show_progress=not (quiet or as_json))
        else:
            outcome = _measure(cal, opts, show_progress=not (quiet or as_json))
        yaml_path, csv_path, prev = cal.write_outputs(outcome, path, force)
    except InputError as exc:
        raise _fail(str(exc)) from None
    except MissingDependency as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted; no profile was written") from None
    kept = f"kept the previous profile as {prev}" if prev else None
    if as_json:
        doc = {
            "profile": str(yaml_path), "csv": str(csv_path), "previous": str(prev) if prev else None,
            "device": outcome.profile.device, "wall_s": round(outcome.wall_s, 1),
            "efficiency": outcome.profile.efficiency.model_dump(),
            "efficiency_by_dtype": {k: v.model_dump() for k, v in outcome.profile.efficiency_by_dtype.items()},
            "heldout_errors": outcome.fit.heldout, "fit_errors_insample": outcome.fit.insample,
        }
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    if not quiet:
        console = Console()
        console.print(_errors_table(outcome.fit.heldout, outcome.fit.insample))
        console.print(f"profile: [bold]{yaml_path}[/bold] (raw measurements {csv_path.name}, {outcome.wall_s:.0f} s)")
        if kept:
            console.print(kept)
    elif kept:
        err_console.print(kept)


def _measure(cal, opts, show_progress: bool):
    """Run the calibration with a rich progress bar of the stages (on a terminal)."""
    if not show_progress or not sys.stderr.isatty():
        return cal.calibrate(opts)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]calibrating"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True,
    ) as prog:
        task = prog.add_task("starting", total=1)

        def total(n: int) -> None:
            prog.update(task, total=n)

        def tick(msg: str) -> None:
            prog.update(task, advance=1, description=msg)

        return cal.calibrate(opts, tick=tick, total=total)


def _measure_llamacpp(opts, show_progress: bool):
    from osdsim.calibrate.llamacpp import calibrate_llamacpp

    if not show_progress or not sys.stderr.isatty():
        return calibrate_llamacpp(opts.name, opts.quick, opts.threads, opts.command)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]calibrating llama.cpp"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console, transient=True,
    ) as prog:
        task = prog.add_task("starting", total=1)
        return calibrate_llamacpp(
            opts.name, opts.quick, opts.threads, opts.command,
            tick=lambda msg: prog.update(task, advance=1, description=msg),
            total=lambda n: prog.update(task, total=n),
        )


def _calibrate_from(source: Path, gpu: str | None, out: Path | None, force: bool, quiet: bool, as_json: bool) -> None:
    """`osdsim calibrate --gpu G --from PATH`: no torch, no device; import, fit, write atomically."""
    from osdsim.calibrate import gpufit
    from osdsim.calibrate.run import check_writable, resolve_out

    try:
        if gpu is None:
            raise InputError("--from: needs --gpu naming the device the measurements are of (a100, h100, h200, a40)")
        parts = ["osdsim", "calibrate", "--gpu", gpu, "--from", str(source)]
        if out is not None:
            parts += ["--out", str(out)]
        outcome = gpufit.calibrate_from(source, gpu, shlex.join(parts))
        path = resolve_out(outcome.profile.name, out)
        check_writable(path)
        path, prev = gpufit.write_profile(outcome.profile, path, force)
    except InputError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        doc = {"profile": str(path), "previous": str(prev) if prev else None, "wall_s": round(outcome.wall_s, 2),
               "files": outcome.imported.files, "efficiency": outcome.profile.efficiency.model_dump(),
               "heldout_errors": outcome.errors}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    if not quiet:
        console = Console()
        t = Table(title="held-out fit errors (absolute % error)", title_justify="left")
        for col in ("family/split/...", "median", "max", "n"):
            t.add_column(col, justify="left" if col.startswith("family") else "right")
        for key, v in outcome.errors.items():
            t.add_row(key, f"{v['median_ape_pct']:.1f}%", f"{v['max_ape_pct']:.1f}%", str(int(v["n"])))
        console.print(t)
        console.print(f"profile: [bold]{path}[/bold] ({sum(outcome.imported.files.values())} rows from "
                      f"{len(outcome.imported.files)} files, {outcome.wall_s:.1f} s)")
    if prev:
        err_console.print(f"kept the previous profile as {prev}")
