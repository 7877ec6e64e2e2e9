"""Fit the cost model's efficiencies to measured passes (issue 4, item 3). numpy + scipy, no torch.

The model fitted is exactly osdsim.cost.model.CostModel (docs/architecture.md, Physics: cost of a pass) at tensor parallel 1:

    time = max(F / (F_peak·η_f(T)), (bytes − KV)/(BW·η_b) + KV/(BW·η_kv)) + m·(L·t_kernel + t_pass)
    η_f(T) = η_max·T / (T + T½)                       (m = 1 for a forward, 3 for a training step)
    for T ≤ g = gemv_max_tokens (BLAS matrix-vector paths): weights read T times, η_f = η_max

F and bytes of each measured pass come from CostModel itself (price() / training_step() under a
reference profile with unit efficiencies), so the fit and the simulator cannot drift apart. The
six parameters (η_max, T½, η_b, t_kernel, t_pass, η_kv) are fitted per dtype by least squares on
the log of predicted/measured time (relative errors), robust loss, several starting points. A weak
prior log(η_kv/η_b) ≈ 0 keeps η_kv at η_b where the passes carry too little KV traffic to tell.
The integer g is chosen among GEMV_CANDIDATES by the fit's cost: a larger g must lower the cost by
GEMV_MIN_GAIN (so noise alone does not buy the extra freedom).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from osdsim.calibrate.measure import Measurement
from osdsim.cost.model import TRAIN_FLOPS_MULTIPLIER, BatchShape, CostModel, TimeCoefs, pass_core
from osdsim.cost.profile import SCHEMA_VERSION, Efficiency, HardwareProfile, Provenance
from osdsim.models import PRESETS, ModelSpec

PARAM_NAMES: tuple[str, ...] = (
    "flops_max", "flops_half_tokens", "bandwidth", "kernel_overhead_s_per_layer", "pass_overhead_s", "kv_bandwidth",
)
LOWER = np.array([1e-4, 0.0, 1e-4, 0.0, 0.0, 1e-4])
UPPER = np.array([1.0, 1e5, 1.0, 1.0, 10.0, 1.0])
GEMV_CANDIDATES: tuple[int, ...] = (0, 2, 3, 4, 8)
GEMV_MIN_GAIN = 0.10  # relative cost reduction a larger g must bring
KV_PRIOR_WEIGHT = 0.01  # residual weight of log(η_kv/η_b); data residuals are O(0.01–0.1)


def spec_for(name: str, dtype: str) -> ModelSpec:
    """A measured model's spec from its name: a preset, or '<preset>-l<N>' (its first N layers)."""
    if name in PRESETS:
        return PRESETS[name].model_copy(update={"dtype": dtype})
    m = re.fullmatch(r"(.+?)(?:-l(\d+))?(?:-v(\d+))?", name)
    if m and m.group(1) in PRESETS and (m.group(2) or m.group(3)):
        base = PRESETS[m.group(1)]
        update: dict = {"name": name, "dtype": dtype}
        if m.group(2):
            update["n_layers"] = int(m.group(2))
        if m.group(3):  # a reduced LM head (osdsim real's draft_vocab)
            update["vocab"] = int(m.group(3))
        return base.model_copy(update=update)
    raise ValueError(f"unknown model {name!r} in measurements (a preset, '<preset>-l<N>' or '<preset>-l<N>-v<V>')")


def reference_profile(peaks: dict[str, float], bandwidth: float) -> HardwareProfile:
    """Unit efficiencies, no overheads: CostModel then returns raw FLOPs and bytes."""
    return HardwareProfile(
        schema_version=SCHEMA_VERSION, name="reference", device="reference",
        peak_flops_per_s=peaks, memory_bandwidth_bytes_per_s=bandwidth, memory_bytes=1.0,
        interconnect_bandwidth_bytes_per_s=1.0,
        efficiency=Efficiency(flops_max=1.0, flops_half_tokens=0.0, bandwidth=1.0,
                              kernel_overhead_s_per_layer=0.0, pass_overhead_s=0.0),
        provenance=Provenance(source="reference"),
    )


@dataclass(frozen=True)
class Terms:
    """Per-row inputs of the time formula (numpy arrays, one entry per pass)."""

    flops: np.ndarray
    bytes: np.ndarray
    kv_bytes: np.ndarray
    weight_bytes: np.ndarray  # one read of the weights (× the training multiplier for a step)
    tokens: np.ndarray
    layers: np.ndarray
    multiplier: np.ndarray
    peak: np.ndarray
    bandwidth: float


