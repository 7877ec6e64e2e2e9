"""A serving replica as a SimPy process: continuous batching with (optional) speculative decoding.

One iteration (docs/architecture.md, "One iteration"), for B decoding sequences and some prefill chunks:
    draft:  k sequential passes over B tokens (+ the draft's own prefill of this iteration's chunks)
    target: one pass over B·(k+1) verify tokens + the prefill chunks (chunked prefill, Sarathi)
Each decoding sequence then emits a + 1 tokens, a drawn from the acceptance law at its α.
Without speculation the target pass carries B decode tokens and each sequence emits one.

Admission is FCFS, limited by `max_batch_size` and KV capacity; a request reserves KV for its
prompt + output (+ k look-ahead slots) on admission, so there is no preemption.
The running batch is kept as arrays (struct of arrays) so an iteration costs O(1) numpy calls.

There is one iteration path, Replica._stretch: it plans m ≥ 1 iterations (prefill chunks are
deterministic, acceptances are drawn at once when the law can draw a stretch), prices them with
one pass_times call per batch shape, and applies them at once; m = 1 is the same code.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

from osdsim.cost.model import CostModel
from osdsim.sim.distill import Distiller
from osdsim.sim.placement import Placement
from osdsim.specdec import optimal_k

# Shortest stretch worth planning: below it, drawing and pricing ahead (and rewinding the
# random stream when an arrival cuts the stretch) costs more than the events it saves.
MACRO_MIN_STEPS = 4
# Rows of one batch shape are priced with one array call (CostModel.pass_times) from this many on;
# below it, numpy's per-call overhead exceeds the scalar pass_time calls it replaces.
PRICE_ARRAY_MIN_ROWS = 10
# The same with the arrival times known ahead: the horizon is rarely overshot, so short stretches pay.
MACRO_ARRIVALS_MIN_STEPS = 2
# Memory of the moving average of stretch lengths (only arrivals cut stretches): new = KEEP·old + (1 − KEEP)·last.
MACRO_LEN_KEEP = 0.8
# With the arrival times known ahead, a stretch is planned to just past the next arrival that would be
# admitted: rows ≈ gap / (ROW_S_MARGIN · shortest iteration of the last stretch) + ROW_EXTRA (too few
# rows only cost one more stretch; too many are planned, drawn and priced for nothing).
ROW_S_MARGIN = 0.9
ROW_EXTRA = 2


@dataclass
class ReplicaConfig:
    target_cost: CostModel
    draft_cost: CostModel | None  # None: no speculation
    max_batch: int
    chunk_tokens: float  # per-iteration token budget (inf = unlimited)
    kv_capacity: int
    k: int | None  # None = auto
    k_max: int
    placement: Placement  # where due training steps run (osdsim.sim.placement)
    macro_steps: int = 64  # decode iterations one event may cover between arrivals/finishes (0: off)
    attention_padding: float | None = None  # ρ: a padded batch cache (None: paged, Σ context)


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
        self.extend = self.rows.extend  # the iterations of one stretch

    def frame(self):
        import pandas as pd

        if self.rows:  # column by column (from_records goes through object arrays)
            df = pd.DataFrame({f: np.array(col) for f, col in zip(self.FIELDS, zip(*self.rows, strict=True), strict=True)})
        else:
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

    def extend(self, recs) -> None:
        for rec in recs:
            self.add(rec)

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
        law,  # the accepted-length law: GeometricLaw or EmpiricalLaw (osdsim.specdec)
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
        self.law = law
        self.log = IterationLog() if log_bin_s is None else BinnedIterationLog(log_bin_s)
        self.kv_free = cfg.kv_capacity
        self.busy_s = 0.0
        self.spare_s = 0.0  # harvest: spare training work this replica offered (summed per replica, in order)
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
        self.placement = cfg.placement
        # Passes priced one at a time (CostModel.scalar_pass_time: pass_time's bits, fewer calls).
        self._target_pass = cfg.target_cost.scalar_pass_time()
        self._draft_pass = cfg.draft_cost.scalar_pass_time() if cfg.draft_cost is not None else None
        # Stretches (see _stretch): several iterations in one event when the law can draw them at
        # once and α cannot change mid-stretch (no trainer publishing asynchronously).
        self._macro_len = float(cfg.macro_steps)  # moving average of iterations per stretch
        self._stretch_ok = cfg.macro_steps > 0 and (not self.spec or law.stretch) and cfg.placement.stretch_ok
        # Open loop with routing fixed in advance: the (planned) arrival times of the requests this
        # replica will get and their ids, set by the engine; None: arrivals are not known ahead.
        self._ahead_t: np.ndarray | None = None
        self._ahead_rid: np.ndarray | None = None
        self._row_s = 0.0  # shortest iteration of the last stretch (0: none yet)
        # Exp(1) values of the random stream drawn ahead of its position (a stretch draws all the rows
        # it plans; those it does not run stay here for the next one instead of being rewound).
        self._exp = np.empty(0)

    def know_arrivals(self, times: np.ndarray, rids: np.ndarray) -> None:
        """The arrival times (sorted) and ids of every request that will be routed here."""
        self._ahead_t = times
        self._ahead_rid = rids

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
    def _harvest_pending(self) -> bool:
        """A pending step takes spare compute from serving iterations (harvest in iterations)."""
        return self.placement.harvesting_in_iterations(self.distillers)

    def _idle(self):
        """Nothing to serve: wait for an arrival; harvest training uses the idle device meanwhile."""
        get = self.inbox.get()
        if not self.placement.harvesting(self.distillers):
            rid = yield get
            self.waiting.append(rid)
            return
        yield from self.placement.idle(self, get)

    # --- serving -------------------------------------------------------------------------------------
    def run(self):
        while True:
            self._drain_inbox()
            self._admit()
            if self.placement.blocks_serving(self.distillers):
                yield from self.placement.train(self)
                continue
            if self._unreleased:
                for rid in self._unreleased:
                    self.table.on_release(rid)  # type: ignore[misc]
                self._unreleased.clear()
            if self.n == 0:
                yield from self._idle()
                continue
            yield from self._stretch()

    def _choose_k(self, batch: int, alpha: float, ctx_mean: float) -> int:
        key = (batch, int(alpha * 100 + 0.5), int(ctx_mean) >> 8)
        k = self._k_cache.get(key)
        if k is None:
            c = self.cfg.draft_cost.decode_time(batch, ctx_mean) / self.cfg.target_cost.decode_time(batch, ctx_mean)
            k = optimal_k(alpha, c, self.cfg.k_max)
            self._k_cache[key] = k
        return k

    def _stretch_cap(self) -> int:
        """How many iterations the next event may plan (1: one iteration)."""
        if not self._stretch_ok or self._harvest_pending():  # α or spare compute move mid-stretch
            return 1
        # Recent stretches (cut by arrivals) say how far ahead drawing pays; without prefill, a
        # request also finishes within its out_left iterations (each emits ≥ 1 token).
        m = self._rows_to_arrival()
        shortest = MACRO_ARRIVALS_MIN_STEPS  # the horizon is where the stretch will likely end anyway
        if m is None:
            m = min(self.cfg.macro_steps, int(2.0 * self._macro_len) + 1)
            shortest = MACRO_MIN_STEPS
        if not self.n_prefill:
            m = min(m, int(self.out_left[: self.n].min()))
        return m if m >= shortest else 1

    def _rows_to_arrival(self) -> int | None:
        """Iterations worth planning when the arrivals are known ahead: up to a little past the next
        one that would be admitted (the stretch's horizon only; an arrival still cuts it exactly as
        before), the cap when none would be; None when the arrivals are not known ahead."""
        times = self._ahead_t
        if times is None or not self._row_s:
            return None
        cap = self.cfg.macro_steps
        if self.waiting or self.n >= self.cfg.max_batch:  # arrivals only join the queue until a finish
            return cap
        now = self.env.now
        i = int(np.searchsorted(times, now, side="right"))
        if i >= times.size:
            return cap
        rid = int(self._ahead_rid[i])  # type: ignore[index]
        need = int(self.table.prompt[rid] + self.table.output[rid]) + self.lookahead
        if self.kv_free < need <= self.cfg.kv_capacity:  # it will wait for a finish
            return cap
        rows = int((float(times[i]) - now) / (ROW_S_MARGIN * self._row_s)) + ROW_EXTRA
        return min(cap, rows)

    def _plan_prefill(self, m_cap: int, k0: int, auto_k: bool):
        """Prefill chunks of up to m_cap iterations (deterministic: FIFO over the prefill budget left
        after the decode/verify tokens). Stops early where the batch shape changes under k: auto (the
        k chosen for the first iteration holds while the decoding set does) or where a request whose
        only output token is the first one finishes. Returns the decoding and first-token masks and
        the chunk sizes (rows × slots), and per row the prefill tokens, their context, their
        attention pairs and the number of prompts completed (the expressions of one iteration, in
        Python scalars; sums of ≤ 7 terms add left to right, as numpy does)."""
        n = self.n
        chunk = self.cfg.chunk_tokens
        spec = self.spec
        pf = np.flatnonzero(self.pf_left[:n])
        slots = pf.tolist()
        left = self.pf_left[pf].tolist()
        ctxs = self.ctx[pf].tolist()
        single_token = (self.out_left[pf] <= 1).tolist()
        active = list(range(len(slots)))
        b0 = n - len(active)
        done_at = [m_cap] * len(slots)  # row where each prompt's prefill completes
        cells_r, cells_s, cells_v = [], [], []
        pf_tok, pf_ctx, pf_pairs, n_comp = [], [], [], []
        m = 0
        while m < m_cap:
            b = n - len(active)
            if m and auto_k and b != b0:
                break
            q = (k0 if spec and b else 0) + 1
            budget = chunk - b * q
            tok = comp = c_sum = 0
            pairs = 0.0
            ends_request = False
            if active and budget > 0:
                before = 0
                terms = []
                for p in active:
                    lp = left[p]
                    x = budget - before
                    before += lp
                    al = 0 if x <= 0 else (lp if x >= lp else int(x))
                    terms.append(al * (ctxs[p] + al / 2.0))
                    if al:
                        tok += al
                        c_sum += ctxs[p]
                        left[p] = lp - al
                        ctxs[p] += al
                        cells_r.append(m)
                        cells_s.append(slots[p])
                        cells_v.append(al)
                        if al == lp:
                            comp += 1
                            done_at[p] = m
                            ends_request = ends_request or single_token[p]
                if tok:
                    if len(terms) <= 7:
                        for t in terms:
                            pairs += t
                    else:
                        pairs = float(np.add.reduce(np.array(terms)))
                active = [p for p in active if left[p]]
            pf_tok.append(tok)
            pf_ctx.append(float(c_sum))
            pf_pairs.append(pairs)
            n_comp.append(comp)
            m += 1
            if ends_request:  # a request finishes with its first token
                break
            if not active:  # everyone decodes from here on
                if not (auto_k and n != b0):
                    rest = m_cap - m
                    pf_tok.extend([0] * rest)
                    pf_ctx.extend([0.0] * rest)
                    pf_pairs.extend([0.0] * rest)
                    n_comp.extend([0] * rest)
                    m = m_cap
                break
        done = np.full(n, -1, dtype=np.int64)
        done[pf] = done_at
        rows = np.arange(m)[:, None]
        dec = rows > done
        first = rows == done
        alloc = np.zeros((m, n), dtype=np.int64)
        if cells_v:
            alloc[cells_r, cells_s] = cells_v
        return dec, first, alloc, pf_tok, pf_ctx, pf_pairs, n_comp

    def _stretch(self):
        """m ≥ 1 iterations in one event, exactly as m events of one iteration would run them.

        Plan: while nobody can be admitted and α is fixed, what the batch does is known ahead: the
        prefill chunks are deterministic, and the accepted lengths are i.i.d. draws, row by row. So
        up to the first finish (or the stretch cap) the iterations are planned, their acceptances
        drawn in one call (when the law can draw a stretch), priced (CostModel.pass_times,
        bit-identical to pass_time) and applied at once; the replica sleeps until the stretch ends,
        or, when a request arrives that could be admitted, until the end of the iteration in
        flight (the random stream is rewound to exactly the rows used). m = 1 (no stretch) when the
        law cannot draw a stretch, a training step is pending under harvest, or α may change
        asynchronously (dedicated trainer)."""
        cfg = self.cfg
        env = self.env
        n = self.n
        spec = self.spec
        auto_k = cfg.k is None
        m_cap = self._stretch_cap()
        ctx0 = self.ctx[:n]
        dom = self.dom[:n]
        alpha_slot = self.alpha_by_domain[dom] if spec else None

        # Decoding set of the first iteration, and its k.
        if self.n_prefill:
            dec0 = self.pf_left[:n] == 0
            b0 = int(np.count_nonzero(dec0))
        else:
            dec0 = None
            b0 = n
        k0 = 0
        if spec and cfg.k is not None:
            k0 = cfg.k
        elif spec and b0:
            a_dec = alpha_slot if dec0 is None else alpha_slot[dec0]
            c_dec = ctx0 if dec0 is None else ctx0[dec0]
            k0 = self._choose_k(b0, float(np.add.reduce(a_dec)) / b0, float(np.add.reduce(c_dec)) / b0)

        # Plan the rows: decoding mask, first tokens, prefill chunks.
        if self.n_prefill:
            dec, first, alloc, pf_tok, pf_ctx, pf_pairs, n_comp = self._plan_prefill(m_cap, k0, auto_k)
            m_plan = dec.shape[0]
            b_rows = dec.sum(axis=1)
        else:
            m_plan = m_cap
            dec = first = alloc = None
            pf_tok = n_comp = [0] * m_plan
            pf_ctx = pf_pairs = [0.0] * m_plan
            b_rows = np.full(m_plan, n)

        # Harvest with a step pending: one iteration, whose accepted lengths are drawn after the spare
        # compute it offered was given to training (with the α that training left; behaviour kept
        # from the one-iteration path).
        harvesting = self._harvest_pending()
        if harvesting:
            m = 1
            a = emit = None
            c_sum = np.array([float(np.add.reduce(ctx0 if dec is None else ctx0[dec[0]]))])
            if cfg.attention_padding is not None:
                c_sum = self._padded_context(np.zeros((1, n), dtype=np.int64), None, dec, 1)
        else:
            a, step = self._draw(m_plan, dec, first, b_rows, k0, alpha_slot)
            m, c_sum, emit = self._extent(step, dec, alloc, b0)
            if cfg.attention_padding is not None:
                c_sum = self._padded_context(step, alloc, dec, m)

        # Per-row batch shape: decoding count, k, α mean and draft weight sets (they change only
        # where a prefill completes).
        b_list = b_rows[:m].tolist()
        k_list = [k0 if spec and b else 0 for b in b_list]
        alpha_mean = [np.nan] * m
        wsets = [1] * m
        if spec:
            shape = None  # (decoding count, α mean, weight sets); the set only grows within a stretch
            for j in range(m):
                if not b_list[j]:
                    continue
                if shape is None or b_list[j] != shape[0]:
                    sel = slice(None) if dec is None else dec[j]
                    ws = 1 if len(self.distillers) <= 1 else int(np.unique(dom[sel]).size)
                    shape = (b_list[j], float(np.add.reduce(alpha_slot[sel])) / b_list[j], ws)
                alpha_mean[j], wsets[j] = shape[1], shape[2]

        duration, flops, nbytes, compute_s = self._price(m, b_list, k_list, c_sum, pf_tok, pf_ctx, pf_pairs,
                                                         n_comp, wsets)
        if harvesting or self.placement.co_running():  # m == 1 (neither placement allows stretches then)
            duration[0] += self.placement.slow_down(duration[0])
        self._row_s = min(duration)

        t0 = env.now
        ends = []
        t = t0
        for d in duration:
            t += d
            ends.append(t)
        if m > 1 and t0 + (ends[-1] - t0) != ends[-1]:  # the clock could not land on the exact sum
            m = 1
            ends = ends[:1]

        # Sleep to the stretch's end, or to the end of the iteration in flight when an arrival could
        # be admitted (an arrival that can only join the queue changes nothing in the stretch).
        end = env.timeout(ends[-1] - t0)
        cut = False
        if m == 1:
            yield end
        else:
            while True:
                get = self.inbox.get()
                yield end | get
                if not get.triggered:
                    get.cancel()
                    break
                self.waiting.append(get.value)
                if not self._joins_queue_now():
                    cut = True
                    break
                if end.processed:
                    break
        used = m
        if cut:
            now = env.now
            used = next(j for j, e_ in enumerate(ends) if e_ >= now) + 1  # iterations begun by now
            if ends[used - 1] > now:
                yield env.timeout(ends[used - 1] - now)
        if m_cap > 1:
            # Only an arrival says how far ahead is worth drawing; a stretch that ran to its end (a
            # finish or the cap) could have been as long as it was allowed to be.
            self._macro_len = MACRO_LEN_KEEP * self._macro_len + (1 - MACRO_LEN_KEEP) * (used if cut else m_cap)
        if a is not None and self.law.stretch:  # the rows run consume their draws; the rest wait
            self._consume(int(b_rows[:used].sum()))

        spare_took = None
        if harvesting:  # m == used == 1
            self.busy_s += duration[0]
            spare = max(duration[0] - compute_s[0], 0.0) * self.placement.spare_rate
            self.spare_s += spare
            spare_took = (spare, self.placement.give(self.distillers, spare, t0, env.now))
            a, step = self._draw(1, dec, first, b_rows, k0, alpha_slot)
            if a is not None and self.law.stretch:
                self._consume(int(b_rows[0]))
            _, _, emit = self._extent(step, dec, alloc, b0)
        per_iter = emit.sum(axis=1)

        # Outcomes of the iterations run (finishes only happen in the last one, when used == m).
        emit = emit[:used]
        tot = emit.sum(axis=0)
        ctx = self.ctx[:n]
        self.out_left[:n] -= tot
        ctx += tot
        self.s_emitted[:n] += tot
        if dec is None:
            self.s_steps[:n] += used
        else:
            self.s_steps[:n] += dec[:used].sum(axis=0)
            pf_used = alloc[:used].sum(axis=0)
            self.pf_left[:n] -= pf_used
            ctx += pf_used
            rows, slots = np.nonzero(first[:used])
            if slots.size:
                self.table.first_token[self.rid[slots]] = np.asarray(ends)[rows]
                self.n_prefill -= int(slots.size)
        if a is not None:
            a = a[:used]
            self.s_accepted[:n] += a.sum(axis=0)
            rejected = a < k0
            if dec is None:
                self.s_proposed[:n] += k0 * used
            else:
                self.s_proposed[:n] += k0 * dec[:used].sum(axis=0)
                rejected &= dec[:used]
            self.s_rejections[:n] += rejected.sum(axis=0)
        # Book the iterations (in order, as one iteration at a time would) and log them.
        dur = duration[:used]
        cs = compute_s[:used]
        if spare_took is not None:
            spares, took = [spare_took[0]], [spare_took[1]]
        else:
            busy = self.busy_s
            for d in dur:
                busy += d
            self.busy_s = busy
            spares = took = [0.0] * used
            if self.placement.spare_rate:
                rate = self.placement.spare_rate
                spares = [max(d - c, 0.0) * rate for d, c in zip(dur, cs, strict=True)]
                total = self.spare_s
                for x in spares:
                    total += x
                self.spare_s = total
        self.log.extend(zip([t0, *ends[: used - 1]], dur, b_list[:used], pf_tok[:used], per_iter[:used].tolist(),
                            k_list[:used], alpha_mean[:used], flops[:used], nbytes[:used], cs,
                            spares, took, ["serve"] * used, strict=True))
        finished = np.flatnonzero(self.out_left[:n] <= 0)
        if finished.size:
            self._finish(finished)

    def _exponentials(self, count: int) -> np.ndarray:
        """The next `count` Exp(1) values of the stream, not consumed (_consume does): one stream
        drawn in pieces is the stream drawn at once, so values drawn ahead wait for the next stretch."""
        buf = self._exp
        if count > buf.size:
            buf = self._exp = np.concatenate((buf, self.rng.standard_exponential(count - buf.size)))
        return buf[:count]

    def _consume(self, count: int) -> None:
        if count:
            self._exp = self._exp[count:]

    def _draw(self, m_plan, dec, first, b_rows, k0, alpha_slot):
        """Accepted lengths a (rows × slots; 0 off the decoding set) and tokens each slot emits per row
        before the finishing cap (a + 1 decoding, 1 for a first token). All planned rows are drawn at
        once, rows in order and decoding slots in slot order: the stream one iteration at a time would
        consume (the caller consumes the rows it runs, _consume)."""
        n = self.n
        if not self.spec or int(b_rows[:m_plan].sum()) == 0:
            step = np.ones((m_plan, n), dtype=np.int64) if dec is None else (dec[:m_plan] | first[:m_plan]).astype(np.int64)
            return None, step
        if self.law.stretch:
            inv = self._inv_neg_log_alpha[self.dom[:n]]
            if dec is None:
                e = self._exponentials(m_plan * n).reshape(m_plan, n)  # row-major: rows in order
            else:
                e = np.zeros((m_plan, n))
                e[dec[:m_plan]] = self._exponentials(int(b_rows[:m_plan].sum()))
            a = np.minimum(e * inv, k0).astype(np.int64)
        else:  # a law that cannot draw a stretch: m_plan == 1
            a = np.zeros((1, n), dtype=np.int64)
            sel = slice(None) if dec is None else dec[0]
            a[0, sel] = self.law.sample(self.rng, alpha_slot[sel], k0)
        step = a + 1
        if dec is not None:
            step = np.where(dec[:m_plan], step, first[:m_plan])
        return a, step

    def _extent(self, step, dec, alloc, b0):
        """(m, context sums per row, tokens emitted per row and slot): the stretch runs to its first
        finish, and under k: auto to where the 256-token bucket of the mean context moves."""
        n = self.n
        out0 = self.out_left[:n]
        ctx0 = self.ctx[:n]
        m_plan = step.shape[0]
        cum = np.cumsum(step, axis=0)
        any_done = (cum >= out0).any(axis=1)
        m = int(np.argmax(any_done)) + 1 if any_done.any() else m_plan
        # Context sum of the decoding sequences at the start of each row (exact integers).
        if dec is None:
            c_sum = (int(np.add.reduce(ctx0)) + np.concatenate(([0], np.cumsum(step[: m - 1].sum(axis=1))))).astype(float)
        else:
            grow = step[: m - 1] + alloc[: m - 1]
            ctx_rows = ctx0 + np.concatenate((np.zeros((1, n), dtype=np.int64), np.cumsum(grow, axis=0)))
            c_sum = np.where(dec[:m], ctx_rows, 0).sum(axis=1).astype(float)
        if self.spec and self.cfg.k is None and m > 1 and b0:
            bucket = (c_sum / b0).astype(np.int64) >> 8
            moved = np.flatnonzero(bucket != bucket[0])
            if moved.size:
                m = int(moved[0])
                c_sum = c_sum[:m]
        emit = step[:m].copy()
        if any_done[m - 1]:  # the finishing iteration emits no more than each request has left
            emit[m - 1] = np.minimum(step[m - 1], out0 - (cum[m - 2] if m > 1 else 0))
        return m, c_sum, emit

    def _padded_context(self, step, alloc, dec, m) -> np.ndarray:
        """The context the decoding rows' attention reads per iteration with a padded batch cache:
        n_dec · ρ · (longest decoding row), instead of Σ context (paged attention). One KV tensor
        [B, H, W, D] per batch: every row's queries meet all W ≥ longest columns (left pads, holes)."""
        ctx0 = self.ctx[: self.n]
        if ctx0.size == 0:
            return np.zeros(m)
        grow = step[: m - 1] if alloc is None else step[: m - 1] + alloc[: m - 1]
        rows = ctx0 + np.concatenate((np.zeros((1, ctx0.size), dtype=np.int64), np.cumsum(grow, axis=0)))
        if dec is None:
            longest, count = rows.max(axis=1), np.full(m, ctx0.size)
        else:
            longest, count = np.where(dec[:m], rows, 0).max(axis=1), dec[:m].sum(axis=1)
        return self.cfg.attention_padding * count * longest.astype(float)

    def _price(self, m, b_list, k_list, c_sum, pf_tok, pf_ctx, pf_pairs, n_comp, wsets):
        """(duration, flops, bytes, compute_s) lists of m iterations: the draft's k passes (+ its
        prefill of the chunks) and the target's verify + prefill pass. Rows without prefill that
        share a batch shape (PRICE_ARRAY_MIN_ROWS or more) are priced by one pass_times call; the
        expressions are those of pass_time, element-wise (so every row equals pricing it alone, bit
        for bit)."""
        cfg = self.cfg
        dc = cfg.draft_cost
        tc = cfg.target_cost
        draft_pass, target_pass = self._draft_pass, self._target_pass
        if (m >= PRICE_ARRAY_MIN_ROWS and not any(pf_tok) and b_list[0] and b_list.count(b_list[0]) == m
                and wsets.count(wsets[0]) == m):
            groups = [((b_list[0], k_list[0], wsets[0]), None)]  # one batch shape, no prefill
        else:
            shapes: dict[tuple[int, int, int], list[int]] = {}
            groups = []
            for j in range(m):
                if pf_tok[j] or not b_list[j] or m < PRICE_ARRAY_MIN_ROWS:
                    groups.append((None, j))  # priced alone
                else:
                    shapes.setdefault((b_list[j], k_list[j], wsets[j]), []).append(j)
            for shape, rows in shapes.items():
                if len(rows) >= PRICE_ARRAY_MIN_ROWS:
                    groups.append((shape, rows))
                else:  # the same bits one row at a time (what a stretch of one iteration computes)
                    groups.extend((None, j) for j in rows)
        duration = [0.0] * m
        flops = [0.0] * m
        nbytes = [0.0] * m
        compute_s = [0.0] * m
        for shape, rows in groups:
            if shape is None:  # one row (with prefill chunks, or prefill only, or m = 1)
                j = rows
                b, k, ws = b_list[j], k_list[j], wsets[j]
                c = float(c_sum[j])
                q = k + 1
                dur = fl = by = cs = 0.0
                if k:  # the draft decodes (spec and b > 0)
                    mean_extra = b * (k - 1) / 2.0  # average draft context growth over the k passes
                    td, fd, bd, cd = draft_pass(b, b, c + mean_extra, c + mean_extra + b / 2.0, ws)
                    dur += k * td
                    fl += k * fd
                    by += k * bd
                    cs += k * cd
                    if pf_tok[j]:  # the draft prefills the same chunks to build its own KV cache
                        td, fd, bd, cd = draft_pass(pf_tok[j], 0, pf_ctx[j], pf_pairs[j])
                        dur += td
                        fl += fd
                        by += bd
                        cs += cd
                tt, ft, bt, ct = target_pass(b * q + pf_tok[j], b * q + n_comp[j], c + pf_ctx[j],
                                              q * c + b * q * q / 2.0 + pf_pairs[j])
                duration[j] = dur + tt
                flops[j] = fl + ft
                nbytes[j] = by + bt
                compute_s[j] = cs + ct
                continue
            b, k, ws = shape
            c = c_sum if rows is None else c_sum[rows]
            q = k + 1
            tt, ft, bt, ct = tc.pass_times(b * q, b * q, c + 0.0, q * c + b * q * q / 2.0 + 0.0)
            if k:
                mean_extra = b * (k - 1) / 2.0
                td, fd, bd, cd = dc.pass_times(b, b, c + mean_extra, c + mean_extra + b / 2.0, ws)
                # 0.0 + k·draft + target: the order one iteration adds them in.
                tt, ft, bt, ct = (0.0 + k * td) + tt, (0.0 + k * fd) + ft, (0.0 + k * bd) + bt, (0.0 + k * cd) + ct
            else:
                tt, ft, bt, ct = 0.0 + tt, 0.0 + ft, 0.0 + bt, 0.0 + ct
            if rows is None:
                duration, flops, nbytes, compute_s = tt.tolist(), ft.tolist(), bt.tolist(), ct.tolist()
            else:
                for col, vals in ((duration, tt), (flops, ft), (nbytes, bt), (compute_s, ct)):
                    for j, v in zip(rows, vals.tolist(), strict=True):
                        col[j] = v
        return duration, flops, nbytes, compute_s

    def _joins_queue_now(self) -> bool:
        """Whether the request that just arrived mid-stretch (the queue's tail) can neither be admitted
        nor rejected before the stretch's next finish, so one iteration at a time would only have
        queued it. At the stretch's start _admit stopped: the batch was full, or the queue's head did
        not fit in the free KV (and fits the capacity). Until a finish neither changes."""
        if self.n >= self.cfg.max_batch or len(self.waiting) > 1:
            return True
        rid = self.waiting[-1]
        need = int(self.table.prompt[rid] + self.table.output[rid]) + self.lookahead
        return self.kv_free < need <= self.cfg.kv_capacity

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
