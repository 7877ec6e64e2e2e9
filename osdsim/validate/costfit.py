"""Pass costs fitted where they are observed: on the fit run's own recorded passes (issue 12, 5a).

`osdsim calibrate` measures isolated passes (microbenchmarks); a serving loop runs the same passes
between Python bookkeeping, sampling, cache copies and other work that the microbenchmarks never
see. Here every recorded draft step (k draft passes) and verify pass of the fit run is priced with
the profile's cost model (osdsim.cost.model.CostModel, public pricing only) and one correction is
fitted on top of the profile, for the efficiency block of each dtype the two models are priced in:

    measured ≈ max(s_f · compute(pass; t½), s_b · memory(pass)) + passes · (L · t_layer + t_pass)

by least squares on relative error (every pass weighs the same; a soft-L1 loss so that passes a
busy machine stretched do not pull the fit). s_f and s_b scale the compute and memory terms (η_f
divided by s_f, η_b and η_kv by s_b; a value that would exceed 1 moves into the peak rate or
bandwidth), t½ is the GEMM efficiency ramp η(T) = η_max · T / (T + t½) (the serving loop's GEMMs
see B·(k+1) rows, shapes the microbenchmarks fit only at batch 1), and t_layer, t_pass replace the
kernel and pass overheads. A linear fit of (s_f = s_b, t_layer, t_pass) with the profile's t½
starts the non-linear one; s_b is held near s_f by a weak prior where no pass is memory-bound. Training is corrected
separately by the ratio of measured to twin-predicted training-step time (train_efficiency of the
training dtype's block). The corrected profile is a YAML file the twin reads like any other.

Batch-1 runs record steps.csv (draft_s over the step's proposed passes, verify_s) with contexts
from requests.csv; batched serve runs record iterations.csv (prefill_s over prefill_tokens of
prefill_rows, draft_s over the batch's draft passes, verify_s over verify_tokens with context_tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osdsim.errors import InputError, atomic_write_text

DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Pass:
    """One measured group of passes: each pass as (model, (tokens, logits, context, pairs)) with
    model 'draft' or 'target'."""

    shapes: list[tuple[str, tuple[float, float, float, float]]]
    measured_s: float
    kind: str  # draft step | verify | prefill


def passes_batch1(requests: list[dict], steps: list[dict], k: int) -> list[Pass]:
    """A batch-1 run's passes: each step's draft passes at the growing context and its verify pass
    over proposed + 1 tokens (context = prompt + tokens emitted before the step, the first by prefill)."""
    prompt = {int(r["request_index"]): int(_num(r["prompt_tokens"])) for r in requests}
    emitted: dict[int, int] = {}
    out = []
    for st in steps:
        rid = int(st["request_index"])
        ctx = prompt.get(rid, 0) + 1 + emitted.get(rid, 0)
        emitted[rid] = emitted.get(rid, 0) + int(_num(st["emitted"]))
        g = int(_num(st.get("proposed", k))) if str(st.get("proposed", "")) not in ("", "nan") else k
        d, v = _num(st["draft_s"]), _num(st["verify_s"])
        if g > 0 and d > 0:
            out.append(Pass([("draft", (1, 1, ctx + j, ctx + j + 0.5)) for j in range(g)], d, "draft step"))
        if v > 0:
            q = g + 1
            out.append(Pass([("target", (q, q, ctx, q * (ctx + q / 2.0)))], v, "verify"))
    return out


def passes_batched(iterations: list[dict]) -> list[Pass]:
    """A serve run's passes: per iteration its prefill chunks (a target and a draft pass over
    prefill_tokens), the draft passes over its decoding rows and one verify pass over verify_tokens
    (Σ γ_i + 1) with context_tokens cached (the simulator prices them alike)."""
    out = []
    for it in iterations:
        pf, pr, ps = _num(it.get("prefill_tokens")), _num(it.get("prefill_rows")), _num(it.get("prefill_s"))
        if pf > 0 and pr > 0 and ps > 0:
            shape = (pf, pr, 0.0, pf * pf / (2.0 * pr))
            out.append(Pass([("target", shape), ("draft", shape)], ps, "prefill"))
        b = int(_num(it["batch_size"]) or 0)
        if b <= 0:
            continue
        c = _num(it["context_tokens"])
        # What the attention read: the batch cache's B × W columns (pads and holes included) where the
        # server recorded its widths, else Σ context (records made before widths were recorded).
        w_t, w_d = _num(it.get("cache_width")), _num(it.get("draft_cache_width"))
        c_t = b * w_t if w_t > 0 else c
        c_d = b * w_d if w_d > 0 else c
        d, v, vt = _num(it["draft_s"]), _num(it["verify_s"]), _num(it["verify_tokens"])
        # Draft passes actually run: the longest row's γ (rows near their end draft fewer than k).
        k = min(int(_num(it["k"]) or 0), int(math.ceil(max(vt - b, 0) / b))) if math.isfinite(vt) else 0
        if k > 0 and d > 0:
            out.append(Pass([("draft", (b, b, c_d + b * j, c_d + b * j + b / 2.0)) for j in range(k)], d, "draft step"))
        if v > 0 and vt > 0:
            q = vt / b
            out.append(Pass([("target", (vt, vt, c_t, q * c_t + b * q * q / 2.0))], v, "verify"))
    return out


def attention_padding(iterations: list[dict]) -> float | None:
    """ρ for the twin's padded attention: the median ratio of the target cache's width to the longest
    decoding row over a serve run's iterations (≥ 1; None where the run recorded no widths)."""
    ratios = [_num(it.get("cache_width")) / _num(it.get("longest_row")) for it in iterations
              if _num(it.get("longest_row")) > 0 and _num(it.get("cache_width")) > 0]
    return max(float(np.median(ratios)), 1.0) if ratios else None


