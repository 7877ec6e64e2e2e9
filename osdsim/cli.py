"""The `osdsim` command line: typer parses, pydantic validates, one api call works, rich shows."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from osdsim.errors import InputError

app = typer.Typer(
    name="osdsim",
    help="Simulate and validate Online Speculative Decoding (OSD) on a serving cluster.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profile_app = typer.Typer(help="Inspect hardware profiles.", no_args_is_help=True)
app.add_typer(profile_app, name="profile")

err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> typer.Exit:
    """One line on stderr, then exit `code` (2 = bad input)."""
    err_console.print(f"[bold red]error:[/bold red] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def _progress(quiet: bool, label: str) -> Progress | None:
    if quiet or not sys.stderr.isatty():
        return None
    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} requests"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True,
    )


def _parse_compare(values: list[str], scenario) -> dict | None:
    """`--compare strategy=no-spec,osd`, `--compare spec=off,on` or `--compare FIELD.PATH=a,b`."""
    from osdsim.scenario import apply_overrides, scenario_from_dict

    if not values:
        return None
    if len(values) > 1:
        raise InputError("--compare: give one FIELD=v1,v2,... (compare one field at a time)")
    text = values[0]
    if "=" not in text:
        raise InputError(f"--compare {text!r}: expected FIELD=v1,v2 (e.g. strategy=no-spec,static,osd or spec=off,on)")
    field, raw = text.split("=", 1)
    items = [v.strip() for v in raw.split(",") if v.strip()]
    if len(items) < 1:
        raise InputError(f"--compare {text!r}: no values")
    field = field.strip()
    if field == "spec":
        on = scenario.strategy if scenario.strategy != "no-spec" else "static"
        mapping = {"off": "no-spec", "on": on}
        bad = [v for v in items if v not in mapping]
        if bad:
            raise InputError(f"--compare spec: values must be 'off' or 'on' (got {bad[0]!r})")
        return {f"spec={v}": scenario.with_strategy(mapping[v]) for v in items}
    if field == "strategy":
        from osdsim.scenario import STRATEGIES

        bad = [v for v in items if v not in STRATEGIES]
        if bad:
            raise InputError(f"--compare strategy: unknown strategy {bad[0]!r}; allowed: {', '.join(STRATEGIES)}")
        return {v: scenario.with_strategy(v) for v in items}
    base = scenario.model_dump(mode="json", exclude_none=True)
    base["compare"] = None
    out = {}
    for v in items:
        data = apply_overrides(base, [f"{field}={v}"])
        out[f"{field}={v}"] = scenario_from_dict(data, scenario.base_dir, source=f"--compare {field}={v}")
    return out


@app.command()
def run(
    scenario: Path = typer.Argument(..., help="Scenario YAML (see scenarios/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set workload.rate_per_s=20 (repeatable)."),
    compare: list[str] = typer.Option(
        [], "--compare", help="Compare variants on the same arrivals: strategy=no-spec,static,osd | spec=off,on | FIELD=a,b."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: runs/<name>-<timestamp>)."),
    fmt: str = typer.Option("parquet", "--format", help="Per-request tables: parquet or csv."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots and report.md."),
    no_write: bool = typer.Option(False, "--no-write", help="Do not write an output directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
) -> None:
    """Simulate a scenario: print a summary table and write results to an output directory."""
    from osdsim.api import compare as api_compare
    from osdsim.report.tables import markdown_report, print_summary
    from osdsim.report.writers import comparison_document, summary_json, write_output
    from osdsim.scenario import load_scenario

    if fmt not in ("parquet", "csv"):
        raise fail(f"--format: must be 'parquet' or 'csv' (got {fmt!r})")
    try:
        sc = load_scenario(scenario, set_)
        variants = _parse_compare(compare, sc)
        prog = _progress(quiet or as_json, f"simulating {sc.name}")
        if prog is not None:
            with prog:
                task = prog.add_task("sim", total=1)

                def cb(done: int, total: int) -> None:
                    prog.update(task, completed=done, total=total)

                result = api_compare(sc, variants=variants, progress=cb)
        else:
            result = api_compare(sc, variants=variants)
        written = None
        if not no_write:
            target = out or Path("runs") / f"{sc.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            written = write_output(result, target, fmt=fmt, plots=plots,
                                   report_fn=markdown_report if plots else None)
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted; no results were written", code=130) from None
    if as_json:
        sys.stdout.write(summary_json(comparison_document(result)))
        return
    if not quiet:
        console = Console() if sys.stdout.isatty() else Console(width=160)
        print_summary(result, console)
        if written is not None:
            console.print(f"results: [bold]{written}[/bold]")


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML: base scenario + axes (see scenarios/sweeps/)."),
    out: Path | None = typer.Option(None, "--out", help="Output directory (default: runs/sweep-<name>-<timestamp>)."),
    workers: int = typer.Option(0, "--workers", help="Parallel workers (default: all cores)."),
    backend: str = typer.Option("pool", "--backend", help="pool (local processes) or ray."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster address (default: start a local Ray)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted sweep in --out, skipping finished points."),
    as_json: bool = typer.Option(False, "--json", help="Print the result rows as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
) -> None:
    """Run a sweep of scenarios (grid or random) on a process pool or a Ray cluster."""
    import os

    from osdsim.sweep.runner import run_sweep
    from osdsim.sweep.spec import load_sweep, points

    if backend not in ("pool", "ray"):
        raise fail(f"--backend: must be 'pool' or 'ray' (got {backend!r})")
    if workers < 0:
        raise fail("--workers: must be >= 1 (0 = all cores)")
    n_workers = workers or os.cpu_count() or 1
    try:
        spec, base, base_dir = load_sweep(sweep_file)
        pts = points(spec)
        target = out or Path("runs") / f"sweep-{spec.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        prog = _progress(quiet or as_json, f"sweep {spec.name}")
        label = "points"
        if prog is not None:
            prog.columns = (TextColumn(f"[bold]sweep {spec.name}"), BarColumn(),
                            TextColumn("{task.completed}/{task.total} " + label), TimeElapsedColumn(), TimeRemainingColumn())
            with prog:
                task = prog.add_task("sweep", total=len(pts))
                table, ran, skipped = run_sweep(spec, base, base_dir, pts, target, n_workers, backend, address, resume,
                                                progress=lambda d, t: prog.update(task, completed=d, total=t))
        else:
            table, ran, skipped = run_sweep(spec, base, base_dir, pts, target, n_workers, backend, address, resume)
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail(f"interrupted; finished points are kept in {target} (continue with --resume)", code=130) from None
    failed = int((table["status"] != "ok").sum()) if not table.empty else 0
    if as_json:
        sys.stdout.write(table.to_json(orient="records") + "\n")
        return
    if not quiet:
        Console().print(
            f"{len(pts)} points: {ran} run now, {skipped} already done, {failed} failed; results: [bold]{target}[/bold]"
        )
        for _, row in table[table["status"] != "ok"].head(5).iterrows():
            Console().print(f"  [red]failed[/red] point {row['point']} (seed {row['seed']}): {row['error']}")


@app.command()
def plot(sweep_dir: Path = typer.Argument(..., help="Output directory of `osdsim sweep`.")) -> None:
    """Draw a sweep's standard pictures (speedup vs load, k* vs load, harvest stall, recovery)."""
    from osdsim.sweep.plots import plot_sweep

    try:
        written = plot_sweep(sweep_dir)
    except InputError as exc:
        raise fail(str(exc)) from None
    for p in written:
        Console().print(str(p))


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")) -> None:
    """Check the installation and say what each command can do on this machine."""
    from rich.table import Table

    from osdsim.doctor import capabilities, checks

    cs = checks()
    caps = capabilities(cs)
    if as_json:
        sys.stdout.write(json.dumps({"checks": [c.__dict__ for c in cs], "capabilities": caps}, indent=2) + "\n")
        return
    console = Console()
    t = Table(title="installation", title_justify="left")
    for col in ("component", "status", "detail", "install"):
        t.add_column(col, overflow="fold")
    for c in cs:
        t.add_row(c.name, "[green]ok[/green]" if c.ok else "[yellow]missing[/yellow]", c.detail, c.fix or "")
    console.print(t)
    t2 = Table(title="what works here", title_justify="left")
    t2.add_column("command")
    t2.add_column("status")
    for k, v in caps.items():
        t2.add_row(k, v)
    console.print(t2)


