"""PNG plots of a comparison (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from osdsim.sim.results import Comparison


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shift_times(cmp: Comparison) -> list[float]:
    first = next(iter(cmp.results.values()))
    req = first.requests
    if req.empty:
        return []
    phases = req["phase"].to_numpy()
    change = np.flatnonzero(phases[1:] != phases[:-1]) + 1
    return [float(req["arrival_s"].iloc[i]) for i in change]


def write_plots(cmp: Comparison, out: Path) -> list[Path]:
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    shifts = _shift_times(cmp)

    def mark(ax):
        for s in shifts:
            ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)

    # Latency CDFs.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, res in cmp.results.items():
        fin = res.requests[res.requests["finished"]]
        for ax, col, label in zip(axes, ("ttft_s", "tpot_s", "e2e_s"), ("TTFT (s)", "TPOT (s)", "end-to-end (s)"), strict=True):
            v = np.sort(fin[col].dropna().to_numpy())
            if v.size:
                ax.plot(v, np.arange(1, v.size + 1) / v.size, label=name)
            ax.set_xlabel(label)
            ax.set_ylabel("CDF")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "latency_cdf.png", plt))

    # Time series per variant.
    fig, axes = plt.subplots(4, 1, figsize=(11, 9), sharex=True)
    for name, res in cmp.results.items():
        ts = res.timeseries
        if ts.empty:
            continue
        axes[0].plot(ts["t_s"], ts["throughput_tokens_per_s"], label=name)
        axes[1].plot(ts["t_s"], ts["mean_batch"], label=name)
        axes[2].plot(ts["t_s"], ts["compute_utilisation"], label=f"{name} compute")
        axes[2].plot(ts["t_s"], ts["bandwidth_utilisation"], linestyle=":", label=f"{name} bandwidth")
        axes[3].plot(ts["t_s"], ts["alpha"], label=name)
    for ax, lab in zip(axes, ("output tok/s", "mean decode batch", "utilisation", "served α"), strict=True):
        ax.set_ylabel(lab)
        ax.grid(alpha=0.3)
        mark(ax)
    axes[0].legend(fontsize=8, ncol=3)
    axes[2].legend(fontsize=7, ncol=3)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    written.append(_save(fig, out / "timeseries.png", plt))

    # α per domain over time (each draft's state after every training step).
    alpha_variants = [(n, r) for n, r in cmp.results.items() if not r.alpha.empty]
    if alpha_variants:
        fig, axes = plt.subplots(len(alpha_variants), 1, figsize=(11, 2.6 * len(alpha_variants)), sharex=True, squeeze=False)
        end = max(float(r.requests["finish_s"].max()) for _, r in cmp.results.items() if r.requests["finish_s"].notna().any())
        for ax, (name, res) in zip(axes[:, 0], alpha_variants, strict=True):
            al = res.alpha
            cols = [c for c in al.columns if c.startswith("alpha_")]
            # One representative draft state per (replica, draft): plot replica with most events.
            key = al.groupby(["replica", "draft_id"]).size().idxmax()
            sub = al[(al["replica"] == key[0])]
            for c in cols:
                if sub["draft_id"].nunique() > 1:  # per-domain drafts: each domain from its own draft
                    d_idx = cols.index(c)
                    s = sub[sub["draft_id"] == d_idx]
                else:
                    s = sub
                t = np.append(s["time_s"].to_numpy(), end)
                v = np.append(s[c].to_numpy(), s[c].to_numpy()[-1] if len(s) else np.nan)
                ax.step(t, v, where="post", label=c.removeprefix("alpha_"))
            ax.set_ylabel(f"α ({name})")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, ncol=4)
            mark(ax)
        axes[-1, 0].set_xlabel("time (s)")
        fig.tight_layout()
        written.append(_save(fig, out / "alpha_per_domain.png", plt))

    # TPOT over time per strategy (rolling median by finish time).
    fig, ax = plt.subplots(figsize=(11, 3.4))
    for name, res in cmp.results.items():
        fin = res.requests[res.requests["finished"]].sort_values("finish_s")
        if len(fin) > 1:
            w = max(5, len(fin) // 100)
            ax.plot(fin["finish_s"], fin["tpot_s"].rolling(w, min_periods=1).median() * 1e3, label=name)
    ax.set_ylabel("TPOT (ms, rolling median)")
    ax.set_xlabel("time (s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    mark(ax)
    fig.tight_layout()
    written.append(_save(fig, out / "tpot_over_time.png", plt))

    # Spare vs used FLOPs (harvest placement).
    harvest = [(n, r) for n, r in cmp.results.items() if r.summary["training"].get("placement")]
    if harvest:
        fig, ax = plt.subplots(figsize=(11, 3.4))
        for name, res in harvest:
            ts = res.timeseries
            ax.plot(ts["t_s"], ts["spare_flops_per_s"] / 1e12, label=f"{name} spare (serving iterations)")
            ax.plot(ts["t_s"], ts["train_flops_per_s"] / 1e12, linestyle="--", label=f"{name} used by training")
        ax.set_ylabel("TFLOP/s (FLOP-equivalent)")
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        mark(ax)
        fig.tight_layout()
        written.append(_save(fig, out / "spare_vs_used_flops.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