def recorded_passes(run: Any, k: int) -> list[Pass]:
    its = getattr(run, "iterations", None)
    if its:
        return passes_batched(its)
    return passes_batch1(run.requests, run.steps, k)


def price(p: Pass, models: dict) -> float:
    return float(sum(models[m].pass_time(*s)[0] for m, s in p.shapes))


def ape(passes: list[Pass], models: dict) -> dict[str, float]:
    """Median absolute relative error per kind of pass ('draft step', 'verify')."""
    out: dict[str, list[float]] = {}
    for p in passes:
        out.setdefault(p.kind, []).append(abs(price(p, models) - p.measured_s) / p.measured_s)
    return {kind: float(np.median(v)) for kind, v in out.items()}


@dataclass
class CostFit:
    scale: float  # s_f: compute time x
    kernel_overhead_s_per_layer: float
    pass_overhead_s: float
    bytes_scale: float = 1.0  # s_b: memory time x
    flops_half_tokens: float | None = None  # t½ of the GEMM efficiency ramp (None: the profile's)
    attention_flops: float | None = None  # η_att of the attention kernel (None: shared roofline)
    kv_bandwidth: float | None = None  # η_kv of the attention kernel's KV traffic
    train_factor: float = 1.0
    passes: int = 0
    before: dict = field(default_factory=dict)  # median |error| per kind, microbenchmark profile
    after: dict = field(default_factory=dict)  # the same with the fitted profile (in sample)

    def as_dict(self) -> dict:
        return {"roofline_scale": round(self.scale, 5), "bytes_scale": round(self.bytes_scale, 5),
                "flops_half_tokens": None if self.flops_half_tokens is None else round(self.flops_half_tokens, 3),
                "attention_flops": self.attention_flops, "kv_bandwidth": self.kv_bandwidth,
                "kernel_overhead_s_per_layer": self.kernel_overhead_s_per_layer,
                "pass_overhead_s": self.pass_overhead_s, "train_time_factor": round(self.train_factor, 5),
                "passes": self.passes, "median_abs_error_microbenchmark": self.before,
                "median_abs_error_serving_fitted_in_sample": self.after}


