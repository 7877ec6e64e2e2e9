"""Turn a finished simulation into tables and a summary (what users read)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from osdsim.sim.engine import RawRun
from osdsim.sim.replica import AGG_COLUMNS

PCTS = (50, 90, 99)


@dataclass
class Result:
    """One simulated strategy: per-request table, time series, training log, summary."""

    strategy: str
    requests: pd.DataFrame
    timeseries: pd.DataFrame
    iterations: pd.DataFrame
    alpha: pd.DataFrame
    training: pd.DataFrame
    summary: dict


@dataclass
class Comparison:
    """Several strategies on the same arrivals (common random numbers)."""

    scenario_name: str
    results: dict[str, Result]
    summary: dict = field(default_factory=dict)


def _r(x: float, digits: int = 6) -> float | None:
    """Round to `digits` significant digits for stable, readable JSON; NaN/inf → None."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return float(f"{x:.{digits}g}")


def _stats(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, **{f"p{p}": None for p in PCTS}}
    pct = np.percentile(v, PCTS)
    return {"mean": _r(v.mean()), **{f"p{p}": _r(x) for p, x in zip(PCTS, pct, strict=True)}}


def request_frame(run: RawRun) -> pd.DataFrame:
    t = run.table
    req = run.requests
    finished = np.isfinite(t.finish)
    ttft = t.first_token - t.arrival
    e2e = t.finish - t.arrival
    with np.errstate(divide="ignore", invalid="ignore"):
        tpot = np.where(t.output > 1, (t.finish - t.first_token) / (t.output - 1), np.nan)
        alpha_meas = t.accepted / (t.accepted + t.rejections)
        tokens_per_step = np.where(t.steps > 0, (t.output - 1) / t.steps, np.nan)
    return pd.DataFrame(
        {
            "request_id": np.arange(len(req)),
            "replica": t.replica,
            "domain": np.asarray(req.domain_names, dtype=object)[req.domain] if len(req) else [],
            "phase": np.asarray(req.phase_names, dtype=object)[req.phase] if len(req) else [],
            "arrival_s": t.arrival,
            "admitted_s": t.admitted,
            "first_token_s": t.first_token,
            "finish_s": t.finish,
            "prompt_tokens": t.prompt,
            "output_tokens": t.output,
            "emitted_tokens": t.emitted,
            "queue_s": t.admitted - t.arrival,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "e2e_s": e2e,
            "steps": t.steps,
            "accepted_tokens": t.accepted,
            "proposed_tokens": t.proposed,
            "rejections": t.rejections,
            "tokens_per_step": tokens_per_step,
            "alpha_measured": alpha_meas,
            "alpha_model": t.alpha_model,
            "finished": finished,
            "rejected": t.rejected,
        }
    )


TIMESERIES_COLUMNS = (
    "t_s", "throughput_tokens_per_s", "mean_batch", "busy_fraction", "compute_utilisation",
    "bandwidth_utilisation", "alpha", "mean_k", "spare_flops_per_s", "train_flops_per_s",
)


def timeseries_frame(run: RawRun, bin_s: float | None) -> pd.DataFrame:
    it = run.iterations
    end = max(run.sim_time_s, 1e-9)
    width = bin_s or _nice_bin(end / 200.0)
    if it.empty:
        return pd.DataFrame(columns=list(TIMESERIES_COLUMNS), dtype=float)
    n_rep = max(1, run.scenario.hardware.replicas)
    peak = run.extra["peak_flops"]
    bw = run.extra["bandwidth"]
    df = it[["t_s", *AGG_COLUMNS]].copy()
    df["bin"] = np.floor(it["t_s"].to_numpy() / width).astype(np.int64)
    df = df.drop(columns="t_s")
    g = df.groupby("bin", sort=True).sum()
    capacity_s = width * n_rep
    out = pd.DataFrame(
        {
            "t_s": g.index.to_numpy() * width,
            "throughput_tokens_per_s": g["emitted_tokens"].to_numpy() / width,
            "mean_batch": g["batch_x_s"].to_numpy() / np.maximum(g["serve_s"].to_numpy(), 1e-12),
            "busy_fraction": np.minimum(g["duration_s"].to_numpy() / capacity_s, 1.0),
            "compute_utilisation": np.minimum(g["flops"].to_numpy() / (peak * capacity_s), 1.0),
            "bandwidth_utilisation": np.minimum(g["bytes"].to_numpy() / (bw * capacity_s), 1.0),
            "alpha": np.where(g["alpha_n"] > 0, g["alpha_x_n"] / np.maximum(g["alpha_n"], 1), np.nan),
            "mean_k": np.where(g["alpha_n"] > 0, g["k_x_n"] / np.maximum(g["alpha_n"], 1), np.nan),
            "spare_flops_per_s": g["spare_flops"].to_numpy() / width,
            "train_flops_per_s": g["train_work_flops"].to_numpy() / width,
        }
    )
    return out