def pass_terms(rows: list[Measurement], peaks: dict[str, float], bandwidth: float) -> Terms:
    ref = reference_profile(peaks, bandwidth)
    flops, nbytes, kv, weights, mult = [], [], [], [], []
    for r in rows:
        cm = CostModel(spec_for(r.model, r.dtype), ref)
        if r.pass_type == "train":
            pc = cm.training_step(float(r.tokens), float(r.batch * r.q * r.q), r.trainable_params)
            flops.append(pc.flops)
            nbytes.append(pc.bytes)
            kv.append(TRAIN_FLOPS_MULTIPLIER * cm.kv_bytes(BatchShape(r.tokens, r.tokens, 0.0, 0.0)))
            weights.append(TRAIN_FLOPS_MULTIPLIER * cm.weight_bytes)
            mult.append(TRAIN_FLOPS_MULTIPLIER)
        else:
            s = BatchShape(r.tokens, r.logit_tokens, r.context_tokens, r.attention_pairs)
            flops.append(cm.flops(s))
            nbytes.append(cm.bytes(s))
            kv.append(cm.kv_bytes(s))
            weights.append(cm.weight_bytes)
            mult.append(1.0)
    return Terms(
        flops=np.array(flops), bytes=np.array(nbytes), kv_bytes=np.array(kv), weight_bytes=np.array(weights), tokens=np.array([float(r.tokens) for r in rows]),
        layers=np.array([float(r.n_layers) for r in rows]), multiplier=np.array(mult),
        peak=np.array([peaks[r.dtype] for r in rows]), bandwidth=bandwidth,
    )


def predict(params: np.ndarray, t: Terms, gemv_max_tokens: int = 0, train_efficiency: float = 1.0) -> np.ndarray:
    """CostModel's time for each row under efficiency `params` (PARAM_NAMES order), g and the
    training-step efficiency (divides the roofline part of training rows).

    `Terms.bytes` are computed with g = 0 (one weight read); rows with T ≤ g add T − 1 reads."""
    core, overhead = _core_and_overhead(params, t, gemv_max_tokens)
    return core / np.where(t.multiplier > 1, train_efficiency, 1.0) + overhead


