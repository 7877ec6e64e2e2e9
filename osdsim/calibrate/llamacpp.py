"""`osdsim calibrate --gpu cpu --backend llamacpp`: price a llama.cpp server (issue 15, item 3).

Measures real passes of the models osdsim real serves on llama.cpp — the packaged SmolLM2-135M GGUF
(Q4_1 layers, Q8_0 embeddings/head, f16 KV cache) and its 2-layer draft sliced from it byte for byte
(the untrained layer draft exactly as the run exports it) — at batch 1 and batched (B sequences, each
in its own KV stream, in one llama_decode: the batched server's passes), the shapes the simulator
prices: decode (1 token after c cached), verify (k+1 tokens, logits at every position), prefill
(q tokens, logits at the last), the draft's decode/verify passes. Each pass is llama_decode plus the
copy of its logits out of llama.cpp (what the server pays). Fitted with the same cost model and
least-squares fit as `osdsim calibrate` (`fit.fit_passes`), held-out shapes scored apart.

Peaks: the profile carries torch's best fp32/bf16 GEMM here (so transformers-dtype models price too)
and a `q4_1` peak = max(the fp32 GEMM peak, 1.25 × the best FLOP rate of a measured llama.cpp pass),
an anchor for η (the fitted efficiencies are relative to it). Bandwidth: best streaming rate (torch).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osdsim.calibrate.measure import Measurement, Timer
from osdsim.calibrate.passes import PassShape, shape_row
from osdsim.errors import InputError
from osdsim.models import ModelSpec

DTYPE = "q4_1"
TARGET = "smollm2-135m-q4_1"
# The trained draft as osdsim real publishes it (served_draft_type: Q4_1 rounds distillation updates
# away, so its layers are re-quantised to Q8_0): a third model of the grid, fitted as its own dtype.
DRAFT_DTYPE = "q8_0"
DRAFT = "smollm2-135m-q8_0-l2"
CANARY_TOKENS = 8  # the canary pass: a fresh 8-token prefill of the draft (the server's HostCanary shape)


@dataclass(frozen=True)
class LPlan:
    models: dict[str, int]  # model name (a preset or '<preset>-l<N>') -> layers sliced from the GGUF
    shapes: tuple[PassShape, ...]
    repeats: int


def _grid(model: str, pass_type: str, split: str, contexts, qs, batches=(1,)) -> list[PassShape]:
    return [PassShape(model, pass_type, b, c, q, split) for b in batches for c in contexts for q in qs]


def plan(quick: bool) -> LPlan:
    """Grid of batch-1 shapes (the batch-1 server) and batched ones (the batched server: B sequences
    with their own KV streams in one llama_decode, as LlamaCppEngine runs them). Batched contexts sit
    just under llama.cpp's 256-cell padding of each stream (250, 500), so the context the cost model
    is given is the width the attention reads. Full: the 30-layer target and its 2-layer draft
    (≈ 3 min on one core); quick (tests): 4- and 2-layer slices, a handful of shapes."""
    if quick:
        models = {f"{TARGET}-l4": 4, f"{TARGET}-l2": 2, DRAFT: 2}
        shapes: list[PassShape] = []
        for m in models:
            shapes += _grid(m, "decode", "fit", (16, 128), (1,))
            shapes += _grid(m, "verify", "fit", (64,), (3, 6))
            shapes += _grid(m, "prefill", "fit", (0,), (16, 64))
            shapes += _grid(m, "decode", "fit", (60,), (1,), batches=(2,))
            shapes += _grid(m, "decode", "heldout", (64,), (1,))
            shapes += _grid(m, "verify", "heldout", (64,), (4,))
            shapes += _grid(m, "verify", "heldout", (60,), (3,), batches=(3,))
        return LPlan(models, tuple(shapes), 3)
    models = {TARGET: 30, f"{TARGET}-l2": 2, DRAFT: 2}
    shapes = []
    for m in models:
        shapes += _grid(m, "decode", "fit", (32, 256, 1024), (1,))
        shapes += _grid(m, "verify", "fit", (128,), (2, 3, 5, 9))
        shapes += _grid(m, "verify", "fit", (768,), (3, 5))
        shapes += _grid(m, "prefill", "fit", (0,), (16, 64, 256))
        shapes += _grid(m, "prefill", "fit", (256,), (64,))
        shapes += _grid(m, "decode", "heldout", (128, 512), (1,))
        shapes += _grid(m, "verify", "heldout", (384,), (4, 6))
        shapes += _grid(m, "verify", "heldout", (64,), (7,))
        shapes += _grid(m, "prefill", "heldout", (0,), (32, 128))
        shapes += _grid(m, "decode", "fit", (250,), (1,), batches=(2, 4, 8))
        shapes += _grid(m, "decode", "fit", (500,), (1,), batches=(4,))
        shapes += _grid(m, "verify", "fit", (250,), (4,), batches=(2, 4, 8))
        shapes += _grid(m, "decode", "heldout", (500,), (1,), batches=(3,))
        shapes += _grid(m, "decode", "heldout", (250,), (1,), batches=(6,))
        shapes += _grid(m, "verify", "heldout", (500,), (4,), batches=(3,))
        shapes += _grid(m, "verify", "heldout", (250,), (3,), batches=(6,))
    return LPlan(models, tuple(shapes), 9)


def dtype_of(name: str) -> str:
    """The dtype a grid model is priced in: the Q8_0 draft's, else the packaged model's Q4_1."""
    return DRAFT_DTYPE if name == DRAFT else DTYPE


def spec_of(name: str) -> ModelSpec:
    from osdsim.calibrate.fit import spec_for

    return spec_for(name, dtype_of(name))


def build_models(gguf_path: Path, lplan: LPlan, workdir: Path, threads: int, n_ctx: int) -> dict[str, Any]:
    from osdsim.real.llamacpp import LlamaCppLM, open_reader, read_base, slice_gguf

    reader = open_reader(gguf_path)
    base = read_base(gguf_path, reader)
    if base.layer_type != DTYPE:
        raise InputError(f"{gguf_path.name}: layers are {base.layer_type}, the llamacpp calibration prices {DTYPE}")
    out: dict[str, Any] = {}
    for name, layers in lplan.models.items():
        retype = DRAFT_DTYPE if dtype_of(name) != DTYPE else None
        path = (gguf_path if layers == base.n_layers and retype is None
                else slice_gguf(gguf_path, layers, workdir / f"{name}.gguf", reader, layer_type=retype))
        out[name] = LlamaCppLM(path, n_ctx=n_ctx, threads=threads)
    return out


@dataclass
class BatchedBank:
    """One model's batched llama.cpp context for the batched shapes: per context length c a bank of
    sequence ids that hold c cached tokens (built once, untimed); a pass appends q tokens to the
    first B of them and removes them again, so no context is rebuilt between sweeps."""

    lm: Any  # osdsim.real.llamacpp.LlamaCppBatchLM
    seqs: dict[int, list[int]]  # context -> sequence ids holding it
    built: set[int] = field(default_factory=set)


def build_batched(models: dict[str, Any], lplan: LPlan, threads: int) -> dict[str, BatchedBank]:
    """A batched context per model with batched shapes: max B sequences for each batched context."""
    from osdsim.real.llamacpp import LlamaCppBatchLM

    out: dict[str, BatchedBank] = {}
    for name in models:
        mine = [s for s in lplan.shapes if s.model == name and s.batch > 1]
        if not mine:
            continue
        seqs: dict[int, list[int]] = {}
        for c in sorted({s.context for s in mine}):
            first = sum(len(v) for v in seqs.values())
            seqs[c] = list(range(first, first + max(s.batch for s in mine if s.context == c)))
        n_ctx_seq = max(s.context + s.q for s in mine) + 1
        out[name] = BatchedBank(LlamaCppBatchLM(models[name].path, sum(len(v) for v in seqs.values()), n_ctx_seq,
                                                threads), seqs)
    return out


def _batched_pass(bank: BatchedBank, shape: PassShape, rng: np.random.Generator) -> tuple[Any, Any]:
    """(the timed call, the undo) of one batched shape: B blocks of q tokens after c cached, logits
    at every position (decode, verify) or the last (prefill)."""
    from osdsim.real.llamacpp import Block

    lm, c = bank.lm, shape.context
    ids = bank.seqs[c][: shape.batch]
    if c not in bank.built:  # untimed: every sequence of the bank gets its c tokens once
        lm.decode([Block(sq, 0, [int(x) for x in rng.integers(3, lm.n_vocab, c)], []) for sq in bank.seqs[c]])
        bank.built.add(c)
    want = list(range(shape.q)) if shape.pass_type != "prefill" else [shape.q - 1]
    blocks = [Block(sq, c, [int(x) for x in rng.integers(3, lm.n_vocab, shape.q)], want) for sq in ids]

    def undo() -> None:
        for sq in ids:
            lm.seq_rm(sq, c)

    return (lambda: lm.decode(blocks)), undo


def build_canary(models: dict[str, Any], lplan: LPlan, threads: int) -> Any:
    """The canary: the shallowest model of the plan loaded once more, on a context of its own (its
    passes leave the measured models' KV caches alone)."""
    from osdsim.real.llamacpp import LlamaCppLM

    return LlamaCppLM(models[canary_model(lplan)].path, n_ctx=4 * CANARY_TOKENS, threads=threads)


def _canary_pass(lm: Any) -> float:
    """Seconds of one canary pass on its own context (reset, untimed; then the timed prefill)."""
    lm.reset()
    t0 = time.perf_counter()
    lm.feed(list(range(100, 100 + CANARY_TOKENS)), all_logits=False)
    return time.perf_counter() - t0


def host_corrected(times: list[float], speeds: list[float], reference_s: float) -> list[float]:
    """Each time at the reference host speed: t × reference / (the canary's time around it).

    On a shared machine the host's speed drifts over seconds to minutes (here: a 1-token decode's
    median over half-second blocks moved between 11.6 and 16.1 ms within 20 s, lag-1 correlation
    0.83), so shapes timed in slow moments come out slow and the fit reads drift as shape. A canary
    timed right before and right after each pass (their geometric mean, `speeds`) says how fast the
    host ran then; scaling by reference / canary puts every sample at one speed, the median canary
    of the calibration (the paired-reference idea of duet benchmarking, Bulej et al., ICPE 2020)."""
    return [t * reference_s / s for t, s in zip(times, speeds, strict=True)]


def measure(models: dict[str, Any], lplan: LPlan, tick=None, seed: int = 0,
            canary: Any = None, batched: dict[str, BatchedBank] | None = None) -> list[Measurement]:
    """Sweep the grid `repeats` times after a warm-up sweep, one call per shape per sweep (load that
    comes and goes spreads over all shapes), median per shape. Within a sweep shapes run in order of
    context per model, so each context is built by extending (untimed) the one before; batched
    shapes (B > 1) run on the model's BatchedBank in `batched`.

    With a `canary` (a model on its own context), every timed pass is bracketed by a canary pass and
    the medians are of host-corrected times (host_corrected); `raw_median_s` keeps the uncorrected
    median, and a `kind='canary'` row the canary's own distribution."""
    rng = np.random.default_rng(seed)
    order = sorted(range(len(lplan.shapes)), key=lambda i: (lplan.shapes[i].model, lplan.shapes[i].context))
    times: list[list[float]] = [[] for _ in lplan.shapes]
    speeds: list[list[float]] = [[] for _ in lplan.shapes]
    canaries: list[float] = []
    for sweep in range(lplan.repeats + 1):
        for lm in models.values():
            lm.reset()
        for i in order:
            shape = lplan.shapes[i]
            if shape.batch > 1:
                if not batched or shape.model not in batched:
                    raise ValueError(f"{shape}: a batched shape needs the model's batched context")
                run, undo = _batched_pass(batched[shape.model], shape, rng)
            else:
                run, undo = _single_pass(models[shape.model], shape, rng)
            before = _canary_pass(canary) if canary is not None else 1.0
            t0 = time.perf_counter()
            run()
            dt = time.perf_counter() - t0
            after = _canary_pass(canary) if canary is not None else 1.0
            undo()
            if sweep:
                times[i].append(dt)
                speeds[i].append(float(np.sqrt(before * after)))
                if canary is not None:
                    canaries += [before, after]
        if tick is not None:
            tick(f"llama.cpp passes: sweep {sweep}/{lplan.repeats}")
    rows = []
    reference = statistics.median(canaries) if canaries else 1.0
    for s, t, sp in zip(lplan.shapes, times, speeds, strict=True):
        row = shape_row(spec_of(s.model), s, host_corrected(t, sp, reference) if canaries else t)
        row.raw_median_s = statistics.median(t)
        rows.append(row)
    if canaries:
        rows.append(Measurement(kind="canary", dtype=DTYPE, median_s=reference, repeats=len(canaries),
                                model=canary_model(lplan), q=CANARY_TOKENS, tokens=CANARY_TOKENS,
                                min_s=min(canaries), max_s=max(canaries), raw_median_s=reference))
    return rows


def _single_pass(lm: Any, shape: PassShape, rng: np.random.Generator) -> tuple[Any, Any]:
    """(the timed call, the undo) of one batch-1 shape: the context is extended (untimed) or cut to
    c, then q tokens with logits at every position (decode, verify) or the last (prefill)."""
    if lm.n_past > shape.context:
        lm.truncate(shape.context)
    if lm.n_past < shape.context:
        lm.feed([int(x) for x in rng.integers(3, lm.n_vocab, shape.context - lm.n_past)], all_logits=False)
    ids = [int(x) for x in rng.integers(3, lm.n_vocab, shape.q)]
    all_logits = shape.pass_type != "prefill"
    return (lambda: lm.feed(ids, all_logits=all_logits)), (lambda: lm.truncate(shape.context))


def canary_model(lplan: LPlan) -> str:
    """The canary runs on the shallowest model of the plan (the draft: the server's canary too)."""
    return min(lplan.models, key=lambda m: lplan.models[m])


def _micro(torch: Any, threads: int) -> list[Measurement]:
    """torch's GEMM peaks (fp32, bf16) and streaming bandwidth on this CPU (the profile's anchors)."""
    from osdsim.calibrate import micro

    torch.set_num_threads(threads)
    timer = Timer(torch, "cpu", 5, warmup=1, budget_s=0.5)
    rows = [micro.copy_bandwidth(torch, timer, "cpu", 256 << 20), micro.read_bandwidth(torch, timer, "cpu", 256 << 20),
            micro.gemv_bandwidth(torch, timer, "cpu", "fp32", 256 << 20)]
    for dtype in ("fp32", "bf16"):
        for t in (64, 256):
            rows.append(micro.gemm(torch, timer, "cpu", dtype, t, 576, 1536))
    return rows


def torch_profile_for(name: str) -> Any:
    """The shipped torch profile of the same CPU (cpu-<slug>.yaml for cpu-llamacpp-<slug>), or None."""
    from osdsim.calibrate.run import shipped_profile

    if not name.startswith("cpu-llamacpp-"):
        return None
    return shipped_profile(f"cpu-{name[len('cpu-llamacpp-'):]}")


def calibrate_llamacpp(name: str, quick: bool, threads: int, command: str, tick=None, total=None) -> Any:
    """Measure, fit and build the profile (nothing written here). Returns run.Outcome.

    When the torch profile of this CPU is shipped (cpu-<slug>.yaml), its fp32/bf16 peaks, bandwidth
    and efficiency blocks are carried over, so one profile prices both what runs in PyTorch (the
    draft's training steps, fp32) and what llama.cpp serves (q4_1); else they are measured here."""
    from datetime import datetime, timezone

    from osdsim.calibrate.fit import fit_passes
    from osdsim.calibrate.run import Outcome, _load_average, detect, import_torch, versions
    from osdsim.cost.profile import SCHEMA_VERSION, HardwareProfile, Provenance
    from osdsim.real.llamacpp import require_llama_cpp
    from osdsim.real.models import smollm2_gguf_path

    t0 = time.perf_counter()
    load_start = _load_average()
    llama_cpp = require_llama_cpp()
    torch = import_torch()
    lplan = plan(quick)
    if total is not None:
        total(lplan.repeats + 3)
    tick = tick or (lambda _msg: None)
    gguf_path = smollm2_gguf_path()
    info = detect(torch, "cpu", threads)
    torch_prof = torch_profile_for(name)
    rows = [] if torch_prof is not None else _micro(torch, threads)
    tick("GEMM peaks and bandwidth (torch)")
    with tempfile.TemporaryDirectory(prefix="osdsim-cal-llamacpp-") as tmp:
        max_ctx = max(s.context + s.q for s in lplan.shapes) + 8
        models = build_models(gguf_path, lplan, Path(tmp), threads, max_ctx)
        canary = build_canary(models, lplan, threads)
        batched = build_batched(models, lplan, threads)
        try:
            rows += measure(models, lplan, tick, canary=canary, batched=batched)
        finally:
            for lm in (*models.values(), canary, *(bank.lm for bank in batched.values())):
                lm.close()
    if torch_prof is not None:
        gemm_peak = {d: v for d, v in torch_prof.peak_flops_per_s.items() if d not in (DTYPE, DRAFT_DTYPE)}
        bandwidth = torch_prof.memory_bandwidth_bytes_per_s
        carried = {d: torch_prof.efficiency_for(d) for d in gemm_peak}
        anchor = (f"peak_flops_per_s.{'/'.join(gemm_peak)}, the memory bandwidth and the "
                  f"{'/'.join(carried)} efficiencies (PyTorch: the draft's training) are carried over from "
                  f"the torch profile {torch_prof.name}.yaml of this CPU")
    else:
        gemm_peak = {d: max(r.rate for r in rows if r.kind == "gemm" and r.dtype == d) for d in ("fp32", "bf16")}
        bandwidth = max(r.rate for r in rows if r.kind == "bandwidth")
        carried = {}
        anchor = ("peak_flops_per_s.fp32/bf16 = best torch GEMM here, memory bandwidth = best torch streaming "
                  "rate (no torch profile of this CPU shipped: fp32/bf16 passes fall back to the q4_1 efficiency)")
    from osdsim.calibrate.fit import pass_terms

    passes = [r for r in rows if r.kind == "pass"]
    flops = pass_terms(passes, {DTYPE: 1.0, DRAFT_DTYPE: 1.0}, bandwidth).flops
    best_rate = float(max(f / r.median_s for f, r in zip(flops, passes, strict=True)))
    anchor_peak = max(gemm_peak["fp32"], 1.25 * best_rate)
    peaks = {**gemm_peak, DTYPE: anchor_peak, DRAFT_DTYPE: anchor_peak}
    decode_target = [r.median_s for r in passes
                     if r.pass_type == "decode" and r.batch == 1 and r.n_layers == max(lplan.models.values())]
    fit = fit_passes(rows, peaks, bandwidth, overhead_guess_s=20e-6)
    tick("fit")
    drift = host_drift_note(rows, fit)
    wall_s = time.perf_counter() - t0
    lc_version = str(getattr(llama_cpp, "__version__", "?"))
    from osdsim.real.llamacpp import build_info

    sgemm = "without" if build_info()["batch_invariant"] else "with"
    notes = (
        f"Measured by osdsim calibrate --backend llamacpp ({'quick' if quick else 'full'} grid, {len(fit.rows)} "
        f"real llama.cpp passes at batch 1 and batched of {', '.join(lplan.models)}: the packaged {gguf_path.name} and "
        f"slices of its first layers copied byte for byte; llama-cpp-python {lc_version} ({sgemm} "
        f"llamafile sgemm), {threads} thread(s), "
        f"f16 KV cache; each pass = llama_decode + copying its logits out). Dtype {DTYPE}: Q4_1 layers, Q8_0 "
        f"embeddings/head (ModelSpec head_dtype), activations fp32; dtype {DRAFT_DTYPE} (efficiency_by_dtype): "
        f"{DRAFT}, the 2-layer draft re-quantised to Q8_0 as osdsim real publishes a trained draft. {anchor}; "
        f"peak_flops_per_s.{DTYPE} and .{DRAFT_DTYPE} = "
        f"max(fp32 peak, 1.25 x the best llama.cpp pass rate {best_rate / 1e9:.1f} GFLOP/s), an anchor for the "
        f"fitted efficiencies; memory bandwidth {bandwidth / 1e9:.1f} GB/s. `efficiency` is {DTYPE} (llama.cpp). "
        f"Target decode step (batch 1) median "
        f"{statistics.median(decode_target) * 1e3 if decode_target else float('nan'):.2f} ms. Efficiencies fitted "
        f"by least squares on log time of the 'fit' passes; fit_errors are on held-out shapes. {drift} Wall time "
        f"{wall_s:.0f} s; 1-minute load average {load_start} at start, {_load_average()} at end."
    )
    eff = fit.efficiency[DTYPE]
    vers = versions(torch, "cpu")
    vers["llama_cpp_python"] = lc_version
    profile = HardwareProfile(
        schema_version=SCHEMA_VERSION, name=name,
        device=info.describe().replace("torch threads", "threads") + ", llama.cpp",
        peak_flops_per_s=peaks, memory_bandwidth_bytes_per_s=bandwidth, memory_bytes=info.memory_bytes,
        interconnect_bandwidth_bytes_per_s=bandwidth, efficiency=eff,
        efficiency_by_dtype={**carried, DRAFT_DTYPE: fit.efficiency[DRAFT_DTYPE]},
        provenance=Provenance(
            source="measured", measured_on=info.describe(),
            date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), command=command,
            efficiencies_are_defaults=False, notes=notes, versions=vers,
        ),
        fit_errors=fit.heldout,
    )
    return Outcome(profile, rows, fit, wall_s)


