"""Fit the cost model's kernel-level GPU terms on imported kernel timings (issue 13). numpy + scipy.

Per device, each operator family is fitted on its own (they are separate kernels on a GPU), with
the cost model's own formula (osdsim.cost.model.pass_core) so fit and simulator cannot drift:

- linear (QKV, O, gate+up, down GEMMs of one layer): roofline_p(F/(F_peak·η_f(T)), W/(BW·η_b)) + t_lin,
  η_f(T) = η_max·T/(T + T½), F = 2·T·P_layer/t, W = b·P_layer/t. p (the smooth roofline's
  sharpness) is fitted: near the ridge point a GEMM is slower than both of its bounds, which max()
  cannot express (the residuals of p = ∞ show it; see the fit report).
- non-GEMM (norms, rotary, activation, residual add): t_ng + max(T, T₀)·(n_d·d + n_f·ffn/t + n_q·(d+d_kv)/t);
  the norms and adds run on the full width in every TP rank (the tables show it: their time does
  not fall with t), the rotary and the activation on the rank's shard.
- attention (FlashAttention, paged KV): max(4·d/t·Σq(c+q/2)/(F_peak·η_att), KV/(BW·η_kv)) + t_att (max,
  not the smooth form: the simulator prices many contexts at once with numpy, bit-identical to max()).
- all-reduce: t_lat + 2(n−1)/n·bytes/B per call (NCCL ring), over the single-node rows.
- serving-engine CPU time per iteration: c0 + c1·batch (vLLM's schedule, prepare, sample, process).

kernel_overhead_s_per_layer = t_lin + t_ng + t_att. Each family's fit minimises log(pred/meas)
(relative error) by least squares. Errors are held out: the models in HELDOUT_MODELS are not
fitted (all their rows are scored), attention and collectives hold out every other grid point.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
from scipy.optimize import least_squares, minimize_scalar, nnls

from osdsim.calibrate.tables import (
    AttentionTable,
    CollectiveTable,
    CpuOverheadTable,
    Imported,
    MlpTable,
)
from osdsim.cost.model import BatchShape, CostModel, TimeCoefs, pass_core
from osdsim.cost.profile import SCHEMA_VERSION, Efficiency, HardwareProfile, Provenance
from osdsim.errors import InputError
from osdsim.models import ModelSpec

HELDOUT_MODELS: tuple[str, ...] = ("meta-llama/Llama-2-7b-hf", "Qwen/Qwen-72B")
DECODE_TOKENS = (1, 256)
PREFILL_TOKENS = (512, 4096)
BYTES = 2  # bf16 / fp16: every Vidur table is half precision
DATA_SOURCE = ("github.com/microsoft/vidur (MIT License, Copyright (c) Microsoft Corporation): "
               "data/profiling at commit 7d47513 (compute mlp.csv, network); A100 attention.csv blob "
               "ee3dec7 (commit 44bc599); cpu_overheads from commit 6d98aa8")

# Datasheet peaks (dense, no sparsity), memory bandwidth and size, per-direction link bandwidth.
DATASHEETS: dict[str, dict] = {
    "a100": dict(name="a100-80g", device="NVIDIA A100-SXM4-80GB",
                 peaks={"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "int8": 624e12},
                 bandwidth=2039e9, memory=85899345920.0, link=300e9,
                 sheet="NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOP/s dense BF16/FP16, 19.5 TFLOP/s FP32, "
                       "2,039 GB/s HBM2e, NVLink 600 GB/s bidirectional"),
    "h100": dict(name="h100", device="NVIDIA H100 SXM5 80GB",
                 peaks={"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12, "int8": 1978.9e12, "fp8": 1978.9e12},
                 bandwidth=3350e9, memory=85899345920.0, link=450e9,
                 sheet="NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16/FP16, 67 TFLOP/s FP32, 3.35 TB/s HBM3, "
                       "NVLink 900 GB/s bidirectional"),
    "a40": dict(name="a40", device="NVIDIA A40 48GB",
                peaks={"bf16": 149.7e12, "fp16": 149.7e12, "fp32": 37.4e12, "int8": 299.3e12},
                bandwidth=696e9, memory=51539607552.0, link=56.25e9,
                sheet="NVIDIA A40 datasheet: 149.7 TFLOP/s dense BF16/FP16 tensor, 37.4 TFLOP/s FP32, 696 GB/s "
                      "GDDR6, 48 GB, NVLink bridge 112.5 GB/s bidirectional"),
}
H200 = dict(name="h200", device="NVIDIA H200 SXM 141GB", bandwidth=4800e9, memory=141e9, link=450e9,
            sheet="NVIDIA H200 datasheet: H100's tensor cores (989 TFLOP/s dense BF16), 4.8 TB/s HBM3e, 141 GB, "
                  "NVLink 900 GB/s bidirectional")


# --- errors ------------------------------------------------------------------------------------
def ape(pred: np.ndarray, meas: np.ndarray) -> dict[str, float]:
    e = np.abs(np.asarray(pred) - np.asarray(meas)) / np.asarray(meas) * 100.0
    return {"median_ape_pct": round(float(np.median(e)), 2), "max_ape_pct": round(float(np.max(e)), 2),
            "n": float(len(e))}


def _solve(residuals, x0, lower, upper, what: str, path) -> np.ndarray:
    res = least_squares(residuals, x0, bounds=(lower, upper), method="trf", x_scale="jac",
                        xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=3000)
    if not res.success or not np.all(np.isfinite(res.x)):
        raise InputError(f"{path}: the {what} fit did not converge ({res.message})")
    return res.x


# --- linear + non-GEMM (per-layer tables) ------------------------------------------------------
def layer_spec(t: MlpTable) -> ModelSpec:
    d = t.dims
    return ModelSpec(name=t.model, n_layers=1, hidden=d["n_embd"], n_heads=d["n_head"], n_kv_heads=d["n_kv_head"],
                     ffn=d["n_expanded_embd"], vocab=d["vocab_size"], mlp_matrices=3 if d["use_gated_mlp"] else 2,
                     dtype="bf16")


@dataclass
class LayerRows:
    """Concatenated per-layer rows of several tables (one row per table row)."""

    model: np.ndarray
    tp: np.ndarray
    tokens: np.ndarray
    params: np.ndarray  # matmul parameters of one layer (whole model, not per rank)
    hidden: np.ndarray
    ffn: np.ndarray
    qk: np.ndarray  # d + d_kv
    linear_s: np.ndarray
    nongemm_s: np.ndarray

    def select(self, mask: np.ndarray) -> LayerRows:
        return LayerRows(**{k: v[mask] for k, v in self.__dict__.items()})


def layer_rows(tables: list[MlpTable]) -> LayerRows:
    cols: dict[str, list] = {k: [] for k in LayerRows.__dataclass_fields__}
    for t in tables:
        s, n = layer_spec(t), len(t.tokens)
        cols["model"].append(np.array([t.model] * n, dtype=object))
        cols["tp"].append(t.tp)
        cols["tokens"].append(t.tokens)
        cols["params"].append(np.full(n, float(s.layer_params)))
        cols["hidden"].append(np.full(n, float(s.hidden)))
        cols["ffn"].append(np.full(n, float(s.ffn)))
        cols["qk"].append(np.full(n, float(s.hidden + s.kv_dim)))
        cols["linear_s"].append(t.linear_s)
        cols["nongemm_s"].append(t.nongemm_s)
    return LayerRows(**{k: np.concatenate(v) for k, v in cols.items()})


def linear_predict(x: np.ndarray, r: LayerRows, peak: float, bw: float) -> np.ndarray:
    """x = (η_max, T½, η_b, p, t_lin): the GEMMs of one layer, by pass_core."""
    eta_max, t_half, eta_b, p, t0 = x
    flops = 2.0 * r.params / r.tp * r.tokens
    wbytes = BYTES * r.params / r.tp
    eta = eta_max * r.tokens / (r.tokens + t_half)
    coefs = TimeCoefs(peak=peak, eff_bw=bw * eta_b, kv_extra_s_per_byte=0.0, gpu=True, sharpness=p)
    core, _, _ = pass_core(flops, 0.0, wbytes, 0.0, 0.0, 0.0, eta, coefs, np.maximum, flops, wbytes)
    return core + t0


def nongemm_predict(x: np.ndarray, r: LayerRows) -> np.ndarray:
    t0, n_d, n_f, n_q, t_min = x
    return t0 + np.maximum(r.tokens, t_min) * (n_d * r.hidden + n_f * r.ffn / r.tp + n_q * r.qk / r.tp)


def regime_weights(tokens: np.ndarray) -> np.ndarray:
    """√ of 1/(rows in the row's band of tokens): the sparse decode sizes weigh as much as the dense
    prefill grid (each band, ≤ 256 and > 256 tokens, carries the same total weight)."""
    small = tokens <= DECODE_TOKENS[1]
    n_small, n_large = max(int(small.sum()), 1), max(int((~small).sum()), 1)
    return np.sqrt(np.where(small, 1.0 / n_small, 1.0 / n_large) * len(tokens) / 2.0)


def fit_linear(r: LayerRows, peak: float, bw: float, path) -> np.ndarray:
    log_meas = np.log(r.linear_s)
    w = regime_weights(r.tokens)

    def res(x):
        return w * (np.log(linear_predict(x, r, peak, bw)) - log_meas)

    best = None
    for half0 in (8.0, 64.0, 512.0):
        x = _solve(res, np.array([0.7, half0, 0.8, 4.0, 2e-5]), [0.05, 0.0, 0.05, 1.0, 0.0],
                   [1.0, 1e5, 1.0, 64.0, 1e-3], "linear-op", path)
        cost = float(np.sum(res(x) ** 2))
        if best is None or cost < best[0]:
            best = (cost, x)
    return best[1]


def fit_nongemm(r: LayerRows, path) -> np.ndarray:
    """For a fixed T₀ the model is linear in (t_ng, n_d, n_f, n_q): non-negative least squares on the
    (regime-weighted) relative error, over a grid of T₀ and then a bounded 1-D search around the best."""
    w = regime_weights(r.tokens)

    def solve(log_t_min: float) -> tuple[float, np.ndarray]:
        t_min = float(np.exp(log_t_min))
        eff = np.maximum(r.tokens, t_min)
        a = np.stack([np.ones_like(eff), eff * r.hidden, eff * r.ffn / r.tp, eff * r.qk / r.tp], axis=1)
        a = a / r.nongemm_s[:, None] * w[:, None]
        scale = np.linalg.norm(a, axis=0)
        scale[scale == 0] = 1.0
        coef, rnorm = nnls(a / scale, w, maxiter=5000)
        return float(rnorm), np.append(coef / scale, t_min)

    grid = np.log(np.geomspace(1.0, 4096.0, 49))
    costs = [solve(g)[0] for g in grid]
    i = int(np.argmin(costs))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(lambda g: solve(g)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    cost, x = solve(float(res.x)) if res.fun <= costs[i] else solve(grid[i])
    if not (math.isfinite(cost) and np.all(np.isfinite(x))):
        raise InputError(f"{path}: the non-GEMM op fit did not converge")
    return x


# --- attention ----------------------------------------------------------------------------------
@dataclass
class AttRows:
    prefill: np.ndarray
    flops: np.ndarray
    kv_bytes: np.ndarray
    time_s: np.ndarray
    tokens: np.ndarray
    heldout: np.ndarray


def attention_rows(t: AttentionTable) -> AttRows:
    d, tp = t.dims["n_embd"], t.dims["tp"]
    d_kv = d // t.dims["n_q_head"] * t.dims["n_kv_head"]
    q = np.where(t.prefill, t.chunk, 1.0)
    pairs = t.batch * q * (t.kv + q / 2.0)
    flops = 4.0 * d / tp * pairs  # the cost model's 4·L·d·pairs/t, one layer
    kv_bytes = 2.0 * d_kv * BYTES / tp * t.batch * (t.kv + q)  # cached read + new written
    kv_values = np.unique(t.kv)
    held = np.isin(t.kv, kv_values[1::2])
    return AttRows(t.prefill, flops, kv_bytes, t.time_s, t.batch * q, held)


def attention_predict(x: np.ndarray, a: AttRows, peak: float, bw: float, p: float | None) -> np.ndarray:
    eta_att, eta_kv, t0 = x
    coefs = TimeCoefs(peak=peak, eff_bw=bw, kv_extra_s_per_byte=0.0, gpu=True, sharpness=p,
                      attention_peak=peak * eta_att, kv_bw=bw * eta_kv)
    core, _, _ = pass_core(a.flops, a.flops, a.kv_bytes, a.kv_bytes, 0.0, 0.0, 1.0, coefs, np.maximum)
    return core + t0


def fit_attention(a: AttRows, peak: float, bw: float, p: float | None, path) -> np.ndarray:
    fit = ~a.heldout
    sub = AttRows(*(v[fit] for v in a.__dict__.values()))
    log_meas = np.log(sub.time_s)

    def res(x):
        return np.log(attention_predict(x, sub, peak, bw, p)) - log_meas

    return _solve(res, np.array([0.3, 0.6, 1e-5]), [1e-3, 1e-3, 0.0], [1.0, 1.0, 1e-3], "attention", path)


# --- collectives, CPU overhead ------------------------------------------------------------------
def fit_collective(t: CollectiveTable, max_bytes: float = 64 * 2**20) -> tuple[float, float, dict]:
    """(latency s, bandwidth B/s, errors): ring all-reduce 2(n−1)/n·size/B (send/recv: size/B)."""
    keep = t.size_bytes <= max_bytes
    n, size, meas = t.workers[keep], t.size_bytes[keep], t.time_s[keep]
    factor = 2.0 * (n - 1) / n if t.collective == "all_reduce" else np.ones_like(n)
    sizes = np.unique(size)
    held = np.isin(size, sizes[1::2])

    def pred(x, m):
        return x[0] * 1e-6 + factor[m] * size[m] / (x[1] * 1e9)

    fit = ~held
    x = _solve(lambda x: np.log(pred(x, fit)) - np.log(meas[fit]), np.array([10.0, 100.0]), [0.0, 0.1],
               [1e4, 1e4], f"{t.collective} latency/bandwidth", t.path)
    errors = {f"{t.collective}/{t.cluster}/n{int(k)}": ape(pred(x, held & (n == k)), meas[held & (n == k)])
              for k in np.unique(n)}
    errors[f"{t.collective}/{t.cluster}"] = ape(pred(x, held), meas[held])
    return float(x[0] * 1e-6), float(x[1] * 1e9), errors


def fit_cpu(t: CpuOverheadTable) -> tuple[float, float, dict]:
    """c0 + c1·batch on the TP-1 rows (with TP > 1 the engine also broadcasts to its workers, a cost
    the profile does not price per TP), held-out models scored; errors on TP > 1 rows reported too."""
    tp1 = t.tp == 1
    if not np.any(tp1):
        tp1 = np.ones_like(tp1)
    held = np.isin(t.model, HELDOUT_MODELS) & tp1
    fit = ~np.isin(t.model, HELDOUT_MODELS) & tp1
    if not np.any(fit):
        fit = tp1
    a = np.vstack([np.ones(fit.sum()), t.batch[fit]]).T
    # relative least squares: divide each row by its measurement
    coef, *_ = np.linalg.lstsq(a / t.time_s[fit, None], np.ones(fit.sum()), rcond=None)
    c0, c1 = float(max(coef[0], 0.0)), float(max(coef[1], 0.0))
    sel = held if np.any(held) else fit
    errors = {"cpu_overhead/heldout/tp1" if np.any(held) else "cpu_overhead/insample/tp1":
              ape(c0 + c1 * t.batch[sel], t.time_s[sel])}
    if np.any(~tp1):
        errors["cpu_overhead/tp>1 (not priced per TP)"] = ape(c0 + c1 * t.batch[~tp1], t.time_s[~tp1])
    return c0, c1, errors


# --- the whole device ---------------------------------------------------------------------------
@dataclass
class DeviceFit:
    device: str  # a100 | h100 | a40
    efficiency: Efficiency
    link_bandwidth: float
    errors: dict[str, dict[str, float]]
    notes: list[str] = field(default_factory=list)
    attention_note: str = ""
    seconds: float = 0.0
    linear: np.ndarray | None = None
    nongemm: np.ndarray | None = None
    attention: np.ndarray | None = None


def _regimes(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"decode": (tokens >= DECODE_TOKENS[0]) & (tokens <= DECODE_TOKENS[1]),
            "prefill": (tokens >= PREFILL_TOKENS[0]) & (tokens <= PREFILL_TOKENS[1])}


def fit_device(im: Imported, foreign_attention: AttentionTable | None = None,
               heldout_models: tuple[str, ...] = HELDOUT_MODELS) -> DeviceFit:
    """Fit every family the imported tables allow; held-out errors per family, regime and TP."""
    t_start = time.perf_counter()
    if foreign_attention is None and not im.attention and im.foreign_attention:
        foreign_attention = im.foreign_attention[0]
    dev = im.device
    sheet = DATASHEETS.get(dev)
    if sheet is None:
        raise InputError(f"--gpu {dev}: no datasheet peaks known for it (known: {', '.join(DATASHEETS)})")
    if not im.mlp:
        raise InputError(f"--from: no per-operator (mlp.csv) tables of {dev}; the linear/non-GEMM fit needs them")
    peak, bw = sheet["peaks"]["bf16"], sheet["bandwidth"]
    path0 = im.mlp[0].path.parent.parent.parent
    rows = layer_rows(im.mlp)
    held = np.isin(rows.model, heldout_models)
    if not np.any(~held):
        raise InputError(f"{path0}: every model is held out; nothing left to fit on")
    fit_rows = rows.select(~held)
    lin = fit_linear(fit_rows, peak, bw, path0)
    ng = fit_nongemm(fit_rows, path0)
    errors: dict[str, dict[str, float]] = {}
    score = rows.select(held) if np.any(held) else fit_rows
    split = "heldout" if np.any(held) else "insample"
    lin_pred, ng_pred = linear_predict(lin, score, peak, bw), nongemm_predict(ng, score)
    for regime, mask in _regimes(score.tokens).items():
        for tp in np.unique(score.tp):
            m = mask & (score.tp == tp)
            if not np.any(m):
                continue
            key = f"{split}/{regime}/tp{int(tp)}"
            errors[f"linear/{key}"] = ape(lin_pred[m], score.linear_s[m])
            errors[f"nongemm/{key}"] = ape(ng_pred[m], score.nongemm_s[m])
            errors[f"layer/{key}"] = ape(lin_pred[m] + ng_pred[m], score.linear_s[m] + score.nongemm_s[m])
        errors[f"layer/{split}/{regime}"] = ape((lin_pred + ng_pred)[mask], (score.linear_s + score.nongemm_s)[mask])
    for model in sorted(set(score.model)):
        m = score.model == model
        errors[f"layer/{split}/{model}"] = ape((lin_pred + ng_pred)[m], (score.linear_s + score.nongemm_s)[m])
    fit_pred = linear_predict(lin, fit_rows, peak, bw) + nongemm_predict(ng, fit_rows)
    errors["layer/insample"] = ape(fit_pred, fit_rows.linear_s + fit_rows.nongemm_s)
    p = float(lin[3])

    # attention: measured here, or transferred from another device's table
    att_tables = im.attention
    notes = []
    att = None
    if att_tables or foreign_attention is not None:
        table = att_tables[0] if att_tables else foreign_attention
        src = DATASHEETS.get(table.device, sheet)
        a = attention_rows(table)
        att = fit_attention(a, src["peaks"]["bf16"], src["bandwidth"], p, table.path)
        if att_tables:
            pred = attention_predict(att, a, peak, bw, p)
            for kind, m in (("decode", ~a.prefill), ("prefill", a.prefill)):
                errors[f"attention/heldout/{kind}"] = ape(pred[m & a.heldout], a.time_s[m & a.heldout])
            attention_note = (f"Attention fitted on {table.path.name} ({len(a.time_s)} rows; FlashAttention, "
                              f"paged KV, one shape: d={table.dims['n_embd']}, {table.dims['n_q_head']} query / "
                              f"{table.dims['n_kv_head']} KV heads, TP {table.dims['tp']}); held out: every other "
                              "KV-cache size. Other shapes use the same efficiencies (FLOPs and KV bytes scale).")
            layer_att = _layer_with_attention(im, table, lin, ng, att, peak, bw, p)
            errors.update(layer_att)
        else:
            attention_note = (f"Attention is not measured on {dev}: priced with the efficiencies fitted on "
                              f"{table.device}'s attention table ({table.path.name}: η_att, η_kv, per-layer time) "
                              f"applied to {dev}'s datasheet peak FLOP/s and memory bandwidth.")
    else:
        attention_note = ("No attention table: attention shares the GEMMs' roofline (FLOPs at η_f, KV bytes at η_b).")

    # collectives
    link, lat = sheet["link"], 1e-5
    ar = [c for c in im.collectives if c.collective == "all_reduce"]
    sr = [c for c in im.collectives if c.collective == "send_recv"]
    preferred = sorted(ar, key=lambda c: (not c.cluster.endswith("dgx"), c.cluster))
    for c in preferred:
        c_lat, c_bw, c_err = fit_collective(c)
        errors.update(c_err)
        if c is preferred[0]:
            lat, link = c_lat, c_bw
            notes.append(f"all-reduce from {c.cluster}/{c.path.name}: latency {c_lat * 1e6:.1f} us, ring bus "
                         f"bandwidth {c_bw / 1e9:.0f} GB/s (sizes read as bytes, as Vidur's predictor does)")
    if not ar and sr:
        c = sorted(sr, key=lambda c: c.cluster)[0]
        s_lat, s_bw, s_err = fit_collective(c)
        errors.update(s_err)
        lat, link = 2.0 * s_lat, s_bw  # ring all-reduce over 2 GPUs: 2 steps of size/2
        notes.append(f"no all-reduce table: all-reduce derived from {c.cluster}/{c.path.name} (send/recv latency "
                     f"{s_lat * 1e6:.1f} us, {s_bw / 1e9:.0f} GB/s) as a 2-step ring: latency 2·t_lat, bandwidth B")
    # CPU overhead
    c0, c1 = 2e-4, 0.0
    cpu = im.cpu or im.foreign_cpu
    if cpu:
        c0, c1, c_err = fit_cpu(cpu[0])
        errors.update(c_err)
        host = "" if im.cpu else f" (measured with {cpu[0].device}s: the engine's CPU work does not depend on the GPU)"
        notes.append(f"serving-engine CPU time per iteration from {cpu[0].path.name}{host}: {c0 * 1e3:.3f} ms + "
                     f"{c1 * 1e6:.1f} us per sequence (vLLM: schedule + prepare inputs + sampler + process outputs)")
    else:
        notes.append(f"no CPU-overhead table for {dev}: pass overhead fixed at the default "
                     f"{c0 * 1e3:.1f} ms, no per-sequence term")
    embs = [t.ops["emb"][t.tokens <= DECODE_TOKENS[1]] for t in im.mlp if "emb" in t.ops]
    emb = float(np.median(np.concatenate(embs))) if embs else 0.0  # the embedding lookup, once per pass
    kernel = float(lin[4] + ng[0] + (att[2] if att is not None else 0.0))
    eff = Efficiency(
        flops_max=float(lin[0]), flops_half_tokens=float(lin[1]), bandwidth=float(lin[2]),
        kernel_overhead_s_per_layer=kernel, pass_overhead_s=c0 + emb, allreduce_latency_s=lat,
        roofline_sharpness=p,
        attention_flops=float(att[0]) if att is not None else None,
        kv_bandwidth=float(att[1]) if att is not None else None,
        nongemm_s_per_token_hidden=float(ng[1]), nongemm_s_per_token_ffn=float(ng[2]),
        nongemm_s_per_token_qkv=float(ng[3]), nongemm_min_tokens=float(ng[4]), pass_overhead_s_per_seq=c1,
    )
    _check_against_cost_model(eff, im.mlp[0], lin, ng, sheet, link)
    return DeviceFit(dev, eff, link, errors, notes, attention_note, time.perf_counter() - t_start, lin, ng, att)


def _layer_with_attention(im, table, lin, ng, att, peak, bw, p) -> dict:
    """Whole decoder layer (GEMMs + non-GEMM + attention) where both tables share the shape: the
    mlp table of the attention table's model and TP, at the attention table's held-out points."""
    d, tp = table.dims["n_embd"], table.dims["tp"]
    out = {}
    for t in im.mlp:
        if t.path.resolve().parent != table.path.resolve().parent or t.dims["n_embd"] != d:
            continue  # the attention table's own model (same directory)
        a = attention_rows(table)
        sel = a.heldout
        r = layer_rows([t]).select(layer_rows([t]).tp == tp)
        lookup = {float(k): i for i, k in enumerate(r.tokens)}
        idx = np.array([lookup.get(float(k), -1) for k in a.tokens[sel]])
        ok = idx >= 0
        if not np.any(ok):
            continue
        rr = r.select(idx[ok])
        sub = AttRows(*(v[sel][ok] for v in a.__dict__.values()))
        pred = linear_predict(lin, rr, peak, bw) + nongemm_predict(ng, rr) + attention_predict(att, sub, peak, bw, p)
        meas = rr.linear_s + rr.nongemm_s + sub.time_s
        for kind, m in (("decode", ~sub.prefill), ("prefill", sub.prefill)):
            if np.any(m):
                out[f"layer+attention/heldout-kv/{t.model}/tp{tp}/{kind}"] = ape(pred[m], meas[m])
        break
    return out


def _check_against_cost_model(eff: Efficiency, t: MlpTable, lin, ng, sheet, link) -> None:
    """The fitted profile's CostModel prices one layer as the families' sum (guards the formula)."""
    prof = build_profile(sheet, eff, link, Provenance(source="check"))
    spec = layer_spec(t).model_copy(update={"vocab": 1})  # the LM head's weights: 2·d bytes
    for tp in (1, 2):
        cm = CostModel(spec, prof, tp)
        for tokens in (1.0, 64.0, 2048.0):
            got = cm.pass_time(tokens, 0, 0.0, 0.0)[0] - eff.pass_overhead_s - (cm._comm_fixed + cm._comm_per_token * tokens)
            if eff.attention_flops is not None:  # the new tokens' KV written (no attention FLOPs at c = 0 pairs)
                got -= cm.kv_bytes(BatchShape(tokens, 0, 0.0, 0.0)) / (cm.bandwidth * eff.kv_bandwidth)
            r = LayerRows(*(np.array([v]) for v in (t.model, float(tp), tokens, float(spec.layer_params),
                                                   float(spec.hidden), float(spec.ffn), float(spec.hidden + spec.kv_dim),
                                                   1.0, 1.0)))
            want = float(linear_predict(lin, r, sheet["peaks"]["bf16"], sheet["bandwidth"])[0]
                         + nongemm_predict(ng, r)[0]) + (eff.kernel_overhead_s_per_layer - lin[4] - ng[0])
            if not math.isclose(got, want, rel_tol=1e-4 if eff.attention_flops is not None else 1e-2):
                raise AssertionError(f"cost model prices a layer at {got}, the fit at {want}")


def build_profile(sheet: dict, eff: Efficiency, link: float, prov: Provenance, fit_errors=None,
                  name: str | None = None, device: str | None = None, bandwidth: float | None = None,
                  memory: float | None = None) -> HardwareProfile:
    return HardwareProfile(
        schema_version=SCHEMA_VERSION, name=name or sheet["name"], device=device or sheet["device"],
        peak_flops_per_s=dict(sheet["peaks"]), memory_bandwidth_bytes_per_s=bandwidth or sheet["bandwidth"],
        memory_bytes=memory or sheet["memory"], interconnect_bandwidth_bytes_per_s=link, efficiency=eff,
        provenance=prov, fit_errors=fit_errors or {},
    )


def profile_from_fit(fit: DeviceFit, im: Imported, command: str) -> HardwareProfile:
    sheet = DATASHEETS[fit.device]
    e = fit.efficiency
    notes = (
        f"Fitted by `{command}` on real CUDA kernel timings (Vidur's profiler, bf16/fp16) with datasheet peaks "
        f"({sheet['sheet']}) as the reference. Linear ops: smooth roofline p={e.roofline_sharpness:.2f}, "
        f"η_max={e.flops_max:.3f}, T½={e.flops_half_tokens:.1f}, η_b={e.bandwidth:.3f}. Non-GEMM ops priced per "
        f"token outside the roofline. Held-out models (not fitted): {', '.join(HELDOUT_MODELS)}; fit_errors keys "
        f"are family/split/regime/TP (decode = {DECODE_TOKENS[0]}-{DECODE_TOKENS[1]} tokens, prefill = "
        f"{PREFILL_TOKENS[0]}-{PREFILL_TOKENS[1]}); 'layer' = linear + non-GEMM of one decoder layer. "
        + "; ".join(fit.notes) + "."
    )
    prov = Provenance(
        source="measured", measured_on=sheet["device"] + " (Vidur's public profiling runs)",
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), command=command,
        efficiencies_are_defaults=False, notes=notes, data_source=DATA_SOURCE, files=dict(im.files),
        attention=fit.attention_note, fit_seconds=round(fit.seconds, 2),
    )
    return build_profile(sheet, e, fit.link_bandwidth, prov, fit.errors)


def derive_h200(h100: HardwareProfile) -> HardwareProfile:
    """H200 = H100's fitted efficiencies with H200's memory bandwidth and size: derived, not measured."""
    prov = h100.provenance.model_copy(update={
        "source": "derived", "measured_on": None, "derived_from": f"{h100.name} ({h100.provenance.date})",
        "notes": (f"DERIVED, NOT MEASURED: {h100.name}'s fitted efficiencies, overheads and all-reduce with "
                  f"{H200['sheet']}. H200 runs the H100's SM90 kernels on faster, larger memory; expect the "
                  "bandwidth-bound parts to be the least certain. Source fit: " + (h100.provenance.notes or "")),
    })
    return h100.model_copy(update={
        "name": H200["name"], "device": H200["device"], "memory_bandwidth_bytes_per_s": H200["bandwidth"],
        "memory_bytes": H200["memory"], "provenance": prov,
        "fit_errors": {f"h100:{k}": v for k, v in h100.fit_errors.items()},
    })


def summary_rows(errors: dict[str, dict[str, float]]) -> list[tuple[str, float, float, int]]:
    return [(k, v["median_ape_pct"], v["max_ape_pct"], int(v["n"])) for k, v in errors.items()]


def median_of(values) -> float:
    return statistics.median(values)


# --- `osdsim calibrate --gpu G --from PATH` ------------------------------------------------------
@dataclass
class ImportOutcome:
    profile: HardwareProfile
    errors: dict[str, dict[str, float]]
    imported: Imported
    wall_s: float


def calibrate_from(source, gpu: str, command: str) -> ImportOutcome:
    """Import the measurements under `source` for `gpu` and fit a profile (nothing written here).

    `--gpu h200` fits the H100's tables and derives H200 from them (labelled derived)."""
    from osdsim.calibrate.tables import DEVICE_ALIASES, import_measurements

    t0 = time.perf_counter()
    name = gpu.strip().lower()
    family = DEVICE_ALIASES.get(name)
    if family is None:
        raise InputError(f"--gpu {gpu!r}: --from imports measurements of a100 / a100-80g, h100, h200 (derived "
                         "from h100) or a40")
    data_device = "h100" if family == "h200" else family
    im = import_measurements(source, data_device)
    if im.raw and not im.mlp:
        profile, errors = _profile_from_raw(im, data_device, command)
    else:
        fit = fit_device(im)
        fit.seconds = time.perf_counter() - t0
        profile, errors = profile_from_fit(fit, im, command), fit.errors
    if family == "h200":
        profile = derive_h200(profile)
    profile.provenance.fit_seconds = round(time.perf_counter() - t0, 2)
    return ImportOutcome(profile, errors, im, time.perf_counter() - t0)


def _profile_from_raw(im: Imported, device: str, command: str) -> tuple[HardwareProfile, dict]:
    """osdsim's own raw calibration CSV (whole passes): the pass fit of `osdsim calibrate`."""
    from osdsim.calibrate.fit import fit_passes

    sheet = DATASHEETS[device]
    rows = [r for t in im.raw for r in t.rows]
    try:
        fit = fit_passes(rows, dict(sheet["peaks"]), sheet["bandwidth"])
    except (ValueError, KeyError) as exc:
        raise InputError(f"{im.raw[0].path}: {exc}") from None
    dtypes = list(fit.efficiency)
    primary = "bf16" if "bf16" in fit.efficiency else dtypes[0]
    prov = Provenance(
        source="measured", measured_on=sheet["device"], command=command, efficiencies_are_defaults=False,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), files=dict(im.files),
        notes=(f"Imported osdsim raw calibration CSV(s) and fitted with the pass fit of `osdsim calibrate`, "
               f"datasheet peaks as the reference ({sheet['sheet']})."),
    )
    prof = HardwareProfile(
        schema_version=SCHEMA_VERSION, name=sheet["name"], device=sheet["device"], peak_flops_per_s=dict(sheet["peaks"]),
        memory_bandwidth_bytes_per_s=sheet["bandwidth"], memory_bytes=sheet["memory"],
        interconnect_bandwidth_bytes_per_s=sheet["link"], efficiency=fit.efficiency[primary],
        efficiency_by_dtype={d: e for d, e in fit.efficiency.items() if d != primary}, provenance=prov,
        fit_errors=fit.heldout,
    )
    return prof, fit.heldout


def write_profile(profile: HardwareProfile, path, force: bool):
    """Write atomically (temp file + rename); an existing profile is kept as <name>.prev.yaml unless force."""
    from pathlib import Path

    from osdsim.cost.profile import dump_profile
    from osdsim.errors import atomic_write_text

    path = Path(path)
    prev = None
    text = (f"# Hardware profile written by `{profile.provenance.command}`.\n"
            "# Fitted on imported kernel timings; held-out errors (percent) in fit_errors, sources in provenance.\n"
            + dump_profile(profile))
    if path.exists() and not force:
        prev = path.with_name(f"{path.stem}.prev.yaml")
        atomic_write_text(prev, path.read_text())
    atomic_write_text(path, text)
    return path, prev