def _nice_bin(x: float) -> float:
    if x <= 0:
        return 1.0
    exp = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10**exp >= x:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def _phase_rows(req: pd.DataFrame, run: RawRun, baseline: pd.DataFrame | None) -> list[dict]:
    rows = []
    for i, name in enumerate(run.requests.phase_names):
        sel = req[(run.requests.phase == i)]
        fin = sel[sel["finished"]]
        steps = fin["steps"].sum()
        e2e = _stats(fin["e2e_s"])
        row = {
            "phase": name,
            "bounds": [_r(x) for x in run.requests.phase_bounds[i]],
            "requests": int(len(sel)),
            "alpha_mean": _r(_alpha(fin)),
            "alpha_model_mean": _r(np.nanmean(fin["alpha_model"])) if fin["alpha_model"].notna().any() else None,
            "tokens_per_step": _r((fin["output_tokens"] - 1).clip(lower=0).sum() / steps) if steps else None,
            "tpot_p50_s": _stats(fin["tpot_s"])["p50"],
            "e2e_p50_s": e2e["p50"],
            "e2e_p99_s": e2e["p99"],
        }
        if baseline is not None:
            base = baseline[(run.requests.phase == i) & baseline["finished"].to_numpy()]
            b_e2e = base["e2e_s"].mean()
            row["speedup_e2e"] = _r(b_e2e / fin["e2e_s"].mean()) if len(fin) and len(base) else None
            b_tpot = base["tpot_s"].mean()
            row["speedup_tpot"] = _r(b_tpot / fin["tpot_s"].mean()) if len(fin) and len(base) else None
        rows.append(row)
    return rows


def _alpha(df: pd.DataFrame) -> float:
    acc = df["accepted_tokens"].sum()
    rej = df["rejections"].sum()
    return acc / (acc + rej) if acc + rej > 0 else float("nan")


def recovery(req: pd.DataFrame, run: RawRun, window: int, tol: float) -> list[dict]:
    """Per shift boundary: requests and seconds until the served α is back near its target.

    The served α of each request is the draft's α for it at its first step (`alpha_model`); a trailing
    mean over `window` requests (arrival order) is compared with target = min(pre-shift level,
    the new phase's plateau); recovered at the first request where it is ≥ target − tol.
    """
    r = run.requests
    if len(r.phase_names) < 2 or not req["alpha_model"].notna().any():
        return []
    plateau_by_domain = run.extra.get("plateau_by_domain")
    alpha = req["alpha_model"].to_numpy()
    valid = np.isfinite(alpha)
    idx = np.flatnonzero(valid)
    series = alpha[idx]
    out = []
    for i in range(1, len(r.phase_names)):
        starts = np.flatnonzero(r.phase[idx] == i)
        before = np.flatnonzero(r.phase[idx] == i - 1)
        if starts.size == 0 or before.size == 0:
            continue
        s0 = int(starts[0])
        pre = float(series[before[-window:]].mean())
        # Plateau of the new phase's stream: α_∞ weighted by its domains' share of requests.
        doms = r.domain[idx[starts]]
        plateau = None if plateau_by_domain is None else float(plateau_by_domain[doms].mean())
        target = pre if plateau is None else min(pre, plateau)
        end = int(starts[-1]) + 1
        # Restart the window at the shift so pre-shift requests do not mask the drop.
        seg = pd.Series(series[s0:end]).rolling(window, min_periods=1).mean().to_numpy()
        hit = np.flatnonzero(seg >= target - tol)
        rec_req = int(hit[0]) if hit.size else None
        t_shift = float(req["arrival_s"].iloc[idx[s0]])
        rec_s = None if rec_req is None else float(req["arrival_s"].iloc[idx[s0 + rec_req]]) - t_shift
        out.append(
            {
                "shift": f"{r.phase_names[i - 1]} -> {r.phase_names[i]}",
                "at_request": int(idx[s0]),
                "at_s": _r(t_shift),
                "alpha_before": _r(pre),
                "alpha_after_shift": _r(float(series[s0])),
                "target": _r(target),
                "recovered_after_requests": rec_req,
                "recovered_after_s": _r(rec_s) if rec_s is not None else None,
            }
        )
    return out


