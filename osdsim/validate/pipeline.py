"""`osdsim validate`: fit on one real run, predict a different one, run it for real, compare.

The method (issue 6; DESIGN.md §5), nothing fitted on the run it is judged on:
  a. fit run S1 (seed A): real OSD; fit α_0, α_∞, τ per domain and the accepted-length law;
  b. held-out run S2 (other seed / stream / update interval): real OSD, every request and step timed;
  c. simulate S2 with the fitted acceptance, the device profile, inline training, batch 1 and the same
     arrivals and lengths (trace mode);
  d. compare predicted with measured.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osdsim.errors import InputError, atomic_write_text, format_validation_error
from osdsim.scenario import load_model_file
from osdsim.validate.compare import MetricRow
from osdsim.validate.fit import empirical_law, fit_alpha_curve


class Tolerances(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha_phase_abs: float = Field(0.05, gt=0, description="Mean α per phase, absolute.")
    tokens_per_step_rel: float = Field(0.10, gt=0)
    pass_time_rel: float = Field(0.10, gt=0, description="Draft pass, verify pass, training step.")
    e2e_median_rel: float = Field(0.10, gt=0)
    e2e_p90_rel: float = Field(0.20, gt=0)
    e2e_ks: float = Field(0.30, gt=0, le=1, description="Two-sample KS statistic of per-request latency.")
    total_time_rel: float = Field(0.10, gt=0)
    recovery_rel: float = Field(0.25, gt=0)
    alpha_rmse_abs: float = Field(0.08, gt=0, description="RMSE of the α trajectory (moving window).")


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    profile: str | None = Field(None, description="Hardware profile for the simulation (name or path).")
    calibrate: str = Field("none", description="none | quick | full: calibrate this device first.")
    fit: dict = Field(..., description="Real-run config (osdsim real schema) of the fit run S1.")
    heldout: dict = Field(default_factory=dict, description="Overrides of `fit` for the held-out run S2.")
    alpha_window_requests: int = Field(16, ge=1)
    tolerances: Tolerances = Field(default_factory=Tolerances)


def load_suite(path: Path) -> Suite:
    suite = load_model_file(path, Suite, "validation suite")
    if suite.calibrate not in ("none", "quick", "full"):
        raise InputError(f"{path}: calibrate: must be none, quick or full (got {suite.calibrate!r})")
    if suite.profile is None and suite.calibrate == "none":
        raise InputError(f"{path}: profile: required unless calibrate is quick or full")
    return suite


def check_suite(suite: Suite, suite_path: Path) -> None:
    """Everything that can be checked without running: real-run configs and the profile."""
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.real.config import RealConfig

    for label, data in (("fit", suite.fit), ("heldout", _merge(suite.fit, suite.heldout))):
        try:
            RealConfig(**data)
        except ValidationError as exc:
            raise InputError(f"{suite_path}: {label}: {format_validation_error(exc)}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"{suite_path}: {label}: {str(exc).splitlines()[0]}") from None
    if suite.profile:
        load_profile(resolve_profile_path(suite.profile, suite_path.resolve().parent))


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# --- fitting ---------------------------------------------------------------------------------------
def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def fit_acceptance(requests: list[dict], k: int) -> tuple[dict, dict]:
    """(acceptance file dict, empirical law dict) from a real run's request rows."""
    rows = sorted(requests, key=lambda r: int(r["request_index"]))
    served: dict[str, float] = {}
    per_dom: dict[str, tuple[list, list, list]] = {}
    for r in rows:
        d = r["domain"]
        n, a, rej = per_dom.setdefault(d, ([], [], []))
        n.append(served.get(d, 0.0))
        a.append(_num(r["accepted"]))
        rej.append(_num(r["rejections"]))
        served[d] = served.get(d, 0.0) + _num(r["output_tokens"])
    domains = {}
    for d, (n, a, rej) in per_dom.items():
        f = fit_alpha_curve(np.array(n), np.array(a), np.array(rej))
        domains[d] = {**f.as_acceptance(f"fitted by osdsim validate on {len(n)} requests (rmse {f.rmse:.3f})"),
                      "alpha_offline": round(f.alpha_inf, 5)}
    lengths = [[int(x) for x in str(r.get("accepted_lengths", "")).split()] for r in rows]
    alpha = [_num(r["accepted"]) / max(_num(r["accepted"]) + _num(r["rejections"]), 1e-12) for r in rows]
    law = empirical_law(np.array(alpha), lengths, k=k, groups=4)
    return {"transfer": 0.0, "distillation_helps": False, "domains": domains}, law