@app.command()
def validate(
    suite_file: Path | None = typer.Argument(
        None, help="Validation suite YAML (validate/*.yaml); default: the suite for this device (see --list)."),
    out: Path | None = typer.Option(None, "--out", help="Report directory (default: validate/reports)."),
    calibrate_mode: str | None = typer.Option(None, "--calibrate", help="Override the suite: none | quick | full."),
    reuse: bool = typer.Option(False, "--reuse-runs", help="Re-predict from the real runs recorded in the work directory."),
    check: bool = typer.Option(False, "--check", help="Only check the suite file (schema, real-run configs, profile) and exit."),
    list_: bool = typer.Option(False, "--list", help="List the shipped suites (name, device, description) and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or table."),
) -> None:
    """Fit on one real run, predict held-out real runs, run them, report predicted vs measured."""
    import os
    import platform

    from osdsim.validate.compare import exit_code, report_table, write_plots, write_report
    from osdsim.validate.pipeline import calibrate_here, load_suite, run_validation
    from osdsim.validate.suites import default_suite, list_suites

    if list_:
        suites = list_suites()
        if as_json:
            sys.stdout.write(json.dumps([{"name": s.name, "file": str(s.path), "device": s.device, "kind": s.kind,
                                          "description": s.description} for s in suites], indent=2) + "\n")
            return
        from rich.table import Table

        t = Table(title="validation suites", title_justify="left")
        for col in ("name", "device", "kind", "file", "description"):
            t.add_column(col, overflow="fold")
        for s in suites:
            t.add_row(s.name, s.device, s.kind, str(s.path.relative_to(s.path.parents[1])), s.description)
        Console().print(t)
        return
    try:
        if suite_file is None:
            suite_file, why = default_suite()
            if not quiet:
                err_console.print(f"suite: [bold]{suite_file.name}[/bold] ({why}; give a suite file to choose another)")
        suite = load_suite(suite_file)
        if calibrate_mode is not None:
            if calibrate_mode not in ("none", "quick", "full"):
                raise InputError(f"--calibrate: must be none, quick or full (got {calibrate_mode!r})")
            suite = suite.model_copy(update={"calibrate": calibrate_mode})
        if check:
            from osdsim.validate.pipeline import check_suite

            check_suite(suite, suite_file)
            if not quiet:
                Console().print(f"{suite_file}: suite {suite.name} is valid")
            return
        out_dir = out or Path("validate") / "reports"
        say = None if (quiet or as_json) else (lambda m: err_console.print(f"[dim]{m}…[/dim]"))
        try:
            import torch  # noqa: F401
        except ImportError:
            raise InputError("osdsim validate needs torch + transformers: bash scripts/install.sh real") from None
        notice = None if quiet else (lambda m: err_console.print(f"[yellow]{m}[/yellow]"))
        result = run_validation(suite, suite_file, out_dir, progress=say, calibrate_fn=calibrate_here, reuse=reuse,
                                notice=notice, calibrate_given=calibrate_mode is not None)
        device = platform.processor() or platform.machine()
        stem = out_dir / f"{suite.name}-{datetime.now().strftime('%Y%m%d')}"
        if not str(result.meta.get("device", "")).startswith("cuda"):
            result.meta["device"] = f"CPU {device}, {os.cpu_count()} cores"
        result.meta["command"] = ("osdsim validate " + " ".join(sys.argv[2:])) if len(sys.argv) > 2 else f"osdsim validate {suite_file}"
        if result.series:
            result.meta["plots"] = [p.name for p in write_plots(result.series, stem)]
        js, md = write_report(result.rows, result.meta, stem)
    except InputError as exc:
        from rich.markup import escape

        raise fail(escape(str(exc))) from None
    except KeyboardInterrupt:
        raise fail("interrupted; earlier reports are untouched", code=130) from None
    if as_json:
        sys.stdout.write(js.read_text())
    elif not quiet:
        Console().print(report_table(result.rows, result.meta["title"]))
        Console().print(f"report: [bold]{md}[/bold]")
    raise typer.Exit(exit_code(result.rows))


