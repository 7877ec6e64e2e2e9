"""Validation under load (issue 12 item 3): the simulator's predictions for a batched server.

The fit stays on a separate run (S1: a batch-1 closed-loop run or a batched one): acceptance
(fit_acceptance) and serving-fitted pass costs (costfit) come from it alone. Each held-out run is a
real batched serve run (`osdsim real` with a `serve:` section) at its own arrival rate and training
placement; its twin replays the run's exact arrival times, domains and lengths as an open-loop trace
with the run's batching (max batch, chunked prefill, KV budget), placement, update interval and
pending-step limit, and is compared with it: TTFT / TPOT / E2E p50 and p90, mean batch, queueing
delay, α per phase, tokens per step, training steps due / done / skipped, training seconds used, α
at the end of each phase; across runs the arrival rate at which harvest training falls behind for good.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from osdsim.errors import InputError, atomic_write_text, format_validation_error
from osdsim.specdec import alpha_from_counts
from osdsim.validate.compare import MetricRow
from osdsim.validate.fit import FIT_FORGETTING_DESCRIPTION


class LoadTolerances(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_p50_rel: float = Field(0.15, gt=0)
    tpot_p50_rel: float = Field(0.10, gt=0)
    e2e_p50_rel: float = Field(0.10, gt=0)
    p90_rel: float = Field(0.20, gt=0, description="TTFT, TPOT and E2E p90.")
    mean_batch_rel: float = Field(0.10, gt=0)
    queue_rel: float = Field(0.25, gt=0, description="Mean queueing delay, relative ...")
    queue_abs_s: float = Field(0.05, ge=0, description="... or within this many seconds.")
    alpha_phase_abs: float = Field(0.05, gt=0, description="α per phase and α at the end of each phase.")
    tokens_per_step_rel: float = Field(0.10, gt=0)
    steps_rel: float = Field(0.10, gt=0, description="Training steps due and done.")
    train_seconds_rel: float = Field(0.25, gt=0, description="Seconds used for training (harvest).")
    fall_behind_rate_rel: float = Field(0.25, gt=0)


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(..., min_length=1, description="Name of the held-out run in the report.")
    overrides: dict = Field(default_factory=dict, description="Overrides of the held-out config (serve.rate_per_s ...).")
    load: float | None = Field(
        None, gt=0, description="Arrival rate as a fraction of the server's capacity (the saturated throughput "
        "predicted from the fit run S1): 'low load' means the same on every machine. Sets serve.rate_per_s.")
    load_end: float | None = Field(
        None, gt=0, description="With load: the rate ramps from load to load_end (fractions of capacity) over "
        "the stream (serve.rate_end_per_s), so one run finds the rate at which training falls behind.")
    load_of: Literal["capacity", "harvest_limit"] = Field(
        "capacity", description="What load (and load_end) are fractions of: the capacity, or the harvest limit "
        "(the arrival rate at which S1's twin predicts harvest training falls behind for good, "
        "predicted_harvest_limit). Where training is slow next to serving (bf16 serving, fp32 training on an "
        "AVX-512 BF16 CPU: 0.2 × capacity) a fixed fraction of capacity is not 'training keeps up' on every machine.")

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if self.load_end is not None and self.load is None:
            raise ValueError("load_end: needs load (the fraction of capacity the ramp starts at)")
        return self


class LoadSuite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    profile: str | None = None
    calibrate: str = Field("none", description="none | quick | full")
    on_other_device: Literal["calibrate", "refuse"] = "calibrate"
    costs: Literal["serving", "microbenchmark"] = "serving"
    host_speed: Literal["replay", "fixed"] = Field(
        "replay", description="replay: each held-out twin prices at that run's measured host speed (its "
        "host-speed canary's median vs the fit run's: every pass and training cost x the ratio), as it replays "
        "the run's arrivals; fixed: every twin prices at the fit run's speed. The other variant is reported in "
        "information rows; without canaries on both sides the twin prices at the fit run's speed.")
    fit_forgetting: bool = Field(
        False, description=FIT_FORGETTING_DESCRIPTION)
    fit: dict = Field(..., description="Real-run config of the fit run S1 (batch-1, or with a serve section).")
    fit_reverse: dict | None = Field(
        None, description="Overrides of `fit` for a second served fit run S1r (e.g. another seed with the domains in "
        "the other order) whose α observations join S1's in the acceptance fit; the pass costs and the capacity "
        "stay S1's. One order identifies the transfer into the domain trained second only: the transfer from it "
        "into the domain trained first is never seen from scratch (validate.fit.fit_joint_runs).")
    heldout: dict = Field(..., description="Overrides of `fit` shared by every held-out served run (needs serve:).")
    runs: list[RunSpec] = Field(..., min_length=1)
    tolerances: LoadTolerances = Field(default_factory=LoadTolerances)
    alpha_window_requests: int = Field(16, ge=1)
    probe: dict = Field(
        default_factory=dict,
        description="Overrides of `fit` for the co-location probe P, run when a held-out run is dedicated: "
        "served with placement dedicated (a trainer process beside the server), it measures the serving "
        "slowdown while the trainer trains, the publish delay and the trainer's step time that the "
        "dedicated twins use (default: the fit config with 12 requests per phase, a step every 3).")


# The co-location probe's defaults (overridden by the suite's `probe:`): short, with the trainer busy
# for a good part of the run, so both busy and idle iterations are timed.
PROBE_DEFAULTS = {"stream": {"requests_per_phase": 12}, "distill": {"update_interval": 3},
                  "eval": {"every_updates": 1000}}
# Iterations needed on each side (trainer busy / idle) to measure the interference.
PROBE_MIN_ITERATIONS = 5


def probe_config(suite: LoadSuite, suite_path: Path, fit: Any) -> Any:
    """The co-location probe P's config: the fit run's, dedicated, shortened (suite `probe:` on top)."""
    from osdsim.validate.pipeline import _merge

    if fit.serve is None:
        raise InputError(f"{suite_path}: a dedicated held-out run needs a served fit run (fit: serve:) for its probe")
    data = _merge(_merge(suite.fit, PROBE_DEFAULTS), suite.probe)
    return _real_config(suite_path, "probe",
                        _merge(data, {"name": f"{fit.name}-probe", "serve": {"placement": "dedicated"}}))


def reverse_fit_config(suite: LoadSuite, suite_path: Path, fit: Any) -> Any:
    """The second fit run S1r's config: the fit run's with the suite's `fit_reverse:` on top."""
    from osdsim.validate.pipeline import _merge

    assert suite.fit_reverse is not None
    return _real_config(suite_path, "fit_reverse",
                        _merge(_merge(suite.fit, {"name": f"{fit.name}-reverse"}), suite.fit_reverse))