# --- the simulated twin of a real run ----------------------------------------------------------------
def _spec(d: dict, name: str, dtype: str, vocab: int | None = None) -> dict:
    return {
        "name": name, "n_layers": d["layers"], "hidden": d["hidden"], "n_heads": d["heads"],
        "n_kv_heads": d["kv_heads"], "ffn": d["ffn"], "vocab": vocab or d["vocab"],
        "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32"),
        "tied_embeddings": d.get("tied_embeddings", False),
    }


def twin_scenario(summary: dict, requests: list[dict], profile: str, acc_file: Path, law_file: Path,
                  trace_file: Path, workdir: Path) -> dict:
    cfg = summary["config"]
    dtype = summary.get("serve_dtype") or cfg["models"].get("serve_dtype") or cfg["models"]["dtype"]
    draft_vocab = summary.get("draft_vocab") or None
    doms = sorted({r["domain"] for r in requests})
    lines = ["arrival_s,domain,prompt_tokens,output_tokens"]
    for r in sorted(requests, key=lambda r: int(r["request_index"])):
        lines.append(f"{_num(r['start_s']):.6f},{r['domain']},{int(r['prompt_tokens'])},{max(int(r['output_tokens']), 1)}")
    atomic_write_text(trace_file, "\n".join(lines) + "\n")
    # Phases by request index, as the real stream was built.
    phase_rows = sorted(requests, key=lambda r: int(r["request_index"]))
    bounds = []
    for r in phase_rows:
        p = int(r["phase"])
        if not bounds or bounds[-1][0] != p:
            bounds.append([p, int(r["request_index"]), int(r["request_index"]) + 1, r.get("phase_name") or str(p), r["domain"]])
        else:
            bounds[-1][2] = int(r["request_index"]) + 1
    phases = [{"name": str(b[3]), "start": b[1], "end": b[2], "mix": {b[4]: 1.0}} for b in bounds]
    return {
        "name": f"twin-{summary['name']}",
        "seed": int(cfg.get("seed", 0)),
        "models": {"target": _spec(summary["target"], "real-target", dtype),
                   "draft": _spec(summary["draft"], "real-draft", dtype, draft_vocab)},
        "hardware": {"profile": profile},
        "batching": {"max_batch_size": 1, "chunked_prefill_tokens": None},
        "strategy": "osd",
        "speculation": {"k": int(cfg["decode"]["k"])},
        "acceptance": {"file": str(acc_file), "law": "empirical", "empirical_file": str(law_file)},
        "distill": {"placement": "inline", "update_interval_requests": int(cfg["distill"]["update_interval"]),
                    "window_requests": int(cfg["distill"].get("window_requests") or cfg["distill"]["update_interval"]),
                    "tokens": "all", "trainable": "layers"},
        "workload": {"arrival": "trace", "trace_file": str(trace_file), "domains": {d: {} for d in doms},
                     "shift": {"unit": "requests", "phases": phases}},
        "report": {"alpha_window_requests": 8},
    }


# --- comparison ----------------------------------------------------------------------------------
@dataclass
class ValidationResult:
    rows: list[MetricRow]
    meta: dict
    files: dict[str, Path] = field(default_factory=dict)


def _real_alpha(rows: list[dict]) -> float:
    a = sum(_num(r["accepted"]) for r in rows)
    rej = sum(_num(r["rejections"]) for r in rows)
    return a / (a + rej) if a + rej > 0 else math.nan