# Weight of the prior log(s_b / s_f) = 0 next to one pass's relative error: small enough that any
# memory-bound passes decide s_b, large enough to pin it when none are.
BYTES_SCALE_PRIOR = 0.05


def fit_pass_costs(passes: list[Pass], draft_spec, target_spec, profile) -> tuple[CostFit, Any]:
    """(fit, corrected profile) from measured passes of both models. One correction (the serving
    loop's, over what the microbenchmarks timed) is fitted for every dtype the two models are priced
    in: a llama.cpp server runs its Q4_1 target and its Q8_0 draft (osdsim.real.llamacpp.
    served_draft_type) in one loop, and fitting only the draft's block left the target's verify and
    prefill passes uncorrected."""
    from scipy.optimize import least_squares, lsq_linear

    from osdsim.cost.model import CostModel

    if len(passes) < 6:
        raise InputError(f"serving-fitted costs: the fit run recorded only {len(passes)} timed passes (need 6)")
    dtypes = list(dict.fromkeys([target_spec.dtype, draft_spec.dtype]))  # the target's first
    eff = profile.efficiency_for(dtypes[0])
    models = {"draft": CostModel(draft_spec, profile), "target": CostModel(target_spec, profile)}
    layers = {"draft": draft_spec.n_layers, "target": target_spec.n_layers}
    own = {"draft": profile.efficiency_for(draft_spec.dtype), "target": eff}
    fixed = {m: layers[m] * own[m].kernel_overhead_s_per_layer + own[m].pass_overhead_s for m in layers}
    measured = np.array([p.measured_s for p in passes])
    n_layers = np.array([sum(layers[m] for m, _ in p.shapes) for p in passes], dtype=float)
    n_passes = np.array([len(p.shapes) for p in passes], dtype=float)
    # 1. linear start: measured ≈ s · roofline + L · t_layer + n · t_pass (relative residuals)
    roof = np.array([price(p, models) - sum(fixed[m] for m, _ in p.shapes) for p in passes])
    a = np.stack([roof, n_layers, n_passes], axis=1) / measured[:, None]
    y = np.ones(len(passes))
    lo, hi = [0.05, 0.0, 0.0], [20.0, np.inf, np.inf]
    start = lsq_linear(a, y, bounds=(lo, hi)).x
    sol = least_squares(lambda p: a @ p - y, np.clip(start, np.array(lo) + 1e-12, None), bounds=(lo, hi),
                        loss="soft_l1", f_scale=0.1, x_scale=np.maximum(np.abs(start), 1e-6))
    s0, t_layer0, t_pass0 = (float(x) for x in sol.x)

    # 2. non-linear: separate compute / memory scales and the efficiency ramp t½, priced by the
    # cost model itself (so the corrected profile prices exactly what was fitted).
    def theta_profile(theta: np.ndarray) -> Any:
        s_f, s_b, half, att, kv = (float(x) for x in np.exp(theta[[0, 1, 2, 5, 6]]))
        prof = profile
        for dtype in dtypes:
            prof = scale_profile(prof, dtype, s_f, float(theta[3]), float(theta[4]), bytes_scale=s_b,
                                 flops_half_tokens=half, attention_flops=att, kv_bandwidth=kv)
        return prof

    def residuals(theta: np.ndarray) -> np.ndarray:
        prof = theta_profile(theta)
        fm = {"draft": CostModel(draft_spec, prof), "target": CostModel(target_spec, prof)}
        pred = np.array([price(p, fm) for p in passes])
        return np.append(pred / measured - 1.0, BYTES_SCALE_PRIOR * (theta[1] - theta[0]))

    half0 = max(float(eff.flops_half_tokens), 0.5)
    # The attention (QK^T, softmax, PV over the cached columns, and the cache append) as its own
    # kernel after the GEMMs: max(att FLOPs / (F·η_att), KV bytes / (BW·η_kv)), started at the
    # GEMMs' efficiency and the profile's KV-streaming efficiency.
    att0 = min(eff.attention_flops if eff.attention_flops is not None else eff.flops_max / s0, 1.0)
    kv0 = min((eff.kv_bandwidth if eff.kv_bandwidth is not None else eff.bandwidth) / s0, 1.0)
    theta0 = np.array([math.log(s0), math.log(s0), math.log(half0), t_layer0, t_pass0,
                       math.log(att0), math.log(kv0)])
    t_hi = max(float(measured.max()), 1e-3)
    bounds = ([math.log(0.05), math.log(0.05), math.log(0.05), 0.0, 0.0, math.log(1e-4), math.log(1e-4)],
              [math.log(20.0), math.log(20.0), math.log(4096.0), t_hi, t_hi, 0.0, 0.0])
    theta0 = np.clip(theta0, np.array(bounds[0]) + 1e-9, np.array(bounds[1]) - 1e-9)
    nl = least_squares(residuals, theta0, bounds=bounds, loss="soft_l1", f_scale=0.1,
                       x_scale=np.array([1.0, 1.0, 1.0, max(t_layer0, 1e-5), max(t_pass0, 1e-4), 1.0, 1.0]),
                       diff_step=1e-3, max_nfev=300)
    corrected = theta_profile(nl.x)
    c_eff = corrected.efficiency_for(dtypes[0])
    fitted_models = {"draft": CostModel(draft_spec, corrected), "target": CostModel(target_spec, corrected)}
    fit = CostFit(float(np.exp(nl.x[0])), float(nl.x[3]), float(nl.x[4]), bytes_scale=float(np.exp(nl.x[1])),
                  flops_half_tokens=float(np.exp(nl.x[2])), attention_flops=c_eff.attention_flops,
                  kv_bandwidth=c_eff.kv_bandwidth, passes=len(passes),
                  before=ape(passes, models), after=ape(passes, fitted_models))
    return fit, corrected