def _real_config(suite_path: Path, label: str, data: dict) -> Any:
    """A suite run's RealConfig; bad input names the run and field in one line."""
    from osdsim.real.config import RealConfig

    try:
        return RealConfig(**data)
    except ValidationError as exc:
        raise InputError(f"{suite_path}: {label}: {format_validation_error(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"{suite_path}: {label}: {str(exc).splitlines()[0]}") from None


def run_configs(suite: LoadSuite, suite_path: Path, capacity_per_s: float | None = None,
                harvest_limit_per_s: float | None = None) -> tuple[Any, list[tuple[str, Any]]]:
    """(fit config, [(label, held-out config)]) as RealConfigs; bad input names the run and field.
    A run given as a `load` gets its rate from `capacity_per_s` (or `harvest_limit_per_s`, its
    `load_of`); before S1 has measured them (None) a placeholder rate checks the rest of the config."""
    from osdsim.validate.pipeline import _merge

    def build(label: str, data: dict) -> Any:
        return _real_config(suite_path, label, data)

    fit = build("fit", suite.fit)
    if suite.fit_reverse is not None and build("fit_reverse", _merge(suite.fit, suite.fit_reverse)).serve is None:
        raise InputError(f"{suite_path}: fit_reverse: the second fit run needs a served fit run (fit: serve:)")
    base = _merge(suite.fit, suite.heldout)
    runs, seen = [], set()
    for r in suite.runs:
        if r.label in seen:
            raise InputError(f"{suite_path}: runs: label {r.label!r} given twice")
        seen.add(r.label)
        data = _merge(base, r.overrides)
        if r.load is not None:
            if (data.get("serve") or {}).get("arrival", "poisson") != "poisson":
                raise InputError(f"{suite_path}: run {r.label!r}: load: needs serve.arrival poisson")
            basis = capacity_per_s if r.load_of == "capacity" else harvest_limit_per_s
            cap = 1.0 if basis is None else basis
            data = _merge(data, {"serve": {"rate_per_s": r.load * cap,
                                           "rate_end_per_s": None if r.load_end is None else r.load_end * cap}})
        cfg = build(f"run {r.label!r}", data)
        if cfg.serve is None:
            raise InputError(f"{suite_path}: run {r.label!r}: a held-out run needs a serve: section")
        runs.append((r.label, cfg))
    return fit, runs


CAPACITY_MIN_REQUESTS = 10  # finished S1 requests needed for a steady state between the 20th and 80th percentile


def predicted_capacity(s1: ServeRun, profile: str, acc_file: Path, law_file: Path, work: Path,
                       base_dir: Path, attention_padding: float | None = None) -> float:
    """The server's capacity (requests/s): the saturated throughput its twin predicts for S1's requests
    (their prompt and output lengths) all waiting at t = 0, served with S1's batching and the untrained
    draft, no training. Completions per second between the 20th and the 80th percentile finish (the
    steady state: the batch is full, neither filling nor draining)."""
    burst = [dict(r, arrival_s="0") for r in s1.requests]
    doc = serve_twin_scenario(ServeRun(s1.summary, burst, [], [], [], []), profile, acc_file, law_file,
                              work / "capacity-trace.csv", attention_padding=attention_padding)
    doc["strategy"] = "static"
    doc["name"] = "capacity"
    doc["report"] = {"alpha_window_requests": 8}
    twin = simulate_twin(doc, base_dir)
    fin = np.sort(twin.result.requests["finish_s"].to_numpy(dtype=float))
    fin = fin[np.isfinite(fin)]
    lo, hi = int(0.2 * len(fin)), int(0.8 * len(fin))
    if len(fin) < CAPACITY_MIN_REQUESTS or fin[hi - 1] <= fin[lo]:
        raise InputError("capacity: S1 has too few requests to measure the server's saturated throughput")
    return float((hi - 1 - lo) / (fin[hi - 1] - fin[lo]))


# The harvest-limit twin: S1's requests, HARVEST_LIMIT_COPIES times over, arriving on a ramp from
# HARVEST_LIMIT_RAMP[0] to [1] × capacity (deterministic: the i-th gap is 1 / the ramp's i-th rate).
HARVEST_LIMIT_RAMP = (0.05, 1.5)
HARVEST_LIMIT_COPIES = 3


def predicted_harvest_limit(s1: ServeRun, heldout: Any, capacity: float, profile: str, acc_file: Path,
                            law_file: Path, work: Path, base_dir: Path,
                            attention_padding: float | None = None) -> float:
    """The arrival rate (requests/s) at which harvest training falls behind for good, as S1's twin
    predicts it: S1's requests (prompt and output lengths, domains, in order, HARVEST_LIMIT_COPIES times)
    arriving on a rising rate, served with S1's batching and the held-out run's distillation settings
    and harvest placement; fall_behind_rate on the twin's step fates (the rule the report applies to
    both sides). The ramp's top rate where training never falls behind on it."""
    import copy as _copy

    from osdsim.real.serve import ramp_rates

    lo, hi = (f * capacity for f in HARVEST_LIMIT_RAMP)
    rows = sorted(s1.requests, key=lambda r: int(r["request_index"])) * HARVEST_LIMIT_COPIES
    rates = ramp_rates(lo, hi, len(rows))
    arrivals = np.concatenate([[0.0], np.cumsum(1.0 / np.asarray(rates[:-1], dtype=float))])
    reqs = [dict(r, request_index=i, arrival_s=f"{a:.6f}") for i, (r, a) in enumerate(zip(rows, arrivals, strict=True))]
    summary = _copy.deepcopy(s1.summary)
    cfg = summary["config"]
    serve = {**cfg["serve"], "arrival": "poisson", "rate_per_s": lo, "rate_end_per_s": hi, "placement": "harvest",
             "max_pending_steps": heldout.serve.max_pending_steps}
    cfg["serve"] = serve
    cfg["distill"] = heldout.distill.model_dump(mode="json")
    summary.update(placement="harvest", name="harvest-limit")
    doc = serve_twin_scenario(ServeRun(summary, reqs, [], [], [], []), profile, acc_file, law_file,
                              work / "harvest-limit-trace.csv", attention_padding=attention_padding)
    twin = simulate_twin(doc, base_dir)
    req = twin.result.requests
    rate = fall_behind_rate(twin_step_fates(twin), req["finish_s"].to_numpy(dtype=float),
                            req["arrival_s"].to_numpy(dtype=float), serve, int(heldout.distill.update_interval))
    return float(hi if rate is None else rate)


# --- a recorded serve run ------------------------------------------------------------------------------
@dataclass
class ServeRun:
    summary: dict
    requests: list[dict]
    iterations: list[dict]
    steps: list[dict]
    training: list[dict]
    units: list[dict]
    alpha: list[dict] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)  # training rows that ran (for costfit / fit)


SERVE_FILES = ("requests.csv", "iterations.csv", "steps.csv", "training.csv", "training_units.csv")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_serve_run(run_dir: Path) -> ServeRun | None:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if summary.get("mode") != "serve" or "config" not in summary:
        return None
    try:
        tables = {n: _rows(run_dir / n) for n in SERVE_FILES}
    except OSError:
        return None
    alpha = _rows(run_dir / "alpha.csv") if (run_dir / "alpha.csv").is_file() else []
    done = [t for t in tables["training.csv"] if t.get("status") == "done"]
    return ServeRun(summary, tables["requests.csv"], tables["iterations.csv"], tables["steps.csv"],
                    tables["training.csv"], tables["training_units.csv"], alpha, done)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def serve_trace_rows(requests: list[dict]) -> list[str]:
    """The recorded run as an open-loop trace: its exact arrival times, domains and lengths."""
    rows = sorted(requests, key=lambda r: (_num(r["arrival_s"]), int(r["request_index"])))
    out = ["arrival_s,domain,prompt_tokens,output_tokens"]
    for r in rows:
        out.append(f"{_num(r['arrival_s']):.6f},{r['domain']},{int(_num(r['prompt_tokens']))},"
                   f"{max(int(_num(r['output_tokens'])), 1)}")
    return out


