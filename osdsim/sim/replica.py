"""A serving replica as a SimPy process: continuous batching with (optional) speculative decoding.

One iteration (DESIGN.md §4.2), for B decoding sequences and some prefill chunks:
    draft:  k sequential passes over B tokens (+ the draft's own prefill of this iteration's chunks)
    target: one pass over B·(k+1) verify tokens + the prefill chunks (chunked prefill, Sarathi)
Each decoding sequence then emits a + 1 tokens, a drawn from the acceptance law at its α.
Without speculation the target pass carries B decode tokens and each sequence emits one.

Admission is FCFS, limited by `max_batch_size` and KV capacity; a request reserves KV for its
prompt + output (+ k look-ahead slots) on admission, so there is no preemption.
The running batch is kept as arrays (struct of arrays) so an iteration costs O(1) numpy calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

from osdsim.cost.model import CostModel
from osdsim.sim.distill import Distiller, DistillStats
from osdsim.specdec import optimal_k, sample_geometric

# Shortest stretch worth a macro step: below it, drawing and pricing ahead (and rewinding the
# random stream when an arrival cuts the stretch) costs more than the events it saves.
MACRO_MIN_STEPS = 4


@dataclass
class ReplicaConfig:
    target_cost: CostModel
    draft_cost: CostModel | None  # None: no speculation
    max_batch: int
    chunk_tokens: float  # per-iteration token budget (inf = unlimited)
    kv_capacity: int
    k: int | None  # None = auto
    k_max: int
    placement: str  # inline | harvest | dedicated | none
    harvest_fraction: float
    interference: float
    macro_steps: int = 64  # decode iterations one event may cover between arrivals/finishes (0: off)


class RequestTable:
    """Per-request inputs and outcomes, shared by all replicas (arrays of length N)."""

    def __init__(self, arrival: np.ndarray, domain: np.ndarray, prompt: np.ndarray, output: np.ndarray):
        n = arrival.size
        self.arrival = arrival
        self.domain = domain
        self.prompt = prompt
        self.output = output
        self.replica = np.full(n, -1, dtype=np.int64)
        self.admitted = np.full(n, np.nan)
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.steps = np.zeros(n, dtype=np.int64)  # decode iterations (spec steps)
        self.accepted = np.zeros(n, dtype=np.int64)  # accepted draft tokens
        self.proposed = np.zeros(n, dtype=np.int64)  # drafted tokens
        self.rejections = np.zeros(n, dtype=np.int64)  # steps ending in a rejection (a < k)
        self.emitted = np.zeros(n, dtype=np.int64)  # output tokens emitted so far
        self.alpha_model = np.full(n, np.nan)  # the draft's α for this request at its first step
        self.rejected = np.zeros(n, dtype=bool)  # can never fit in KV capacity
        self.done = 0
        self.on_done: Callable[[], None] | None = None
        # Closed-loop clients: called with a request id once the request is complete as its client
        # sees it (finished, and any inline training step it made due has run); None: open loop.
        self.on_release: Callable[[int], None] | None = None

    def mark_done(self, count: int = 1) -> None:
        self.done += count
        if self.on_done is not None:
            self.on_done()


AGG_COLUMNS = ("duration_s", "flops", "bytes", "emitted_tokens", "spare_flops", "train_work_flops",
               "batch_x_s", "alpha_x_n", "alpha_n", "k_x_n", "serve_s")


class IterationLog:
    """Per-iteration records of one replica (one tuple per iteration; a DataFrame at the end)."""

    FIELDS = (
        "t_s", "duration_s", "decode_seqs", "prefill_tokens", "emitted_tokens", "k",
        "alpha_mean", "flops", "bytes", "compute_busy_s", "spare_flops", "train_work_flops", "kind",
    )

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.add = self.rows.append  # one list append per iteration (hot path)

    def frame(self):
        import pandas as pd

        df = pd.DataFrame.from_records(self.rows, columns=list(self.FIELDS))
        serve = (df["kind"] == "serve").to_numpy()
        n = df["decode_seqs"].to_numpy(dtype=float)
        alpha = df["alpha_mean"].to_numpy(dtype=float)
        has_alpha = np.isfinite(alpha) & serve
        df["batch_x_s"] = n * df["duration_s"].to_numpy() * serve
        df["alpha_x_n"] = np.where(has_alpha, alpha * n, 0.0)
        df["alpha_n"] = np.where(has_alpha, n, 0.0)
        df["k_x_n"] = df["k"].to_numpy(dtype=float) * np.where(has_alpha, n, 0.0)
        df["serve_s"] = df["duration_s"].to_numpy() * serve
        return df


class BinnedIterationLog:
    """Iteration records summed into time bins (bounded memory for very long runs)."""

    def __init__(self, width_s: float) -> None:
        self.width = width_s
        self.bins: dict[int, list[float]] = {}

    def add(self, rec: tuple) -> None:
        t, dur, n, _pf, emitted, k, alpha, flops, nbytes, _busy, spare, used, kind = rec
        b = int(t / self.width)
        acc = self.bins.get(b)
        if acc is None:
            acc = self.bins[b] = [0.0] * len(AGG_COLUMNS)
        serve = kind == "serve"
        acc[0] += dur
        acc[1] += flops
        acc[2] += nbytes
        acc[3] += emitted
        acc[4] += spare
        acc[5] += used
        if serve:
            acc[6] += n * dur
            acc[10] += dur
            if alpha == alpha:  # not NaN
                acc[7] += alpha * n
                acc[8] += n
                acc[9] += k * n

    def frame(self):
        import pandas as pd

        keys = sorted(self.bins)
        df = pd.DataFrame([self.bins[b] for b in keys], columns=list(AGG_COLUMNS))
        df.insert(0, "t_s", np.asarray(keys, dtype=float) * self.width)
        df["kind"] = "bin"
        return df


class Replica:
    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        cfg: ReplicaConfig,
        table: RequestTable,
        rng: np.random.Generator,
        draft_for_domain: list[Distiller | None],
        alpha_source: list,  # per domain: the DraftState serving it (None without speculation)
        sample_accepted: Callable[[np.random.Generator, np.ndarray, int], np.ndarray],
        stats: DistillStats,
        log_bin_s: float | None = None,
    ):
        self.env = env
        self.index = index
        self.cfg = cfg
        self.table = table
        self.rng = rng
        self.inbox: simpy.Store = simpy.Store(env)
        self.waiting: deque[int] = deque()
        self.distillers = [d for d in dict.fromkeys(draft_for_domain) if d is not None]
        self.distiller_for_domain = draft_for_domain
        self.alpha_source = alpha_source
        self.alpha_by_domain = np.zeros(len(alpha_source))
        self.refresh_alpha()
        self.sample_accepted = sample_accepted
        self._geometric = sample_accepted is sample_geometric
        self.stats = stats
        self.log = IterationLog() if log_bin_s is None else BinnedIterationLog(log_bin_s)
        self.kv_free = cfg.kv_capacity
        self.busy_s = 0.0
        self.outstanding = 0
        self._unreleased: list[int] = []  # finished request ids not yet handed back (closed loop)
        self._k_cache: dict[tuple[int, int, int], int] = {}
        cap = cfg.max_batch
        self.n = 0
        self.rid = np.zeros(cap, dtype=np.int64)
        self.ctx = np.zeros(cap, dtype=np.int64)  # tokens with KV (prefilled prompt + generated)
        self.pf_left = np.zeros(cap, dtype=np.int64)  # prompt tokens not yet prefilled
        self.out_left = np.zeros(cap, dtype=np.int64)  # output tokens still to emit
        self.dom = np.zeros(cap, dtype=np.int64)
        self.kv_res = np.zeros(cap, dtype=np.int64)
        # Per-slot outcome counters, copied to the request table when the request finishes.
        self.s_steps = np.zeros(cap, dtype=np.int64)
        self.s_accepted = np.zeros(cap, dtype=np.int64)
        self.s_proposed = np.zeros(cap, dtype=np.int64)
        self.s_rejections = np.zeros(cap, dtype=np.int64)
        self.s_emitted = np.zeros(cap, dtype=np.int64)
        self._slot_arrays = (self.rid, self.ctx, self.pf_left, self.out_left, self.dom, self.kv_res,
                             self.s_steps, self.s_accepted, self.s_proposed, self.s_rejections, self.s_emitted)
        self.n_prefill = 0  # running sequences still prefilling
        self.spec = cfg.draft_cost is not None
        self.lookahead = (cfg.k or cfg.k_max) if self.spec else 0
        self._harvest_rate = 0.0
        # Macro steps (see _macro): decode-only stretches with i.i.d. geometric acceptance and α that
        # cannot change mid-stretch (no trainer publishing asynchronously).
        self._macro_len = float(cfg.macro_steps)  # moving average of iterations per macro step
        self._macro_ok = cfg.macro_steps > 0 and (not self.spec or self._geometric) and cfg.placement != "dedicated"
        if cfg.draft_cost is not None:
            # Spare training work per second of spare device time, in the steps' own unit
            # (device-seconds at full speed for the training dtype): the harvest fraction θ.
            self._harvest_rate = cfg.harvest_fraction

    # --- α view ------------------------------------------------------------------------------------
    def refresh_alpha(self) -> None:
        for d, src in enumerate(self.alpha_source):
            self.alpha_by_domain[d] = 0.0 if src is None else src.alpha[d]
        # Geometric law fast path: a = ⌊E / (−ln α)⌋ with E ~ Exp(1), since P(E ≥ j·(−ln α)) = α^j.
        clipped = np.clip(self.alpha_by_domain, 1e-12, 1.0 - 1e-12)
        self._inv_neg_log_alpha = -1.0 / np.log(clipped)

    # --- arrivals ------------------------------------------------------------------------------------
    def submit(self, rid: int) -> None:
        self.outstanding += 1
        self.table.replica[rid] = self.index
        # The simulated clock reached the arrival by summing gaps; record that exact instant so
        # causality (admitted ≥ arrival) holds to the last bit.
        self.table.arrival[rid] = self.env.now
        self.inbox.put(rid)

    def _drain_inbox(self) -> None:
        if self.inbox.items:
            self.waiting.extend(self.inbox.items)
            self.inbox.items.clear()

    def _admit(self) -> None:
        t = self.table
        cap = self.cfg.max_batch
        while self.waiting and self.n < cap:
            rid = self.waiting[0]
            need = int(t.prompt[rid] + t.output[rid]) + self.lookahead
            if need > self.cfg.kv_capacity:  # can never fit: report it, do not block the queue
                self.waiting.popleft()
                t.rejected[rid] = True
                self.outstanding -= 1
                t.mark_done()
                if t.on_release is not None:
                    self._unreleased.append(rid)
                continue
            if need > self.kv_free:
                break
            self.waiting.popleft()
            i = self.n
            self.rid[i] = rid
            self.ctx[i] = 0
            self.pf_left[i] = t.prompt[rid]
            self.out_left[i] = t.output[rid]
            self.dom[i] = t.domain[rid]
            self.kv_res[i] = need
            self.s_steps[i] = self.s_accepted[i] = self.s_proposed[i] = 0
            self.s_rejections[i] = self.s_emitted[i] = 0
            self.kv_free -= need
            t.admitted[rid] = self.env.now
            # The draft's α for this request as it enters the batch (the served α it will see).
            if self.spec:
                t.alpha_model[rid] = self.alpha_by_domain[t.domain[rid]]
            self.n += 1
            self.n_prefill += 1

    # --- training ------------------------------------------------------------------------------------
    def _pending_steps(self):
        for d in self.distillers:
            if d.pending:
                yield d

    def _train_inline(self):
        for dist in list(self._pending_steps()):
            while dist.pending:
                step = dist.pending.popleft()
                dist.in_flight += 1
                dur = step.cost.time_s
                step.started_s = self.env.now
                yield self.env.timeout(dur)
                self.busy_s += dur
                self.stats.busy_s += dur
                self.stats.latency_cost_s += dur
                self.stats.work_s_used += step.work_s
                self.log.add((self.env.now - dur, dur, 0, 0, 0, 0, np.nan, step.cost.flops, step.cost.bytes,
                              step.cost.compute_s, 0.0, step.work_s, "train"))
                dist.complete(step, self.env.now, dur)

    def _harvest(self, spare_s: float, since_s: float) -> float:
        """Give spare work (device-seconds at full training speed, accrued since `since_s`) to pending
        steps in FIFO order; returns the work used."""
        used = 0.0
        for dist in self.distillers:
            while dist.pending and spare_s > 0:
                step = dist.pending[0]
                if step.started_s is None:
                    step.started_s = max(since_s, step.due_s)
                take = min(spare_s, step.work_s - step.progress_s)
                step.progress_s += take
                spare_s -= take
                used += take
                if step.progress_s >= step.work_s * (1 - 1e-12):
                    dist.pending.popleft()
                    dist.in_flight += 1
                    dist.complete(step, self.env.now, self.env.now - step.started_s)
        self.stats.work_s_used += used
        return used

    def _harvest_pending(self) -> bool:
        return self.cfg.placement == "harvest" and any(d.pending for d in self.distillers)

    def _idle(self):
        """Nothing to serve: wait for an arrival; harvest training uses the idle device meanwhile."""
        get = self.inbox.get()
        if not self._harvest_pending():
            rid = yield get
            self.waiting.append(rid)
            return
        rate = self._harvest_rate  # training work (full-speed device-seconds) per idle second: θ
        remaining = sum(s.work_s - s.progress_s for d in self.distillers for s in d.pending)
        t0 = self.env.now
        yield get | self.env.timeout(remaining / rate)
        if get.triggered:  # an arrival (possibly at the same instant the work finished)
            spare = (self.env.now - t0) * rate
            self.waiting.append(get.value)
        else:
            # The pending work finished; grant it exactly (elapsed time can round to 0 at large t).
            spare = remaining
            get.cancel()
        self.stats.spare_s_available += spare
        self._harvest(spare, t0)

    # --- serving -------------------------------------------------------------------------------------
    def run(self):
        while True:
            self._drain_inbox()
            self._admit()
            if self.cfg.placement == "inline" and any(d.pending for d in self.distillers):
                yield from self._train_inline()
                continue
            if self._unreleased:
                for rid in self._unreleased:
                    self.table.on_release(rid)  # type: ignore[misc]
                self._unreleased.clear()
            if self.n == 0:
                yield from self._idle()
                continue
            if self._macro_ok and self.n_prefill == 0 and not self._harvest_pending():
                yield from self._macro()
                continue
            yield from self._iteration()

    def _choose_k(self, batch: int, alpha: float, ctx_mean: float) -> int:
        key = (batch, int(alpha * 100 + 0.5), int(ctx_mean) >> 8)
        k = self._k_cache.get(key)
        if k is None:
            c = self.cfg.draft_cost.decode_time(batch, ctx_mean) / self.cfg.target_cost.decode_time(batch, ctx_mean)
            k = optimal_k(alpha, c, self.cfg.k_max)
            self._k_cache[key] = k
        return k

    def _iteration(self):
        cfg = self.cfg
        env = self.env
        n = self.n
        ctx = self.ctx[:n]
        n_pf = self.n_prefill
        if n_pf == 0:  # fast path: everyone decodes; slices are views, no fancy indexing
            dec = slice(0, n)
            b = n
        else:
            dec = np.flatnonzero(self.pf_left[:n] == 0)
            b = int(dec.size)
        spec = self.spec and b > 0
        ctx_dec = ctx[dec]
        c_sum = float(np.add.reduce(ctx_dec)) if b else 0.0
        k = 0
        alpha = None
        dom_dec = None
        if spec:
            dom_dec = self.dom[:n][dec]
            alpha = self.alpha_by_domain[dom_dec]
            k = cfg.k if cfg.k is not None else self._choose_k(b, float(np.add.reduce(alpha)) / b, c_sum / b)
        q = k + 1

        # Prefill chunks: decode/verify tokens take the budget first, then FIFO prefill chunks.
        pf_tokens = 0
        pf_ctx = 0.0
        pf_pairs = 0.0
        n_complete = 0
        pf_idx = alloc = None
        if n_pf:
            budget = cfg.chunk_tokens - b * q
            if budget > 0:
                pf_left = self.pf_left[:n]
                pf_idx = np.flatnonzero(pf_left)
                left = pf_left[pf_idx]
                before = np.cumsum(left) - left
                alloc = np.clip(budget - before, 0, left).astype(np.int64)
                pf_tokens = int(alloc.sum())
                if pf_tokens:
                    c_pf = ctx[pf_idx]
                    pf_ctx = float(c_pf[alloc > 0].sum())
                    pf_pairs = float((alloc * (c_pf + alloc / 2.0)).sum())
                    n_complete = int(np.count_nonzero(alloc == left))

        # Price the passes (the cost model only prices).
        duration = flops = nbytes = compute_s = 0.0
        if spec:
            dc = cfg.draft_cost
            weight_sets = 1 if len(self.distillers) <= 1 else int(np.unique(dom_dec).size)
            mean_extra = b * (k - 1) / 2.0  # average draft context growth over the k passes
            td, fd, bd, cd = dc.pass_time(b, b, c_sum + mean_extra, c_sum + mean_extra + b / 2.0, weight_sets)
            duration += k * td
            flops += k * fd
            nbytes += k * bd
            compute_s += k * cd
            if pf_tokens:  # the draft prefills the same chunks to build its own KV cache
                td, fd, bd, cd = dc.pass_time(pf_tokens, 0, pf_ctx, pf_pairs)
                duration += td
                flops += fd
                nbytes += bd
                compute_s += cd
        tt, ft, bt, ct = cfg.target_cost.pass_time(
            b * q + pf_tokens, b * q + n_complete, c_sum + pf_ctx, q * c_sum + b * q * q / 2.0 + pf_pairs
        )
        duration += tt
        flops += ft
        nbytes += bt
        compute_s += ct

        harvesting = self._harvest_pending()
        if harvesting and cfg.interference > 0:
            extra = duration * cfg.interference
            duration += extra
            self.stats.latency_cost_s += extra

        t0 = env.now
        yield env.timeout(duration)
        self.busy_s += duration

        # Spare compute of this iteration (harvest): θ·(duration − compute_s) device-seconds.
        spare = used = 0.0
        if self._harvest_rate and cfg.placement == "harvest":
            spare = max(duration - compute_s, 0.0) * self._harvest_rate
            self.stats.spare_s_available += spare
            if harvesting:
                used = self._harvest(spare, t0)

        # Outcomes: prefill progress and first tokens.
        emitted_total = 0
        out_left = self.out_left
        if pf_tokens:
            pf_left = self.pf_left
            pf_left[pf_idx] -= alloc
            ctx[pf_idx] += alloc
            done_pf = pf_idx[(pf_left[pf_idx] == 0) & (alloc > 0)]
            if done_pf.size:
                self.table.first_token[self.rid[done_pf]] = env.now
                out_left[done_pf] -= 1
                ctx[done_pf] += 1
                self.s_emitted[done_pf] += 1
                emitted_total += int(done_pf.size)
                self.n_prefill -= int(done_pf.size)

        # Decode/verify outcomes (slot counters; copied to the request table on finish).
        alpha_mean = np.nan
        if b:
            if spec:
                if self._geometric:
                    e = self.rng.standard_exponential(b)
                    a = np.minimum(e * self._inv_neg_log_alpha[dom_dec], k).astype(np.int64)
                else:
                    a = self.sample_accepted(self.rng, alpha, k)
                emit = np.minimum(a + 1, out_left[:n][dec])
                self.s_accepted[:n][dec] += a
                self.s_proposed[:n][dec] += k
                self.s_rejections[:n][dec] += a < k
                alpha_mean = float(np.add.reduce(alpha)) / b
                out_left[:n][dec] -= emit
                ctx[dec] += emit
                self.s_emitted[:n][dec] += emit
                emitted_total += int(np.add.reduce(emit))
            else:
                out_left[:n][dec] -= 1
                ctx[dec] += 1
                self.s_emitted[:n][dec] += 1
                emitted_total += b
            self.s_steps[:n][dec] += 1

        self.log.add((t0, duration, b, pf_tokens, emitted_total, k, alpha_mean, flops, nbytes,
                      compute_s, spare, used, "serve"))

        finished = np.flatnonzero(out_left[:n] <= 0)
        if finished.size:
            self._finish(finished)

    def _macro(self):
        """Up to `macro_steps` decode iterations in one event, exactly as _iteration would run them.

        While nothing is prefilling, nobody can be admitted (no arrival) and α is fixed, the batch only
        decodes: its iteration times depend on the contexts alone, and its accepted lengths are the
        same Exp(1) draws _iteration makes, row by row. So the stretch up to the first finish is drawn
        and priced at once (CostModel.pass_times, bit-identical to pass_time), and the replica sleeps
        until it ends — or, when a request arrives, until the end of the iteration in flight. The
        random stream is rewound to exactly the rows used, so results equal the one-by-one path."""
        cfg = self.cfg
        env = self.env
        n = self.n
        b = n
        spec = self.spec
        out_left = self.out_left[:n]
        # A request finishes within min(out_left) iterations (each emits ≥ 1 token), and recent
        # stretches (cut by arrivals) say how far ahead drawing pays: draw no more than either.
        m_max = min(cfg.macro_steps, int(out_left.min()), int(2.0 * self._macro_len) + 1)
        if m_max < MACRO_MIN_STEPS:  # too short to pay for drawing ahead
            yield from self._iteration()
            return
        c0 = int(np.add.reduce(self.ctx[:n]))
        k = 0
        if spec:
            dom = self.dom[:n]
            alpha_sum = float(np.add.reduce(self.alpha_by_domain[dom]))
            k = cfg.k if cfg.k is not None else self._choose_k(b, alpha_sum / b, float(c0) / b)
            rng_state = self.rng.bit_generator.state
            e = self.rng.standard_exponential((m_max, n))
            a = np.minimum(e * self._inv_neg_log_alpha[dom], k).astype(np.int64)  # [M, n]
            step = a + 1
        else:
            step = np.ones((m_max, n), dtype=np.int64)
        q = k + 1
        cum = np.cumsum(step, axis=0)
        any_done = (cum >= out_left).any(axis=1)
        m = int(np.argmax(any_done)) + 1 if any_done.any() else m_max  # iterations up to the first finish
        # Context at the start of each iteration (no cap applies before the finishing iteration).
        c_sum = (c0 + np.concatenate(([0], np.cumsum(step[: m - 1].sum(axis=1))))).astype(float)
        if spec and cfg.k is None:
            # k: auto is cached per 256-token bucket of the mean context: stop where the bucket moves.
            bucket = (c_sum / b).astype(np.int64) >> 8
            moved = np.flatnonzero(bucket != bucket[0])
            if moved.size:
                m = int(moved[0])
                c_sum = c_sum[:m]
        emit = step[:m].copy()
        last = cum[m - 1] >= out_left
        if last.any():  # the finishing iteration emits no more than each request has left
            emit[m - 1] = np.minimum(step[m - 1], out_left - (cum[m - 2] if m > 1 else 0))
        per_iter = emit.sum(axis=1)  # tokens emitted per iteration

        # Price every iteration (the same expressions as _iteration, element-wise).
        duration = np.zeros(m)
        flops = np.zeros(m)
        nbytes = np.zeros(m)
        compute_s = np.zeros(m)
        if spec:
            dc = cfg.draft_cost
            weight_sets = 1 if len(self.distillers) <= 1 else int(np.unique(dom).size)
            mean_extra = b * (k - 1) / 2.0
            td, fd, bd, cd = dc.pass_times(b, b, c_sum + mean_extra, c_sum + mean_extra + b / 2.0, weight_sets)
            duration += k * td
            flops += k * fd
            nbytes += k * bd
            compute_s += k * cd
        tt, ft, bt, ct = cfg.target_cost.pass_times(b * q, b * q, c_sum + 0.0, q * c_sum + b * q * q / 2.0 + 0.0)
        duration += tt
        flops += ft
        nbytes += bt
        compute_s += ct
        t0 = env.now
        ends = []
        t = t0
        for d in duration.tolist():
            t += d
            ends.append(t)
        if t0 + (ends[-1] - t0) != ends[-1]:  # the clock could not land on the exact sum: step singly
            if spec:
                self.rng.bit_generator.state = rng_state
            yield from self._iteration()
            return

        get = self.inbox.get()
        yield env.timeout(ends[-1] - t0) | get
        used = m
        if get.triggered:  # an arrival (possibly at the same instant the stretch ended)
            self.waiting.append(get.value)
            now = env.now
            used = next(j for j, end in enumerate(ends) if end >= now) + 1  # iterations begun by now
            if ends[used - 1] > now:
                yield env.timeout(ends[used - 1] - now)
        else:
            get.cancel()
        # Only an arrival says how far ahead is worth drawing; a stretch that ran to its end (a finish
        # or the cap) could have been as long as it was allowed to be.
        self._macro_len = 0.8 * self._macro_len + 0.2 * (used if get.triggered else m_max)
        if spec and used < m_max:  # rewind: consume exactly the rows used, as _iteration would
            self.rng.bit_generator.state = rng_state
            self.rng.standard_exponential((used, n))

        # Outcomes of the iterations run (finishes only happen in the last one, when used == m).
        emit = emit[:used]
        tot = emit.sum(axis=0)
        out_left -= tot
        self.ctx[:n] += tot
        self.s_emitted[:n] += tot
        self.s_steps[:n] += used
        alpha_mean = np.nan
        if spec:
            a = a[:used]
            self.s_accepted[:n] += a.sum(axis=0)
            self.s_proposed[:n] += k * used
            self.s_rejections[:n] += (a < k).sum(axis=0)
            alpha_mean = alpha_sum / b
        harvest = self._harvest_rate and cfg.placement == "harvest"
        start = t0
        for j in range(used):
            d = float(duration[j])
            self.busy_s += d
            spare = 0.0
            if harvest:
                spare = max(d - float(compute_s[j]), 0.0) * self._harvest_rate
                self.stats.spare_s_available += spare
            self.log.add((start, d, b, 0, int(per_iter[j]), k, alpha_mean, float(flops[j]), float(nbytes[j]),
                          float(compute_s[j]), spare, 0.0, "serve"))
            start = ends[j]
        finished = np.flatnonzero(out_left <= 0)
        if finished.size:
            self._finish(finished)

    def _finish(self, finished: np.ndarray) -> None:
        t = self.table
        now = self.env.now
        n = self.n
        rids = self.rid[finished]
        t.finish[rids] = now
        t.steps[rids] = self.s_steps[finished]
        t.accepted[rids] = self.s_accepted[finished]
        t.proposed[rids] = self.s_proposed[finished]
        t.rejections[rids] = self.s_rejections[finished]
        t.emitted[rids] = self.s_emitted[finished]
        self.kv_free += int(self.kv_res[finished].sum())
        for rid in rids.tolist():
            dom = int(t.domain[rid])
            dist = self.distiller_for_domain[dom]
            if dist is not None:
                dist.add_request(dom, int(t.prompt[rid]), int(t.output[rid]), int(t.rejections[rid]), now)
        keep = np.ones(n, dtype=bool)
        keep[finished] = False
        m = n - int(finished.size)
        for arr in self._slot_arrays:
            arr[:m] = arr[:n][keep]
        self.n = m
        self.outstanding -= int(finished.size)
        t.mark_done(int(finished.size))
        if t.on_release is not None:
            self._unreleased.extend(rids.tolist())