def compare_runs(real: Any, sim: Any, suite: Suite, k: int) -> list[MetricRow]:
    from scipy.stats import ks_2samp

    tol = suite.tolerances
    reqs = sorted(real.requests, key=lambda r: int(r["request_index"]))
    rows: list[MetricRow] = []
    sim_phases = sim.summary["phases"]
    for i, ph in enumerate(sim_phases):
        real_rows = [r for r in reqs if int(r["phase"]) == i]
        rows.append(MetricRow(f"α, phase {ph['phase']}", ph["alpha_mean"], _real_alpha(real_rows), tol.alpha_phase_abs, "abs"))
    # α trajectory: RMSE between moving windows (request order) of predicted and measured α̂.
    w = suite.alpha_window_requests
    sim_req = sim.requests.sort_values("request_id")
    pa = (sim_req["accepted_tokens"].rolling(w, min_periods=1).sum()
          / (sim_req["accepted_tokens"] + sim_req["rejections"]).rolling(w, min_periods=1).sum()).to_numpy()
    ra_acc = np.array([_num(r["accepted"]) for r in reqs])
    ra_rej = np.array([_num(r["rejections"]) for r in reqs])
    ra = np.convolve(ra_acc, np.ones(w))[: len(reqs)] / np.maximum(np.convolve(ra_acc + ra_rej, np.ones(w))[: len(reqs)], 1e-12)
    m = np.isfinite(pa) & np.isfinite(ra)
    rmse = float(np.sqrt(np.mean((pa[m] - ra[m]) ** 2))) if m.any() else math.nan
    rows.append(MetricRow(f"α trajectory RMSE ({w}-request window)", rmse, 0.0, tol.alpha_rmse_abs, "abs"))
    steps = sum(_num(r["steps"]) for r in reqs)
    real_tps = sum(_num(r["output_tokens"]) - 1 for r in reqs) / steps if steps else math.nan
    rows.append(MetricRow("accepted tokens per step (incl. bonus)", sim.summary["speculation"]["mean_tokens_per_step"],
                          real_tps, tol.tokens_per_step_rel))
    # Pass times: the cost model at batch 1 and the run's mean context vs measured means.
    real_steps = real.steps
    if real_steps:
        real_draft = float(np.mean([_num(s["draft_s"]) for s in real_steps]))
        real_verify = float(np.mean([_num(s["verify_s"]) for s in real_steps]))
        pred_draft, pred_verify = _predicted_pass_times(sim, k)
        rows.append(MetricRow(f"draft time per step ({k} passes)", pred_draft, real_draft, tol.pass_time_rel, unit="s"))
        rows.append(MetricRow("verify pass time", pred_verify, real_verify, tol.pass_time_rel, unit="s"))
    real_train = [x for x in (_num(u.get("train_s")) for u in real.updates) if math.isfinite(x)]
    sim_train = sim.training[sim.training["kind"] == "done"]["duration_s"]
    if real_train and len(sim_train):
        rows.append(MetricRow("training step time", float(sim_train.mean()), float(np.mean(real_train)),
                              tol.pass_time_rel, unit="s"))
    real_e2e = np.array([_num(r["finish_s"]) - _num(r["start_s"]) for r in reqs])
    sim_e2e = sim.requests["e2e_s"].dropna().to_numpy()
    rows.append(MetricRow("end-to-end latency, median", float(np.median(sim_e2e)), float(np.median(real_e2e)),
                          tol.e2e_median_rel, unit="s"))
    rows.append(MetricRow("end-to-end latency, p90", float(np.percentile(sim_e2e, 90)), float(np.percentile(real_e2e, 90)),
                          tol.e2e_p90_rel, unit="s"))
    rows.append(MetricRow("end-to-end latency, KS statistic", float(ks_2samp(sim_e2e, real_e2e).statistic), 0.0,
                          tol.e2e_ks, "abs"))
    rows.append(MetricRow("total run time", float(sim.requests["finish_s"].max()),
                          float(max(_num(r["finish_s"]) for r in reqs)), tol.total_time_rel, unit="s"))
    phase_of = np.array([int(r["phase"]) for r in reqs])
    for rec in sim.summary["recovery"]:
        shift_at = rec["at_request"]
        # "Not recovered" is censored at the end of the phase (a number, so it can be compared).
        phase_len = int(np.count_nonzero(phase_of == phase_of[shift_at])) if shift_at < len(reqs) else 0
        predicted = rec["recovered_after_requests"]
        predicted = float(phase_len if predicted is None else predicted)
        measured = _real_recovery(ra, shift_at, rec["target"], 0.02)
        measured = float(phase_len if measured is None else measured)
        rows.append(MetricRow(f"recovery after {rec['shift']} (requests; phase length if never)", predicted, measured,
                              tol.recovery_rel))
    return rows


