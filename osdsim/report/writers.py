"""Write results to an output directory atomically (a temp dir renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from osdsim.errors import InputError
from osdsim.sim.results import Comparison, Result


def summary_json(obj: dict) -> str:
    """Deterministic JSON: sorted keys are NOT used (order is meaningful); no timestamps inside."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def comparison_document(cmp: Comparison) -> dict:
    return {
        "scenario": cmp.scenario_name,
        "comparison": cmp.summary,
        "variants": {name: r.summary for name, r in cmp.results.items()},
    }


def _write_table(df: pd.DataFrame, path_stem: Path, fmt: str) -> str:
    if fmt == "parquet":
        path = path_stem.with_suffix(".parquet")
        df.to_parquet(path, index=False)
    else:
        path = path_stem.with_suffix(".csv")
        df.to_csv(path, index=False)
    return path.name


def _write_variant(res: Result, d: Path, fmt: str) -> None:
    d.mkdir(parents=True, exist_ok=True)
    _write_table(res.requests, d / "requests", fmt)
    _write_table(res.timeseries, d / "timeseries", "csv")
    _write_table(res.iterations, d / "iterations", fmt)
    _write_table(res.alpha, d / "alpha", "csv")
    _write_table(res.training, d / "training", "csv")
    (d / "summary.json").write_text(summary_json(res.summary))


def write_output(
    cmp: Comparison,
    out_dir: Path,
    fmt: str = "parquet",
    plots: bool = True,
    extra_files: dict[str, str] | None = None,
    report_fn: Callable[[Comparison, Path], None] | None = None,
) -> Path:
    """Write every variant's tables, summary.json, plots and report.md into `out_dir`.

    Everything goes into a temporary sibling directory first; only when all files are written is
    it renamed to `out_dir` (an existing `out_dir` is replaced only then), so an interrupted or
    failed run never leaves a half-written result.
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise InputError(f"--out {out_dir}: cannot write there ({exc.strerror or exc})") from None
    try:
        for name, res in cmp.results.items():
            _write_variant(res, tmp / _safe(name), fmt)
        (tmp / "summary.json").write_text(summary_json(comparison_document(cmp)))
        for rel, text in (extra_files or {}).items():
            (tmp / rel).write_text(text)
        if plots:
            from osdsim.report.plots import write_plots

            write_plots(cmp, tmp / "plots")
        if report_fn is not None:
            report_fn(cmp, tmp)
        old = None
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"--out {out_dir}: writing results failed ({exc.strerror or exc}); nothing was replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
