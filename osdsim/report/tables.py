"""Rich tables and a Markdown report of a comparison."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from osdsim.sim.results import Comparison


def _f(x, fmt: str = "{:.3g}") -> str:
    return "—" if x is None else fmt.format(x)


def _ms(x) -> str:
    return "—" if x is None else f"{x * 1e3:.1f}"


def summary_tables(cmp: Comparison) -> list[Table]:
    tables = []
    t = Table(title=f"{cmp.scenario_name}: strategies on the same arrivals", title_justify="left")
    for col in ("variant", "α", "tok/step", "TTFT p50 ms", "TPOT p50 ms", "E2E p50 s", "E2E p99 s",
                "tok/s", "speedup (E2E)"):
        t.add_column(col, justify="right" if col != "variant" else "left")
    for row in cmp.summary["variants"]:
        t.add_row(
            row["variant"], _f(row["alpha"], "{:.3f}"), _f(row["tokens_per_step"], "{:.2f}"),
            _ms(row["ttft_p50_s"]), _ms(row["tpot_p50_s"]), _f(row["e2e_p50_s"]), _f(row["e2e_p99_s"]),
            _f(row["throughput_tokens_per_s"], "{:.0f}"), _f(row.get("speedup_e2e_mean"), "{:.2f}×"),
        )
    tables.append(t)

    first = next(iter(cmp.results.values()))
    if len(first.summary["phases"]) > 1:
        p = Table(title="per phase of the shift", title_justify="left")
        for col in ("phase", "variant", "α", "tok/step", "TPOT p50 ms", "E2E p50 s", "E2E p99 s", "speedup"):
            p.add_column(col, justify="left" if col in ("phase", "variant") else "right")
        n_ph = len(first.summary["phases"])
        for i in range(n_ph):
            for name, res in cmp.results.items():
                ph = res.summary["phases"][i]
                p.add_row(
                    ph["phase"], name, _f(ph["alpha_mean"], "{:.3f}"), _f(ph["tokens_per_step"], "{:.2f}"),
                    _ms(ph["tpot_p50_s"]), _f(ph["e2e_p50_s"]), _f(ph["e2e_p99_s"]),
                    _f(ph.get("speedup_e2e"), "{:.2f}×"),
                )
        tables.append(p)

    rec_rows = [(n, r) for n, res in cmp.results.items() for r in res.summary["recovery"]]
    if rec_rows:
        r = Table(title="α recovery after each shift (served α back within tolerance of its target)", title_justify="left")
        for col in ("variant", "shift", "α before", "α after shift", "target", "requests", "seconds"):
            r.add_column(col, justify="left" if col in ("variant", "shift") else "right")
        for name, row in rec_rows:
            r.add_row(
                name, row["shift"], _f(row["alpha_before"], "{:.3f}"), _f(row["alpha_after_shift"], "{:.3f}"),
                _f(row["target"], "{:.3f}"),
                "not recovered" if row["recovered_after_requests"] is None else str(row["recovered_after_requests"]),
                _f(row["recovered_after_s"], "{:.1f}"),
            )
        tables.append(r)

    train_rows = [(n, res.summary["training"]) for n, res in cmp.results.items() if res.summary["training"]["placement"]]
    if train_rows:
        tr = Table(title="online distillation", title_justify="left")
        for col in ("variant", "placement", "steps due/done/skipped", "train FLOPs", "spare FLOPs",
                    "latency cost s", "cost-neutral", "stalled at req/s"):
            tr.add_column(col, justify="left" if col in ("variant", "placement") else "right")
        for name, s in train_rows:
            tr.add_row(
                name, s["placement"], f"{s['steps_due']}/{s['steps_done']}/{s['steps_skipped']}",
                _f(s["train_work_flops_used"], "{:.3g}"), _f(s["spare_flops_available"], "{:.3g}"),
                _f(s["latency_cost_s"], "{:.3g}"),
                {True: "yes", False: "no", None: "—"}[s.get("cost_neutral")],
                _f(s.get("stalled_at_rate_per_s"), "{:.2f}"),
            )
        tables.append(tr)
    return tables


def print_summary(cmp: Comparison, console: Console) -> None:
    for t in summary_tables(cmp):
        console.print(t)
    first = next(iter(cmp.results.values())).summary
    console.print(
        f"[dim]acceptance law: {', '.join(sorted({r.summary['acceptance_law'] for r in cmp.results.values()}))}; "
        f"k: {', '.join(sorted({r.summary['k'] for r in cmp.results.values()}))}; "
        f"requests: {first['requests']['arrived']}[/dim]"
    )


def markdown_report(cmp: Comparison, out: Path) -> None:
    """A one-page Markdown report beside the plots."""
    console = Console(record=True, width=140, file=io.StringIO())
    print_summary(cmp, console)
    text = console.export_text()
    lines = [f"# osdsim report: {cmp.scenario_name}", "", "```", text.rstrip(), "```", ""]
    plots = sorted((out / "plots").glob("*.png")) if (out / "plots").exists() else []
    for p in plots:
        lines += [f"## {p.stem.replace('_', ' ')}", "", f"![{p.stem}](plots/{p.name})", ""]
    lines += ["Files: `summary.json` (all variants), `<variant>/requests.*` (per request), "
              "`<variant>/timeseries.csv`, `<variant>/alpha.csv` (α per domain after each training step), "
              "`<variant>/training.csv`.", ""]
    (out / "report.md").write_text("\n".join(lines))
