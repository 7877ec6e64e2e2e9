"""`osdsim real SCENARIO`: run real OSD (real models, real queries, real distillation).

`real` is a plain function; the application registers it as a typer command. Bad input prints one
line and exits with code 2 (no traceback).
"""

from __future__ import annotations

import json as jsonlib
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from osdsim.errors import json_safe
from osdsim.real._deps import MissingDependency


def _fail(msg: str) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(2)


def _validation_line(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first.get("loc", ())) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{path}: {loc}: {first.get('msg', 'invalid')}{more}"


def _fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return "-" if not math.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def real(
    scenario: Annotated[Path, typer.Argument(help="Real-run scenario YAML (e.g. scenarios/real-smollm2-shift.yaml).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default runs/<name>).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or table.")] = False,
    json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (overrides the scenario).")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Target: 'smollm2', a HF dir or a .gguf.")] = None,
    draft: Annotated[str | None, typer.Option("--draft", help="Draft: 'layers:L' or a HF dir.")] = None,
    requests_per_phase: Annotated[int | None, typer.Option("--requests-per-phase", help="Override the stream length.")] = None,
    rate: Annotated[float | None, typer.Option("--rate", help="Serving mode: Poisson arrivals at this rate (requests/s).")] = None,
    placement: Annotated[str | None, typer.Option("--placement", help="Serving mode: training inline | harvest | dedicated.")] = None,
    max_batch: Annotated[int | None, typer.Option("--max-batch", help="Serving mode: max sequences per batch.")] = None,
) -> None:
    """Serve a shifting query stream with real speculative decoding and online distillation."""
    from osdsim.real.config import load_config

    try:
        cfg = load_config(scenario)
    except FileNotFoundError:
        raise _fail(f"{scenario}: no such file") from None
    except ValidationError as e:
        raise _fail(_validation_line(scenario, e)) from None
    except (OSError, ValueError) as e:
        raise _fail(f"{scenario}: {str(e).splitlines()[0]}") from None
    updates: dict[str, Any] = {}
    if threads is not None:
        if threads < 1:
            raise _fail("--threads must be >= 1")
        updates["threads"] = threads
    if target is not None or draft is not None:
        updates["models"] = cfg.models.model_copy(
            update={k: v for k, v in (("target", target), ("draft", draft)) if v is not None})
    if requests_per_phase is not None:
        if requests_per_phase < 1:
            raise _fail("--requests-per-phase must be >= 1")
        updates["stream"] = cfg.stream.model_copy(update={"requests_per_phase": requests_per_phase})
    serve_updates: dict[str, Any] = {}
    if rate is not None:
        serve_updates.update(arrival="poisson", rate_per_s=rate)
    if placement is not None:
        serve_updates["placement"] = placement
    if max_batch is not None:
        serve_updates["max_batch_size"] = max_batch
    if serve_updates:
        from osdsim.real.config import RealConfig, ServeCfg

        base = cfg.serve.model_dump() if cfg.serve is not None else {}
        try:
            updates["serve"] = ServeCfg(**{**base, **serve_updates})
        except ValidationError as e:
            raise _fail(_validation_line(scenario, e).replace(f"{scenario}: ", f"{scenario}: serve.", 1)) from None
        try:
            cfg = RealConfig(**{**cfg.model_dump(), **{k: (v.model_dump() if hasattr(v, "model_dump") else v)
                                                        for k, v in updates.items()}})
        except ValidationError as e:
            raise _fail(_validation_line(scenario, e)) from None
        updates = {}
    if updates:
        cfg = cfg.model_copy(update=updates)
    out_dir = out or Path("runs") / cfg.name
    try:
        from osdsim.real._deps import require_module

        require_module("torch")
        require_module("transformers")
        from osdsim.real.run import run_real
    except MissingDependency as e:
        raise _fail(str(e)) from None

    show = not quiet and not json
    try:
        if show:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            with Progress(TextColumn("[bold]real OSD"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                          transient=False) as bar:
                task = bar.add_task("run", total=None, info="loading models and held-out answers")

                def progress(done: int, total: int, info: dict[str, Any]) -> None:
                    extra = (f"updates={info['updates']}" if "updates" in info
                             else f"batch={info['batch']} waiting={info['waiting']}")
                    bar.update(task, completed=done, total=total,
                               info=f"{info['domain']} α={_fmt(info['alpha'], 2)} {extra}")

                result = run_real(cfg, out_dir, progress)
        else:
            result = run_real(cfg, out_dir, None)
    except (MissingDependency, FileNotFoundError, ValueError) as e:
        raise _fail(str(e).splitlines()[0]) from None
    except MemoryError:
        typer.echo(f"error: out of memory; the requests recorded so far are in {out_dir}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"error: interrupted; the requests recorded so far are in {out_dir}", err=True)
        raise typer.Exit(130) from None
    if json:
        typer.echo(jsonlib.dumps(json_safe(result.summary), indent=2))
        return
    if quiet:
        return
    _print_table(result.summary, out_dir)


def _print_serve_table(summary: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    tr = summary["training"]
    t = Table(title=f"real OSD server: {summary['name']} ({summary['requests']} requests, "
                    f"{summary['iterations']} iterations, placement {summary['placement']})")
    for col in ("phase", "requests", "α stream", "tokens/step", "held-out α (start→end)"):
        t.add_column(col)
    for ph in summary["phases"]:
        held = ", ".join(f"{d} {_fmt(ph['alpha_heldout_start'].get(d, float('nan')), 2)}→{_fmt(a, 2)}"
                         for d, a in ph["alpha_heldout_end"].items())
        t.add_row(ph["name"], str(ph["requests"]), _fmt(ph["acceptance"]["alpha"]),
                  _fmt(ph["acceptance"]["tokens_per_step"], 2), held)
    console = Console(file=sys.stdout)
    console.print(t)
    console.print(f"mean batch {_fmt(summary['mean_batch'], 2)}; training steps due {tr['steps_due']}, done "
                  f"{tr['steps_done']}, skipped {tr['steps_skipped']}, pending {tr['steps_pending_at_end']}; "
                  f"idle s used {_fmt(tr['idle_s_used'], 1)} of {_fmt(tr['idle_s_available'], 1)}; "
                  f"stream {_fmt(summary['stream_s'], 1)} s; wrote {out_dir}")
    _print_sync(console, summary.get("backend") or {}, (summary.get("backend") or {}).get("sync") or {})


def _print_sync(console: Any, backend: dict[str, Any], sync: dict[str, Any]) -> None:
    """The llama.cpp draft's export + reload per publication (the simulator's sync_delay_s)."""
    if backend.get("engine") == "llama.cpp" and sync.get("n"):
        console.print(f"served on llama.cpp; draft export + reload per update (n={sync['n']}): median "
                      f"{_fmt(sync['sync_s_median'] * 1e3, 0)} ms, p90 {_fmt(sync['sync_s_p90'] * 1e3, 0)} ms "
                      f"(export {_fmt(sync['export_s_median'] * 1e3, 0)} ms, reload "
                      f"{_fmt(sync['reload_s_median'] * 1e3, 0)} ms)")


def _print_table(summary: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    if summary.get("mode") == "serve":
        _print_serve_table(summary, out_dir)
        return

    t = Table(title=f"real OSD: {summary['name']} ({summary['requests']} requests, {summary['updates']} updates)")
    for col in ("phase", "α stream", "tokens/step", "held-out α (own domain)", "speedup", "incl. training"):
        t.add_column(col)
    for ph in summary["phases"]:
        held = ", ".join(
            f"{d} {_fmt(ph['alpha_heldout_start'].get(d, float('nan')), 2)}→"
            f"{_fmt(ph['alpha_heldout_end'].get(d, float('nan')), 2)}"
            for d in ph["domains"]
        )
        t.add_row(ph["name"], _fmt(ph["acceptance"]["alpha"]), _fmt(ph["acceptance"]["tokens_per_step"], 2),
                  held, _fmt(ph["speedup_serving"], 2) + "×", _fmt(ph["speedup_incl_training"], 2) + "×")
    console = Console(file=sys.stdout)
    console.print(t)
    console.print(f"c (draft pass / target decode step) = {_fmt(summary['c_measured'])}; "
                  f"wrote {out_dir}")
    _print_sync(console, summary.get("backend") or {}, summary.get("sync") or {})
