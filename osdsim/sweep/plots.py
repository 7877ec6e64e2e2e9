"""`osdsim plot SWEEP_DIR`: the standard pictures of a sweep."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from osdsim.errors import InputError

LOAD_AXIS = "workload.rate_per_s"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_table(sweep_dir: Path) -> pd.DataFrame:
    p = sweep_dir / "results.parquet"
    if not p.exists():
        raise InputError(f"{sweep_dir}: no results.parquet (not a sweep output directory?)")
    df = pd.read_parquet(p)
    return df[df["status"] == "ok"] if "status" in df else df


def _strategies(df: pd.DataFrame, metric: str) -> list[str]:
    return sorted({c[: -len(metric) - 1] for c in df.columns if c.endswith("." + metric)})


def _axes(df: pd.DataFrame) -> list[str]:
    fixed = {"point_id", "point", "repeat", "seed", "status", "error"}
    return [c for c in df.columns if c not in fixed and "." in c and not any(
        c.startswith(s + ".") for s in _strategies(df, "alpha"))]


def plot_sweep(sweep_dir: Path) -> list[Path]:
    plt = _plt()
    df = load_table(sweep_dir)
    if df.empty:
        raise InputError(f"{sweep_dir}: no successful points to plot")
    axes = _axes(df)
    x_axis = LOAD_AXIS if LOAD_AXIS in df.columns else (axes[0] if axes else None)
    if x_axis is None:
        raise InputError(f"{sweep_dir}: the sweep has no axis to plot against")
    out = sweep_dir / "plots"
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    others = [a for a in axes if a != x_axis and df[a].nunique() > 1]

    def line_plot(metric: str, ylabel: str, fname: str, title: str) -> None:
        strategies = _strategies(df, metric)
        if not strategies:
            return
        fig, ax = plt.subplots(figsize=(7.5, 4))
        groups = df.groupby(others) if others else [((), df)]
        for key, g in groups:
            suffix = "" if not others else " (" + ", ".join(f"{o.split('.')[-1]}={v}" for o, v in zip(others, key if isinstance(key, tuple) else (key,), strict=True)) + ")"
            for s in strategies:
                col = f"{s}.{metric}"
                m = g.groupby(x_axis)[col].mean(numeric_only=False) if g[col].dtype != object else g.groupby(x_axis)[col].apply(lambda v: pd.to_numeric(v, errors="coerce").mean())
                ax.plot(m.index, m.to_numpy(dtype=float), marker="o", label=f"{s}{suffix}")
        ax.set_xlabel(x_axis)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    line_plot("speedup_e2e_mean", "speedup over no-spec (mean E2E)", "speedup_vs_load.png", "Speedup vs load")
    line_plot("mean_k", "mean k", "k_vs_load.png", "k* vs load")
    line_plot("cost_neutral", "harvest training kept up (1 = yes)", "harvest_stall_vs_load.png",
              "Where harvest-mode training stalls")
    interval = "distill.update_interval_requests"
    if interval in df.columns and _strategies(df, "recovery_requests_max"):
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for s in _strategies(df, "recovery_requests_max"):
            m = df.groupby(interval)[f"{s}.recovery_requests_max"].mean()
            ax.plot(m.index, m.to_numpy(dtype=float), marker="o", label=s)
        ax.set_xlabel(interval)
        ax.set_ylabel("α recovery after shift (requests)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / "recovery_vs_update_interval.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