def _eff_fields(profile, dtype: str) -> tuple[str, str | None]:
    """Where dtype's efficiency block lives: ('efficiency', None) or ('efficiency_by_dtype', dtype)."""
    return ("efficiency_by_dtype", dtype) if dtype in profile.efficiency_by_dtype else ("efficiency", None)


def scale_profile(profile, dtype: str, s: float, t_layer: float, t_pass: float,
                  bytes_scale: float | None = None, flops_half_tokens: float | None = None,
                  attention_flops: float | None = None, kv_bandwidth: float | None = None):
    """The profile with dtype's passes costing max(s · compute, s_b · memory) + L·t_layer + t_pass
    (s_b = bytes_scale, default s; t½ = flops_half_tokens, default the profile's). attention_flops
    (with kv_bandwidth) prices attention as its own kernel at those efficiencies of the (new) peak
    and bandwidth."""
    eff = profile.efficiency_for(dtype)
    peaks = dict(profile.peak_flops_per_s)
    bw = profile.memory_bandwidth_bytes_per_s
    s_b = s if bytes_scale is None else bytes_scale
    f = eff.flops_max / s
    peak_gain = max(f, 1.0)  # an efficiency above 1 moves into the peak
    b = eff.bandwidth / s_b
    bw_gain = max(b, 1.0)
    kv = None if eff.kv_bandwidth is None else min(eff.kv_bandwidth / s_b / bw_gain, 1.0)
    upd_eff = {"flops_max": f / peak_gain, "bandwidth": b / bw_gain, "kv_bandwidth": kv,
               "kernel_overhead_s_per_layer": t_layer, "pass_overhead_s": t_pass}
    if flops_half_tokens is not None:
        upd_eff["flops_half_tokens"] = flops_half_tokens
    if attention_flops is not None:
        upd_eff["attention_flops"] = min(attention_flops / peak_gain, 1.0)
    if kv_bandwidth is not None:
        upd_eff["kv_bandwidth"] = min(kv_bandwidth / bw_gain, 1.0)
    new = eff.model_copy(update=upd_eff)
    if peak_gain > 1.0 and dtype in peaks:
        peaks[dtype] *= peak_gain
    upd: dict = {"peak_flops_per_s": peaks, "memory_bandwidth_bytes_per_s": bw * bw_gain}
    where, key = _eff_fields(profile, dtype)
    if bw_gain > 1.0:
        # The bandwidth is shared by every dtype: keep the other blocks' absolute rates.
        upd["efficiency"] = profile.efficiency if where != "efficiency" else new
        others = {}
        for d, e in profile.efficiency_by_dtype.items():
            others[d] = new if d == key else _rebase_bw(e, bw_gain)
        if where != "efficiency":
            upd["efficiency"] = _rebase_bw(profile.efficiency, bw_gain)
        upd["efficiency_by_dtype"] = others
    elif where == "efficiency":
        upd["efficiency"] = new
    else:
        upd["efficiency_by_dtype"] = {**profile.efficiency_by_dtype, key: new}
    return profile.model_copy(update=upd)