@profile_app.command("show")
def profile_show(path: str = typer.Argument(..., help="Profile name or YAML path.")) -> None:
    """Print a hardware profile readably."""
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.report.profiles import profile_table

    try:
        prof = load_profile(resolve_profile_path(path))
    except InputError as exc:
        raise fail(str(exc)) from None
    console = Console()
    console.print(profile_table(prof))
    if prof.fit_errors:  # the fit's held-out errors, one row per family/split/regime/TP
        from rich.table import Table

        t = Table(title=f"fit errors of {prof.name} (absolute % error; provenance above says on what)",
                  title_justify="left")
        for col in ("family/split/regime", "median", "max", "n"):
            t.add_column(col, justify="left" if col.startswith("family") else "right")
        for key, v in prof.fit_errors.items():
            t.add_row(key, f"{v.get('median_ape_pct', float('nan')):.2f}%", f"{v.get('max_ape_pct', float('nan')):.2f}%",
                      str(int(v.get("n", 0))))
        console.print(t)


@profile_app.command("diff")
def profile_diff(a: str = typer.Argument(...), b: str = typer.Argument(...)) -> None:
    """Compare two hardware profiles field by field."""
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.report.profiles import diff_table

    try:
        pa = load_profile(resolve_profile_path(a))
        pb = load_profile(resolve_profile_path(b))
    except InputError as exc:
        raise fail(str(exc)) from None
    Console().print(diff_table(pa, pb))