def summarise(run: RawRun, baseline: pd.DataFrame | None = None) -> Result:
    sc = run.scenario
    req = request_frame(run)
    fin = req[req["finished"]]
    n = len(req)
    span = run.sim_time_s if run.sim_time_s > 0 else float("nan")
    slo = sc.slo
    good = fin[(fin["ttft_s"] <= slo.ttft_s) & ((fin["tpot_s"] <= slo.tpot_s) | fin["tpot_s"].isna())]
    steps = fin["steps"].sum()
    it = run.iterations
    busy = float(np.sum(run.busy_s))
    cap = span * max(1, sc.hardware.replicas)
    st = run.stats
    training = {
        "placement": sc.distill.placement if run.strategy in ("osd", "osd-per-domain") else None,
        "steps_due": st.steps_due,
        "steps_done": st.steps_done,
        "steps_skipped": st.steps_skipped,
        "steps_pending_at_end": int(run.extra.get("pending_steps", 0)),
        "tokens_trained": _r(st.tokens_trained),
        "train_flops": _r(st.train_flops),
        "train_work_flops_used": _r(st.work_s_used * run.extra["train_flops_per_work_s"]),
        "spare_flops_available": _r(st.spare_s_available * run.extra["train_flops_per_work_s"]),
        "latency_cost_s": _r(st.latency_cost_s),
        "training_busy_s": _r(st.busy_s),
    }
    if run.strategy in ("osd", "osd-per-domain") and sc.distill.placement == "harvest":
        # Cost-neutral: every due step was trained from spare compute, none skipped.
        training["cost_neutral"] = bool(st.steps_skipped == 0)
        training["stalled_at_rate_per_s"] = _stall_rate(run)
    summary = {
        "scenario": sc.name,
        "strategy": run.strategy,
        "seed": sc.seed,
        "acceptance_law": run.acceptance_law,
        "k": run.k_setting,
        "requests": {
            "arrived": n,
            "finished": int(len(fin)),
            "unfinished": int(n - len(fin)),
            "rejected_too_long": int(req["rejected"].sum()),
        },
        "sim_time_s": _r(run.sim_time_s),
        "throughput": {
            "requests_per_s": _r(len(fin) / span) if n else None,
            "output_tokens_per_s": _r(fin["output_tokens"].sum() / span) if n else None,
            "goodput_requests_per_s": _r(len(good) / span) if n else None,
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s},
        },
        "latency_s": {
            "ttft": _stats(fin["ttft_s"]),
            "tpot": _stats(fin["tpot_s"]),
            "e2e": _stats(fin["e2e_s"]),
            "queue": _stats(fin["queue_s"]),
        },
        "speculation": {
            "alpha_measured": _r(_alpha(fin)),
            "mean_tokens_per_step": _r((fin["output_tokens"] - 1).clip(lower=0).sum() / steps) if steps else None,
            "mean_accepted_per_step": _r(fin["accepted_tokens"].sum() / steps) if steps else None,
            "mean_k": _r(float(it["k_x_n"].sum() / it["alpha_n"].sum()))
            if run.k_setting != "off" and not it.empty and it["alpha_n"].sum() > 0 else None,
        },
        "utilisation": {
            "busy_fraction": _r(min(busy / cap, 1.0)) if cap > 0 else None,
            "compute": _r(min(float(it["flops"].sum()) / (run.extra["peak_flops"] * cap), 1.0)) if cap > 0 and not it.empty else None,
            "bandwidth": _r(min(float(it["bytes"].sum()) / (run.extra["bandwidth"] * cap), 1.0)) if cap > 0 and not it.empty else None,
            "mean_batch": _r(float(it["batch_x_s"].sum() / max(it["serve_s"].sum(), 1e-12))) if not it.empty else None,
            "kv_capacity_tokens": run.kv_capacity_tokens,
        },
        "training": training,
        "phases": _phase_rows(req, run, baseline),
        "recovery": recovery(req, run, sc.report.alpha_window_requests, sc.report.recovery_tolerance),
    }
    return Result(
        strategy=run.strategy,
        requests=req,
        timeseries=timeseries_frame(run, sc.report.time_bin_s),
        iterations=run.iterations,
        alpha=run.alpha_events,
        training=run.training_events,
        summary=summary,
    )


def _stall_rate(run: RawRun) -> float | None:
    """Arrival rate (req/s, trailing 10% of requests) when harvest training first fell behind.

    Training has fallen behind when a due step is skipped (the pending queue overflowed).
    """
    ev = run.training_events
    skipped = ev[ev["kind"] == "skipped"]
    if skipped.empty:
        return None
    t_stall = float(skipped["time_s"].iloc[0])
    arr = run.requests.arrival_s
    upto = arr[arr <= t_stall]
    if upto.size < 10:
        return None
    w = max(10, upto.size // 10)
    span = upto[-1] - upto[-w]
    return _r((w - 1) / span) if span > 0 else None


def compare_summary(results: dict[str, Result]) -> dict:
    base = results.get("no-spec")
    base_name = "no-spec"
    if base is None:
        base_name, base = next(iter(results.items()))
    rows = []
    for name, res in results.items():
        s = res.summary
        row = {
            "variant": name,
            "strategy": res.strategy,
            "alpha": s["speculation"]["alpha_measured"],
            "tokens_per_step": s["speculation"]["mean_tokens_per_step"],
            "ttft_p50_s": s["latency_s"]["ttft"]["p50"],
            "tpot_p50_s": s["latency_s"]["tpot"]["p50"],
            "e2e_p50_s": s["latency_s"]["e2e"]["p50"],
            "e2e_p99_s": s["latency_s"]["e2e"]["p99"],
            "throughput_tokens_per_s": s["throughput"]["output_tokens_per_s"],
        }
        if base is not None:
            b = base.summary["latency_s"]["e2e"]["mean"]
            m = s["latency_s"]["e2e"]["mean"]
            row["speedup_e2e_mean"] = _r(b / m) if b and m else None
            bt = base.summary["latency_s"]["tpot"]["mean"]
            mt = s["latency_s"]["tpot"]["mean"]
            row["speedup_tpot_mean"] = _r(bt / mt) if bt and mt else None
        rows.append(row)
    return {"baseline": base_name, "variants": rows}
