"""`osdsim validate`: fit on one real run, predict a different one, run it for real, compare.

The method (issue 6; docs/architecture.md, The validator), nothing fitted on the run it is judged on:
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
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osdsim.errors import InputError, atomic_write_text, format_validation_error
from osdsim.scenario import load_model_file
from osdsim.specdec import alpha_from_counts, bootstrap_ratio_ci
from osdsim.validate.compare import MetricRow
from osdsim.validate.fingerprint import device_fingerprint, profile_differences, profile_fingerprint
from osdsim.validate.fingerprint import differences as fingerprint_differences
from osdsim.validate.fit import FIT_FORGETTING_DESCRIPTION, empirical_law, fit_joint


class Tolerances(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha_phase_abs: float = Field(0.05, gt=0, description="Mean α per phase, absolute.")
    tokens_per_step_rel: float = Field(0.10, gt=0)
    pass_time_rel: float = Field(0.10, gt=0, description="Draft pass, verify pass, training step.")
    e2e_median_rel: float = Field(0.10, gt=0)
    e2e_p90_rel: float = Field(0.20, gt=0)
    e2e_ks: float = Field(0.30, gt=0, le=1, description="Two-sample KS statistic of per-request latency.")
    total_time_rel: float = Field(0.10, gt=0)
    recovery_rel: float = Field(0.25, gt=0, description="regain_requests (information row: a threshold crossing "
                                "that 30-request phases cannot resolve).")
    regain_alpha_abs: float = Field(0.05, gt=0, description="α regained within a new phase (last third − first third).")
    speedup_rel: float = Field(0.10, gt=0, description="Speedup of OSD over target-only decoding.")
    alpha_rmse_abs: float = Field(0.08, gt=0, description="RMSE of the α trajectory (moving window).")
    publish_rel: float = Field(0.20, gt=0, description="llama.cpp: median publication (GGUF export + reload) per "
                               "update, predicted from the fit run.")


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    profile: str | None = Field(None, description="Hardware profile for the simulation (name or path).")
    calibrate: str = Field("none", description="none | quick | full: calibrate this device first.")
    fit: dict = Field(..., description="Real-run config (osdsim real schema) of the fit run S1.")
    heldout: dict = Field(default_factory=dict, description="Overrides of `fit` for the held-out run S2.")
    alpha_window_requests: int = Field(16, ge=1)
    on_other_device: Literal["calibrate", "refuse"] = Field(
        "calibrate", description="A measured profile made on another device: calibrate this one first, or refuse.")
    costs: Literal["serving", "microbenchmark"] = Field(
        "serving", description="Profile the verdict uses: corrected on the fit run's own passes, or calibrate's alone.")
    fit_forgetting: bool = Field(
        False, description=FIT_FORGETTING_DESCRIPTION)
    tolerances: Tolerances = Field(default_factory=Tolerances)


def load_suite(path: Path) -> Any:
    """A batch-1 Suite, or a LoadSuite (osdsim.validate.load) when the file has `runs:`."""
    from osdsim.validate.load import LoadSuite

    try:
        raw = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        raw = None
    schema = LoadSuite if isinstance(raw, dict) and "runs" in raw else Suite
    suite = load_model_file(path, schema, "validation suite")
    if suite.calibrate not in ("none", "quick", "full"):
        raise InputError(f"{path}: calibrate: must be none, quick or full (got {suite.calibrate!r})")
    if suite.profile is None and suite.calibrate == "none":
        raise InputError(f"{path}: profile: required unless calibrate is quick or full")
    return suite


def check_suite(suite: Any, suite_path: Path) -> None:
    """Everything that can be checked without running: real-run configs and the profile."""
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.real.config import RealConfig
    from osdsim.validate.load import LoadSuite, run_configs

    if isinstance(suite, LoadSuite):
        run_configs(suite, suite_path)
        if suite.profile:
            load_profile(resolve_profile_path(suite.profile, suite_path.resolve().parent))
        return

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


def _loss_tokens(r: dict, positions: str) -> float:
    """Positions a request contributes to distillation (the simulator's `distill.tokens`)."""
    return _num(r["output_tokens"]) if positions == "all" else _num(r["rejections"])


def training_schedule(requests: list[dict], updates: list[dict], cfg: Any, domains: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens each update trained on per domain [U, D], updates applied before each request [N]).

    An update after `requests_seen` requests trains `epochs` passes over the last `window` requests
    (the simulator's progress "trained_tokens"), as osdsim.real's distiller does."""
    rows = sorted(requests, key=lambda r: int(r["request_index"]))
    dist = cfg["distill"]
    window = int(dist.get("window_requests") or 0) or int(dist["update_interval"])
    epochs = int(dist.get("epochs_per_update", 1))
    seen = sorted(int(u["requests_seen"]) for u in updates)
    tokens = np.zeros((len(seen), len(domains)))
    for u, m in enumerate(seen):
        for r in rows[max(m - window, 0) : m]:
            tokens[u, domains.index(r["domain"])] += epochs * _loss_tokens(r, dist.get("positions", "all"))
    before = np.searchsorted(np.array(seen), [int(r["request_index"]) for r in rows], side="right")
    return tokens, before


def fit_acceptance(run: RecordedRun, k: int, forgetting: bool = False) -> tuple[dict, dict]:
    """(acceptance file dict, empirical law dict) from the fit run: α_0, α_∞, τ per domain and the
    transfer, fitted jointly on the stream's requests and the held-out checkpoints (fit.fit_joint)."""
    cfg = run.summary["config"]
    rows = sorted(run.requests, key=lambda r: int(r["request_index"]))
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    step_tokens, before = training_schedule(rows, run.updates, cfg, domains)
    acc = np.array([_num(r["accepted"]) for r in rows])
    rej = np.array([_num(r["rejections"]) for r in rows])
    od = [domains.index(r["domain"]) for r in rows]
    osteps = list(before)
    y = [alpha_from_counts(a, r) if a + r > 0 else 0.0 for a, r in zip(acc, rej, strict=True)]
    wts = list(acc + rej)
    # Held-out α (teacher-forced on held-out prompts = the same acceptance rate): weight = positions
    # examined, about held-out prompts × the domain's mean output length.
    per_prompt = {d: float(np.mean([_num(r["output_tokens"]) for r in rows if r["domain"] == d])) for d in domains}
    n_heldout = int(cfg["stream"].get("heldout_per_domain", 0))
    for a in run.alpha:
        if a["domain"] in domains and math.isfinite(_num(a["alpha_heldout"])):
            od.append(domains.index(a["domain"]))
            osteps.append(min(int(a["update"]), len(step_tokens)))
            y.append(_num(a["alpha_heldout"]))
            wts.append(n_heldout * per_prompt[a["domain"]])
    fit = fit_joint(domains, step_tokens, np.array(od), np.array(osteps), np.array(y), np.array(wts),
                    fit_forgetting=forgetting and len(domains) > 1)
    return acceptance_files(fit, rows, k, "", "stream + held-out")


def acceptance_files(fit: Any, rows: list[dict], k: int, of: str, how: str) -> tuple[dict, dict]:
    """(acceptance file dict, empirical law dict) of a joint fit (fit.JointFit): the curves and the
    transfer, each domain's source naming its observations (`of`, `how`); the accepted-length law from
    `rows` (the fit run's requests, grouped by their α̂)."""
    out_domains = {}
    for d, f in fit.curves.items():
        out_domains[d] = {**f.as_acceptance(f"fitted by osdsim validate on {f.requests} observations{of} "
                                            f"({how}; rmse {f.rmse:.3f})"),
                          "alpha_offline": round(f.alpha_inf, 5)}
    lengths = [[int(x) for x in str(r.get("accepted_lengths", "")).split()] for r in rows]
    alpha = np.array([alpha_from_counts(_num(r["accepted"]), _num(r["rejections"])) for r in rows])
    law = empirical_law(alpha, lengths, k=k, groups=4)
    out = {"transfer": round(fit.transfer, 5), "distillation_helps": False, "domains": out_domains}
    if fit.forgetting_tokens is not None:
        out["forgetting_tokens"] = round(fit.forgetting_tokens, 3)
    return out, law


# --- the simulated twin of a real run ----------------------------------------------------------------
GGUF_DTYPES = {"f32": "fp32", "f16": "fp16", "q8_0": "q8_0", "q4_1": "q4_1", "q4_0": "q4_0"}


def _spec(d: dict, name: str, dtype: str, vocab: int | None = None, gguf: dict | None = None) -> dict:
    """The twin's ModelSpec of a recorded model; `gguf` = {layers, head} types when llama.cpp served
    it (weights in those types, f16 KV cache: llama.cpp's default)."""
    spec = {
        "name": name, "n_layers": d["layers"], "hidden": d["hidden"], "n_heads": d["heads"],
        "n_kv_heads": d["kv_heads"], "ffn": d["ffn"], "vocab": vocab or d["vocab"],
        "dtype": {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32"),
        "tied_embeddings": d.get("tied_embeddings", False),
    }
    if gguf is not None:
        spec["dtype"] = GGUF_DTYPES.get(gguf["layers"], "fp16")
        head = GGUF_DTYPES.get(gguf.get("head") or gguf["layers"], "fp16")
        if head != spec["dtype"]:
            spec["head_dtype"] = head
        spec["kv_dtype"] = "fp16"
    return spec


def run_model_specs(summary: dict) -> dict[str, dict]:
    """The twin's ModelSpecs (as dicts) of a recorded run's target and draft, in its serving dtype;
    where llama.cpp served them, in their GGUF layer and head types."""
    cfg = summary["config"]
    dtype = summary.get("serve_dtype") or cfg["models"].get("serve_dtype") or cfg["models"]["dtype"]
    backend = summary.get("backend") or {}
    gguf: dict = {}
    if backend.get("engine") == "llama.cpp":  # served on llama.cpp: the GGUF types price the passes
        gguf = {"target": {"layers": backend["target_layer_type"], "head": backend.get("head_type")},
                "draft": {"layers": backend["draft_layer_type"], "head": backend.get("head_type")}}
    return {"target": _spec(summary["target"], "real-target", dtype, gguf=gguf.get("target")),
            "draft": _spec(summary["draft"], "real-draft", dtype, summary.get("draft_vocab") or None,
                           gguf=gguf.get("draft"))}


def twin_trace_rows(requests: list[dict], priced_sync: bool = False) -> list[str]:
    """The held-out run as a closed-loop trace: think_s = the pause before a request that is not
    training (target-only baseline decodes, labelling, held-out evaluation, bookkeeping): start_i −
    finish_{i−1} − train_s_{i−1} (− sync_s_{i−1}, the publication of the update, when the twin prices
    it as distill.publish_pause_s). The twin prices the training itself."""
    rows = sorted(requests, key=lambda r: int(r["request_index"]))
    lines = ["arrival_s,domain,prompt_tokens,output_tokens,think_s"]
    prev_finish = prev_train = None
    for r in rows:
        start = _num(r["start_s"])
        think = 0.0 if prev_finish is None else max(start - prev_finish - prev_train, 0.0)
        lines.append(f"{start:.6f},{r['domain']},{int(r['prompt_tokens'])},{max(int(r['output_tokens']), 1)},{think:.6f}")
        prev_finish = _num(r["finish_s"])
        prev_train = _num(r.get("train_s") or 0.0) + (_num(r.get("sync_s") or 0.0) if priced_sync else 0.0)
    return lines


def publish_pause_of(run: Any) -> float:
    """The fit run's median publication time per update (updates' sync_s: GGUF export + reload on
    llama.cpp, the copy into the serving draft on transformers): the twin's distill.publish_pause_s."""
    vals = [x for x in (_num(u.get("sync_s")) for u in run.updates) if math.isfinite(x) and x >= 0]
    return float(np.median(vals)) if vals else 0.0


def twin_scenario(summary: dict, requests: list[dict], profile: str, acc_file: Path, law_file: Path,
                  trace_file: Path, workdir: Path, trace_rows: list[str] | None = None,
                  publish_pause_s: float = 0.0) -> dict:
    cfg = summary["config"]
    train_dtype = cfg["models"]["dtype"]
    doms = sorted({r["domain"] for r in requests})
    atomic_write_text(trace_file, "\n".join(trace_rows or twin_trace_rows(requests, publish_pause_s > 0)) + "\n")
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
    dist = cfg["distill"]
    dt = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    return {
        "name": f"twin-{summary['name']}",
        "seed": int(cfg.get("seed", 0)),
        "models": run_model_specs(summary),
        "hardware": {"profile": profile},
        "batching": {"max_batch_size": 1, "chunked_prefill_tokens": None},
        "strategy": "osd",
        "speculation": {"k": int(cfg["decode"]["k"])},
        "acceptance": {"file": str(acc_file), "law": "empirical", "empirical_file": str(law_file)},
        # As osdsim.real trains: inline between requests, in the training dtype, `epochs` passes over
        # the last `window` requests in padded minibatches, the LM head only at distilled positions.
        "distill": {"placement": "inline", "update_interval_requests": int(dist["update_interval"]),
                    "window_requests": int(dist.get("window_requests") or dist["update_interval"]),
                    "tokens": "all" if dist.get("positions", "all") == "all" else "target",
                    "trainable": "layers", "train_dtype": dt.get(train_dtype, "fp32"),
                    "train_vocab": int(summary["draft"]["vocab"]),
                    "epochs_per_step": int(dist.get("epochs_per_update", 1)),
                    "batch_sequences": int(dist.get("batch_size", 8)), "logits_at": "loss",
                    "progress": "trained_tokens", "publish_pause_s": round(float(publish_pause_s), 6)},
        "workload": {"arrival": "trace", "trace_file": str(trace_file), "trace_replay": "closed",
                     "domains": {d: {} for d in doms}, "shift": {"unit": "requests", "phases": phases}},
        "report": {"alpha_window_requests": 8},
    }


# --- comparison ----------------------------------------------------------------------------------
@dataclass
class ValidationResult:
    rows: list[MetricRow]
    meta: dict
    files: dict[str, Path] = field(default_factory=dict)
    series: dict = field(default_factory=dict)  # α trajectories and latencies, for the plots


def _bootstrap_alpha_ci(rows: list[dict], resamples: int = 2000) -> tuple[float, float] | None:
    """95% interval of a phase's pooled α̂ when its requests are resampled (prompt-to-prompt
    variation: how far another stream of as many requests could land). Fixed seed: deterministic."""
    acc = np.array([_num(r["accepted"]) for r in rows])
    return bootstrap_ratio_ci(acc, acc + np.array([_num(r["rejections"]) for r in rows]), resamples)


def _real_alpha(rows: list[dict]) -> float:
    return alpha_from_counts(sum(_num(r["accepted"]) for r in rows), sum(_num(r["rejections"]) for r in rows))


def compare_runs(real: Any, sim: Any, suite: Suite, k: int, nospec: Any = None,
                 series: dict | None = None, notes: list[str] | None = None) -> list[MetricRow]:
    from scipy.stats import ks_2samp

    tol = suite.tolerances
    reqs = sorted(real.requests, key=lambda r: int(r["request_index"]))
    rows: list[MetricRow] = []
    sim_phases = sim.summary["phases"]
    for i, ph in enumerate(sim_phases):
        real_rows = [r for r in reqs if int(r["phase"]) == i]
        rows.append(MetricRow(f"α, phase {ph['phase']}", ph["alpha_mean"], _real_alpha(real_rows), tol.alpha_phase_abs,
                              "abs", measured_ci=_bootstrap_alpha_ci(real_rows)))
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
    rows.append(MetricRow(f"α trajectory RMSE ({w}-request window)", rmse, None, tol.alpha_rmse_abs, "score"))
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
        # The cost model alone, pass by pass: each real step priced at its own context length.
        for label, ape in _per_pass_errors(sim, reqs, real_steps, k).items():
            rows.append(MetricRow(label, ape, None, tol.pass_time_rel, "score"))
        # The host's own speed over the run, from the target-only baseline decodes spread through
        # it: information rows that tell a slower or drifting machine apart from a wrong cost model.
        speed = host_speed_index(sim, reqs)
        if len(speed) >= 2:
            ratios = [x for _, x in speed]
            rows.append(MetricRow(
                f"host speed drift: target-only decode measured/predicted, p90/p10 − 1 over {len(speed)} "
                "baseline requests (information)",
                float(np.percentile(ratios, 90) / np.percentile(ratios, 10) - 1.0), None, tol.pass_time_rel, "score",
                gate=False))
            for label, ape in _per_pass_errors(sim, reqs, real_steps, k, speed).items():
                rows.append(MetricRow(label, ape, None, tol.pass_time_rel, "score", gate=False))
    real_train = [x for x in (_num(u.get("train_s")) for u in real.updates) if math.isfinite(x)]
    sim_train = sim.training[sim.training["kind"] == "done"]["duration_s"]
    if real_train and len(sim_train):
        rows.append(MetricRow("training step time", float(sim_train.mean()), float(np.mean(real_train)),
                              tol.pass_time_rel, unit="s"))
    if (real.summary.get("backend") or {}).get("engine") == "llama.cpp":
        # The server exports the draft to GGUF and reloads it after every update (blocking serving):
        # predicted = the fit run's median (the twin's publish_pause_s), measured = this run's.
        real_sync = [x for x in (_num(u.get("sync_s")) for u in real.updates) if math.isfinite(x)]
        if real_sync:
            rows.append(MetricRow("publish per update (GGUF export + reload), median",
                                  float(sim.scenario.distill.publish_pause_s), float(np.median(real_sync)),
                                  tol.publish_rel, unit="s"))
    real_e2e = np.array([_num(r["finish_s"]) - _num(r["start_s"]) for r in reqs])
    sim_e2e = sim.requests["e2e_s"].dropna().to_numpy()
    if series is not None:
        shifts = [int(i) + 1 for i in np.flatnonzero(np.diff([int(r["phase"]) for r in reqs]))]
        series.update(window=w, alpha_measured=ra.tolist(), alpha_predicted=pa.tolist(), shifts=shifts,
                      e2e_measured=real_e2e.tolist(), e2e_predicted=sim_e2e.tolist())
    rows.append(MetricRow("end-to-end latency, median", float(np.median(sim_e2e)), float(np.median(real_e2e)),
                          tol.e2e_median_rel, unit="s"))
    rows.append(MetricRow("end-to-end latency, p90", float(np.percentile(sim_e2e, 90)), float(np.percentile(real_e2e, 90)),
                          tol.e2e_p90_rel, unit="s"))
    rows.append(MetricRow("end-to-end latency, KS statistic", float(ks_2samp(sim_e2e, real_e2e).statistic), None,
                          tol.e2e_ks, "score"))
    rows.append(MetricRow("total run time", float(sim.requests["finish_s"].max()),
                          float(max(_num(r["finish_s"]) for r in reqs)), tol.total_time_rel, unit="s"))
    # Speedup of OSD over target-only decoding, as the real run measures it: output tokens per second
    # of decoding (after the first token), serving only and with the inline training time added.
    if nospec is not None:
        base = [r for r in reqs if str(r.get("baseline_tokens", "")) not in ("", "0")]
        if base:
            base_tps = sum(_num(r["baseline_tokens"]) for r in base) / sum(_num(r["baseline_decode_s"]) for r in base)
            spec_tokens = sum(_num(r["output_tokens"]) for r in reqs)
            spec_s = sum(_num(r["decode_s"]) for r in reqs)
            train_s = sum(_num(r.get("train_s") or 0.0) for r in reqs)
            p_osd, p_train = _decode_time(sim.requests), float(sim_train.sum()) if len(sim_train) else 0.0
            p_base = _decode_time(nospec.requests)
            rows.append(MetricRow("speedup of OSD over no speculation (decode)", p_base / p_osd,
                                  (spec_tokens / spec_s) / base_tps, tol.speedup_rel))
            rows.append(MetricRow("speedup of OSD over no speculation (incl. training)", p_base / (p_osd + p_train),
                                  (spec_tokens / (spec_s + train_s)) / base_tps, tol.speedup_rel))
            if notes is not None:
                notes.append(speedup_note(sim.requests, nospec.requests, p_osd, p_base, spec_tokens, spec_s,
                                          base_tps, len(base), len(reqs)))
    # After each shift: the α regained within the new phase (pooled α of its last third − its first
    # third: hundreds of examined positions each, resolvable in 30 requests), gated; and regain_requests
    # (requests until the α of the last w requests is back at the w requests before the shift), shown
    # for information: a threshold crossing of a noisy moving window that such phases cannot resolve.
    phase_of = np.array([int(r["phase"]) for r in reqs])
    sim_acc = sim_req["accepted_tokens"].to_numpy(dtype=float)
    sim_rej = sim_req["rejections"].to_numpy(dtype=float)
    for at in np.flatnonzero(np.diff(phase_of)) + 1:
        end = int(np.flatnonzero(phase_of == phase_of[at])[-1]) + 1
        name = f"{reqs[at - 1]['domain']} -> {reqs[at]['domain']}"
        rows.append(MetricRow(f"α regained after {name} (last third − first third of the phase)",
                              alpha_regained(sim_acc, sim_rej, int(at), end), alpha_regained(ra_acc, ra_rej, int(at), end),
                              tol.regain_alpha_abs, "abs", measured_ci=_bootstrap_regain_ci(ra_acc, ra_rej, int(at), end)))
        predicted = regain_requests(sim_acc, sim_rej, int(at), end, w)
        measured = regain_requests(ra_acc, ra_rej, int(at), end, w)
        length = float(end - at)
        rows.append(MetricRow(f"regain_requests after {name} (requests to regain the pre-shift α; {end - at:.0f} if never)",
                              length if predicted is None else predicted, length if measured is None else measured,
                              tol.recovery_rel, gate=False))
        if notes is not None:
            notes.append(regain_note(ra_acc, ra_rej, int(at), end, w, name))
    return rows


def _pooled(accepted: np.ndarray, rejections: np.ndarray, lo: int, hi: int) -> float:
    return alpha_from_counts(float(accepted[lo:hi].sum()), float(rejections[lo:hi].sum()))


def _fmt_errs(d: dict) -> str:
    return ", ".join(f"{k} {v * 100:.1f}%" for k, v in d.items()) or "n/a"


def alpha_regained(accepted: np.ndarray, rejections: np.ndarray, at: int, end: int) -> float:
    """Pooled α of the last third of the phase [at, end) minus that of its first third."""
    third = max((end - at) // 3, 1)
    return _pooled(accepted, rejections, end - third, end) - _pooled(accepted, rejections, at, at + third)


def _bootstrap_regain_ci(accepted: np.ndarray, rejections: np.ndarray, at: int, end: int,
                         resamples: int = 2000) -> tuple[float, float] | None:
    """95% interval of alpha_regained when each third's requests are resampled (fixed seed)."""
    third = max((end - at) // 3, 1)
    if third < 2:
        return None
    rng = np.random.default_rng(0)
    parts = []
    for lo in (at, end - third):
        a, r = accepted[lo : lo + third], rejections[lo : lo + third]
        idx = rng.integers(0, third, size=(resamples, third))
        parts.append(a[idx].sum(axis=1) / np.maximum((a[idx] + r[idx]).sum(axis=1), 1e-12))
    lo_, hi_ = np.percentile(parts[1] - parts[0], [2.5, 97.5])
    return float(lo_), float(hi_)


def regain_note(accepted: np.ndarray, rejections: np.ndarray, at: int, end: int, window: int, name: str) -> str:
    """Why regain_requests is not gated: how far the measured crossing moves when requests are resampled."""
    rng = np.random.default_rng(1)
    n = end - at
    draws = []
    for _ in range(200):
        idx = np.concatenate([np.arange(max(at - window, 0), at), at + np.sort(rng.integers(0, n, n))])
        a, r = accepted[idx], rejections[idx]
        got = regain_requests(a, r, at - max(at - window, 0), len(idx), window)
        draws.append(float(n) if got is None else got)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return (f"regain_requests after {name} is shown, not gated: resampling the phase's own requests moves the "
            f"measured value over [{lo:.0f}, {hi:.0f}] requests of {n} (a {window}-request moving window crossing a "
            f"threshold); the gated statistic is the α regained within the phase (pooled thirds).")


def speedup_note(sim_req: Any, nospec_req: Any, p_osd: float, p_base: float, spec_tokens: float, spec_s: float,
                 base_tps: float, n_base: int, n_req: int) -> str:
    """Where a speedup error comes from: the OSD decode rate, the target-only rate, or both."""
    p_osd_tps = float(sim_req["output_tokens"].sum()) / p_osd if p_osd > 0 else math.nan
    p_base_tps = float(nospec_req["output_tokens"].sum()) / p_base if p_base > 0 else math.nan
    m_osd_tps = spec_tokens / spec_s if spec_s > 0 else math.nan

    def err(p: float, m: float) -> str:
        return f"{(p - m) / m * 100:+.1f}%" if m and math.isfinite(p) and math.isfinite(m) else "n/a"

    return (f"speedup = OSD decode rate / target-only rate. OSD: predicted {p_osd_tps:.1f} vs measured "
            f"{m_osd_tps:.1f} tokens/s ({err(p_osd_tps, m_osd_tps)}, over all {n_req} requests); target-only: "
            f"predicted {p_base_tps:.1f} vs measured {base_tps:.1f} tokens/s ({err(p_base_tps, base_tps)}; measured on "
            f"only {n_base} baseline requests, predicted over all {n_req}). A speedup miss is the ratio of these two errors.")


def regain_requests(accepted: np.ndarray, rejections: np.ndarray, at: int, end: int, window: int) -> float | None:
    """Requests served in the new phase [at, end) until the pooled α of the last `window` of them
    first reaches the pooled α of the `window` requests before the shift (None: never). Named apart
    from the simulator's `recovery` (summary["recovery"]: the served α model back near its target)."""
    level = _pooled(accepted, rejections, max(at - window, 0), at)
    if not math.isfinite(level):
        return None
    for last in range(at + window, end + 1):
        if _pooled(accepted, rejections, last - window, last) >= level:
            return float(last - at)
    return None


def _decode_time(requests: Any) -> float:
    """Σ decode seconds (first token to finish) of a simulated run's requests."""
    return float((requests["finish_s"] - requests["first_token_s"]).sum())


def _cost_models(sim: Any) -> tuple[Any, Any]:
    """(draft, target) CostModels of the twin's scenario under its profile."""
    from osdsim.cost.model import CostModel
    from osdsim.sim.engine import load_scenario_profile

    sc = sim.scenario
    prof = load_scenario_profile(sc)
    return CostModel(sc.draft, prof), CostModel(sc.target, prof)


def host_speed_index(sim: Any, reqs: list[dict]) -> list[tuple[float, float]]:
    """(start_s, measured / predicted) of every baseline request's target-only decode, in time order.

    The baseline decodes (real.specdec.target_generate and its llama.cpp twin: a prefill of prompt[:-1],
    then one 1-token pass per output token at cache lengths prompt − 1 + j) are spread through each
    phase and run the very kernels the profile prices, so their ratio to the profile is the host's
    speed at that moment (1 = as calibrated, 1.2 = 20% slower): a machine that drifts over minutes
    shows here, independently of the draft, the acceptance and the speculative passes."""
    _, target = _cost_models(sim)
    out = []
    for r in reqs:
        n, meas = _num(r.get("baseline_tokens", "")), _num(r.get("baseline_decode_s", ""))
        if not (math.isfinite(n) and math.isfinite(meas)) or n < 1 or meas <= 0:
            continue
        ctx0 = int(_num(r["prompt_tokens"])) - 1
        pred = sum(target.decode_time(1, ctx0 + j) for j in range(int(n)))
        out.append((_num(r["start_s"]), meas / pred))
    return sorted(out)


def _per_pass_errors(sim: Any, reqs: list[dict], steps: list[dict], k: int,
                     speed: list[tuple[float, float]] | None = None) -> dict[str, float]:
    """Median absolute relative error of the cost model on every real draft step (k passes) and
    verify pass, each priced at its own context (prompt + tokens emitted before the step).

    With `speed` (host_speed_index), each prediction is scaled by the host's speed at its request's
    start (linear between baseline requests, constant beyond): the error left once the machine's
    drift over the run is taken out (an information row, not a prediction)."""
    draft, target = _cost_models(sim)
    prompt = {int(r["request_index"]): int(_num(r["prompt_tokens"])) for r in reqs}
    scale: dict[int, float] = {}  # per request; 1 where absent
    if speed:
        at, ratio = np.array([t for t, _ in speed]), np.array([x for _, x in speed])
        scale = {int(r["request_index"]): float(np.interp(_num(r["start_s"]), at, ratio)) for r in reqs}
    emitted: dict[int, int] = {}
    d_err, v_err = [], []
    for st in steps:
        rid = int(st["request_index"])
        ctx = prompt.get(rid, 0) + 1 + emitted.get(rid, 0)  # the prefill emitted the first token
        emitted[rid] = emitted.get(rid, 0) + int(_num(st["emitted"]))
        d_meas, v_meas = _num(st["draft_s"]), _num(st["verify_s"])
        f = scale.get(rid, 1.0)
        if d_meas > 0:
            d_pred = f * sum(draft.decode_time(1, ctx + j) for j in range(k))
            d_err.append(abs(d_pred - d_meas) / d_meas)
        if v_meas > 0:
            v_err.append(abs(f * target.decode_time(1, ctx, tokens_per_seq=k + 1) - v_meas) / v_meas)
    tail = ", host drift taken out (information)" if speed else ""
    out = {}
    if d_err:
        out[f"cost model per pass: draft step, median |error| over {len(d_err)} real steps{tail}"] = float(np.median(d_err))
    if v_err:
        out[f"cost model per pass: verify, median |error| over {len(v_err)} real passes{tail}"] = float(np.median(v_err))
    return out


def _predicted_pass_times(sim: Any, k: int) -> tuple[float, float]:
    req = sim.requests
    ctx = float((req["prompt_tokens"] + req["output_tokens"] / 2).mean())
    draft, target = _cost_models(sim)
    return k * draft.decode_time(1, ctx), target.decode_time(1, ctx, tokens_per_seq=k + 1)


# --- serving-fitted pass costs (issue 12, 5a) ---------------------------------------------------------
def serving_fitted_profile(s1: Any, k: int, profile: str, acc_file: Path, law_file: Path, work: Path,
                           suite_path: Path, twin_fn: Any = None, publish_pause_s: float = 0.0) -> tuple[Path, Any]:
    """The profile corrected on S1's own recorded passes (costfit.fit_pass_costs), and its training
    time scaled by S1's measured / twin-predicted training-step time; written to the work directory."""
    from osdsim.api import simulate
    from osdsim.scenario import scenario_from_dict
    from osdsim.sim.engine import load_scenario_profile
    from osdsim.validate import costfit

    twin_fn = twin_fn or (lambda prof: twin_scenario(s1.summary, s1.requests, prof, acc_file, law_file,
                                                     work / "S1-trace.csv", work, publish_pause_s=publish_pause_s))
    sc = scenario_from_dict(twin_fn(profile), base_dir=suite_path.resolve().parent, source="twin scenario of S1")
    micro = load_scenario_profile(sc)
    fit, corrected = costfit.fit_pass_costs(costfit.recorded_passes(s1, k), sc.draft, sc.target, micro)
    out = work / "profile-serving.yaml"
    att = ("" if fit.attention_flops is None else
           f", attention kernel at {fit.attention_flops:.4f} of peak / KV at {fit.kv_bandwidth or 0:.4f} of bandwidth")
    half = "" if fit.flops_half_tokens is None else f", GEMM ramp t_half {fit.flops_half_tokens:.1f} tokens"
    note = (f"Pass costs corrected on {fit.passes} recorded serving passes of the fit run: compute x{fit.scale:.3f}, "
            f"memory x{fit.bytes_scale:.3f}{half}{att}, kernel overhead {fit.kernel_overhead_s_per_layer * 1e6:.1f} "
            f"us/layer, pass overhead {fit.pass_overhead_s * 1e3:.3f} ms "
            f"({'/'.join(dict.fromkeys([sc.target.dtype, sc.draft.dtype]))}).")
    costfit.write_profile(corrected, out, note)
    real_train = [x for x in (_num(u.get("train_s")) for u in s1.updates) if math.isfinite(x) and x > 0]
    if real_train and sc.strategy != "no-spec":
        sim = simulate(scenario_from_dict(twin_fn(str(out)), base_dir=suite_path.resolve().parent, source="twin of S1"))
        done = sim.training[sim.training["kind"] == "done"]["duration_s"]
        if len(done) and float(done.mean()) > 0:
            fit.train_factor = float(np.mean(real_train)) / float(done.mean())
            # From the in-memory profile, not the file just written: that one already carries the
            # note and the '-serving' name, which write_profile would add a second time.
            corrected = costfit.scale_training(corrected, sc.distill.train_dtype or sc.draft.dtype, fit.train_factor)
            costfit.write_profile(corrected, out, note + f" Training steps x{fit.train_factor:.3f} (S1 measured / predicted).")
    return out, fit


# --- the whole method ------------------------------------------------------------------------------
@dataclass
class RecordedRun:
    """A finished real run read back from its output directory (requests/steps/updates CSV + summary)."""

    summary: dict
    requests: list[dict]
    steps: list[dict]
    updates: list[dict]
    alpha: list[dict] = field(default_factory=list)  # held-out α checkpoints


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

    alpha = rows("alpha.csv") if (run_dir / "alpha.csv").is_file() else []
    return RecordedRun(summary, rows("requests.csv"), rows("steps.csv"), rows("updates.csv"), alpha)


def served_otherwise(summary: dict, cfg: Any) -> str | None:
    """Why a recorded run with `cfg`'s config no longer stands for it, or None: a llama.cpp run whose
    draft was published in another GGUF type than this version of osdsim publishes for the config
    (auto became 'at least q8_0': Q4_1 rounded the distillation updates away)."""
    backend = summary.get("backend") or {}
    if backend.get("engine") != "llama.cpp":
        return None
    from osdsim.real.llamacpp import served_draft_type

    want = served_draft_type(cfg.models.gguf_draft_type, backend.get("target_layer_type"))
    got = backend.get("draft_layer_type")
    return None if got == want else f"its draft was served in {got}, this config serves it in {want}"


def _recorded_or_run(cfg: Any, run_dir: Path, reuse: bool, label: str, progress, notice,
                     runner: Any = None) -> tuple[Any, bool]:
    """A recorded run whose config equals `cfg` and that was recorded on this device (with
    --reuse-runs), or a fresh real run (stamped with this device's fingerprint)."""
    from osdsim.real.config import RealConfig

    here = device_fingerprint(cfg.device, int(cfg.threads))
    if reuse:
        rec = load_recorded(run_dir)
        why = None
        if rec is None:
            why = "none recorded"
        elif not _same_config(RealConfig, rec.summary.get("config"), cfg):
            why = "the recorded run has another config"
        elif served_otherwise(rec.summary, cfg):
            why = f"the recorded run is stale ({served_otherwise(rec.summary, cfg)})"
        else:
            diff = fingerprint_differences(rec.summary.get("device_fingerprint"), here)
            if not diff:
                return rec, True
            why = ("it was recorded on an unknown device (no device fingerprint)" if "device_fingerprint" not in rec.summary
                   else f"it was recorded on another device ({'; '.join(diff)})")
        if notice:
            notice(f"--reuse-runs: {label}: {why} in {run_dir}; running it for real")
    if progress:
        progress(f"{label} (real)")
    if runner is None:
        from osdsim.real.run import run_real as runner
    try:
        run = runner(cfg, run_dir)
    except ValueError as exc:  # e.g. a CUDA device asked for but absent
        raise InputError(f"{label}: {str(exc).splitlines()[0]}") from None
    stamp_fingerprint(run, run_dir, here)
    return run, False


def stamp_fingerprint(run: Any, run_dir: Path, fp: dict) -> None:
    """Record the device a run was made on in its summary (and summary.json) when the real side did not."""
    import json

    if isinstance(run.summary, dict) and "device_fingerprint" not in run.summary:
        run.summary["device_fingerprint"] = fp
        path = run_dir / "summary.json"
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except ValueError:
                return
            doc["device_fingerprint"] = fp
            atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


@dataclass
class RealConfigLike:
    """What resolve_profile needs of a real-run config (tests pass this instead of a RealConfig)."""

    device: str = "cpu"
    threads: int = 1


def resolve_profile(suite: Suite, suite_path: Path, work: Path, cfg: Any, calibrate_fn, calibrate_given: bool,
                    notice=None, progress=None) -> tuple[str, str]:
    """(profile path, how it was chosen): the suite's profile, or a calibration of this device when the
    suite calibrates or its measured profile was made on another device (refused with one line when
    the suite or --calibrate none says not to calibrate)."""
    from osdsim.cost.profile import load_profile, resolve_profile_path

    mode = suite.calibrate
    how = "suite profile"
    if mode == "none":
        if not suite.profile:
            raise InputError(f"{suite_path}: profile: required unless calibrate is quick or full")
        path = resolve_profile_path(suite.profile, suite_path.resolve().parent)  # type: ignore[arg-type]
        fingerprint = device_fingerprint(cfg.device, int(cfg.threads))
        backend = serving_backend(cfg)
        prof = load_profile(path)
        if not prices_backend(prof, backend):
            raise InputError(f"{path}: profile prices {'llama.cpp' if 'llama.cpp' in str(prof.device) else 'PyTorch'} "
                             f"passes but the suite's runs serve on {backend}; give a profile of that backend")
        diff = profile_differences(prof, fingerprint)
        if not diff:
            return str(path), f"{suite.profile} (measured on this device)"
        where = "; ".join(diff)
        mate = measured_profile_of(path.resolve().parent, fingerprint, backend)
        if mate is not None:
            return str(mate), f"{mate.name} (measured on this device; {path.name} was measured on another: {where})"
        if calibrate_given or suite.on_other_device == "refuse":
            raise InputError(f"{path}: profile was measured on another device ({where}); "
                             "calibrate this one (--calibrate full) or give a profile of this device")
        if notice:
            notice(f"profile {path.name} was measured on another device ({where}): calibrating this one (full grid)")
        mode, how = "full", f"calibrated here (full grid): {path.name} was measured on another device ({where})"
    else:
        how = f"calibrated here ({mode} grid)"
    if calibrate_fn is None:
        raise InputError("calibrate: this osdsim has no calibrate command installed")
    if progress:
        progress(f"calibrating this device ({mode})")
    # The device the real runs use (a GPU suite calibrates the GPU), on their serving backend.
    extra = {"backend": "llamacpp"} if serving_backend(cfg) == "llamacpp" else {}
    return str(calibrate_fn(work / "profile.yaml", quick=mode == "quick", device=cfg.device,
                            threads=int(cfg.threads), **extra)), how


def serving_backend(cfg: Any) -> str:
    """The real runs' serving engine: transformers or llamacpp (a profile prices one of them)."""
    return str(getattr(getattr(cfg, "models", None), "backend", "transformers"))


def prices_backend(prof: Any, backend: str) -> bool:
    """Whether a profile prices passes of this serving backend (llama.cpp profiles say so in `device`)."""
    return ("llama.cpp" in str(prof.device)) == (backend == "llamacpp")


def measured_profile_of(directory: Path, fingerprint: dict, backend: str = "transformers") -> Path | None:
    """A measured profile in `directory` (e.g. calibration/) made on the device of `fingerprint` for the
    serving `backend`, if any (datasheet profiles carry no device and never match; a llama.cpp profile
    prices only llama.cpp runs, a torch profile only transformers runs)."""
    from osdsim.cost.profile import load_profile

    for path in sorted(directory.glob("*.yaml")):
        try:
            prof = load_profile(path)
        except (InputError, OSError, ValueError):
            continue
        if not prices_backend(prof, backend):
            continue
        if profile_fingerprint(prof) is not None and not profile_differences(prof, fingerprint):
            return path
    return None


def _same_config(schema: Any, recorded: Any, cfg: Any) -> bool:
    """Recorded config == cfg, read through today's schema (fields added since take their defaults)."""
    try:
        return schema(**recorded).model_dump(mode="json") == cfg.model_dump(mode="json")
    except (TypeError, ValueError):
        return False


def calibrate_here(path: Path, quick: bool, device: str = "cpu", threads: int = 1, backend: str = "torch") -> Path:
    """Measure this device in-process (osdsim.calibrate's API) and write the profile to `path`
    (backend llamacpp: llama.cpp passes of the packaged GGUF, as `osdsim calibrate --backend llamacpp`)."""
    from osdsim.calibrate import devices
    from osdsim.calibrate import run as cal

    torch = cal.import_torch()
    if backend == "llamacpp":
        from osdsim.calibrate import llamacpp as lcal

        if device not in ("cpu", "auto"):
            raise InputError(f"calibrate: the llamacpp backend runs on the CPU (got device {device})")
        name = lcal.profile_name(devices.profile_name(cal.detect(torch, "cpu", threads)))
        command = (f"osdsim calibrate --gpu cpu --backend llamacpp --threads {threads} --out {path} --force"
                   + (" --quick" if quick else ""))

        def measure() -> Any:
            return lcal.calibrate_llamacpp(name, quick, threads, command)
    else:
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"calibrate: device {device}: no CUDA device here")
        name = devices.profile_name(cal.detect(torch, dev, threads))
        command = f"osdsim calibrate --device {dev} --threads {threads} --out {path} --force" + (" --quick" if quick else "")

        def measure() -> Any:
            return cal.calibrate(cal.Options(dev, name, quick, threads, command))
    old = torch.get_num_threads()
    try:
        outcome = measure()
    finally:
        torch.set_num_threads(old)
    path.parent.mkdir(parents=True, exist_ok=True)
    yaml_path, _, _ = cal.write_outputs(outcome, path, force=True)
    return yaml_path


def run_validation(suite: Suite, suite_path: Path, out_dir: Path, progress=None, calibrate_fn=None,
                   reuse: bool = False, notice=None, calibrate_given: bool = False) -> ValidationResult:
    from osdsim.validate.load import LoadSuite, run_load_validation

    if isinstance(suite, LoadSuite):
        return run_load_validation(suite, suite_path, out_dir, progress, calibrate_fn, reuse, notice, calibrate_given)
    from osdsim.api import simulate
    from osdsim.real.config import RealConfig
    from osdsim.scenario import scenario_from_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    work = (out_dir / f"{suite.name}-work").resolve()
    try:
        fit_cfg = RealConfig(**suite.fit)
        held_cfg = RealConfig(**_merge(suite.fit, suite.heldout))
    except ValidationError as exc:
        raise InputError(f"{suite_path}: fit/heldout: {format_validation_error(exc)}") from None
    profile, profile_how = resolve_profile(suite, suite_path, work, held_cfg, calibrate_fn, calibrate_given,
                                           notice, progress)
    s1, s1_reused = _recorded_or_run(fit_cfg, work / "S1", reuse, "fit run S1", progress, notice)
    k = int(fit_cfg.decode.k)
    try:
        acc, law = fit_acceptance(s1, k, suite.fit_forgetting)
    except ValueError as exc:
        raise InputError(f"{suite_path}: fit run S1 cannot be fitted: {exc}") from None
    acc_file, law_file = work / "acceptance.yaml", work / "accepted_lengths.yaml"
    atomic_write_text(acc_file, yaml.safe_dump(acc, sort_keys=False))
    atomic_write_text(law_file, yaml.safe_dump(law, sort_keys=False))
    if progress:
        progress("fitting pass costs on S1's recorded passes")
    pause = publish_pause_of(s1)
    serving_path, cost_fit = serving_fitted_profile(s1, k, profile, acc_file, law_file, work, suite_path,
                                                    publish_pause_s=pause)
    serving_profile = str(serving_path)
    s2, s2_reused = _recorded_or_run(held_cfg, work / "S2", reuse, "held-out run S2", progress, notice)
    if progress:
        progress("simulating S2")
    variants = {"serving": serving_profile, "microbenchmark": profile}
    main_costs = suite.costs
    results = {}
    for label, prof_path in variants.items():
        twin = twin_scenario(s2.summary, s2.requests, prof_path, acc_file, law_file, work / "S2-trace.csv", work,
                             publish_pause_s=pause)
        if label == main_costs:
            atomic_write_text(work / "twin-scenario.yaml", yaml.safe_dump(twin, sort_keys=False))
        sc = scenario_from_dict(twin, base_dir=suite_path.resolve().parent, source="twin scenario")
        sim = simulate(sc)
        sim.scenario = sc
        nospec = simulate(sc.model_copy(update={"strategy": "no-spec"}))
        results[label] = (sim, nospec)
    series: dict = {}
    sim, nospec = results[main_costs]
    notes: list[str] = []
    rows = compare_runs(s2, sim, suite, int(held_cfg.decode.k), nospec=nospec, series=series, notes=notes)
    other = "microbenchmark" if main_costs == "serving" else "serving"
    o_sim, o_nospec = results[other]
    rows += [MetricRow(f"{other} profile: {r.name}", r.predicted, r.measured, r.tolerance, r.kind, r.unit,
                       r.measured_ci, gate=False)
             for r in compare_runs(s2, o_sim, suite, int(held_cfg.decode.k), nospec=o_nospec)
             if not r.name.startswith("α")]
    reused = [name for name, r in (("S1", s1_reused), ("S2", s2_reused)) if r]
    traces = []
    if len(sim.iterations) and "kind" in sim.iterations and not (sim.iterations["kind"] == "bin").any():
        from osdsim.validate.trace import sim_trace, write_trace

        # The batch-1 real run records no per-iteration clock (only per-request start/finish), so only
        # the prediction has a timeline here; served runs (load suites) write both.
        traces.append(write_trace(sim_trace(sim, f"predicted: {suite.name} S2"),
                                  out_dir / f"{suite.name}-traces" / "S2-predicted.trace.json")
                      .relative_to(out_dir).as_posix())
    meta = {
        "title": f"osdsim validate: {suite.name}",
        "suite": str(suite_path),
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": s2.summary.get("device", "local"),
        "method": f"fit on S1 (seed {fit_cfg.seed}), predict held-out S2 (seed {held_cfg.seed}) as a closed-loop "
        "trace replay" + (f" (real runs {' and '.join(reused)} reused from the work directory)" if reused else ""),
        "profile": profile,
        "profile_choice": profile_how,
        "costs": f"the {main_costs} profile gates the result; rows named '{other} profile: …' are the same "
                 f"comparison with the {other} profile, for information",
        "serving_fitted_costs": cost_fit.as_dict(),
        "serving_profile": str(serving_profile),
        "fitted_acceptance": acc,
        "traces": traces,
        "notes": notes + [f"Pass costs: microbenchmark-only median |error| per pass kind on S1 "
                          f"{_fmt_errs(cost_fit.before)}; serving-fitted (in sample) {_fmt_errs(cost_fit.after)}."],
    }
    return ValidationResult(rows=rows, meta=meta, files={"work": work}, series=series)