OPTIONAL_COMMANDS = (
    ("osdsim.real.cli", "real", "Run real online speculative decoding (torch + transformers)."),
    ("osdsim.calibrate.cli", "calibrate", "Measure this device and fit the cost model into a profile."),
)


def _register_optional(commands=OPTIONAL_COMMANDS) -> None:
    """Commands whose code needs torch register lazily: their modules import no torch at load time,
    so `osdsim run` works (and starts fast) without the `real` extra.

    Only that side being absent from the installation (its module not found) leaves a command out.
    Any other failure while importing it (a bug in the sub-CLI) registers the command as one that
    reports the error and exits non-zero, so the command never vanishes silently and the other
    commands keep working."""
    import importlib

    for module, name, help_text in commands:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
                continue  # that side is not installed
            _register_broken(name, help_text, module, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - reported when the command is used
            _register_broken(name, help_text, module, exc)
            continue
        fn = getattr(mod, name, None)
        if fn is None:
            _register_broken(name, help_text, module, AttributeError(f"{module} has no command function {name!r}"))
        else:
            app.command(name, help=help_text)(fn)


def _register_broken(name: str, help_text: str, module: str, exc: BaseException) -> None:
    message = f"osdsim {name}: cannot load {module}: {type(exc).__name__}: {exc}"

    def broken(ctx: typer.Context) -> None:
        Console(stderr=True).print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2)

    app.command(name, help=f"{help_text} [unavailable: {type(exc).__name__} while importing {module}]",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(broken)


_register_optional()


def main() -> None:
    """Console entry point: no tracebacks for users (OSDSIM_DEBUG=1 shows them)."""
    import os

    try:
        app()
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/bold red] interrupted")
        sys.exit(130)
    except SystemExit:
        raise
    except MemoryError:
        err_console.print("[bold red]error:[/bold red] out of memory; shorten the run or use report.iteration_log: binned")
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - last line of defence
        if os.environ.get("OSDSIM_DEBUG"):
            raise
        msg = str(exc).splitlines()[0] if str(exc) else ""
        err_console.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {msg} "
            "(a bug in osdsim; rerun with OSDSIM_DEBUG=1 for the traceback and report it)",
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()


__all__ = ["app", "json"]
