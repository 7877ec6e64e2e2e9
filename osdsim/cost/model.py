"""The cost model: prices a forward pass (or a training step) on one replica. It only prices.

docs/architecture.md (Physics: cost of a pass). A pass over a batch with new tokens q_i and cached contexts c_i (T = Σ q_i):

    FLOPs = 2·P_dense·T + 2·d·V·T_logits + 4·L·d_attn·Σ q_i·(c_i + q_i/2)
            (matmuls: 2 FLOPs per multiply-add; attention: QKᵀ and AV over the causal span)
    bytes = w·(P_dense·b_w + d·V·b_h)      weights, read once per pass (w distinct weight sets; b_h: head dtype)
          + 2·L·d_kv·(Σ c_i + T)·b_kv      KV read for cached tokens + KV written for new ones
          + 2·L·T·(2·d + ffn)·b_a          activations in and out of each layer
          + T_logits·V·b_a                 logits written
    time  = max(FLOPs/(F_peak·η_f(T)), bytes/(BW·η_b)) + L·t_kernel + t_pass + t_allreduce

with η_f(T) = η_max·T/(T + T½) (small passes cannot fill the tensor cores). With tensor
parallelism t, FLOPs and bytes split t ways and each layer adds two ring all-reduces of the
activations: 2·L·(2·(t−1)/t·T·d·b_a / B_link + t_lat).

Two optional profile terms, fitted on CPUs (defaults leave the formulas above unchanged):
- η_kv (`kv_bandwidth`): the memory term reads (bytes − KV bytes)/(BW·η_b) + KV bytes/(BW·η_kv);
  attention and cache appends stream the KV cache far slower than GEMMs stream weights on a CPU.
- g (`gemv_max_tokens`): a BLAS that runs a T-row matmul as T matrix-vector products for T ≤ g
  reads the weights T times, and its FLOPs run at η_max (they hide under those reads) instead of
  on the GEMM curve η_f(T).

Kernel-level GPU terms, fitted on per-operator CUDA timings (`osdsim calibrate --from`; all off by
default, and with all off every expression above is evaluated exactly as before):
- p (`roofline_sharpness`): roofline(c, m) = (c^p + m^p)^(1/p) instead of max(c, m).
- η_att (`attention_flops`): attention is its own kernel, max(4·L·d_attn·Σq(c+q/2)/(F·η_att),
  KV bytes/(BW·η_kv)), added to the GEMMs' roofline (which then holds no attention FLOPs or KV bytes).
- n_d, n_f, n_q, T₀ (`nongemm_*`): norms, rotary, activation and residual adds cost
  L·max(T, T₀)·(n_d·d + n_f·ffn/t + n_q·(d + d_kv)/t) seconds outside the roofline (which then holds
  no activation bytes).
- s (`pass_overhead_s_per_seq`): serving-engine CPU time per sequence, s·T_logits per pass.

All of it is one formula, `pass_core` (the fit in osdsim.calibrate calls it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osdsim.cost.profile import HardwareProfile
from osdsim.models import ModelSpec

# AdamW state traffic per trainable parameter in a mixed-precision step (bytes):
# read fp32 master weight, grad, m, v (16) and write weight, m, v (12).
OPTIMIZER_BYTES_PER_PARAM = 28
# Backward ≈ 2× forward FLOPs, so a training step ≈ 3× the forward (Kaplan et al. 2020).
TRAIN_FLOPS_MULTIPLIER = 3.0


@dataclass(frozen=True, slots=True)
class TimeCoefs:
    """Per-GPU constants of the roofline core of the time formula (see pass_core)."""

    peak: float  # FLOP/s of the pass's dtype (an array of them in the fit)
    eff_bw: float  # BW·η_b
    kv_extra_s_per_byte: float  # 1/(BW·η_kv) − 1/(BW·η_b) (0 when η_kv is unset); shared roofline only
    gpu: bool = False  # any kernel-level GPU term on (else the classic single roofline)
    sharpness: float | None = None  # p of the smooth roofline; None = max
    attention_peak: float | None = None  # F·η_att: attention priced as its own kernel; None = shared
    kv_bw: float = 0.0  # BW·η_kv (own-kernel attention)
    nongemm: bool = False  # activations priced as per-token non-GEMM seconds instead of bytes


def roofline(compute_s, memory_s, sharpness, maximum):
    """max(c, m), or the smooth (c^p + m^p)^(1/p) = hi·(1 + (lo/hi)^p)^(1/p) (no under/overflow)."""
    hi = maximum(compute_s, memory_s)
    if sharpness is None:
        return hi
    lo = compute_s + memory_s - hi
    return hi * (1.0 + (lo / (hi + 1e-300)) ** sharpness) ** (1.0 / sharpness)  # + 1e-300: 0 when both are 0


def pass_core(flops, att_flops, nbytes, kv_bytes, act_bytes, nongemm_s, eta, c: TimeCoefs, maximum,
              gemm_flops=0.0, gemm_bytes=0.0):
    """The roofline core of a pass (scalars with maximum=max, or numpy arrays with np.maximum):
    (core_s, compute_s, memory_s); the pass time is core_s + fixed overheads + communication.

    flops and nbytes are the pass's totals; att_flops, kv_bytes and act_bytes their attention,
    KV-cache and activation parts; nongemm_s the non-GEMM seconds (used only when c.nongemm);
    gemm_flops and gemm_bytes the GEMMs' own (weights + LM head; used only when attention is its
    own kernel, and scalars even when the contexts are arrays)."""
    if not c.gpu:
        compute_s = flops / (c.peak * eta)
        memory_s = nbytes / c.eff_bw + kv_bytes * c.kv_extra_s_per_byte
        return maximum(compute_s, memory_s), compute_s, memory_s
    if c.attention_peak is not None:
        mem_bytes = gemm_bytes if c.nongemm else gemm_bytes + act_bytes
        compute_s = gemm_flops / (c.peak * eta)
        memory_s = mem_bytes / c.eff_bw
    else:
        mem_bytes = nbytes - act_bytes if c.nongemm else nbytes
        compute_s = flops / (c.peak * eta)
        memory_s = mem_bytes / c.eff_bw + kv_bytes * c.kv_extra_s_per_byte
    core = roofline(compute_s, memory_s, c.sharpness, maximum)
    if c.attention_peak is not None:
        att_c = att_flops / c.attention_peak
        att_m = kv_bytes / c.kv_bw
        # max, not the smooth form: contexts are arrays in macro steps, and numpy's power is not
        # bit-identical to Python's (pass_times must equal pass_time element for element).
        core = core + maximum(att_c, att_m)
        compute_s = compute_s + att_c
        memory_s = memory_s + att_m
    if c.nongemm:
        core = core + nongemm_s
    return core, compute_s, memory_s


@dataclass(frozen=True, slots=True)
class BatchShape:
    """Aggregates of a batch that the cost formulas need (all sums over sequences i)."""

    tokens: int  # T = Σ q_i, new tokens in this pass
    logit_tokens: int  # tokens whose logits are needed (decode/verify positions, last prefill)
    context_tokens: float  # Σ c_i, cached tokens whose KV is read
    attention_pairs: float  # Σ q_i·(c_i + q_i/2), query-key pairs over the causal span
    weight_sets: int = 1  # distinct weight sets read (e.g. several per-domain drafts)


@dataclass(frozen=True, slots=True)
class PassCost:
    """Named parts of a priced pass (seconds, FLOPs, bytes), per GPU."""

    time_s: float
    compute_s: float
    memory_s: float
    overhead_s: float
    comm_s: float
    flops: float
    bytes: float

    @property
    def compute_utilisation(self) -> float:
        """Fraction of the pass's duration the device's peak FLOPs were used (≤ 1)."""
        return 0.0 if self.time_s <= 0 else self.flops_time_at_peak / self.time_s

    flops_time_at_peak: float = 0.0


class CostModel:
    """Prices passes of one model on one replica (tensor-parallel degree `tp`)."""

    def __init__(self, model: ModelSpec, profile: HardwareProfile, tp: int = 1):
        self.model = model
        self.profile = profile
        self.tp = tp
        eff = profile.efficiency_for(model.dtype)
        m = model
        b_w = m.weight_bytes_per_param
        b_h = m.head_bytes_per_param
        b_a = m.act_bytes_per_element
        self.peak_flops = profile.peak_flops(m.dtype)  # per GPU
        self.bandwidth = profile.memory_bandwidth_bytes_per_s
        # Per-GPU coefficients (divide by tp once here).
        self._flops_per_token = 2.0 * m.dense_params / tp
        self._flops_per_logit = 2.0 * m.hidden * m.vocab / tp
        self._flops_per_pair = 4.0 * m.n_layers * m.hidden / tp
        self._weight_bytes = (m.dense_params * b_w + m.head_params * b_h) / tp
        self._kv_bytes_per_token = m.kv_bytes_per_token / tp
        self._act_bytes_per_token = 2.0 * m.n_layers * (2 * m.hidden + m.ffn) * b_a / tp
        self._logit_bytes = m.vocab * b_a / tp
        self._eta_max = eff.flops_max
        self._t_half = eff.flops_half_tokens
        self._eff_bw = self.bandwidth * eff.bandwidth
        self._gemv_max = eff.gemv_max_tokens
        # Extra seconds per KV-cache byte when η_kv ≠ η_b (exactly 0.0 when η_kv is unset).
        kv_eff = eff.kv_bandwidth
        self._kv_extra_s_per_byte = 0.0 if kv_eff is None else 1.0 / (self.bandwidth * kv_eff) - 1.0 / self._eff_bw
        self._fixed_s = m.n_layers * eff.kernel_overhead_s_per_layer + eff.pass_overhead_s
        self._per_seq_s = eff.pass_overhead_s_per_seq
        gpu = eff.gpu_terms
        self._coefs = TimeCoefs(
            peak=self.peak_flops, eff_bw=self._eff_bw, kv_extra_s_per_byte=self._kv_extra_s_per_byte, gpu=gpu,
            sharpness=eff.roofline_sharpness,
            attention_peak=None if eff.attention_flops is None else self.peak_flops * eff.attention_flops,
            kv_bw=self.bandwidth * (eff.kv_bandwidth if eff.kv_bandwidth is not None else eff.bandwidth),
            nongemm=eff.nongemm_s_per_token_hidden is not None,
        )
        self._nongemm_min = eff.nongemm_min_tokens
        # Non-GEMM seconds per token of the whole model (used only when the nongemm terms are on).
        self._nongemm_s_per_token = 0.0 if eff.nongemm_s_per_token_hidden is None else m.n_layers * (
            eff.nongemm_s_per_token_hidden * m.hidden + eff.nongemm_s_per_token_ffn * m.ffn / tp
            + eff.nongemm_s_per_token_qkv * (m.hidden + m.kv_dim) / tp)
        self._train_eff = eff.train_efficiency
        if tp > 1:
            link = profile.interconnect_bandwidth_bytes_per_s
            self._comm_per_token = 2 * m.n_layers * 2.0 * (tp - 1) / tp * m.hidden * b_a / link
            self._comm_fixed = 2 * m.n_layers * eff.allreduce_latency_s
        else:
            self._comm_per_token = 0.0
            self._comm_fixed = 0.0

    # --- the formulas ------------------------------------------------------------------------
    def flops(self, s: BatchShape) -> float:
        return (
            self._flops_per_token * s.tokens
            + self._flops_per_logit * s.logit_tokens
            + self._flops_per_pair * s.attention_pairs
        )

    def kv_bytes(self, s: BatchShape) -> float:
        """KV-cache bytes of a pass: cached tokens read + new tokens written (part of bytes())."""
        return self._kv_bytes_per_token * (s.context_tokens + s.tokens)

    @property
    def weight_bytes(self) -> float:
        """Weight bytes of one read of the model (dense + head), per GPU."""
        return self._weight_bytes

    def weight_reads(self, tokens: float) -> float:
        """How many times a pass of `tokens` tokens reads the weights (1, or T when T ≤ gemv_max)."""
        return tokens if 0 < tokens <= self._gemv_max else 1.0

    def bytes(self, s: BatchShape) -> float:
        return (
            s.weight_sets * self.weight_reads(s.tokens) * self._weight_bytes
            + self._kv_bytes_per_token * (s.context_tokens + s.tokens)
            + self._act_bytes_per_token * s.tokens
            + self._logit_bytes * s.logit_tokens
        )

    @property
    def eta_max(self) -> float:
        return self._eta_max

    def eta_flops(self, tokens: float) -> float:
        """η_f(T) = η_max·T/(T + T½) (η_max in the matrix-vector regime T ≤ gemv_max_tokens)."""
        if tokens <= 0 or tokens <= self._gemv_max:
            return self._eta_max
        return self._eta_max * tokens / (tokens + self._t_half)

    def price(self, s: BatchShape) -> PassCost:
        """Full breakdown of one forward pass."""
        if s.tokens <= 0:
            return PassCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        time_s, flops, nbytes, compute_s, memory_s, comm_s = self._pass(
            s.tokens, s.logit_tokens, s.context_tokens, s.attention_pairs, s.weight_sets, max)
        return PassCost(
            time_s=time_s,
            compute_s=compute_s,
            memory_s=memory_s,
            overhead_s=self._fixed_s + self._per_seq_s * s.logit_tokens,
            comm_s=comm_s,
            flops=flops,
            bytes=nbytes,
            flops_time_at_peak=flops / self.peak_flops,
        )

    def pass_time(
        self, tokens: float, logit_tokens: float, context_tokens: float, attention_pairs: float,
        weight_sets: int = 1,
    ) -> tuple[float, float, float, float]:
        """Hot path for the simulator: (time_s, flops, bytes, compute_s) of one pass, as price()."""
        if tokens <= 0:
            return 0.0, 0.0, 0.0, 0.0
        return self._pass(tokens, logit_tokens, context_tokens, attention_pairs, weight_sets, max)[:4]

    def scalar_pass_time(self):
        """pass_time as a closure over this model's constants (the simulator prices a few passes per
        iteration one at a time): the expressions of _pass and pass_core for scalars, in the same
        order, so it returns the same bits (tests/unit/test_cost_model.py checks every profile)."""
        fpp, fpt, fpl = self._flops_per_pair, self._flops_per_token, self._flops_per_logit
        kvpt, wb, gemv = self._kv_bytes_per_token, self._weight_bytes, self._gemv_max
        eta_max, t_half = self._eta_max, self._t_half
        apt, lb = self._act_bytes_per_token, self._logit_bytes
        ngs, ngmin = self._nongemm_s_per_token, self._nongemm_min
        c = self._coefs
        peak, eff_bw, kvx, gpu, p = c.peak, c.eff_bw, c.kv_extra_s_per_byte, c.gpu, c.sharpness
        att_peak, kv_bw, nongemm = c.attention_peak, c.kv_bw, c.nongemm
        fixed, comm_fixed, cpt, per_seq = self._fixed_s, self._comm_fixed, self._comm_per_token, self._per_seq_s

        def pass_time(tokens, logit_tokens, context_tokens, attention_pairs, weight_sets=1):
            if tokens <= 0:
                return 0.0, 0.0, 0.0, 0.0
            att_flops = fpp * attention_pairs
            gemm_flops = fpt * tokens + fpl * logit_tokens
            flops = gemm_flops + att_flops
            kv_bytes = kvpt * (context_tokens + tokens)
            weights = weight_sets * wb
            if tokens <= gemv:
                weights *= tokens
                eta = eta_max
            else:
                eta = eta_max * tokens / (tokens + t_half)
            act_bytes = apt * tokens
            logit_bytes = lb * logit_tokens
            nbytes = weights + kv_bytes + act_bytes + logit_bytes
            if not gpu:
                compute_s = flops / (peak * eta)
                memory_s = nbytes / eff_bw + kv_bytes * kvx
                core = max(compute_s, memory_s)
            else:
                if att_peak is not None:
                    gemm_bytes = weights + logit_bytes
                    mem_bytes = gemm_bytes if nongemm else gemm_bytes + act_bytes
                    compute_s = gemm_flops / (peak * eta)
                    memory_s = mem_bytes / eff_bw
                else:
                    mem_bytes = nbytes - act_bytes if nongemm else nbytes
                    compute_s = flops / (peak * eta)
                    memory_s = mem_bytes / eff_bw + kv_bytes * kvx
                core = max(compute_s, memory_s)
                if p is not None:
                    lo = compute_s + memory_s - core
                    core = core * (1.0 + (lo / (core + 1e-300)) ** p) ** (1.0 / p)
                if att_peak is not None:
                    att_c = att_flops / att_peak
                    core = core + max(att_c, kv_bytes / kv_bw)
                    compute_s = compute_s + att_c
                if nongemm:
                    core = core + ngs * (tokens if tokens > ngmin else ngmin)
            time_s = core + fixed + comm_fixed + cpt * tokens
            if per_seq:
                time_s = time_s + per_seq * logit_tokens
            return time_s, flops, nbytes, compute_s

        return pass_time

    def shape_pass_time(self, tokens, logit_tokens, weight_sets=1):
        """pass_time at one pass shape (tokens, logit tokens, weight sets) as a function of the context
        and attention pairs only: every term that depends on the shape alone (η, weight reads, the GEMM
        roofline when attention is its own kernel, overheads) is evaluated once, by the expressions of
        scalar_pass_time in the same order, so f(c, p) returns pass_time(tokens, logit_tokens, c, p,
        weight_sets) bit for bit (the simulator keeps one per batch shape it meets)."""
        if tokens <= 0:
            def zero(context_tokens, attention_pairs):
                return 0.0, 0.0, 0.0, 0.0

            return zero
        fpp, kvpt = self._flops_per_pair, self._kv_bytes_per_token
        c = self._coefs
        peak, eff_bw, kvx, gpu, p = c.peak, c.eff_bw, c.kv_extra_s_per_byte, c.gpu, c.sharpness
        att_peak, kv_bw, nongemm = c.attention_peak, c.kv_bw, c.nongemm
        fixed, comm_fixed = self._fixed_s, self._comm_fixed
        gemm_flops = self._flops_per_token * tokens + self._flops_per_logit * logit_tokens
        weights = weight_sets * self._weight_bytes
        if tokens <= self._gemv_max:
            weights *= tokens
            eta = self._eta_max
        else:
            eta = self._eta_max * tokens / (tokens + self._t_half)
        act_bytes = self._act_bytes_per_token * tokens
        logit_bytes = self._logit_bytes * logit_tokens
        peak_eta = peak * eta
        comm_tokens = self._comm_per_token * tokens
        per_seq = self._per_seq_s
        seq_s = per_seq * logit_tokens
        ngmin = self._nongemm_min
        nongemm_s = self._nongemm_s_per_token * (tokens if tokens > ngmin else ngmin)

        if not gpu:
            def classic(context_tokens, attention_pairs):
                flops = gemm_flops + fpp * attention_pairs
                kv_bytes = kvpt * (context_tokens + tokens)
                nbytes = weights + kv_bytes + act_bytes + logit_bytes
                compute_s = flops / peak_eta
                memory_s = nbytes / eff_bw + kv_bytes * kvx
                time_s = (memory_s if memory_s > compute_s else compute_s) + fixed + comm_fixed + comm_tokens
                if per_seq:
                    time_s = time_s + seq_s
                return time_s, flops, nbytes, compute_s

            return classic
        if att_peak is not None:  # the GEMMs' roofline does not depend on the context: once
            gemm_bytes = weights + logit_bytes
            mem_bytes = gemm_bytes if nongemm else gemm_bytes + act_bytes
            gemm_s = gemm_flops / peak_eta
            memory_s = mem_bytes / eff_bw
            core0 = max(gemm_s, memory_s)
            if p is not None:
                lo = gemm_s + memory_s - core0
                core0 = core0 * (1.0 + (lo / (core0 + 1e-300)) ** p) ** (1.0 / p)

            def kernels(context_tokens, attention_pairs):
                att_flops = fpp * attention_pairs
                kv_bytes = kvpt * (context_tokens + tokens)
                att_c = att_flops / att_peak
                att_m = kv_bytes / kv_bw
                core = core0 + (att_m if att_m > att_c else att_c)  # max(att_c, att_m)
                if nongemm:
                    core = core + nongemm_s
                time_s = core + fixed + comm_fixed + comm_tokens
                if per_seq:
                    time_s = time_s + seq_s
                return time_s, gemm_flops + att_flops, weights + kv_bytes + act_bytes + logit_bytes, gemm_s + att_c

            return kernels
        shared = self.scalar_pass_time()  # the shared roofline's every term reads the context

        def general(context_tokens, attention_pairs):
            return shared(tokens, logit_tokens, context_tokens, attention_pairs, weight_sets)

        return general

    def pass_times(
        self, tokens: float, logit_tokens: float, context_tokens: np.ndarray, attention_pairs: np.ndarray,
        weight_sets: int = 1,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """pass_time for one batch shape at many contexts (arrays): the same expressions, so every
        element equals the scalar result bit for bit (the simulator's macro steps)."""
        return self._pass(tokens, logit_tokens, context_tokens, attention_pairs, weight_sets, np.maximum)[:4]

    def _pass(self, tokens, logit_tokens, context_tokens, attention_pairs, weight_sets, maximum):
        """(time_s, flops, bytes, compute_s, memory_s, comm_s) of one pass, for scalars (maximum=max)
        or arrays of contexts (maximum=np.maximum): the one time formula (its core is pass_core)."""
        att_flops = self._flops_per_pair * attention_pairs
        gemm_flops = self._flops_per_token * tokens + self._flops_per_logit * logit_tokens
        flops = gemm_flops + att_flops
        kv_bytes = self._kv_bytes_per_token * (context_tokens + tokens)
        weights = weight_sets * self._weight_bytes
        if tokens <= self._gemv_max:  # matrix-vector regime: T weight reads, FLOPs at η_max
            weights *= tokens
            eta = self._eta_max
        else:
            eta = self._eta_max * tokens / (tokens + self._t_half)
        act_bytes = self._act_bytes_per_token * tokens
        logit_bytes = self._logit_bytes * logit_tokens
        nbytes = weights + kv_bytes + act_bytes + logit_bytes
        nongemm_s = self._nongemm_s_per_token * (tokens if tokens > self._nongemm_min else self._nongemm_min)
        core, compute_s, memory_s = pass_core(
            flops, att_flops, nbytes, kv_bytes, act_bytes, nongemm_s, eta, self._coefs, maximum,
            gemm_flops, weights + logit_bytes)
        comm_s = self._comm_fixed + self._comm_per_token * tokens
        time_s = core + self._fixed_s + self._comm_fixed + self._comm_per_token * tokens
        if self._per_seq_s:
            time_s = time_s + self._per_seq_s * logit_tokens
        return time_s, flops, nbytes, compute_s, memory_s, comm_s

    # --- convenience shapes --------------------------------------------------------------------
    def decode_time(self, batch: int, context: float, tokens_per_seq: int = 1) -> float:
        """A decode (tokens_per_seq=1) or verify (k+1) pass for `batch` sequences at `context`."""
        q = tokens_per_seq
        t, _, _, _ = self.pass_time(batch * q, batch * q, batch * context, batch * q * (context + q / 2))
        return t

    def training_step(
        self, seq_lengths_sum: float, seq_lengths_sq_sum: float, trainable_params: int,
        logit_tokens: float | None = None, minibatches: int = 1,
    ) -> PassCost:
        """A distillation step over buffered sequences (forward + backward + AdamW).

        FLOPs = 3 × forward FLOPs over all buffered tokens (causal attention Σ l_j²/2; the LM head at
        `logit_tokens` positions, default every position); bytes = 3 weight reads + activations +
        optimizer state traffic. A step run as `minibatches` optimizer steps pays the pass overheads,
        the weight reads and the AdamW update once per minibatch, and its GEMMs see T/minibatches rows.
        (Callers pass padded lengths when minibatches are padded to their longest sequence.) The
        roofline part is divided by the profile's train_efficiency (1 unless calibrated).
        """
        mb = max(int(minibatches), 1)
        tokens = int(seq_lengths_sum)
        if tokens <= 0:
            return PassCost(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        fwd = BatchShape(
            tokens=tokens,
            logit_tokens=tokens if logit_tokens is None else int(logit_tokens),
            context_tokens=0.0,
            attention_pairs=seq_lengths_sq_sum / 2.0,
        )
        flops = TRAIN_FLOPS_MULTIPLIER * self.flops(fwd)
        weights_extra = (mb - 1) * self._weight_bytes  # bytes() counts one weight read per pass
        nbytes = (TRAIN_FLOPS_MULTIPLIER * (self.bytes(fwd) + weights_extra)
                  + mb * OPTIMIZER_BYTES_PER_PARAM * trainable_params / self.tp)
        m = TRAIN_FLOPS_MULTIPLIER
        att_flops = m * self._flops_per_pair * fwd.attention_pairs
        core, compute_s, memory_s = pass_core(
            flops, att_flops, nbytes, m * self.kv_bytes(fwd),
            m * self._act_bytes_per_token * tokens, m * self._nongemm_s_per_token * max(tokens / mb, self._nongemm_min) * mb,
            self.eta_flops(tokens / mb), self._coefs, max,
            flops - att_flops, nbytes - m * (self.kv_bytes(fwd) + self._act_bytes_per_token * tokens))
        overhead = TRAIN_FLOPS_MULTIPLIER * mb * self._fixed_s  # (no per-sequence engine time: nothing is sampled)
        comm_s = TRAIN_FLOPS_MULTIPLIER * (mb * self._comm_fixed + self._comm_per_token * tokens)
        # Training kernels (backward, autograd, loss, AdamW) run at train_efficiency × forward speed
        # (dividing the core is dividing the larger of compute and memory: the same number).
        compute_s /= self._train_eff
        memory_s /= self._train_eff
        return PassCost(
            time_s=core / self._train_eff + overhead + comm_s,
            compute_s=compute_s,
            memory_s=memory_s,
            overhead_s=overhead,
            comm_s=comm_s,
            flops=flops,
            bytes=nbytes,
            flops_time_at_peak=flops / self.peak_flops,
        )


def memory_plan(
    target: ModelSpec, drafts: list[ModelSpec], profile: HardwareProfile, tp: int, memory_utilization: float
) -> tuple[float, float, int]:
    """(bytes available per GPU, weight bytes per GPU, KV-cache capacity in tokens per replica).

    KV capacity = (memory·utilization − weights/tp) / ((KV bytes per token of target + drafts)/tp).
    Raises ValueError when the weights alone do not fit.
    """
    available = profile.memory_bytes * memory_utilization
    weights = (target.weight_bytes + sum(d.weight_bytes for d in drafts)) / tp
    kv_per_token = (target.kv_bytes_per_token + sum(d.kv_bytes_per_token for d in drafts)) / tp
    free = available - weights
    capacity = int(free // kv_per_token) if free > 0 else 0
    return available, weights, capacity