def _core_and_overhead(params: np.ndarray, t: Terms, gemv_max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The cost model's own roofline core (osdsim.cost.model.pass_core) on arrays, plus overheads."""
    eta_max, t_half, eta_b, t_kernel, t_pass, eta_kv = params
    gemv = t.tokens <= gemv_max_tokens  # matrix-vector regime: T weight reads, FLOPs at η_max
    eta = np.where(gemv, eta_max, eta_max * t.tokens / (t.tokens + t_half))
    extra_reads = np.where(gemv, t.tokens - 1.0, 0.0)
    nbytes = t.bytes + extra_reads * t.weight_bytes
    eff_bw = t.bandwidth * eta_b
    coefs = TimeCoefs(peak=t.peak, eff_bw=eff_bw, kv_extra_s_per_byte=1.0 / (t.bandwidth * eta_kv) - 1.0 / eff_bw)
    core, _, _ = pass_core(t.flops, 0.0, nbytes, t.kv_bytes, 0.0, 0.0, eta, coefs, np.maximum)
    return core, t.multiplier * (t.layers * t_kernel + t_pass)


def fit_train_efficiency(params: np.ndarray, t: Terms, measured_s: np.ndarray, gemv_max_tokens: int) -> float:
    """Median over measured training steps of (roofline time at forward efficiencies) / (measured −
    overheads): how much slower (< 1) or faster a step's work runs than the 3×-forward rule says."""
    core, overhead = _core_and_overhead(params, t, gemv_max_tokens)
    work = np.maximum(measured_s - overhead, 1e-3 * measured_s)
    return float(np.clip(np.median(core / work), 0.05, 4.0))


def fit_efficiency(t: Terms, measured_s: np.ndarray, overhead_guess_s: float = 1e-5) -> tuple[np.ndarray, int]:
    """(params, g): for each candidate g, least squares on log(predicted/measured), best of several
    starts (the max() makes the objective piecewise smooth, so one start can stall on the wrong
    side of a kink); a larger g replaces the best so far only if it lowers the cost by GEMV_MIN_GAIN."""
    best: tuple[float, np.ndarray, int] | None = None
    for g in GEMV_CANDIDATES:
        if g and not np.any(t.tokens <= g):
            continue  # no pass in the data is in this regime
        cost, x = _fit_continuous(t, measured_s, overhead_guess_s, g)
        if best is None or cost < best[0] * (1 - GEMV_MIN_GAIN):
            best = (cost, x, g)
    assert best is not None
    return best[1], best[2]


def _fit_continuous(t: Terms, measured_s: np.ndarray, overhead_guess_s: float, g: int) -> tuple[float, np.ndarray]:
    log_meas = np.log(measured_s)

    def residuals(p: np.ndarray) -> np.ndarray:
        prior = KV_PRIOR_WEIGHT * np.log(p[5] / p[2])
        return np.append(np.log(predict(p, t, g)) - log_meas, prior)

    scale = np.array([0.3, 30.0, 0.3, max(overhead_guess_s, 1e-6), max(10 * overhead_guess_s, 1e-5), 0.3])
    best = None
    starts = [(eta0, half0) for eta0 in (0.2, 0.7) for half0 in (2.0, 32.0, 256.0)]
    for eta0, half0 in starts:
        x0 = np.array([eta0, half0, 0.5, overhead_guess_s, 5 * overhead_guess_s, 0.5])
        x0 = np.clip(x0, LOWER + 1e-9, UPPER - 1e-9)
        res = least_squares(
            residuals, x0, bounds=(LOWER, UPPER), x_scale=scale, method="trf",
            loss="soft_l1", f_scale=0.05, xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=1500,
        )
        if best is None or res.cost < best.cost:
            best = res
        if best.cost < 1e-20:  # exact (synthetic data): no other start can do better
            break
    assert best is not None
    return float(best.cost), best.x


def efficiency_from(params: np.ndarray, gemv_max_tokens: int = 0, train_efficiency: float = 1.0) -> Efficiency:
    values = {n: float(v) for n, v in zip(PARAM_NAMES, params, strict=True)}
    return Efficiency(**values, gemv_max_tokens=gemv_max_tokens, train_efficiency=train_efficiency)


def ape_summary(predicted: list[float], measured: list[float]) -> dict[str, float]:
    """Median and max absolute percentage error (in %), and the count."""
    apes = [abs(p - m) / m * 100.0 for p, m in zip(predicted, measured, strict=True)]
    return {"median_ape_pct": round(statistics.median(apes), 3), "max_ape_pct": round(max(apes), 3), "n": len(apes)}


@dataclass
class FitResult:
    efficiency: dict[str, Efficiency]  # per dtype
    heldout: dict[str, dict[str, float]]  # "<pass_type>/<dtype>", "all/<dtype>", "all" -> errors
    insample: dict[str, dict[str, float]]
    rows: list[Measurement] = field(default_factory=list)  # pass rows with predicted_s filled


def fit_passes(
    rows: list[Measurement], peaks: dict[str, float], bandwidth: float, overhead_guess_s: float = 1e-5
) -> FitResult:
    """Fit each dtype on its `split == 'fit'` passes; score all passes; summarise per pass type."""
    passes = [r for r in rows if r.kind == "pass"]
    effs: dict[str, Efficiency] = {}
    heldout: dict[str, dict[str, float]] = {}
    insample: dict[str, dict[str, float]] = {}
    for dtype in sorted({r.dtype for r in passes}):
        mine = [r for r in passes if r.dtype == dtype]
        # Forward passes fit the six efficiencies; training steps then fit train_efficiency alone
        # (their backward/optimizer work must not bend the forward fit). With too few forward
        # passes, everything fits together (train_efficiency stays 1).
        fit_all = [r for r in mine if r.split == "fit"]
        fit_rows = [r for r in fit_all if r.pass_type != "train"]
        train_rows = [r for r in fit_all if r.pass_type == "train"]
        if len(fit_rows) < len(PARAM_NAMES):
            fit_rows, train_rows = fit_all, []
        if len(fit_rows) < len(PARAM_NAMES):
            raise ValueError(f"{dtype}: {len(fit_rows)} passes to fit, need ≥ {len(PARAM_NAMES)}")
        params, gemv = fit_efficiency(
            pass_terms(fit_rows, peaks, bandwidth), np.array([r.median_s for r in fit_rows]), overhead_guess_s
        )
        train_eff = 1.0
        if train_rows:
            train_eff = fit_train_efficiency(params, pass_terms(train_rows, peaks, bandwidth),
                                             np.array([r.median_s for r in train_rows]), gemv)
        effs[dtype] = efficiency_from(params, gemv, train_eff)
        pred = predict(params, pass_terms(mine, peaks, bandwidth), gemv, train_eff)
        for r, p in zip(mine, pred, strict=True):
            r.predicted_s = float(p)
        for split, table in (("heldout", heldout), ("fit", insample)):
            chosen = [r for r in mine if r.split == split]
            for kind in sorted({r.pass_type for r in chosen}):
                sel = [r for r in chosen if r.pass_type == kind]
                table[f"{kind}/{dtype}"] = ape_summary([r.predicted_s for r in sel], [r.median_s for r in sel])
            if chosen:
                table[f"all/{dtype}"] = ape_summary([r.predicted_s for r in chosen], [r.median_s for r in chosen])
    for split, table in (("heldout", heldout), ("fit", insample)):
        chosen = [r for r in passes if r.split == split]
        if chosen:
            table["all"] = ape_summary([r.predicted_s for r in chosen], [r.median_s for r in chosen])
    return FitResult(effs, heldout, insample, passes)


def synthetic_rows(shapes_rows: list[Measurement], profile: HardwareProfile) -> list[Measurement]:
    """Copies of `shapes_rows` timed by CostModel under `profile` (for testing the fit)."""
    out = []
    for r in shapes_rows:
        cm = CostModel(spec_for(r.model, r.dtype), profile)
        if r.pass_type == "train":
            t = cm.training_step(float(r.tokens), float(r.batch * r.q * r.q), r.trainable_params).time_s
        else:
            t, _, _, _ = cm.pass_time(r.tokens, r.logit_tokens, r.context_tokens, r.attention_pairs)
        copy = Measurement(**{k: getattr(r, k) for k in r.__dataclass_fields__})
        copy.median_s = copy.min_s = copy.max_s = t
        out.append(copy)
    return out


def finite(summary: dict[str, dict[str, float]]) -> bool:
    return all(math.isfinite(v) for d in summary.values() for v in d.values())