def host_drift_note(rows: list[Measurement], fit: Any) -> str:
    """What the host-speed correction did: the canary's spread over the calibration and the held-out
    error the same fit would show against the uncorrected medians."""
    canary = [r for r in rows if r.kind == "canary"]
    if not canary:
        return ""
    c = canary[0]
    held = [r for r in fit.rows if r.split == "heldout" and r.raw_median_s > 0]
    raw = statistics.median(abs(r.predicted_s - r.raw_median_s) / r.raw_median_s * 100 for r in held) if held else float("nan")
    return (f"Host-speed correction: every pass bracketed by a canary ({CANARY_TOKENS}-token prefill of {c.model}, "
            f"median {c.median_s * 1e3:.2f} ms, range {c.min_s * 1e3:.2f}-{c.max_s * 1e3:.2f} ms over {c.repeats}); "
            f"medians are of times scaled to the median canary (raw medians in the CSV's raw_median_s; held-out "
            f"median error against them {raw:.1f}%).")


def profile_name(torch_profile_name: str) -> str:
    """cpu-llamacpp-<cpu slug> (the torch profile of the same CPU is cpu-<cpu slug>)."""
    base = torch_profile_name
    return "cpu-llamacpp-" + base[len("cpu-"):] if base.startswith("cpu-") else f"{base}-llamacpp"