def _rebase_bw(e, gain: float):
    return e.model_copy(update={"bandwidth": e.bandwidth / gain,
                                "kv_bandwidth": None if e.kv_bandwidth is None else e.kv_bandwidth / gain})


def scale_training(profile, train_dtype: str, factor: float):
    """The profile with training steps in train_dtype taking `factor` × as long (train_efficiency ÷ factor)."""
    where, key = _eff_fields(profile, train_dtype)
    eff = profile.efficiency_for(train_dtype)
    new = eff.model_copy(update={"train_efficiency": float(np.clip(eff.train_efficiency / factor, 1e-3, 4.0))})
    if where == "efficiency":
        return profile.model_copy(update={"efficiency": new})
    return profile.model_copy(update={"efficiency_by_dtype": {**profile.efficiency_by_dtype, key: new}})


# Seconds-valued efficiency terms: a host r× slower takes r× as long in each of them.
_SECONDS_FIELDS = ("kernel_overhead_s_per_layer", "pass_overhead_s", "allreduce_latency_s",
                   "nongemm_s_per_token_hidden", "nongemm_s_per_token_ffn", "nongemm_s_per_token_qkv",
                   "pass_overhead_s_per_seq")


def scale_host_speed(profile, ratio: float):
    """The profile of the same device running `ratio` × slower in every term (ratio > 1: slower): the
    peak rates and bandwidths ÷ ratio, the fixed seconds × ratio, the efficiencies unchanged. Every
    pass and training-step time the cost model prices is homogeneous of degree one in these terms
    (sums, maxima and p-norms of work ÷ rate and overheads), so each price is exactly ratio × its old
    value. Used to replay a held-out run's measured host speed (its canary vs the fit run's)."""
    if not (ratio > 0 and math.isfinite(ratio)):
        raise ValueError(f"host speed ratio must be finite and > 0, got {ratio}")

    def eff(e):
        return e.model_copy(update={f: (None if getattr(e, f) is None else getattr(e, f) * ratio)
                                    for f in _SECONDS_FIELDS})

    return profile.model_copy(update={
        "peak_flops_per_s": {d: v / ratio for d, v in profile.peak_flops_per_s.items()},
        "memory_bandwidth_bytes_per_s": profile.memory_bandwidth_bytes_per_s / ratio,
        "interconnect_bandwidth_bytes_per_s": profile.interconnect_bandwidth_bytes_per_s / ratio,
        "efficiency": eff(profile.efficiency),
        "efficiency_by_dtype": {d: eff(e) for d, e in profile.efficiency_by_dtype.items()},
    })


def write_profile(profile, path: Path, note: str, suffix: str = "-serving", header: str = "Serving-fitted profile"):
    """Write `profile` with `note` appended to its provenance and `suffix` to its name (once)."""
    from osdsim.cost.profile import dump_profile

    prov = profile.provenance.model_copy(update={"notes": (profile.provenance.notes or "") + " " + note})
    name = profile.name if profile.name.endswith(suffix) else f"{profile.name}{suffix}"
    prof = profile.model_copy(update={"provenance": prov, "name": name})
    atomic_write_text(path, f"# {header} written by osdsim validate. {note}\n" + dump_profile(prof))
    return path
