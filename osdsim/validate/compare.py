"""Predicted vs measured: metric rows with tolerances, pass/fail, and the report files."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from osdsim.errors import atomic_write_text, json_safe


@dataclass
class MetricRow:
    name: str
    predicted: float | None
    measured: float | None
    tolerance: float  # absolute (kind 'abs'), relative ('rel'), or a bound on the statistic ('score')
    kind: str = "rel"  # 'score': `predicted` holds a comparison statistic itself (RMSE, KS, median error)
    unit: str = ""
    measured_ci: tuple[float, float] | None = None  # 95% bootstrap interval of the measured value
    gate: bool = True  # False: shown for information, never fails the report

    @property
    def error(self) -> float | None:
        if self.kind == "score":
            return abs(self.predicted) if self.predicted is not None and math.isfinite(self.predicted) else None
        if self.predicted is None or self.measured is None:
            return None
        if not (math.isfinite(self.predicted) and math.isfinite(self.measured)):
            return None
        if self.kind == "abs":
            return abs(self.predicted - self.measured)
        if self.measured == 0:  # relative error undefined: fall back to the absolute difference
            return abs(self.predicted)
        return abs(self.predicted - self.measured) / abs(self.measured)

    @property
    def passed(self) -> bool:
        e = self.error
        return e is not None and e <= self.tolerance

    def as_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error
        d["passed"] = self.passed
        return d


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if unit == "s" and abs(x) < 1:
        return f"{x * 1e3:.2f} ms"
    return f"{x:.4g}{(' ' + unit) if unit else ''}"


def _err(row: MetricRow) -> str:
    e = row.error
    if e is None:
        return "—"
    return f"{e:.3f}" if row.kind in ("abs", "score") else f"{e * 100:.1f}%"


def _tol(row: MetricRow) -> str:
    if row.kind == "score":
        return f"≤{row.tolerance:.3f}"
    return f"±{row.tolerance:.3f}" if row.kind == "abs" else f"{row.tolerance * 100:.0f}%"


def report_table(rows: list[MetricRow], title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("metric", "predicted", "measured [95% CI]", "error", "tolerance", "pass"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for r in rows:
        measured = _fmt(r.measured, r.unit)
        if r.measured_ci is not None:
            measured += f" [{r.measured_ci[0]:.3g}, {r.measured_ci[1]:.3g}]"
        verdict = ("[green]pass[/green]" if r.passed else "[bold red]FAIL[/bold red]") if r.gate else (
            "[dim]info (within)[/dim]" if r.passed else "[dim]info (outside)[/dim]")
        t.add_row(r.name, _fmt(r.predicted, r.unit), measured, _err(r), _tol(r), verdict)
    return t


def write_report(rows: list[MetricRow], meta: dict, out_stem: Path) -> tuple[Path, Path]:
    """`<stem>.json` and `<stem>.md`, written atomically."""
    gated = [r for r in rows if r.gate]
    doc = json_safe({**meta, "passed": bool(gated) and all(r.passed for r in gated),
                     "metrics": [r.as_dict() for r in rows]})
    js = out_stem.with_suffix(".json")
    atomic_write_text(js, json.dumps(doc, indent=2, default=str, allow_nan=False) + "\n")
    console = Console(record=True, width=140, file=io.StringIO())
    console.print(report_table(rows, meta.get("title", "validation")))
    md = out_stem.with_suffix(".md")
    lines = [f"# {meta.get('title', 'validation')}", ""]
    for k in ("suite", "device", "date", "command", "method", "profile_choice"):
        if k in meta:
            lines.append(f"- **{k}**: {meta[k]}")
    lines += ["", "```", console.export_text().rstrip(), "```", "",
              f"Result: **{'PASS' if doc['passed'] else 'FAIL'}** "
              f"({sum(r.passed for r in gated)}/{len(gated)} metrics within tolerance"
              + (f"; {len(rows) - len(gated)} information rows not counted" if len(rows) > len(gated) else "") + ")", ""]
    for plot in meta.get("plots", []):
        lines += [f"![{plot}]({plot})", ""]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    atomic_write_text(md, "\n".join(lines) + "\n")
    return js, md


def write_plots(series: dict, out_stem: Path) -> list[Path]:
    """`<stem>-alpha.png` (predicted vs measured α over the held-out stream) and `<stem>-latency.png`
    (CDFs of per-request end-to-end latency), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from osdsim.errors import atomic_write_bytes

    def save(fig, path: Path) -> Path:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())
        return path

    if "load" in series:
        return _load_plots(series["load"], out_stem, save, plt)
    written = []
    w = series.get("window", 1)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(series["alpha_measured"], label="measured (real run)", color="black")
    ax.plot(series["alpha_predicted"], label="predicted (osdsim)", color="tab:orange")
    for at in series.get("shifts", []):
        ax.axvline(at, color="grey", linestyle=":")
    ax.set_xlabel("request")
    ax.set_ylabel(f"α over the last {w} requests")
    ax.legend()
    fig.tight_layout()
    written.append(save(fig, out_stem.with_name(out_stem.name + "-alpha.png")))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label, color in (("e2e_measured", "measured", "black"), ("e2e_predicted", "predicted", "tab:orange")):
        x = sorted(series[key])
        ax.step(x, [(i + 1) / len(x) for i in range(len(x))], where="post", label=label, color=color)
    ax.set_xlabel("end-to-end latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    fig.tight_layout()
    written.append(save(fig, out_stem.with_name(out_stem.name + "-latency.png")))
    return written


def _load_plots(runs: list[dict], out_stem: Path, save, plt) -> list[Path]:
    """Per held-out run (one column each, titled by arrival rate and placement): latency CDFs, α over
    time, training steps done vs time; measured black, predicted orange."""
    n = max(len(runs), 1)
    title = [f"{r['label']} ({r['rate']} req/s, {r['placement']})" for r in runs]
    written = []
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False)
    for j, r in enumerate(runs):
        for i, (key, xlabel) in enumerate((("e2e", "end-to-end latency (s)"), ("ttft", "time to first token (s)"))):
            ax = axes[i][j]
            for side, color in (("measured", "black"), ("predicted", "tab:orange")):
                x = sorted(v for v in r[f"{key}_{side}"] if math.isfinite(v))
                if x:
                    ax.step(x, [(q + 1) / len(x) for q in range(len(x))], where="post", label=side, color=color)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("fraction of requests")
            if i == 0:
                ax.set_title(title[j], fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save(fig, out_stem.with_name(out_stem.name + "-latency.png")))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for j, r in enumerate(runs):
        ax = axes[0][j]
        ax.plot(r["alpha_t_measured"], r["alpha_measured"], color="black", label="measured")
        ax.plot(r["alpha_t_predicted"], r["alpha_predicted"], color="tab:orange", label="predicted")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("α, last 8 requests")
        ax.set_title(title[j], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save(fig, out_stem.with_name(out_stem.name + "-alpha.png")))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for j, r in enumerate(runs):
        ax = axes[0][j]
        for side, color in (("measured", "black"), ("predicted", "tab:orange")):
            t = r[f"train_done_{side}"]
            ax.step([0.0, *t], list(range(len(t) + 1)), where="post", color=color, label=side)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("training steps done")
        ax.set_title(title[j], fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(save(fig, out_stem.with_name(out_stem.name + "-training.png")))
    return written


def exit_code(rows: list[MetricRow]) -> int:
    gated = [r for r in rows if r.gate]
    return 0 if gated and all(r.passed for r in gated) else 1