@dataclass
class Colocation:
    """What the probe P measured of a trainer process beside the server."""

    interference: float  # fractional serving slowdown while the trainer trains
    sync_delay_s: float  # median publish delay (step done -> weights in the server)
    train_factor: float  # trainer step time per trained position, P / S1 (co-running vs alone)
    busy_iterations: int
    idle_iterations: int
    profile: str | None = None  # the serving profile with training scaled by train_factor

    def as_dict(self) -> dict:
        return {"interference": round(self.interference, 4), "sync_delay_s": round(self.sync_delay_s, 4),
                "train_factor": round(self.train_factor, 4), "busy_iterations": self.busy_iterations,
                "idle_iterations": self.idle_iterations}


def _twin_models(doc: dict, base_dir: Path, source: str) -> dict:
    """{'draft', 'target'}: CostModels of a twin scenario's models on its profile."""
    from osdsim.cost.model import CostModel
    from osdsim.scenario import scenario_from_dict
    from osdsim.sim.engine import load_scenario_profile

    sc = scenario_from_dict(doc, base_dir=base_dir, source=source)
    prof = load_scenario_profile(sc)
    return {"draft": CostModel(sc.draft, prof), "target": CostModel(sc.target, prof)}


def _train_s_per_position(run: ServeRun) -> float:
    done = [t for t in run.training if t.get("status") == "done"]
    pos = sum(_num(t.get("positions")) for t in done)
    return sum(_num(t.get("train_s")) for t in done) / pos if pos > 0 else math.nan


def measure_colocation(probe: ServeRun, s1: ServeRun, doc: dict, base_dir: Path) -> Colocation:
    """From the probe's iterations: measured / priced pass time (the twin's profile `doc` prices each
    iteration's passes at its own shapes) while the trainer trained vs while it did not; the ratio of
    medians − 1 is the interference. Publish delays and the trainer's step time from its training rows."""
    from osdsim.validate import costfit

    models = _twin_models(doc, base_dir, "twin of the probe")
    busy, idle = [], []
    for it in probe.iterations:
        passes = costfit.passes_batched([it])
        priced = sum(costfit.price(p, models) for p in passes)
        if priced > 0:
            (busy if int(_num(it.get("trainer_busy")) or 0) else idle).append(
                sum(p.measured_s for p in passes) / priced)
    interference = 0.0
    if len(busy) >= PROBE_MIN_ITERATIONS and len(idle) >= PROBE_MIN_ITERATIONS:
        interference = max(float(np.median(busy)) / float(np.median(idle)) - 1.0, 0.0)
    delays = [_num(t.get("published_s")) - _num(t.get("done_s")) for t in probe.training if t.get("status") == "done"]
    delays = [d for d in delays if math.isfinite(d) and d >= 0]
    ratio = _train_s_per_position(probe) / _train_s_per_position(s1)
    return Colocation(interference, float(np.median(delays)) if delays else 0.0,
                      ratio if math.isfinite(ratio) and ratio > 0 else 1.0, len(busy), len(idle))


def serve_twin_scenario(run: ServeRun, profile: str, acc_file: Path, law_file: Path, trace_file: Path,
                        colocation: Colocation | None = None, attention_padding: float | None = None) -> dict:
    """The simulator twin of a recorded serve run (open-loop trace replay with its batching/placement);
    a dedicated run's twin takes the probe's interference, publish delay and trainer speed. The
    server's batch caches are padded (osdsim.real.batching): `attention_padding` ρ (S1's measured
    width / longest row) makes the twin price attention over ρ × the longest row of every batch."""
    from osdsim.validate.pipeline import twin_scenario

    base = twin_scenario(run.summary, run.requests, profile, acc_file, law_file, trace_file, trace_file.parent,
                         trace_rows=serve_trace_rows(run.requests))
    sv = run.summary["config"]["serve"]
    base["batching"] = {"max_batch_size": int(sv["max_batch_size"]),
                        "chunked_prefill_tokens": int(sv["chunked_prefill_tokens"]),
                        "kv_cache_tokens": int(sv["kv_token_budget"]), "attention_padding": attention_padding,
                        # osdsim.real's server prefills into each sequence's own cache with the whole
                        # chunked_prefill_tokens budget, then drafts and verifies: passes of their own.
                        "prefill_pass": "separate"}
    placement = run.summary.get("placement") or sv["placement"]
    if placement == "none":
        base["strategy"] = "static"
    base["distill"].update({"placement": placement if placement != "none" else "inline",
                            "max_pending_steps": int(sv["max_pending_steps"]),
                            # The server trains at full speed in idle windows and never co-runs.
                            "harvest_fraction": 1.0, "harvest_in_iterations": False, "interference": 0.0, "sync_delay_s": 0.0})
    if placement == "dedicated" and colocation is not None:
        base["distill"].update({"dedicated_interference": colocation.interference,
                                "sync_delay_s": colocation.sync_delay_s})
        if colocation.profile:
            base["hardware"]["profile"] = colocation.profile
    base["workload"]["trace_replay"] = "open"
    base["report"] = {"alpha_window_requests": 8, "iteration_log": "full"}
    base["name"] = f"twin-{run.summary['name']}"
    return base


# --- comparison ------------------------------------------------------------------------------------------
def _pct(x: list[float] | np.ndarray, q: float) -> float:
    v = np.asarray([a for a in x if math.isfinite(a)], dtype=float)
    return float(np.percentile(v, q)) if v.size else math.nan


