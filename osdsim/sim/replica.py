"""A serving replica as a SimPy process: continuous batching with (optional) speculative decoding.

One iteration (docs/architecture.md, "One iteration"), for B decoding sequences and some prefill chunks:
    draft:  k sequential passes over B tokens (+ the draft's own prefill of this iteration's chunks)
    target: one pass over B·(k+1) verify tokens + the prefill chunks (chunked prefill, Sarathi)
Each decoding sequence then emits a + 1 tokens, a drawn from the acceptance law at its α.
Without speculation the target pass carries B decode tokens and each sequence emits one.

Admission is FCFS, limited by `max_batch_size` and KV capacity; a request reserves KV for its
prompt + output (+ k look-ahead slots) on admission, so there is no preemption.
The running batch is kept as arrays (struct of arrays) so an iteration costs O(1) numpy calls.

The general iteration path is Replica._stretch: it plans m ≥ 1 iterations (prefill chunks are
deterministic, acceptances are drawn at once when the law can draw a stretch), prices them with
one pass_times call per batch shape, and applies them at once; m = 1 is the same code. When only
the (known) arrivals can change what a replica does, Replica._chain runs its iterations back to
back across finishes and admissions, with the same results (docs/architecture.md, "Chains").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from heapq import heappush
from operator import sub

import numpy as np
import simpy

from osdsim.cost.model import CostModel
from osdsim.sim.distill import Distiller
from osdsim.sim.placement import NoTraining, Placement
from osdsim.specdec import optimal_k

# Shortest stretch worth planning: below it, drawing and pricing ahead (and rewinding the
# random stream when an arrival cuts the stretch) costs more than the events it saves.
MACRO_MIN_STEPS = 4
# Rows of one batch shape are priced with one array call (CostModel.pass_times) from this many on;
# below it, numpy's per-call overhead exceeds the scalar pass_time calls it replaces.
PRICE_ARRAY_MIN_ROWS = 64
# Pass shapes a replica keeps priced ahead (Replica._shape_pass); past it the cache starts over.
SHAPE_CACHE_MAX = 4096
# The same with the arrival times known ahead: the horizon is rarely overshot, so short stretches pay.
MACRO_ARRIVALS_MIN_STEPS = 2
# Memory of the moving average of stretch lengths (only arrivals cut stretches): new = KEEP·old + (1 − KEEP)·last.
MACRO_LEN_KEEP = 0.8
# With the arrival times known ahead, a stretch is planned to just past the next arrival that would be
# admitted: rows ≈ gap / (ROW_S_MARGIN · shortest iteration of the last stretch) + ROW_EXTRA (too few
# rows only cost one more stretch; too many are planned, drawn and priced for nothing).
ROW_S_MARGIN = 0.9
ROW_EXTRA = 2
# Iterations one chain (see Replica._chain) may run before the clock catches up with it: bounds what
# it holds back (done counts for progress, arrivals taken ahead) without costing noticeable events.
CHAIN_MAX_ROWS = 1024
# Exp(1) values drawn at least at once when the stream must be drawn further (the rest wait, so a
# stretch or run asking for a few more does not copy what is waiting each time).
EXP_BLOCK = 4096


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
    separate_prefill: bool = False  # prefill chunks in their own passes with the whole budget (batching.prefill_pass)


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
        # Outcome counters, one row each (views of one array, so a finish copies a replica's in one go):
        # decode iterations (spec steps), accepted draft tokens, drafted tokens, steps ending in a
        # rejection (a < k), output tokens emitted.
        self.counters = np.zeros((5, n), dtype=np.int64)
        self.steps, self.accepted, self.proposed, self.rejections, self.emitted = self.counters
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
    """Per-iteration records of one replica, kept as one list per field (a DataFrame at the end)."""

    FIELDS = (
        "t_s", "duration_s", "decode_seqs", "prefill_tokens", "emitted_tokens", "k",
        "alpha_mean", "flops", "bytes", "compute_busy_s", "spare_flops", "train_work_flops", "kind",
    )

    def __init__(self) -> None:
        self.cols: tuple[list, ...] = tuple([] for _ in self.FIELDS)

    def add(self, rec: tuple) -> None:
        """One iteration (a value per field)."""
        for col, v in zip(self.cols, rec, strict=True):
            col.append(v)

    def extend(self, t, dur, n, pf, emitted, k, alpha, flops, nbytes, busy, spare, used, kind) -> None:
        """The iterations of one stretch: a sequence per field (no tuple per iteration to build)."""
        c = self.cols
        c[0].extend(t)
        c[1].extend(dur)
        c[2].extend(n)
        c[3].extend(pf)
        c[4].extend(emitted)
        c[5].extend(k)
        c[6].extend(alpha)
        c[7].extend(flops)
        c[8].extend(nbytes)
        c[9].extend(busy)
        c[10].extend(spare)
        c[11].extend(used)
        c[12].extend(kind)

    def frame(self):
        import pandas as pd

        # Every column as an array first (the derived ones by numpy), then one DataFrame: setting
        # columns on a DataFrame one by one costs more than their arithmetic at these lengths.
        if self.cols[0]:
            # (the kind strings as objects: pandas makes the same column of them, without a fixed-width copy)
            cols = {f: np.array(col, dtype=object) if f == "kind" else np.array(col)
                    for f, col in zip(self.FIELDS, self.cols, strict=True)}
        else:
            cols = {f: np.array([], dtype=object) for f in self.FIELDS}
        serve = cols["kind"] == "serve"
        n = cols["decode_seqs"].astype(float)
        alpha = cols["alpha_mean"].astype(float)
        dur = cols["duration_s"]
        has_alpha = np.isfinite(alpha) & serve
        cols["batch_x_s"] = n * dur * serve
        cols["alpha_x_n"] = np.where(has_alpha, alpha * n, 0.0)
        cols["alpha_n"] = np.where(has_alpha, n, 0.0)
        cols["k_x_n"] = cols["k"].astype(float) * np.where(has_alpha, n, 0.0)
        cols["serve_s"] = dur * serve
        return pd.DataFrame(cols)


class BinnedIterationLog:
    """Iteration records summed into time bins (bounded memory for very long runs)."""

    def __init__(self, width_s: float) -> None:
        self.width = width_s
        self.bins: dict[int, list[float]] = {}

    def extend(self, *cols) -> None:
        for rec in zip(*cols, strict=True):
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


def _timeout_at(env: simpy.Environment, t: float) -> simpy.Event:
    """An event that fires at exactly t ≥ now. One iteration at a time lands on each boundary as the
    sum of its durations; a stretch woken by an arrival mid-iteration must sleep on to that very sum,
    and env.timeout(t − now) lands on now + (t − now), which can miss t by an ulp (with no delay that
    lands on it: a rounding tie). So the event goes into SimPy's queue at t itself, as
    Environment.schedule puts a Timeout there (simpy 4: `_queue` of (time, priority, id, event))."""
    if env.now + (t - env.now) == t:
        return env.timeout(t - env.now)
    event = simpy.Event(env)
    event._ok, event._value = True, None
    heappush(env._queue, (t, simpy.core.NORMAL, next(env._eid), event))  # type: ignore[attr-defined]
    return event


def _prefill_row(active: list[int], left: list[int], ctxs: list[int], budget: float) -> tuple[int, int, float, list]:
    """One iteration's prefill chunks: FIFO over the prompts still prefilling (`active`, indices into
    `left` and `ctxs`, which it advances) within the token budget left after decode/verify. Returns
    the prefill tokens, the context sum of the chunked prompts, their attention pairs (a sum of ≤ 7
    terms added left to right, as numpy does; longer ones by numpy) and (index, chunk) pairs."""
    tok = c_sum = 0
    pairs = 0.0
    got = []
    if len(active) == 1 and budget > 0:  # one prompt prefilling (most rows): the loop's one pass
        p = active[0]
        lp = left[p]
        al = lp if budget >= lp else int(budget)
        if al:
            c = ctxs[p]
            left[p] = lp - al
            ctxs[p] = c + al
            return al, c, 0.0 + al * (c + al / 2.0), [(p, al)]
    elif active and budget > 0:
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
                got.append((p, al))
        if tok:
            if len(terms) <= 7:
                for t in terms:
                    pairs += t
            else:
                pairs = float(np.add.reduce(np.array(terms)))
    return tok, c_sum, pairs, got


class _ArrivalCut:
    """The known arrivals from the i-th, met row by row as a chain run's iterations are priced.

    passed(j, end), called once `next` ≤ end (the arrival heading the rest comes before row j ends):
    None to go on, else (rows to run, whether the chain stops after them). The first arrival that can
    be admitted or rejected ends the run with the iteration in flight (j + 1 rows); one that can only
    join the queue changes nothing until a finish, and heads the queue (those behind it wait); one
    landing exactly on a boundary stops the chain before that boundary (j rows: the event queue
    orders them)."""

    __slots__ = ("clock", "need", "i", "next", "blocked", "kv_free", "kv_capacity")

    def __init__(self, clock: list[float], need: list[int], i: int, blocked: bool, kv_free: int,
                 kv_capacity: int) -> None:
        self.clock, self.need, self.i, self.blocked = clock, need, i, blocked
        self.kv_free, self.kv_capacity = kv_free, kv_capacity
        self.next = clock[i] if i < len(clock) else float("inf")

    def passed(self, j: int, end: float) -> tuple[int, bool] | None:
        clock, cut = self.clock, None
        while self.next <= end:
            if self.next == end:
                return j, True
            if not self.blocked:
                need = self.need[self.i]
                if need <= self.kv_free or need > self.kv_capacity:
                    cut = j + 1
                self.blocked = True
            self.i += 1
            self.next = clock[self.i] if self.i < len(clock) else float("inf")
        return None if cut is None else (cut, False)


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
        # One row per slot field (views of one array: removing finished slots is one copy).
        self._slots = np.zeros((11, cap), dtype=np.int64)
        (self.rid, self.ctx, self.pf_left, self.out_left, self.dom, self.kv_res,
         self.s_steps, self.s_accepted, self.s_proposed, self.s_rejections, self.s_emitted) = self._slots
        # ctx: tokens with KV (prefilled prompt + generated); pf_left: prompt tokens not yet prefilled;
        # out_left: output tokens still to emit. The s_* outcome counters (RequestTable.counters' order)
        # are copied to the request table when the request finishes.
        self.n_prefill = 0  # running sequences still prefilling
        self.spec = cfg.draft_cost is not None
        self.lookahead = (cfg.k or cfg.k_max) if self.spec else 0
        self.placement = cfg.placement
        # Passes priced one at a time (CostModel.scalar_pass_time: pass_time's bits, fewer calls); shapes
        # that recur (decode rows, full prefill chunks) through one function of the context and pairs per
        # (tokens, logit tokens, weight sets) met (CostModel.shape_pass_time, the same bits; _shape_pass),
        # and decode rows through one pricer per (b, k, weight sets) (_decode_row).
        self._target_pass = cfg.target_cost.scalar_pass_time()
        self._draft_pass = cfg.draft_cost.scalar_pass_time() if cfg.draft_cost is not None else None
        self._target_shapes: dict[tuple[int, int, int], Callable] = {}
        self._draft_shapes: dict[tuple[int, int, int], Callable] = {}
        self._decode_rows: dict[tuple[int, int, int], Callable] = {}
        self._full_chunk_rows: dict[tuple[int, int, int], Callable] = {}  # (b, k, completed prompts)
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
        # Chains (see _chain): the exact clock instants of this replica's arrivals when its whole future
        # is determined by them (None: no chains), how many of them have been submitted, and the done
        # counts a running chain holds back until the clock reaches its end.
        self._ahead_clock: list[float] | None = None
        self._ahead_rid_list: list[int] = []
        self._ahead_need: list[int] = []
        self._submitted = 0
        self._done_later: list[int] | None = None

    def know_arrivals(self, times: np.ndarray, rids: np.ndarray, clock: np.ndarray | None = None) -> None:
        """The arrival times (sorted) and ids of every request that will be routed here. `clock`: the
        exact instants the simulated clock will submit them at, when nothing else can stop or steer
        the run (no time limit); then a replica whose future only its arrivals decide runs chains."""
        self._ahead_t = times
        self._ahead_rid = rids
        cfg = self.cfg
        t = self.table
        determined = (cfg.macro_steps > 0 and not self.distillers and isinstance(cfg.placement, NoTraining)
                      and (not self.spec or (self.law.stretch and cfg.k is not None)))
        tokens_ok = rids.size == 0 or (int(t.prompt[rids].min()) >= 1 and int(t.output[rids].min()) >= 1)
        if clock is not None and determined and tokens_ok:
            self._ahead_clock = clock.tolist()
            self._ahead_rid_list = rids.tolist()
            self._ahead_need = (t.prompt[rids] + t.output[rids] + self.lookahead).tolist()  # KV each reserves

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
        self._submitted += 1
        self.table.replica[rid] = self.index
        # The simulated clock reached the arrival by summing gaps; record that exact instant so
        # causality (admitted ≥ arrival) holds to the last bit.
        self.table.arrival[rid] = self.env.now
        if self.inbox.get_queue:
            self.inbox.put(rid)
        else:  # nobody waits on the inbox: the item is all a put leaves (its event has no callbacks)
            self.inbox.items.append(rid)

    def _drain_inbox(self) -> None:
        if self.inbox.items:
            self.waiting.extend(self.inbox.items)
            self.inbox.items.clear()

    def _admit(self, now: float | None = None) -> None:
        """FCFS admission at an iteration boundary (`now`: the boundary, default the clock)."""
        t = self.table
        if now is None:
            now = self.env.now
        cap = self.cfg.max_batch
        while self.waiting and self.n < cap:
            rid = self.waiting[0]
            need = int(t.prompt[rid] + t.output[rid]) + self.lookahead
            if need > self.cfg.kv_capacity:  # can never fit: report it, do not block the queue
                self.waiting.popleft()
                t.rejected[rid] = True
                self.outstanding -= 1
                self._mark_done(1)
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
            t.admitted[rid] = now
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
            b = self._chain_start()
            if b is None:
                yield from self._stretch()
            else:
                yield from self._chain(b)

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
            tok, c_sum, pairs, got = _prefill_row(active, left, ctxs, self._prefill_budget(chunk, b * q))
            comp = 0
            ends_request = False
            for p, al in got:
                cells_r.append(m)
                cells_s.append(slots[p])
                cells_v.append(al)
                if not left[p]:
                    comp += 1
                    done_at[p] = m
                    ends_request = ends_request or single_token[p]
            if comp:
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
                yield _timeout_at(env, ends[used - 1])
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
        self.log.extend([t0, *ends[: used - 1]], dur, b_list[:used], pf_tok[:used], per_iter[:used].tolist(),
                        k_list[:used], alpha_mean[:used], flops[:used], nbytes[:used], cs,
                        spares, took, ["serve"] * used)
        finished = np.flatnonzero(self.out_left[:n] <= 0)
        if finished.size:
            self._finish(finished)

    # --- chains ------------------------------------------------------------------------------------
    def _chain_start(self) -> int | None:
        """The number of decoding sequences when the next event may be a chain, else None. A chain needs
        the arrivals known to the last bit (know_arrivals), none of them due at this very instant (its
        order against this replica's wake-up is the event queue's), and the decoding sequences to be
        a prefix of the slots (FIFO prefill completes in slot order and admissions append: they are,
        unless a chain never ran)."""
        clock = self._ahead_clock
        if clock is None or self.cfg.attention_padding is not None:  # runs price paged attention only
            return None
        i = self._submitted
        if i < len(clock) and clock[i] == self.env.now:
            return None
        n = self.n
        b = n - int(np.count_nonzero(self.pf_left[:n]))
        if self.pf_left[:b].any():
            return None
        return b

    def _chain(self, b: int) -> Generator[simpy.Event, None, None]:
        """Runs of iterations back to back in one event, exactly as one iteration at a time would run.

        With the arrivals known to the last bit (open loop, routing fixed in advance), no trainer and
        a fixed k, nothing but the arrivals can change what this replica does, so it need not wait
        for them: a run (_chain_run) goes as far as the batch's membership holds (to the first finish,
        the first completed prompt, or the iteration boundary where an arrival can be admitted), and
        at its end the arrivals before that boundary join the queue ahead of their events and FCFS
        admission runs as at any boundary. The clock then sleeps once, to the chain's end; every time
        written meanwhile is the iteration boundary's own (the sums one iteration at a time makes).
        Done counts wait for that end, so the run cannot end before the clock reaches the last
        finish; the arrivals taken ahead are dropped from the inbox when their events have come."""
        env = self.env
        t_start = t = env.now
        i0 = self._submitted
        durs: list[float] = []
        taken = 0  # arrivals put in the queue ahead of their events
        self._done_later = []
        rows_left = CHAIN_MAX_ROWS
        while True:
            t, b, rows, stop = self._chain_run(t, b, rows_left, i0 + taken, durs)
            rows_left -= rows
            if stop or rows_left <= 0:
                break
            taken += self._take_arrivals(t, i0 + taken)
            self._admit(t)
            if self.n == 0:
                break
        if not durs:  # an arrival lands on the first iteration's end: the event queue orders them
            self._done_later = None
            yield from self._stretch()
            return
        if t_start + (t - t_start) == t:
            yield env.timeout(t - t_start)
        else:  # the clock cannot land on the sum at once: the iterations' own sleeps (rare)
            for d in durs:
                yield env.timeout(d)
        self._settle_chain(i0, taken)

    def _take_arrivals(self, t: float, i: int) -> int:
        """Arrivals (from the i-th known one) the clock submits before the boundary t: into the queue."""
        clock = self._ahead_clock
        j = i
        while j < len(clock) and clock[j] < t:  # type: ignore[arg-type]
            j += 1
        self.waiting.extend(self._ahead_rid_list[i:j])
        return j - i

    def _settle_chain(self, i0: int, taken: int) -> None:
        """At the chain's end: the arrivals taken ahead came as planned (their events have put them in
        the inbox, at the instants used): drop them there; release the held done counts."""
        items = self.inbox.items
        rids = self._ahead_rid_list[i0:i0 + taken]
        if items[:taken] != rids or self.table.arrival[rids].tolist() != self._ahead_clock[i0:i0 + taken]:
            raise RuntimeError(f"replica {self.index}: arrivals did not come as the chain planned")
        del items[:taken]
        done, self._done_later = self._done_later, None
        for count in done:  # type: ignore[union-attr]
            self.table.mark_done(count)

    def _chain_run(self, t0: float, b: int, rows_max: int, i_next: int,
                   durs: list[float]) -> tuple[float, int, int, bool]:
        """Iterations from t0 while nobody joins or leaves the batch: slots [0, b) decode, [b, n) prefill.
        Returns (its end, decoding sequences after it, iterations, whether the chain stops there).

        It ends with the first iteration where a sequence finishes, or the one in flight when an
        arrival that can be admitted (or rejected) comes; it stops the chain short of an iteration
        whose end is an arrival's instant (the event queue orders those). A prompt that completes
        (FIFO: the first prefilling slot) emits its first token at that iteration's end and decodes
        from the next one on, so the decoding set grows within a run and stays a prefix of the
        slots. Decoding rows draw their accepted lengths row by row over the decoding slots in slot
        order, the stream one iteration at a time draws; what is drawn and not run waits for the
        next (see _exponentials)."""
        cfg = self.cfg
        n = self.n
        kk = cfg.k if self.spec else 0
        out_dec = self.out_left[:b]
        out_min = min(out_dec.tolist()) if b else rows_max
        cap = min(rows_max, out_min, self._rows_hint(t0, i_next))  # each row emits ≥ 1 per sequence
        # Prefill chunks, row by row (deterministic), with the decoding count of each row: a prompt that
        # completes decodes from the next row on (in slot order: FIFO completes the first ones first).
        b_rows: list[int] = []
        pf_tok: list[int] = []
        pf_ctx: list[float] = []
        pf_pairs: list[float] = []
        n_comp: list[int] = []
        chunks: list[list] = []
        new: list[tuple[int, int]] = []  # (prefilling slot p, row where its prompt completes)
        b_r = b
        if n > b:
            left = self.pf_left[b:n].tolist()
            ctxs = self.ctx[b:n].tolist()
            outs = self.out_left[b:n].tolist()
            active = list(range(n - b))
            chunk = cfg.chunk_tokens
            q = kk + 1
            while active and len(pf_tok) < cap:
                tok, c_sum, pairs, got = _prefill_row(active, left, ctxs,
                                                      self._prefill_budget(chunk, b_r * (q if b_r else 1)))
                if not tok:  # the decoders take the whole budget: no chunk fits until one finishes
                    break
                j = len(pf_tok)
                b_rows.append(b_r)
                pf_tok.append(tok)
                pf_ctx.append(float(c_sum))
                pf_pairs.append(pairs)
                chunks.append(got)
                comp = 0
                for p, _ in got:
                    if not left[p]:
                        comp += 1
                        new.append((p, j))
                        if outs[p] <= 1:  # its only output token is the first: it finishes here
                            cap = j + 1
                        elif not kk:  # no-spec: it emits one token a row from the next row on
                            cap = min(cap, j + outs[p])
                n_comp.append(comp)
                if comp:
                    active = [p for p in active if left[p]]
                    b_r += comp
        rest = cap - len(pf_tok)
        if rest > 0:
            b_rows.extend([b_r] * rest)
            pf_tok.extend([0] * rest)
            pf_ctx.extend([0.0] * rest)
            pf_pairs.extend([0.0] * rest)
            n_comp.extend([0] * rest)
        m = cap
        big = b_r  # decoding slots by the last row: [0, big)
        # Contexts of the completed prompts as they start decoding (prompt + first token), from the row after.
        joins = [(j + 1, ctxs[p] + 1) for p, j in new] if new else []
        c0 = sum(self.ctx[:b].tolist())
        a = cum = mask = None
        m_fin = out_min if b else m + 1  # the row count at whose end a decoder finishes (none: m + 1)
        if new and not kk:
            m_fin = min([m_fin, *(j + outs[p] for p, j in new)])
        if kk and big:
            inv = self._inv_neg_log_alpha[self.dom[:big]]
            out_eff = self.out_left[:big]
            if new:
                out_eff = out_eff.copy()
                out_eff[b:] -= 1  # after the first token
                b_arr = np.array(b_rows)
                mask_all = np.arange(big) < b_arr[:, None]  # decoding cells (rows × slots)
            rows = min(m, 2 * (out_min // (kk + 1)) + 4)  # the first finish is likely before (else: more)
            while True:
                if new:
                    mask = mask_all[:rows]
                    e = np.zeros((rows, big))
                    e[mask] = self._exponentials(sum(b_rows[:rows]))
                    a = np.minimum(e * inv, kk).astype(np.int64)
                    cum = np.add.accumulate(a + mask, axis=0)
                else:
                    e = self._exponentials(rows * b).reshape(rows, b)
                    a = np.minimum(e * inv, kk).astype(np.int64)
                    cum = np.add.accumulate(a + 1, axis=0)
                done_rows = np.logical_or.reduce(cum >= out_eff, axis=1)
                first = int(done_rows.argmax())
                if done_rows[first]:
                    m = m_fin = first + 1
                    break
                if rows == m:
                    m_fin = m + 1
                    break
                rows = min(m, 2 * rows)
            emitted = np.add.reduce(cum[:m], axis=1).tolist()  # by the decoders up to each row's end
            c_list = [c0, *[c0 + x for x in emitted[:-1]]]
        else:
            c_list = [c0 + b * j for j in range(m)]
        if joins:  # a joining sequence adds its context and what it emitted since (no-spec: one a row)
            for j0, cj in joins:
                for j in range(j0, m):
                    c_list[j] += cj if kk else cj + (j - j0)
        k_list = [kk if x else 0 for x in b_rows[:m]] if new or not b else [kk] * m
        # Price row by row up to the first arrival that ends the run (rows past it are never run): the
        # first that can be admitted ends it with the iteration in flight; one landing on a boundary
        # stops the chain short of it (_ArrivalCut).
        watch = self._arrival_watch(i_next)
        ends: list[float] = []
        cut = None
        t = t0
        if m >= PRICE_ARRAY_MIN_ROWS:
            duration, flops, nbytes, compute_s = self._price(m, b_rows, k_list, np.array(c_list, dtype=float), pf_tok,
                                                             pf_ctx, pf_pairs, n_comp, [1] * m)
            for j, d in enumerate(duration):
                t += d
                ends.append(t)
                if watch.next <= t and (cut := watch.passed(j, t)) is not None:
                    break
        elif b and not pf_tok[0] and b_r == b:  # decode rows only (no chunk planned): one shape's pricer
            f = self._decode_rows.get((b, kk, 1)) or self._decode_row(b, kk, 1)
            priced = []
            for j, c in enumerate(c_list):
                row = f(float(c))
                priced.append(row)
                t += row[0]
                ends.append(t)
                if watch.next <= t and (cut := watch.passed(j, t)) is not None:
                    break
            duration, flops, nbytes, compute_s = zip(*priced, strict=True)
        else:  # row by row: _price's single rows (decode rows by their shape's pricer)
            drows, frows, chunk = self._decode_rows, self._full_chunk_rows, cfg.chunk_tokens
            priced = []
            last = f = None
            for j in range(m):
                bj = b_rows[j]
                pj = pf_tok[j]
                if pj or not bj:
                    kj = k_list[j]
                    if self._fills_chunk(bj * (kj + 1), pj):  # a full chunk: its shape's pricer
                        g = frows.get((bj, kj, n_comp[j])) or self._full_chunk_row(bj, kj, n_comp[j])
                        row = g(float(c_list[j]), pf_ctx[j], pf_pairs[j])
                    else:
                        row = self._price_row(bj, kj, 1, float(c_list[j]), pj, pf_ctx[j], pf_pairs[j], n_comp[j])
                else:
                    if bj != last:
                        f = drows.get((bj, kk, 1)) or self._decode_row(bj, kk, 1)
                        last = bj
                    row = f(float(c_list[j]))  # type: ignore[misc]
                priced.append(row)
                t += row[0]
                ends.append(t)
                if watch.next <= t and (cut := watch.passed(j, t)) is not None:
                    break
            duration, flops, nbytes, compute_s = zip(*priced, strict=True)
        if cut is not None:
            m, stop = cut
        else:
            stop = False
        if not m:
            return t0, b, 0, True
        if new:
            new = [(p, j) for p, j in new if j < m]
        b_end = b + len(new)  # decoding after the rows run (before finishes)
        # Book the rows run.
        dur = duration[:m]
        durs.extend(dur)
        busy = self.busy_s
        for d in dur:
            busy += d
        self.busy_s = busy
        self._row_s = min(dur)
        finishes = m == m_fin
        if kk and big:
            if new:
                steps = np.add.reduce(mask_all[:m, :b_end], axis=0)
                self._consume(sum(b_rows[:m]))
            else:
                steps = m
                self._consume(m * b)
            cm = cum[m - 1, :b_end]  # type: ignore[index]
            rej = a[:m, :b_end] < kk  # type: ignore[index]
            if new:
                rej &= mask_all[:m, :b_end]
            sums = emitted[:m]
            tot = cm
            if finishes:  # the finishing row emits no more than each sequence has left
                tot = np.minimum(cm, out_eff[:b_end])
                sums[m - 1] = int(np.add.reduce(tot))
            per_row = [sums[0], *map(sub, sums[1:], sums)]
            # The outcome counters (slot rows s_steps .. s_emitted) in one add.
            inc = np.empty((5, b_end), dtype=np.int64)
            inc[0] = steps
            np.subtract(cm, steps, out=inc[1])  # accepted: cum sums a + 1
            np.multiply(kk, steps, out=inc[2])  # proposed
            np.add.reduce(rej, axis=0, out=inc[3])
            inc[4] = tot
            self._slots[6:, :b_end] += inc
            self.out_left[:b_end] -= tot
            self.ctx[:b_end] += tot
        else:
            steps = tot = m
            if new:
                tot = np.array([m] * b + [m - 1 - j for _, j in new])
                steps = tot
            per_row = b_rows[:m]
            if b_end:
                self.out_left[:b_end] -= tot
                self.ctx[:b_end] += tot
                self.s_emitted[:b_end] += tot
                self.s_steps[:b_end] += steps
        pf_left, ctx = self.pf_left, self.ctx
        for got in chunks[:m]:
            for p, al in got:
                pf_left[b + p] -= al
                ctx[b + p] += al
        if new:  # the prompts completed emit their first token at their row's end
            per_row = list(per_row)
            out_left, emitted_s, first_token, rid = self.out_left, self.s_emitted, self.table.first_token, self.rid
            for p, j in new:
                i = b + p
                out_left[i] -= 1
                ctx[i] += 1
                emitted_s[i] += 1
                first_token[rid[i]] = ends[j]
                per_row[j] += 1
                if not out_left[i]:  # its only output token (then j = m − 1)
                    finishes = True
            self.n_prefill -= len(new)
        b_list = b_rows[:m]
        if self.spec and b_list[0] == b_list[-1]:  # one decoding set over the run (b_rows never shrinks)
            x = b_list[0]
            alpha_mean = [float(np.add.reduce(self.alpha_by_domain[self.dom[:x]])) / x if x else np.nan] * m
        elif self.spec:
            am = self.alpha_by_domain
            dom = self.dom
            alpha_mean = []
            last = -1
            val = np.nan
            for x in b_list:
                if x != last:
                    val = float(np.add.reduce(am[dom[:x]])) / x if x else np.nan
                    last = x
                alpha_mean.append(val)
        else:
            alpha_mean = [np.nan] * m
        zeros = [0.0] * m  # no spare or training work (the log copies it)
        self.log.extend([t0, *ends[: m - 1]], dur, b_list, pf_tok[:m], per_row, k_list[:m],
                        alpha_mean, flops[:m], nbytes[:m], compute_s[:m], zeros, zeros, ["serve"] * m)
        end = ends[m - 1]
        b_after = b_end
        if finishes:
            finished = (self.out_left[:n] <= 0).nonzero()[0]  # flatnonzero without its wrapper (1-D)
            self._finish(finished, end)
            b_after -= int(finished.size)
        return end, b_after, m, stop

    def _rows_hint(self, t0: float, i: int) -> int:
        """Rows worth planning from t0 when the i-th known arrival can be admitted: a little past it by
        the shortest iteration of the last run (too few only cost one more run); else the chain cap."""
        clock = self._ahead_clock
        if not self._row_s or self.waiting or self.n >= self.cfg.max_batch or i >= len(clock):  # type: ignore[arg-type]
            return CHAIN_MAX_ROWS
        need = self._ahead_need[i]
        if self.kv_free < need <= self.cfg.kv_capacity:  # it will wait for a finish
            return CHAIN_MAX_ROWS
        return int((clock[i] - t0) / (ROW_S_MARGIN * self._row_s)) + ROW_EXTRA  # type: ignore[index]

    def _arrival_watch(self, i: int) -> _ArrivalCut:
        """The known arrivals from the i-th, to be met row by row as a run is priced (_ArrivalCut)."""
        blocked = bool(self.waiting) or self.n >= self.cfg.max_batch
        return _ArrivalCut(self._ahead_clock, self._ahead_need, i, blocked,  # type: ignore[arg-type]
                           self.kv_free, self.cfg.kv_capacity)

    def _exponentials(self, count: int) -> np.ndarray:
        """The next `count` Exp(1) values of the stream, not consumed (_consume does): one stream
        drawn in pieces is the stream drawn at once, so values drawn ahead wait for the next stretch."""
        buf = self._exp
        if count > buf.size:
            more = self.rng.standard_exponential(max(count - buf.size, EXP_BLOCK))
            buf = self._exp = np.concatenate((buf, more))
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
        drows = self._decode_rows
        if m < PRICE_ARRAY_MIN_ROWS:
            groups: list = [(None, j) for j in range(m)]  # every row alone
        elif not any(pf_tok) and b_list[0] and b_list.count(b_list[0]) == m and wsets.count(wsets[0]) == m:
            groups = [((b_list[0], k_list[0], wsets[0]), None)]  # one batch shape, no prefill
        else:
            shapes: dict[tuple[int, int, int], list[int]] = {}
            groups = []
            for j in range(m):
                if pf_tok[j] or not b_list[j]:
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
                if b and not pf_tok[j]:  # a decode row: its shape's pricer
                    f = drows.get((b, k, ws)) or self._decode_row(b, k, ws)
                    duration[j], flops[j], nbytes[j], compute_s[j] = f(c)
                    continue
                duration[j], flops[j], nbytes[j], compute_s[j] = self._price_row(
                    b, k, ws, c, pf_tok[j], pf_ctx[j], pf_pairs[j], n_comp[j])
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

    def _prefill_budget(self, chunk: float, decode_tokens: int) -> float:
        """The prefill tokens an iteration may chunk: what the decode/verify tokens leave of the budget
        (fused: they share the target's pass), or all of it (separate: prefill has passes of its own)."""
        return chunk if self.cfg.separate_prefill else chunk - decode_tokens

    def _fills_chunk(self, decode_tokens: int, pf: int) -> bool:
        """Whether an iteration's prefill fills its budget (the shape recurs: priced through a cached pricer)."""
        return pf == self._prefill_budget(self.cfg.chunk_tokens, decode_tokens)

    def _price_row(self, b: int, k: int, ws: int, c: float, pf: int, pf_c: float, pf_p: float,
                   comp: int) -> tuple[float, float, float, float]:
        """(duration, flops, bytes, compute_s) of one iteration with b decoding sequences at context sum c
        (k drafts each, ws weight sets) and pf prefill tokens (context pf_c, attention pairs pf_p,
        completing comp prompts): the draft's k passes (+ its prefill of the chunks: a speculating
        replica's draft builds its own KV cache of every prompt, whether or not anyone decodes yet),
        then the target's verify + prefill pass (fused), or its verify pass and its prefill pass
        (separate)."""
        dshapes, tshapes = self._draft_shapes, self._target_shapes
        dc, tc = self.cfg.draft_cost, self.cfg.target_cost
        q = k + 1
        full = self._fills_chunk(b * q, pf)  # a full chunk: the prefill shape recurs
        dur = fl = by = cs = 0.0
        if k:  # the draft decodes (spec and b > 0)
            mean_extra = b * (k - 1) / 2.0  # average draft context growth over the k passes
            f = dshapes.get((b, b, ws)) or self._shape_pass(dshapes, dc, b, b, ws)
            td, fd, bd, cd = f(c + mean_extra, c + mean_extra + b / 2.0)
            dur += k * td
            fl += k * fd
            by += k * bd
            cs += k * cd
        if pf and self.spec:  # the draft prefills the same chunks to build its own KV cache
            if full:
                f = dshapes.get((pf, 0, 1)) or self._shape_pass(dshapes, dc, pf, 0, 1)
                td, fd, bd, cd = f(pf_c, pf_p)
            else:  # a prompt's last chunk: a shape met once
                td, fd, bd, cd = self._draft_pass(pf, 0, pf_c, pf_p)
            dur += td
            fl += fd
            by += bd
            cs += cd
        if self.cfg.separate_prefill:
            tt = ft = bt = ct = 0.0
            if b:  # the verify pass over the decoding rows alone
                f = tshapes.get((b * q, b * q, 1)) or self._shape_pass(tshapes, tc, b * q, b * q, 1)
                t1, f1, b1, c1 = f(c, q * c + b * q * q / 2.0)
                tt, ft, bt, ct = tt + t1, ft + f1, bt + b1, ct + c1
            if pf:  # the prefill pass over the chunks (logits at each completed prompt's last position)
                if full:
                    f = tshapes.get((pf, comp, 1)) or self._shape_pass(tshapes, tc, pf, comp, 1)
                    t1, f1, b1, c1 = f(pf_c, pf_p)
                else:
                    t1, f1, b1, c1 = self._target_pass(pf, comp, pf_c, pf_p)
                tt, ft, bt, ct = tt + t1, ft + f1, bt + b1, ct + c1
            return dur + tt, fl + ft, by + bt, cs + ct
        key = (b * q + pf, b * q + comp, 1)
        if not pf or full:  # decode only, or a full chunk: the shape recurs
            f = tshapes.get(key) or self._shape_pass(tshapes, tc, *key)
            tt, ft, bt, ct = f(c + pf_c, q * c + b * q * q / 2.0 + pf_p)
        else:
            tt, ft, bt, ct = self._target_pass(key[0], key[1], c + pf_c, q * c + b * q * q / 2.0 + pf_p)
        return dur + tt, fl + ft, by + bt, cs + ct

    def _full_chunk_row(self, b: int, k: int, comp: int) -> Callable:
        """(duration, flops, bytes, compute_s) of an iteration whose prefill fills its budget (the shape
        recurs) with b decoding sequences, k drafts each, completing comp prompts, at decoders' context
        sum c and the chunks' context pf_c and pairs pf_p: _price_row's expressions in its order (the
        same bits), with the shapes' passes found once."""
        cache = self._full_chunk_rows
        if len(cache) >= SHAPE_CACHE_MAX:
            cache.clear()
        q = k + 1
        pf = int(self._prefill_budget(self.cfg.chunk_tokens, b * q))  # (finite: the row fills it)
        tshapes, tc = self._target_shapes, self.cfg.target_cost
        half_bqq = b * q * q / 2.0
        if self.cfg.separate_prefill:
            verify = (tshapes.get((b * q, b * q, 1)) or self._shape_pass(tshapes, tc, b * q, b * q, 1)) if b else None
            prefill = tshapes.get((pf, comp, 1)) or self._shape_pass(tshapes, tc, pf, comp, 1)

            def target(c, pf_c, pf_p):
                tt = ft = bt = ct = 0.0
                if verify is not None:
                    t1, f1, b1, c1 = verify(c, q * c + half_bqq)
                    tt, ft, bt, ct = tt + t1, ft + f1, bt + b1, ct + c1
                t1, f1, b1, c1 = prefill(pf_c, pf_p)
                return tt + t1, ft + f1, bt + b1, ct + c1
        else:
            key = (b * q + pf, b * q + comp, 1)
            fused = tshapes.get(key) or self._shape_pass(tshapes, tc, *key)

            def target(c, pf_c, pf_p):
                return fused(c + pf_c, q * c + half_bqq + pf_p)
        if not self.spec:
            def row(c, pf_c, pf_p):
                tt, ft, bt, ct = target(c, pf_c, pf_p)
                return 0.0 + tt, 0.0 + ft, 0.0 + bt, 0.0 + ct
        else:
            dshapes, dc = self._draft_shapes, self.cfg.draft_cost
            draft_pf = dshapes.get((pf, 0, 1)) or self._shape_pass(dshapes, dc, pf, 0, 1)
            if not k:  # nobody decodes yet: the draft only prefills
                def row(c, pf_c, pf_p):
                    tp, fp, bp, cp = draft_pf(pf_c, pf_p)
                    tt, ft, bt, ct = target(c, pf_c, pf_p)
                    return (0.0 + tp) + tt, (0.0 + fp) + ft, (0.0 + bp) + bt, (0.0 + cp) + ct
            else:
                draft = dshapes.get((b, b, 1)) or self._shape_pass(dshapes, dc, b, b, 1)
                mean_extra = b * (k - 1) / 2.0  # average draft context growth over the k passes
                half_b = b / 2.0

                def row(c, pf_c, pf_p):
                    x = c + mean_extra
                    td, fd, bd, cd = draft(x, x + half_b)
                    tp, fp, bp, cp = draft_pf(pf_c, pf_p)
                    tt, ft, bt, ct = target(c, pf_c, pf_p)
                    return ((0.0 + k * td + tp) + tt, (0.0 + k * fd + fp) + ft, (0.0 + k * bd + bp) + bt,
                            (0.0 + k * cd + cp) + ct)

        cache[(b, k, comp)] = row
        return row

    def _decode_row(self, b: int, k: int, ws: int) -> Callable:
        """(duration, flops, bytes, compute_s) of a decode row of b sequences (k drafts each, ws weight
        sets) at decoders' context sum c: _price's expressions for a row without prefill chunks (its
        + 0.0 terms left out: they change no value here), with the shape's passes made once."""
        cache = self._decode_rows
        if len(cache) >= SHAPE_CACHE_MAX:
            cache.clear()
        q = k + 1
        target = self._target_shapes.get((b * q, b * q, 1)) or self._shape_pass(
            self._target_shapes, self.cfg.target_cost, b * q, b * q, 1)
        half_bqq = b * q * q / 2.0
        if not k:
            def row(c):
                tt, ft, bt, ct = target(c, q * c + half_bqq)
                return 0.0 + tt, 0.0 + ft, 0.0 + bt, 0.0 + ct
        else:
            draft = self._draft_shapes.get((b, b, ws)) or self._shape_pass(
                self._draft_shapes, self.cfg.draft_cost, b, b, ws)  # type: ignore[arg-type]
            mean_extra = b * (k - 1) / 2.0  # average draft context growth over the k passes
            half_b = b / 2.0

            def row(c):
                x = c + mean_extra
                td, fd, bd, cd = draft(x, x + half_b)
                tt, ft, bt, ct = target(c, q * c + half_bqq)
                return (0.0 + k * td) + tt, (0.0 + k * fd) + ft, (0.0 + k * bd) + bt, (0.0 + k * cd) + ct

        cache[(b, k, ws)] = row
        return row

    @staticmethod
    def _shape_pass(cache: dict, cost: CostModel, tokens: int, logit_tokens: int, weight_sets: int) -> Callable:
        """The pass function of one shape (CostModel.shape_pass_time), kept in `cache` (bounded: shapes
        with prefill chunks of every size come and go)."""
        if len(cache) >= SHAPE_CACHE_MAX:
            cache.clear()
        f = cache[(tokens, logit_tokens, weight_sets)] = cost.shape_pass_time(tokens, logit_tokens, weight_sets)
        return f

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

    def _mark_done(self, count: int) -> None:
        """Requests done (finished or rejected); during a chain the count waits for its end (_chain)."""
        if self._done_later is None:
            self.table.mark_done(count)
        else:
            self._done_later.append(count)

    def _finish(self, finished: np.ndarray, now: float | None = None) -> None:
        t = self.table
        if now is None:
            now = self.env.now
        n = self.n
        if finished.size == 1 and not self.distillers and t.on_release is None:  # the usual case, in scalars
            f = int(finished[0])
            rid = int(self.rid[f])
            t.finish[rid] = now
            t.counters[:, rid] = self._slots[6:, f]  # s_steps .. s_emitted
            self.kv_free += int(self.kv_res[f])
            self._slots[:, f:n - 1] = self._slots[:, f + 1:n]
            self.n = n - 1
            self.outstanding -= 1
            self._mark_done(1)
            return
        rids = self.rid[finished]
        t.finish[rids] = now
        t.counters[:, rids] = self._slots[6:, finished]  # s_steps .. s_emitted
        self.kv_free += int(self.kv_res[finished].sum())
        if self.distillers:
            for rid in rids.tolist():
                dom = int(t.domain[rid])
                dist = self.distiller_for_domain[dom]
                if dist is not None:
                    dist.add_request(dom, int(t.prompt[rid]), int(t.output[rid]), int(t.rejections[rid]), now)
        m = n - int(finished.size)
        if m == n - 1:  # one finish (the usual case): shift the slots after it down by one
            f = int(finished[0])
            self._slots[:, f:m] = self._slots[:, f + 1:n]
        else:
            keep = np.ones(n, dtype=bool)
            keep[finished] = False
            self._slots[:, :m] = self._slots[:, :n][:, keep]
        self.n = m
        self.outstanding -= int(finished.size)
        self._mark_done(int(finished.size))
        if t.on_release is not None:
            self._unreleased.extend(rids.tolist())