def _real_recovery(alpha_window: np.ndarray, at: int, target: float | None, tolerance: float) -> float | None:
    if target is None:
        return None
    seg = alpha_window[at:]
    hit = np.flatnonzero(seg >= target - tolerance)
    return float(hit[0]) if hit.size else None


def _predicted_pass_times(sim: Any, k: int) -> tuple[float, float]:
    from osdsim.cost.model import CostModel
    from osdsim.sim.engine import load_scenario_profile

    sc = sim.scenario
    prof = load_scenario_profile(sc)
    req = sim.requests
    ctx = float((req["prompt_tokens"] + req["output_tokens"] / 2).mean())
    draft = CostModel(sc.draft, prof)
    target = CostModel(sc.target, prof)
    return k * draft.decode_time(1, ctx), target.decode_time(1, ctx, tokens_per_seq=k + 1)


# --- the whole method ------------------------------------------------------------------------------
@dataclass
class RecordedRun:
    """A finished real run read back from its output directory (requests/steps/updates CSV + summary)."""

    summary: dict
    requests: list[dict]
    steps: list[dict]
    updates: list[dict]


def load_recorded(run_dir: Path) -> RecordedRun | None:
    import csv
    import json

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("partial") or "config" not in summary:
        return None

    def rows(name: str) -> list[dict]:
        with open(run_dir / name, newline="") as fh:
            return list(csv.DictReader(fh))

    return RecordedRun(summary, rows("requests.csv"), rows("steps.csv"), rows("updates.csv"))


def run_validation(suite: Suite, suite_path: Path, out_dir: Path, progress=None, calibrate_fn=None,
                   reuse: bool = False) -> ValidationResult:
    from osdsim.api import simulate
    from osdsim.real.config import RealConfig
    from osdsim.real.run import run_real
    from osdsim.scenario import scenario_from_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    work = (out_dir / f"{suite.name}-work").resolve()
    profile = suite.profile
    if suite.calibrate != "none":
        if calibrate_fn is None:
            raise InputError("calibrate: this osdsim has no calibrate command installed")
        profile = str(calibrate_fn(work / "profile.yaml", quick=suite.calibrate == "quick"))
    try:
        fit_cfg = RealConfig(**suite.fit)
        held_cfg = RealConfig(**_merge(suite.fit, suite.heldout))
    except ValidationError as exc:
        raise InputError(f"{suite_path}: fit/heldout: {format_validation_error(exc)}") from None
    s1 = load_recorded(work / "S1") if reuse else None
    if s1 is None:
        if progress:
            progress("fit run S1 (real)")
        s1 = run_real(fit_cfg, work / "S1")
    k = int(fit_cfg.decode.k)
    acc, law = fit_acceptance(s1.requests, k)
    acc_file, law_file = work / "acceptance.yaml", work / "accepted_lengths.yaml"
    atomic_write_text(acc_file, yaml.safe_dump(acc, sort_keys=False))
    atomic_write_text(law_file, yaml.safe_dump(law, sort_keys=False))
    s2 = load_recorded(work / "S2") if reuse else None
    if s2 is None:
        if progress:
            progress("held-out run S2 (real)")
        s2 = run_real(held_cfg, work / "S2")
    if progress:
        progress("simulating S2")
    twin = twin_scenario(s2.summary, s2.requests, profile, acc_file, law_file, work / "S2-trace.csv", work)
    atomic_write_text(work / "twin-scenario.yaml", yaml.safe_dump(twin, sort_keys=False))
    sc = scenario_from_dict(twin, base_dir=suite_path.resolve().parent, source="twin scenario")
    sim = simulate(sc)
    sim.scenario = sc
    rows = compare_runs(s2, sim, suite, int(held_cfg.decode.k))
    meta = {
        "title": f"osdsim validate: {suite.name}",
        "suite": str(suite_path),
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": s2.summary.get("device", "local"),
        "method": f"fit on S1 (seed {fit_cfg.seed}), predict held-out S2 (seed {held_cfg.seed}) in trace mode"
        + (" (real runs reused from the work directory)" if reuse else ""),
        "profile": profile,
        "fitted_acceptance": acc,
    }
    return ValidationResult(rows=rows, meta=meta, files={"work": work})