def stall_rate(arrivals: np.ndarray, t_first_skip: float | None) -> float | None:
    """Arrival rate (req/s over the trailing 10% of requests, at least 10) when training first fell
    behind (a due step was skipped): the simulator's own definition (sim.results._stall_rate)."""
    if t_first_skip is None:
        return None
    arr = np.sort(np.asarray(arrivals, dtype=float))
    upto = arr[arr <= t_first_skip]
    if upto.size < 10:
        return None
    w = max(10, upto.size // 10)
    span = upto[-1] - upto[-w]
    return float((w - 1) / span) if span > 0 else None


def real_mean_batch(iterations: list[dict]) -> float:
    """Σ batch·duration / Σ duration over serving iterations (as the simulator's mean_batch)."""
    b = np.array([_num(i["batch_size"]) for i in iterations])
    d = np.array([_num(i["end_s"]) - _num(i["start_s"]) for i in iterations])
    return float((b * d).sum() / d.sum()) if d.sum() > 0 else math.nan


def sim_mean_batch(iterations: Any) -> float:
    it = iterations[iterations["kind"] == "serve"] if "kind" in iterations else iterations
    d = it["duration_s"].to_numpy(dtype=float)
    return float((it["decode_seqs"].to_numpy(dtype=float) * d).sum() / d.sum()) if d.sum() > 0 else math.nan


@dataclass
class Twin:
    result: Any  # osdsim.sim.results.Result
    raw: Any  # the RawRun (training work used)
    scenario: Any


def compare_serve(label: str, real: ServeRun, twin: Twin, tol: LoadTolerances) -> tuple[list[MetricRow], dict]:
    """Rows for one held-out run, and the series its plots need."""
    sim = twin.result
    req = sorted(real.requests, key=lambda r: int(r["request_index"]))
    sreq = sim.requests.sort_values("request_id")
    rows: list[MetricRow] = []

    def add(name, p, m, t, kind="rel", unit="", gate=True):
        rows.append(MetricRow(f"{label}: {name}", p, m, t, kind, unit, gate=gate))

    for col, name, t50 in (("ttft_s", "TTFT", tol.ttft_p50_rel), ("tpot_s", "TPOT", tol.tpot_p50_rel),
                           ("e2e_s", "E2E", tol.e2e_p50_rel)):
        r_v = [_num(r[col]) for r in req]
        s_v = sreq[col].to_numpy(dtype=float)
        add(f"{name} p50", _pct(s_v, 50), _pct(r_v, 50), t50, unit="s")
        add(f"{name} p90", _pct(s_v, 90), _pct(r_v, 90), tol.p90_rel, unit="s")
    add("mean batch (decoding rows, time-weighted)", sim_mean_batch(sim.iterations), real_mean_batch(real.iterations),
        tol.mean_batch_rel)
    q_real = float(np.nanmean([_num(r["queue_s"]) for r in req]))
    q_sim = float(np.nanmean(sreq["queue_s"].to_numpy(dtype=float)))
    add("queueing delay, mean", q_sim, q_real, max(tol.queue_rel * abs(q_real), tol.queue_abs_s), "abs", "s")
    for i, ph in enumerate(sim.summary["phases"]):
        rr = [r for r in req if int(r["phase"]) == i]
        a = alpha_from_counts(sum(_num(r["accepted"]) for r in rr), sum(_num(r["rejections"]) for r in rr))
        add(f"α, phase {ph['phase']}", ph["alpha_mean"], a, tol.alpha_phase_abs, "abs")
    steps = sum(_num(r["steps"]) for r in req)
    add("tokens per step (incl. bonus)", sim.summary["speculation"]["mean_tokens_per_step"],
        sum(_num(r["output_tokens"]) - 1 for r in req) / steps if steps else math.nan, tol.tokens_per_step_rel)
    tr_real = real.summary.get("training") or {}
    tr_sim = sim.summary["training"]
    placement = real.summary.get("placement")
    if placement not in (None, "none"):
        add("training steps due", tr_sim["steps_due"], tr_real.get("steps_due"), tol.steps_rel)
        add("training steps done", tr_sim["steps_done"], tr_real.get("steps_done"), tol.steps_rel)
        due = max(float(tr_real.get("steps_due") or 0), 1.0)
        add("training steps skipped", tr_sim["steps_skipped"], tr_real.get("steps_skipped"),
            max(1.0, tol.steps_rel * due), "abs")
        if placement == "harvest":
            add("seconds of idle time used for training", float(twin.raw.stats.work_s_used),
                _num(tr_real.get("idle_s_used")), tol.train_seconds_rel, unit="s")
        # α at the end of each phase: held-out α of the phase's domain(s) vs the twin's draft α then.
        for i, ph in enumerate(real.summary.get("phases", [])):
            end = ph.get("alpha_heldout_end") or {}
            doms = sorted({r["domain"] for r in req if int(r["phase"]) == i})
            t_end = float(sreq[sreq["phase"] == sim.summary["phases"][i]["phase"]]["finish_s"].max()) \
                if i < len(sim.summary["phases"]) else math.nan
            for d in doms:
                if d in end:
                    rows.append(MetricRow(f"{label}: α at the end of phase {ph.get('name', i)} ({d})",
                                          sim_alpha_at(sim.alpha, d, t_end), float(end[d]), tol.alpha_phase_abs,
                                          "abs", measured_ci=heldout_alpha_ci(real.alpha, f"end_phase_{i}", d)))
    series = {
        "label": label,
        "rate": real.summary["config"]["serve"].get("rate_per_s"),
        "placement": placement,
        "e2e_measured": [_num(r["e2e_s"]) for r in req], "e2e_predicted": sreq["e2e_s"].dropna().tolist(),
        "ttft_measured": [_num(r["ttft_s"]) for r in req], "ttft_predicted": sreq["ttft_s"].dropna().tolist(),
        "alpha_t_measured": [_num(r["finish_s"]) for r in req],
        "alpha_measured": _rolling_alpha([_num(r["accepted"]) for r in req], [_num(r["rejections"]) for r in req], 8),
        "alpha_t_predicted": sreq["finish_s"].tolist(),
        "alpha_predicted": _rolling_alpha(sreq["accepted_tokens"].tolist(), sreq["rejections"].tolist(), 8),
        "train_done_measured": sorted(_num(t["done_s"]) for t in real.training if t.get("status") == "done"),
        "train_done_predicted": sorted(sim.training[sim.training["kind"] == "done"]["time_s"].tolist()),
    }
    return rows, series


def heldout_alpha_ci(alpha_rows: list[dict], label: str, domain: str) -> tuple[float, float] | None:
    """The 95% interval over held-out prompts recorded with a held-out evaluation (alpha.csv's
    alpha_heldout_lo / _hi; runs recorded before they existed have none)."""
    for a in alpha_rows:
        if a.get("label") == label and a.get("domain") == domain:
            lo, hi = _num(a.get("alpha_heldout_lo")), _num(a.get("alpha_heldout_hi"))
            return (lo, hi) if math.isfinite(lo) and math.isfinite(hi) else None
    return None


def _canary(run: Any) -> dict:
    """A served run's host-speed canary summary (osdsim.real.serve.HostCanary.summary; {} if none)."""
    return (getattr(run, "summary", None) or {}).get("host_canary") or {}


def canary_median_s(run: Any) -> float | None:
    """Median seconds of a served run's host-speed canary (osdsim.real.serve.HostCanary), if it ran."""
    c = _canary(run)
    m = c.get("median_s")
    return float(m) if m and c.get("n", 0) >= 3 else None


def canary_model(run: Any) -> str:
    """Which model a served run's canary timed (runs recorded before serve.host_canary: the draft)."""
    return str(_canary(run).get("model", "draft"))


def host_speed_ratio(real: Any, fit: Any) -> float | None:
    """This run's host speed relative to the fit run's: the ratio of their canary medians (> 1: this
    run's host was slower); None where either side has fewer than 3 canaries or they timed different
    models."""
    mine, ref = canary_median_s(real), canary_median_s(fit)
    if mine is None or ref is None or canary_model(real) != canary_model(fit):
        return None
    return mine / ref


def host_speed_rows(label: str, real: ServeRun, ratio: float | None, other: Twin, replayed: bool) -> list[MetricRow]:
    """Information rows, never gated: the host's speed during this run relative to the fit run
    (ratio of their canary medians), and the latency medians of the variant not gated. replayed: the
    gated twin priced at this run's speed and `other` is the twin at the fit run's speed (unscaled);
    else `other` is the gated fixed-speed twin and its medians are shown × the ratio. They tell a host
    that ran slower or faster (other tenants, clocks) apart from a wrong cost model."""
    if ratio is None:
        return []
    rows = [MetricRow(f"{label}: host speed vs the fit run (canary pass time, run / fit; information)",
                      1.0, ratio, 0.05, gate=False)]
    sreq = other.result.requests
    for col, name in (("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        measured = _pct([_num(r[col]) for r in real.requests], 50)
        pred = _pct(sreq[col].to_numpy(dtype=float), 50)
        what = "at the fit run's host speed (no replay" if replayed else f"with the host speed taken out (twin x {ratio:.3f}"
        rows.append(MetricRow(f"{label}: {name} p50 {what}; information)", pred if replayed else pred * ratio,
                              measured, 0.10, unit="s", gate=False))
    return rows


def host_speed_profile(doc: dict, base_dir: Path, ratio: float, path: Path) -> str:
    """Write the twin's profile scaled to a host `ratio` × slower (costfit.scale_host_speed) to `path`."""
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.validate import costfit

    src = resolve_profile_path(str(doc["hardware"]["profile"]), base_dir)
    costfit.write_profile(costfit.scale_host_speed(load_profile(src), ratio), path,
                          f"Host speed replayed: every cost x{ratio:.4f} (the run's host-speed canary median / the "
                          "fit run's).", suffix="-host", header="Host-speed-replayed profile")
    return str(path)


def pass_rows(label: str, real: ServeRun, doc: dict, base_dir: Path) -> list[MetricRow]:
    """Per pass kind, the median measured time of the held-out run's passes vs the twin's profile
    pricing the very same shapes (for information: it separates cost-model error from scheduling)."""
    from osdsim.validate import costfit

    models = _twin_models(doc, base_dir, f"twin of {label}")
    by_kind: dict[str, tuple[list[float], list[float]]] = {}
    for p in costfit.passes_batched(real.iterations):
        pred, meas = by_kind.setdefault(p.kind, ([], []))
        pred.append(costfit.price(p, models))
        meas.append(p.measured_s)
    return [MetricRow(f"{label}: {kind} time, median (priced at the measured shapes)", float(np.median(pr)),
                      float(np.median(me)), 0.10, "rel", "s", gate=False)
            for kind, (pr, me) in sorted(by_kind.items())]


def _rolling_alpha(acc: list[float], rej: list[float], w: int) -> list[float]:
    a, r = np.asarray(acc, dtype=float), np.asarray(rej, dtype=float)
    ca, cr = np.convolve(a, np.ones(w))[: a.size], np.convolve(r, np.ones(w))[: a.size]
    return [alpha_from_counts(x, y) for x, y in zip(ca, cr, strict=True)]


def sim_alpha_at(alpha_events: Any, domain: str, t: float) -> float:
    """The twin's draft α for `domain` at time t (last α event at or before t)."""
    col = f"alpha_{domain}"
    if alpha_events is None or col not in alpha_events or not math.isfinite(t):
        return math.nan
    ev = alpha_events[alpha_events["time_s"] <= t + 1e-9]
    return float(ev[col].iloc[-1]) if len(ev) else float(alpha_events[col].iloc[0])


def behind_from(fates: list[str]) -> int | None:
    """Index (in due order) of the first step from which training stays behind: it was skipped and at
    least half of the steps due from it on were skipped. A chance skip that training recovers from (the
    rest mostly done) is not falling behind. `fates`: 'done' / 'skipped' per due step, in due order
    (steps still pending at the end of the run left out)."""
    for i, fate in enumerate(fates):
        rest = fates[i:]
        if fate == "skipped" and 2 * rest.count("skipped") >= len(rest):
            return i
    return None


def nominal_rate(serve: dict, request_index: int, n: int) -> float | None:
    """The configured Poisson rate at a request index (a ramp rises linearly by index); None for traces."""
    if serve.get("arrival", "poisson") != "poisson" or not serve.get("rate_per_s"):
        return None
    from osdsim.real.serve import ramp_rates

    r0 = float(serve["rate_per_s"])
    r1 = float(serve.get("rate_end_per_s") or r0)
    return float(ramp_rates(r0, r1, max(n, 1))[min(max(request_index, 0), max(n, 1) - 1)])


def fall_behind_rate(fates: list[str], finishes: np.ndarray, arrivals: np.ndarray, serve: dict,
                     interval: int) -> float | None:
    """Arrival rate (req/s) at which training fell behind for good (behind_from): the configured rate
    at the requests that had arrived when that step was due (the `interval`·(i+1)-th finish), or for a
    trace the trailing arrival rate there (stall_rate). The same rule on the server and its twin."""
    i = behind_from(fates)
    if i is None:
        return None
    fin = np.sort(finishes[np.isfinite(finishes)])
    due = float(fin[min(interval * (i + 1), fin.size) - 1]) if fin.size else 0.0
    arrived = int(np.searchsorted(np.sort(arrivals), due, side="right"))
    rate = nominal_rate(serve, max(arrived - 1, 0), arrivals.size)
    return rate if rate is not None else stall_rate(arrivals, due)


def twin_step_fates(twin: Twin) -> list[str]:
    """'done' / 'skipped' per due step of a twin, in due order: the twin consumes due steps oldest first,
    so its done/skipped events in time order are the steps' fates in due order."""
    ev = twin.result.training
    return ev[ev["kind"].isin(["done", "skipped"])].sort_values("time_s", kind="stable")["kind"].tolist()


def fall_behind_rows(entries: list[tuple[str, ServeRun, Twin]], tol: LoadTolerances) -> list[MetricRow]:
    """Across the harvest runs (by starting arrival rate): the rate at which training first falls behind
    for good (fall_behind_rate), from the first run that does, on each side."""
    harvest = [(lbl, r, t) for lbl, r, t in entries if r.summary.get("placement") == "harvest"]
    harvest.sort(key=lambda e: float(e[1].summary["config"]["serve"].get("rate_per_s") or 0.0))
    if len(harvest) < 2:
        return []
    meas = pred = None
    for _, r, t in harvest:
        sv = r.summary["config"]["serve"]
        interval = int(r.summary["config"]["distill"]["update_interval"])
        arr = np.array([_num(x["arrival_s"]) for x in r.requests])
        if meas is None:
            rows = sorted(r.training, key=lambda x: int(_num(x["step"])))
            fates = [x["status"] for x in rows if x.get("status") in ("done", "skipped")]
            meas = fall_behind_rate(fates, np.array([_num(x["finish_s"]) for x in r.requests]), arr, sv, interval)
        if pred is None:
            req = t.result.requests
            pred = fall_behind_rate(twin_step_fates(t), req["finish_s"].to_numpy(dtype=float),
                                    req["arrival_s"].to_numpy(dtype=float), sv, interval)
    return [MetricRow("arrival rate at which harvest training falls behind for good (req/s; — : never)",
                      pred, meas, tol.fall_behind_rate_rel)]


# --- the whole method -----------------------------------------------------------------------------------
def simulate_twin(doc: dict, base_dir: Path) -> Twin:
    from osdsim.scenario import scenario_from_dict
    from osdsim.sim.engine import build_and_run
    from osdsim.sim.results import summarise

    sc = scenario_from_dict(doc, base_dir=base_dir, source="twin scenario")
    raw = build_and_run(sc)
    res = summarise(raw)
    res.scenario = sc
    return Twin(res, raw, sc)


def run_load_validation(suite: LoadSuite, suite_path: Path, out_dir: Path, progress=None, calibrate_fn=None,
                        reuse: bool = False, notice=None, calibrate_given: bool = False,
                        runner: Any = None) -> Any:
    from osdsim.validate import pipeline as P
    from osdsim.validate.trace import combine, serve_run_trace, sim_trace, write_trace

    out_dir.mkdir(parents=True, exist_ok=True)
    work = (out_dir / f"{suite.name}-work").resolve()
    fit_cfg, runs = run_configs(suite, suite_path)
    profile, profile_how = P.resolve_profile(suite, suite_path, work, fit_cfg, calibrate_fn, calibrate_given,
                                             notice, progress)

    def run_and_read(cfg: Any, run_dir: Path) -> Any:
        if runner is not None:
            res = runner(cfg, run_dir)
        else:
            from osdsim.real.run import run_real

            res = run_real(cfg, run_dir)
        if cfg.serve is None:
            return res
        back = load_serve_run(run_dir)
        if back is None:
            raise InputError(f"{run_dir}: the serve run wrote no readable summary.json / CSVs")
        back.summary.update({k: v for k, v in res.summary.items() if k not in back.summary})
        return back

    s1, s1_reused = _reuse_or_run(fit_cfg, work / "S1", reuse, "fit run S1", progress, notice, run_and_read)
    reused = ["S1"] if s1_reused else []
    k = int(fit_cfg.decode.k)
    fit_view = s1
    if isinstance(s1, ServeRun):  # a batched fit run: updates = done training rows with their train_s
        fit_view = P.RecordedRun(s1.summary, s1.requests, s1.steps, _updates_of(s1), s1.alpha)
        fit_view.iterations = s1.iterations  # type: ignore[attr-defined]
    fit_runs = [s1]
    if suite.fit_reverse is not None:
        if not isinstance(s1, ServeRun):
            raise InputError(f"{suite_path}: fit_reverse needs a served fit run S1 (fit: serve:)")
        r_cfg = reverse_fit_config(suite, suite_path, fit_cfg)
        s1r, s1r_reused = _reuse_or_run(r_cfg, work / "S1r", reuse, "fit run S1r", progress, notice, run_and_read)
        if s1r_reused:
            reused.append("S1r")
        fit_runs.append(s1r)
    try:
        if isinstance(s1, ServeRun):
            acc, law = fit_served_acceptance(fit_runs, k, suite.fit_forgetting)
        else:
            acc, law = P.fit_acceptance(fit_view, k, suite.fit_forgetting)
    except ValueError as exc:
        raise InputError(f"{suite_path}: fit run S1 cannot be fitted: {exc}") from None
    acc_file, law_file = work / "acceptance.yaml", work / "accepted_lengths.yaml"
    atomic_write_text(acc_file, yaml.safe_dump(acc, sort_keys=False))
    atomic_write_text(law_file, yaml.safe_dump(law, sort_keys=False))
    if progress:
        progress("fitting pass costs on S1's recorded passes")
    twin_fn = None
    padding = None
    if isinstance(s1, ServeRun):
        from osdsim.validate.costfit import attention_padding

        padding = attention_padding(s1.iterations)
        twin_fn = lambda prof: serve_twin_scenario(s1, prof, acc_file, law_file, work / "S1-trace.csv",  # noqa: E731
                                                   attention_padding=padding)
    serving_path, cost_fit = P.serving_fitted_profile(fit_view, k, profile, acc_file, law_file, work, suite_path,
                                                      twin_fn=twin_fn)
    twin_profile = str(serving_path) if suite.costs == "serving" else profile
    capacity = harvest_limit = None
    if any(r.load is not None for r in suite.runs):
        if not isinstance(s1, ServeRun):
            raise InputError(f"{suite_path}: runs given as a load (fraction of capacity) need a served fit run "
                             "(fit: serve:) to measure the capacity on")
        capacity = _capacity(s1, s1_reused, twin_profile, acc_file, law_file, work, suite_path.resolve().parent,
                             padding)
        if progress:
            progress(f"capacity of this server (predicted from S1): {capacity:.3f} req/s")
        limited = [cfg for (_, cfg), r in zip(runs, suite.runs, strict=True) if r.load is not None
                   and r.load_of == "harvest_limit"]
        if limited:
            harvest_limit = _harvest_limit(s1, s1_reused, limited[0], capacity, twin_profile, acc_file, law_file,
                                           work, suite_path.resolve().parent, padding)
            if progress:
                progress(f"harvest limit (predicted from S1): {harvest_limit:.3f} req/s")
        fit_cfg, runs = run_configs(suite, suite_path, capacity, harvest_limit)
    colocation = None
    if any((cfg.serve.placement == "dedicated") for _, cfg in runs) and isinstance(s1, ServeRun):
        p_cfg = probe_config(suite, suite_path, fit_cfg)
        probe, p_reused = _reuse_or_run(p_cfg, work / "P", reuse, "co-location probe P", progress, notice,
                                        run_and_read)
        if p_reused:
            reused.append("P")
        p_doc = serve_twin_scenario(probe, twin_profile, acc_file, law_file, work / "P-trace.csv",
                                    attention_padding=padding)
        colocation = measure_colocation(probe, s1, p_doc, suite_path.resolve().parent)
        if colocation.train_factor != 1.0:
            from osdsim.cost.profile import load_profile
            from osdsim.validate import costfit

            train_dtype = p_doc["distill"]["train_dtype"]
            path = work / "profile-dedicated.yaml"
            costfit.write_profile(costfit.scale_training(load_profile(Path(twin_profile)), train_dtype,
                                                         colocation.train_factor), path,
                                  f"Training x{colocation.train_factor:.3f}: a trainer process beside the server "
                                  "(probe P) vs alone (S1).")
            colocation.profile = str(path)
    rows: list[MetricRow] = []
    entries, series, traces = [], [], []
    speeds: list[str] = []  # the held-out runs whose twin replays their host speed
    for label, cfg in runs:
        run_dir = work / f"run-{label}"
        real, was_reused = _reuse_or_run(cfg, run_dir, reuse, f"held-out run {label}", progress, notice, run_and_read)
        if was_reused:
            reused.append(label)
        if progress:
            progress(f"simulating {label}")
        doc = serve_twin_scenario(real, twin_profile, acc_file, law_file, work / f"{label}-trace.csv", colocation,
                                  padding)
        base_dir = suite_path.resolve().parent
        ratio = host_speed_ratio(real, s1)
        replayed = suite.host_speed == "replay" and ratio is not None
        if replayed:
            fixed = simulate_twin(doc, base_dir)
            doc = {**doc, "hardware": {**doc["hardware"], "profile": host_speed_profile(
                doc, base_dir, ratio, work / f"profile-{label}-host.yaml")}}
        atomic_write_text(work / f"twin-{label}.yaml", yaml.safe_dump(doc, sort_keys=False))
        twin = simulate_twin(doc, base_dir)
        if replayed:
            speeds.append(f"{label} x{ratio:.3f}")
        r_rows, s = compare_serve(label, real, twin, suite.tolerances)
        rows += r_rows + pass_rows(label, real, doc, base_dir)
        rows += host_speed_rows(label, real, ratio, fixed if replayed else twin, replayed)
        series.append(s)
        entries.append((label, real, twin))
        tdir = out_dir / f"{suite.name}-traces"
        meas = serve_run_trace(run_dir, f"measured: {label}", pid=1)
        pred = sim_trace(twin.result, f"predicted: {label}", pid=2)
        traces.append(write_trace(meas, tdir / f"{label}-measured.trace.json"))
        traces.append(write_trace(pred, tdir / f"{label}-predicted.trace.json"))
        traces.append(write_trace(combine(meas, pred), tdir / f"{label}-side-by-side.trace.json"))
    fall_behind = fall_behind_rows(entries, suite.tolerances)
    rows += fall_behind
    meta = {
        "title": f"osdsim validate: {suite.name}",
        "suite": str(suite_path),
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": entries[0][1].summary.get("device", "local") if entries else "local",
        "method": (f"fit on S1 (seed {fit_cfg.seed}, {'batched' if fit_cfg.serve else 'batch 1'})"
                   + (f" and, for the acceptance, S1r (seed {fit_runs[1].summary['config']['seed']}, domains "
                      f"{' -> '.join(fit_runs[1].summary['config']['stream'].get('domains') or ['as configured'])})"
                      if len(fit_runs) > 1 else "")
                   + "; predict "
                   f"{len(runs)} held-out served runs ({', '.join(lbl for lbl, _ in runs)}) as open-loop trace "
                   "replays of their exact arrivals and lengths with their batching and placement"
                   + (f" and their host speed measured by the canary vs S1 ({', '.join(speeds)})" if speeds else "")
                   + (f" (real runs {', '.join(reused)} reused)" if reused else "")),
        "profile": profile, "profile_choice": profile_how, "serving_profile": str(serving_path),
        "costs": suite.costs, "serving_fitted_costs": cost_fit.as_dict(), "fitted_acceptance": acc,
        "colocation_probe": None if colocation is None else colocation.as_dict(),
        "capacity_per_s": None if capacity is None else round(capacity, 4),
        "harvest_limit_per_s": None if harvest_limit is None else round(harvest_limit, 4),
        "attention_padding": None if padding is None else round(padding, 4),
        "traces": [p.relative_to(out_dir).as_posix() for p in traces],
        "notes": load_notes() + ([] if not speeds else [
            "Host speed (host_speed: replay): this shared host's speed drifts between runs (other tenants, clocks). "
            f"A fixed 8-token pass of the serving {canary_model(s1)} (the host-speed canary, serve.host_canary) is "
            "timed right after an iteration every serve.host_canary_every_s of every run; each held-out twin prices every pass and training step x (its run's canary median / S1's): "
            + ", ".join(speeds) + ". The rows 'at the fit run's host speed' show the twin without it."]) + [
            f"Pass costs fitted on S1's {cost_fit.passes} recorded passes: median |error| per pass kind with the "
            f"microbenchmark profile {P._fmt_errs(cost_fit.before)}; serving-fitted (in sample) "
            f"{P._fmt_errs(cost_fit.after)}; training time x{cost_fit.train_factor:.3f}. The twins use the "
            f"{suite.costs} profile."] + ([] if padding is None else [
            f"The server's batch caches are padded (one KV tensor per batch, rows left-padded, rejected drafts left "
            f"as holes until compaction): passes are fitted at the widths they attended over, and the twins price "
            f"attention over ρ = {padding:.3f} (S1's median cache width / longest row) × the longest row of each "
            "batch (batching.attention_padding)."]) + ([] if capacity is None else [
            f"Capacity (the saturated throughput S1's twin predicts with the serving-fitted costs, untrained draft, "
            f"no training): {capacity:.3f} req/s"
            + ("" if harvest_limit is None else
               f"; harvest limit (the arrival rate at which S1's twin predicts harvest training falls behind for good, "
               f"S1's requests x{HARVEST_LIMIT_COPIES} on a ramp of {HARVEST_LIMIT_RAMP[0]}-{HARVEST_LIMIT_RAMP[1]} x "
               f"capacity): {harvest_limit:.3f} req/s = {harvest_limit / capacity:.2f} x capacity")
            + ". Runs given as a load are served at that fraction of it (of the harvest limit where load_of says so): "
            + ", ".join(f"{lbl} {_rate_text(cfg.serve)}" for lbl, cfg in runs) + "."
            + "".join(f" Harvest training fell behind for good at {_frac(fb.predicted, capacity)} capacity predicted, "
                      f"{_frac(fb.measured, capacity)} measured." for fb in fall_behind)]) + ([] if colocation is None else [
            f"Co-location probe P (dedicated, {colocation.busy_iterations} iterations with the trainer training, "
            f"{colocation.idle_iterations} without): serving slowdown while the trainer trains "
            f"{colocation.interference * 100:.1f}%, publish delay median {colocation.sync_delay_s * 1e3:.0f} ms, "
            f"trainer step time x{colocation.train_factor:.3f} vs inline; the dedicated twins use them."]),
    }
    return P.ValidationResult(rows=rows, meta=meta, files={"work": work}, series={"load": series})


def _frac(rate: float | None, capacity: float) -> str:
    return "— (never)" if rate is None else f"{rate / capacity:.2f}×"


def _rate_text(sv: Any) -> str:
    if sv.arrival != "poisson":
        return "trace"
    return (f"{sv.rate_per_s:.3f} req/s" if sv.rate_end_per_s is None
            else f"{sv.rate_per_s:.3f} -> {sv.rate_end_per_s:.3f} req/s (ramp)")


def load_notes() -> list[str]:
    return [
        "Known differences of the twin: the simulator reserves prompt + actual output tokens of KV per "
        "request, the server prompt + max_new_tokens (kv_token_budget). Harvest twins train as the server "
        "does: in idle windows only, one minibatch per unit, a begun unit finishing before an arrival joins "
        "(harvest_in_iterations: false, harvest_fraction: 1).",
        "Traces (in <suite>-traces/): open a <run>-side-by-side.trace.json (the measured run and its "
        "prediction as two processes) in ui.perfetto.dev or chrome://tracing; -measured / -predicted hold each alone.",
    ]


def served_observations(run: ServeRun, domains: list[str]) -> Any:
    """A served run's training schedule and α observations, exactly as the server ran them
    (fit.RunObservations for fit.fit_joint_runs).

    - Step j (training.csv `step`) was due when the (j·update_interval)-th request finished, and
      trains on the last `window_requests` requests by finish order (the distiller's buffer takes
      each sample as its request finishes); its tokens per domain are theirs (× epochs).
    - Only done steps move α, in step order; the draft of version v (iterations.csv `draft_version`:
      the last published step) has the done steps with id ≤ v applied.
    - Stream observations: per request and draft version, the accepted drafts and the steps that
      ended in a rejection (accepted < proposed) of its speculative steps run with that version, so
      a request served across a publication counts on both sides of it.
    - Held-out evaluations (alpha.csv): at their `update` (the step id evaluated), weighted as
      held-out prompts × the domain's mean output length (validate.pipeline.fit_acceptance)."""
    from osdsim.validate.fit import RunObservations
    from osdsim.validate.pipeline import _loss_tokens

    cfg = run.summary["config"]
    dist = cfg["distill"]
    interval = int(dist["update_interval"])
    window = int(dist.get("window_requests") or 0) or interval
    epochs = int(dist.get("epochs_per_update", 1))
    positions = dist.get("positions", "all")
    finished = sorted((r for r in run.requests if math.isfinite(_num(r["finish_s"]))),
                      key=lambda r: (_num(r["finish_s"]), int(r["request_index"])))
    done = sorted(int(t["step"]) for t in run.training if t.get("status") == "done")
    step_tokens = np.zeros((len(done), len(domains)))
    for u, j in enumerate(done):
        for r in finished[max(j * interval - window, 0): j * interval]:
            step_tokens[u, domains.index(r["domain"])] += epochs * _loss_tokens(r, positions)
    done_ids = np.array(done, dtype=int)

    def applied(version: int) -> int:
        return int(np.searchsorted(done_ids, version, side="right"))

    domain_of = {int(r["request_index"]): r["domain"] for r in run.requests}
    version_of = {int(it["iteration"]): int(_num(it.get("draft_version") or 0)) for it in run.iterations}
    counts: dict[tuple[int, int], list[int]] = {}
    for st in run.steps:
        key = (int(st["request_index"]), version_of.get(int(st["iteration"]), 0))
        a, proposed = int(_num(st["accepted"])), int(_num(st["proposed"]))
        c = counts.setdefault(key, [0, 0])
        c[0] += a
        c[1] += int(a < proposed)
    od, osteps, y, wts = [], [], [], []
    for (i, v), (a, rej) in sorted(counts.items()):
        if a + rej == 0 or domain_of.get(i) not in domains:
            continue
        od.append(domains.index(domain_of[i]))
        osteps.append(applied(v))
        y.append(a / (a + rej))
        wts.append(a + rej)
    per_prompt = {d: float(np.mean([_num(r["output_tokens"]) for r in run.requests if r["domain"] == d] or [0.0]))
                  for d in domains}
    n_heldout = int(cfg["stream"].get("heldout_per_domain", 0))
    for a in run.alpha:
        if a["domain"] in domains and math.isfinite(_num(a["alpha_heldout"])):
            od.append(domains.index(a["domain"]))
            osteps.append(applied(int(_num(a["update"]))))
            y.append(_num(a["alpha_heldout"]))
            wts.append(n_heldout * per_prompt[a["domain"]])
    return RunObservations(step_tokens, np.array(od, dtype=int), np.array(osteps, dtype=int), np.array(y, dtype=float),
                           np.array(wts, dtype=float))


def fit_served_acceptance(runs: list[ServeRun], k: int, forgetting: bool = False) -> tuple[dict, dict]:
    """(acceptance file dict, empirical law dict) from served fit runs (S1, and S1r where the suite has
    `fit_reverse`): α_0, α_∞, τ per domain and the transfer fitted jointly on every run's
    served_observations (fit.fit_joint_runs); the accepted-length law from the first run's requests."""
    from osdsim.validate.fit import fit_joint_runs
    from osdsim.validate.pipeline import acceptance_files

    first = sorted(runs[0].requests, key=lambda r: int(r["request_index"]))
    domains = list(dict.fromkeys(r["domain"] for run in runs
                                 for r in sorted(run.requests, key=lambda r: int(r["request_index"]))))
    obs = [served_observations(run, domains) for run in runs]
    if sum(int(o.obs_alpha.size) for o in obs) < 3:
        raise ValueError("need at least 3 α observations (speculative steps or held-out checkpoints) to fit α(n)")
    fit = fit_joint_runs(domains, obs, fit_forgetting=forgetting and len(domains) > 1)
    names = " + ".join(str(run.summary.get("config", {}).get("name", "?")) for run in runs)
    return acceptance_files(fit, first, k, f" of {names}", "served steps per draft version + held-out")


def _updates_of(run: ServeRun) -> list[dict]:
    """training.csv rows that ran, as the batch-1 updates the fitters read: requests_seen = requests
    finished by the step's due time, train_s as recorded."""
    fin = sorted(_num(r["finish_s"]) for r in run.requests if math.isfinite(_num(r["finish_s"])))
    out = []
    for t in run.training:
        if t.get("status") != "done":
            continue
        out.append({"requests_seen": int(np.searchsorted(fin, _num(t["due_s"]), side="right")),
                    "train_s": t.get("train_s")})
    return out


def _capacity(s1: ServeRun, s1_reused: bool, profile: str, acc_file: Path, law_file: Path, work: Path,
              base_dir: Path, attention_padding: float | None) -> float:
    """The capacity the held-out rates derive from, recorded beside S1 (S1/capacity.json): a reused S1
    keeps the capacity its held-out runs were served at, so they stay reusable when the twin changes."""
    path = work / "S1" / "capacity.json"
    if s1_reused and path.is_file():
        try:
            return float(json.loads(path.read_text())["capacity_per_s"])
        except (ValueError, KeyError, TypeError):
            pass
    cap = predicted_capacity(s1, profile, acc_file, law_file, work, base_dir, attention_padding)
    atomic_write_text(path, json.dumps({"capacity_per_s": cap, "profile": profile}) + "\n")
    return cap


def _harvest_limit(s1: ServeRun, s1_reused: bool, heldout: Any, capacity: float, profile: str, acc_file: Path,
                   law_file: Path, work: Path, base_dir: Path, attention_padding: float | None) -> float:
    """predicted_harvest_limit, recorded beside S1 (S1/capacity.json) as the capacity is: a reused S1
    keeps the limit its held-out runs were served at."""
    path = work / "S1" / "capacity.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    if s1_reused and "harvest_limit_per_s" in doc:
        return float(doc["harvest_limit_per_s"])
    limit = predicted_harvest_limit(s1, heldout, capacity, profile, acc_file, law_file, work, base_dir,
                                    attention_padding)
    atomic_write_text(path, json.dumps({**doc, "harvest_limit_per_s": limit}) + "\n")
    return limit


def _reuse_or_run(cfg, run_dir, reuse, label, progress, notice, runner):
    from osdsim.validate.pipeline import _recorded_or_run

    if reuse and cfg.serve is not None:
        rec = load_serve_run(run_dir)
        if rec is not None:
            # Batch-1 reader does not know serve runs: check here, then fall through to the shared rule.
            from osdsim.real.config import RealConfig
            from osdsim.validate.fingerprint import device_fingerprint, differences
            from osdsim.validate.pipeline import _same_config, served_otherwise

            same = _same_config(RealConfig, rec.summary.get("config"), cfg)
            diff = differences(rec.summary.get("device_fingerprint"), device_fingerprint(cfg.device, int(cfg.threads)))
            stale = served_otherwise(rec.summary, cfg) if same else None
            if same and not diff and not stale:
                return rec, True
            if notice:
                why = ("another config" if not same else f"a stale serving ({stale})" if stale
                       else f"another or unknown device ({'; '.join(diff)})")
                notice(f"--reuse-runs: {label}: the recorded run has {why}; running it for real")
        reuse = False
    return _recorded_or_run(cfg, run_dir, reuse, label, progress, notice, runner)
