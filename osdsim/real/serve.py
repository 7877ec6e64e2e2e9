"""A real batched OSD server: open-loop arrivals, continuous batching, training where it is placed.

One process, wall clock. Each loop turn:
  1. arrivals whose time has passed join a FCFS queue;
  2. admission: the queue's head is admitted while fewer than `max_batch_size` sequences run and
     its prompt + max_new_tokens fits the KV-token budget;
  3. an iteration (when anything runs): chunked prefill of admitted prompts within
     `chunked_prefill_tokens` (batch-1 passes into each sequence's own cache; a sequence whose
     prefill completes joins the running batch in the same iteration), then k draft passes over the
     running batch and one batched target verify pass over Σ_i (γ_i + 1) tokens; each row accepts
     its own a_i ∈ [0, γ_i] (the verifier functions of `osdsim.real.specdec`) and emits a_i + 1;
     finished rows leave the batch;
  4. training, by placement: `inline` runs a due step at once (everything waits behind it);
     `harvest` runs one minibatch (a unit) only when nothing runs or waits, and stops at the next
     unit boundary after a request arrives; `dedicated` hands due steps to a trainer process that
     publishes new draft weights when a step is done.

Ragged acceptance in the batched KV caches: `osdsim.real.batching` (holes + masks, see there).
The draft that serves is a separate copy of the trained draft; new weights reach it only when a
step is complete (publication), as in the simulator where α moves when a step finishes.

Held-out α is evaluated after the stream, off the clock, on the draft weights published at each
phase end and every `eval.every_updates` steps, so evaluation never delays a served request.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import queue as queue_mod
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from osdsim.errors import InputError, atomic_write_text, json_safe
from osdsim.real.batching import prefill_chunk
from osdsim.real.engines import TorchEngine
from osdsim.real.specdec import (
    Generation,
    StepRecord,
    _probs,
    _TeacherAcc,
    overlap,
    sync,
    verify_greedy,
    verify_sampling,
)

Progress = Callable[[int, int, dict[str, Any]], None]


# ----------------------------------------------------------------------------------------------
# Typed records (written as CSV; None is an empty cell)
# ----------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    request_index: int
    phase: int
    phase_name: str
    domain: str
    uid: str
    arrival_s: float
    admitted_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    hit_eos: bool = False
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    rejections: int = 0
    alpha: float | None = None
    accepted_lengths: str = ""


@dataclass
class IterationRecord:
    iteration: int
    start_s: float
    end_s: float
    batch_size: int  # rows decoding in this iteration
    prefill_rows: int
    prefill_tokens: int
    prefill_s: float
    draft_s: float  # all draft passes
    verify_s: float
    k: int
    verify_tokens: int  # Σ_i (γ_i + 1)
    context_tokens: int  # Σ_i committed tokens of the decoding rows at the iteration start
    waiting: int  # queue length at the iteration start
    proposed: int
    accepted: int
    emitted: int
    trainer_busy: int  # dedicated: the trainer process was training during this iteration
    draft_version: int  # the training step whose weights the serving draft had (0: untrained)
    cache_width: int = 0  # target KV columns W the verify pass attended over (≥ longest row: pads, holes)
    longest_row: int = 0  # max_i committed tokens of a decoding row (W − longest_row: holes, pads of all rows)
    draft_cache_width: int = 0  # draft KV columns at the iteration start (k > 0)


@dataclass
class StepRow:
    request_index: int
    iteration: int
    proposed: int
    accepted: int
    emitted: int


@dataclass
class TrainingRecord:
    step: int
    due_s: float
    started_s: float | None = None
    done_s: float | None = None
    published_s: float | None = None
    status: str = "pending"  # done | skipped | pending (still queued when the stream ended)
    samples: int = 0
    positions: int = 0
    units: int = 0
    train_s: float = 0.0
    loss_before: float | None = None
    loss_after: float | None = None


@dataclass
class UnitRecord:
    step: int
    unit: int
    start_s: float
    end_s: float
    preempted: int  # 1 if a request arrived while the unit ran (it waited for the unit boundary)


def _cell(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, float):
        return "" if math.isnan(x) else round(x, 6)
    return x


def records_csv(rows: list[Any], cls: type) -> str:
    names = [f for f in cls.__dataclass_fields__]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        d = asdict(r)
        w.writerow([_cell(d[n]) for n in names])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Arrivals
# ----------------------------------------------------------------------------------------------


@dataclass
class Arrival:
    index: int
    phase: int
    arrival_s: float
    query: Any  # osdsim.real.data.Query


def ramp_rates(rate_per_s: float, rate_end_per_s: float, n: int) -> np.ndarray:
    """The rate at each request index of a ramp: λ_i = λ_0 + (λ_end − λ_0)·i/(n−1) (one definition,
    for the arrivals and for the validator's nominal rate at an index)."""
    return np.linspace(rate_per_s, rate_end_per_s, n) if n > 1 else np.full(n, float(rate_per_s))


def poisson_times(n: int, rate_per_s: float, seed: int, rate_end_per_s: float | None = None) -> np.ndarray:
    """Arrival instants of a Poisson process (rate λ): cumulative sums of Exp(1)/λ_i gaps, from 0.
    With `rate_end_per_s` the rate ramps linearly by request index, λ_i = λ_0 + (λ_end − λ_0)·i/(n−1)
    (gap i, before request i, is drawn at request i's rate); the same Exp(1) draws as the constant rate."""
    rng = np.random.default_rng([seed, 11])
    if rate_end_per_s is None:
        gaps = rng.exponential(1.0 / rate_per_s, size=n)
    else:
        gaps = rng.exponential(1.0, size=n) / ramp_rates(rate_per_s, rate_end_per_s, n)
    gaps[0] = 0.0  # the stream starts with its first request
    return np.cumsum(gaps)


def read_arrival_trace(path: Path) -> list[dict[str, str]]:
    """Rows of a trace CSV (arrival_s, domain, optional uid / prompt); one-line errors."""
    if not path.is_file():
        raise InputError(f"serve.trace_file: {path} not found")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or [])
        missing = [c for c in ("arrival_s", "domain") if c not in cols]
        if missing:
            raise InputError(f"{path}: trace is missing column {missing[0]!r} (needs arrival_s, domain; optional uid, prompt)")
        rows = list(reader)
    if not rows:
        raise InputError(f"{path}: trace has no requests")
    last = -math.inf
    for i, r in enumerate(rows):
        try:
            t = float(r["arrival_s"])
        except ValueError:
            raise InputError(f"{path}: row {i + 2}: arrival_s is not a number ({r['arrival_s']!r})") from None
        if not t >= 0 or t < last:
            raise InputError(f"{path}: row {i + 2}: arrival_s must be ≥ 0 and non-decreasing")
        last = t
    return rows


# ----------------------------------------------------------------------------------------------
# Sequences in flight
# ----------------------------------------------------------------------------------------------


@dataclass
class Sequence:
    rec: RequestRecord
    prompt: list[int]
    seq: list[int]  # committed tokens (prompt + generated)
    tokens: list[int] = field(default_factory=list)  # generated
    prefilled: int = 0  # prompt tokens in the sequence's own caches
    tcache: Any = None  # batch-1 caches while prefilling
    dcache: Any = None
    n_t: int = 0  # committed tokens held by the target cache (all but the last)
    n_d: int = 0  # committed tokens held by the draft cache (a prefix)
    steps: list[StepRecord] = field(default_factory=list)
    teacher: _TeacherAcc | None = None
    done: bool = False

    @property
    def prefill_left(self) -> int:
        return len(self.prompt) - self.prefilled


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------


@dataclass
class ServeModels:
    """What the server runs: serving target and draft (draft possibly a reduced-head view)."""

    target: Any
    draft: Any  # serving draft (callable, maybe SubsetHeadLM)
    pad_id: int
    eos_ids: tuple[int, ...]
    device: torch.device


@dataclass
class ServeParams:
    k: int
    greedy: bool
    temperature: float
    max_new_tokens: int
    positions: str  # target | all | none
    teacher_topk: int
    max_batch_size: int
    kv_token_budget: int
    chunked_prefill_tokens: int


class BatchServer:
    """Continuous batching with speculative decoding over a BatchKV per model."""

    def __init__(self, models: ServeModels, params: ServeParams, generator: torch.Generator,
                 engine: Any = None) -> None:
        self.m, self.p, self.gen = models, params, generator
        self.e = engine if engine is not None else TorchEngine(models.target, models.draft, models.pad_id,
                                                               models.device)
        self.rows: list[Sequence] = []  # decoding, in batch-row order
        self.prefilling: list[Sequence] = []  # admitted, prefill not complete (FCFS)
        self.kv_reserved = 0
        self.iteration = 0

    # --- admission ------------------------------------------------------------------------------
    def running(self) -> int:
        return len(self.rows) + len(self.prefilling)

    def can_admit(self, prompt_len: int) -> bool:
        need = prompt_len + self.p.max_new_tokens
        return self.running() < self.p.max_batch_size and (
            self.kv_reserved + need <= self.p.kv_token_budget or self.running() == 0)

    def admit(self, seq: Sequence) -> None:
        if len(seq.prompt) < 2:
            raise ValueError("serving needs prompts of at least 2 tokens (the chat template adds them)")
        self.kv_reserved += len(seq.prompt) + self.p.max_new_tokens
        self.prefilling.append(seq)

    # --- one iteration ---------------------------------------------------------------------------
    def step(self, clock: Callable[[], float], waiting: int, trainer_busy: bool = False,
             draft_version: int = 0) -> tuple[IterationRecord, list[Sequence], list[StepRow]]:
        p, m = self.p, self.m
        t_start = clock()
        # 1. chunked prefill (FCFS within the token budget). A prompt's final chunk also runs the
        # target's head at its last position and yields the first token (as vLLM's prefill step
        # does, and as the simulator prices it: logits for one token per completed prompt); the
        # sequence joins the decoding rows after this iteration, so it speculates from the next one.
        budget, pf_tokens, pf_rows = p.chunked_prefill_tokens, 0, 0
        joined: list[Sequence] = []
        for s in list(self.prefilling):
            if s.prefill_left > 0 and budget > 0:
                n = min(s.prefill_left, budget)
                chunk = s.prompt[s.prefilled : s.prefilled + n]
                last = n == s.prefill_left
                # k = 0: target-only batched decoding, the draft is never run
                first_logits = self.e.prefill(s, chunk, last, with_draft=p.k > 0)
                s.prefilled += n
                budget -= n
                pf_tokens += n
                pf_rows += 1
                if last:
                    assert first_logits is not None
                    self._first_token(s, first_logits)
                    joined.append(s)
        self.e.sync()
        t_pf = clock()
        if not self.rows:
            finished = self._join(joined, t_pf)
            rec = IterationRecord(self.iteration, t_start, t_pf, 0, pf_rows, pf_tokens, t_pf - t_start,
                                  0.0, 0.0, p.k, 0, 0, waiting, 0, 0, len(joined), int(trainer_busy),
                                  draft_version)
            self.iteration += 1
            return rec, finished, []
        context = sum(len(s.seq) for s in self.rows)
        longest = max(len(s.seq) for s in self.rows)
        width, d_width = self.e.widths(p.k > 0)
        # 2. k draft passes over the running batch (row i drafts γ_i tokens)
        gammas = [max(min(p.k, p.max_new_tokens - len(s.tokens) - 1), 0) for s in self.rows]
        xs: list[list[int]] = [[] for _ in self.rows]
        qs: list[list[torch.Tensor]] = [[] for _ in self.rows]
        for j in range(max(gammas, default=0)):
            blocks = []
            for i, s in enumerate(self.rows):
                if j < gammas[i]:
                    blocks.append(s.seq[s.n_d:] if j == 0 else [xs[i][-1]])
                else:
                    blocks.append([])
            want = [[len(b) - 1] if b else [] for b in blocks]
            logits = self.e.forward("draft", blocks, want)
            for i, s in enumerate(self.rows):
                if not blocks[i]:
                    continue
                s.n_d += len(blocks[i])
                lq = logits[i][-1]  # [V]
                if p.greedy:
                    x = int(torch.argmax(lq))
                    qs[i].append(lq)
                else:
                    q = _probs(lq, p.temperature)
                    x = int(torch.multinomial(q.cpu(), 1, generator=self.gen))
                    qs[i].append(q)
                xs[i].append(x)
        self.e.sync()
        t_draft = clock()
        # 3. one batched verify pass: row i feeds [last committed token, x_1..x_γi]
        vblocks = [s.seq[s.n_t:] + xs[i] for i, s in enumerate(self.rows)]
        vlogits = self.e.forward("target", vblocks)
        outcomes = []
        for i in range(len(self.rows)):
            g, lp = gammas[i], vlogits[i]  # lp: [len(block), V], the last γ+1 rows verify
            lp = lp[-(g + 1):]
            x_t = torch.tensor(xs[i], dtype=torch.long, device=lp.device)
            if p.greedy:
                n, t = verify_greedy(torch.argmax(lp, dim=-1), x_t)
                p_probs = _probs(lp[:g], 1.0) if g else None
                q_probs = _probs(torch.stack(qs[i]), 1.0) if g else None
            else:
                p_probs = _probs(lp, p.temperature)
                q_probs = torch.stack(qs[i]) if g else p_probs[:0]
                n, t = verify_sampling(p_probs, q_probs, x_t, self.gen)
            n_beta = min(n + 1, g)
            beta_sum = float(overlap(p_probs[:n_beta], q_probs[:n_beta]).sum()) if g else 0.0
            outcomes.append((n, t, beta_sum, n_beta, lp))
        self.e.sync()
        t_verify = clock()
        # 4. commit, roll back the rejected drafts, finish rows
        finished: list[Sequence] = []
        step_rows: list[StepRow] = []
        prop_sum = acc_sum = emit_sum = 0
        eos = set(m.eos_ids)
        for i, s in enumerate(self.rows):
            n, t, beta_sum, n_beta, lp = outcomes[i]
            g = gammas[i]
            new = xs[i][:n] + [t]
            for jj, tok in enumerate(new):
                if tok in eos:
                    new = new[: jj + 1]
                    s.rec.hit_eos = True
                    break
            if p.positions != "none" and s.teacher is not None:
                rows_kept = list(range(len(new))) if p.positions == "all" else ([n] if len(new) == n + 1 else [])
                s.teacher.add(len(s.seq) - 1, lp, rows_kept)
            self.e.drop_newest("target", i, g - n)  # target now holds seq + x_1..x_n
            s.n_t = len(s.seq) + n
            keep = len(s.seq) + min(n, max(g - 1, 0))
            if p.k > 0:
                self.e.drop_newest("draft", i, max(s.n_d - keep, 0))
            s.n_d = min(s.n_d, keep)
            s.seq.extend(new)
            s.tokens.extend(new)
            s.steps.append(StepRecord(g, n, len(new), 0.0, 0.0, beta_sum, n_beta))
            step_rows.append(StepRow(s.rec.request_index, self.iteration, g, n, len(new)))
            prop_sum, acc_sum, emit_sum = prop_sum + g, acc_sum + n, emit_sum + len(new)
            if s.rec.hit_eos or len(s.tokens) >= p.max_new_tokens:
                s.done = True
                finished.append(s)
        t_end = clock()
        for s in finished:
            s.rec.finish_s = t_end
            self.kv_reserved -= len(s.prompt) + p.max_new_tokens
        if finished:
            keep_rows = [i for i, s in enumerate(self.rows) if not s.done]
            self.e.keep_rows(keep_rows, with_draft=p.k > 0)
            self.rows = [self.rows[i] for i in keep_rows]
        self.e.compact()
        finished += self._join(joined, t_end)
        rec = IterationRecord(
            self.iteration, t_start, t_end, len(outcomes), pf_rows, pf_tokens, t_pf - t_start,
            t_draft - t_pf, t_verify - t_draft, p.k, sum(g + 1 for g in gammas), context, waiting,
            prop_sum, acc_sum, emit_sum + len(joined), int(trainer_busy), draft_version, width, longest,
            d_width,
        )
        self.iteration += 1
        return rec, finished, step_rows

    def _first_token(self, s: Sequence, logits: torch.Tensor) -> None:
        """The first generated token from the prompt's last logits [V] (greedy, or sampled from the
        target at the serving temperature), committed to the sequence; its teacher distribution is
        kept where every emitted position is distilled."""
        p = self.p
        if p.greedy:
            x = int(torch.argmax(logits))
        else:
            x = int(torch.multinomial(_probs(logits, p.temperature).cpu(), 1, generator=self.gen))
        s.teacher = _TeacherAcc(p.teacher_topk)
        if p.positions == "all":
            s.teacher.add(len(s.prompt) - 1, logits[None], [0])
        s.seq.append(x)
        s.tokens.append(x)
        s.rec.hit_eos = x in self.m.eos_ids

    def _join(self, joined: list[Sequence], t_end: float) -> list[Sequence]:
        """Sequences whose prefill completed this iteration: the first token is stamped at the
        iteration's end (when a server returns it); each joins the decoding rows, or finishes at once
        where its first token ends it. Returns the finished ones."""
        finished = []
        for s in joined:
            self.prefilling.remove(s)
            s.rec.first_token_s = t_end
            s.n_t = s.n_d = len(s.prompt)  # the caches hold the prompt; the first token is the last committed
            if s.rec.hit_eos or len(s.tokens) >= self.p.max_new_tokens:
                s.done = True
                s.rec.finish_s = t_end
                self.kv_reserved -= len(s.prompt) + self.p.max_new_tokens
                self.e.release(s)
                finished.append(s)
                continue
            self.e.add_row(s, with_draft=self.p.k > 0)
            self.rows.append(s)
        return finished


# Tokens of the host-speed canary's pass (a fresh 8-token prefill with the head at the last position:
# the layer GEMMs, attention and head GEMV that serving runs; the target's reads all its weights, as a
# verify pass of B·(k+1) = 8 tokens does: ~60 ms for SmolLM2-135M in bf16 on one Zen 4 core).
CANARY_TOKENS = 8


@dataclass
class HostCanary:
    """A fixed-shape pass timed now and then right after a served iteration: the host's own speed
    over a run, whatever is being served, so a held-out run can be told slower or faster than the fit
    run. After an iteration, not at any loop turn: a pass after an idle wait runs on a cold core
    (clocks and caches) and reads the host slower than serving finds it (seen: +7% on a mostly idle
    run whose passes ran at the fit run's speed)."""

    model: Any
    every_s: float
    device: torch.device
    kind: str = "target"  # which model (serve.host_canary): recorded, as only like canaries compare
    samples: list[tuple[float, float]] = field(default_factory=list)  # (start_s, seconds)
    next_s: float = 0.0

    def _pass(self) -> None:
        prefill_chunk(self.model, list(range(100, 100 + CANARY_TOKENS)), None, last_logits=True)
        sync(self.device)

    def warm_up(self) -> None:
        if self.every_s > 0:
            self._pass()

    def maybe_run(self, clock: Callable[[], float]) -> None:
        if self.every_s <= 0 or clock() < self.next_s:
            return
        t0 = clock()
        self._pass()
        t1 = clock()
        self.samples.append((round(t0, 6), round(t1 - t0, 6)))
        self.next_s = t1 + self.every_s

    def summary(self) -> dict[str, Any]:
        secs = [x for _, x in self.samples]
        return {"every_s": self.every_s, "tokens": CANARY_TOKENS, "model": self.kind, "n": len(secs),
                "median_s": float(np.median(secs)) if secs else None, "samples": [list(x) for x in self.samples]}


def generation_of(s: Sequence) -> Generation:
    """The finished sequence as a batch-1 Generation (what the distiller's sample builder reads)."""
    g = Generation(prompt_len=len(s.prompt), tokens=list(s.tokens), steps=list(s.steps), hit_eos=s.rec.hit_eos)
    g.teacher = s.teacher.record() if s.teacher is not None else None
    return g


# ----------------------------------------------------------------------------------------------
# Training placements
# ----------------------------------------------------------------------------------------------


@dataclass
class DueStep:
    record: TrainingRecord
    samples: list[Any]
    job: Any = None  # TrainJob once started (in this process)


class Placement:
    """Where and when due distillation steps run. The server calls `due` when a step falls due,
    `after_iteration` after every iteration, `idle_unit` when nothing runs or waits, and `poll`
    every loop turn; `publish(step)` is the server's callback that pushes new draft weights."""

    name = "placement"

    def __init__(self, distiller: Any, max_pending: int, publish: Callable[[TrainingRecord, float], None]) -> None:
        self.distiller, self.max_pending, self.publish = distiller, max_pending, publish
        self.pending: deque[DueStep] = deque()
        self.records: list[TrainingRecord] = []
        self.units: list[UnitRecord] = []
        self.busy = False

    def due(self, samples: list[Any], now: float) -> None:
        rec = TrainingRecord(step=len(self.records) + 1, due_s=now, samples=len(samples),
                             positions=sum(s.n_positions for s in samples))
        self.records.append(rec)
        self.pending.append(DueStep(rec, samples))
        while len(self.pending) > self.max_pending:
            dropped = self.pending.popleft()  # the oldest due step that has not started
            dropped.record.status = "skipped"

    def _run_unit(self, step: DueStep, clock: Callable[[], float], next_arrival_s: float) -> None:
        if step.job is None:
            step.job = self.distiller.job(step.samples)
            step.record.started_s = clock()
        t0 = clock()
        step.job.run_unit()
        t1 = clock()
        step.record.units += 1
        step.record.train_s += t1 - t0
        self.units.append(UnitRecord(step.record.step, step.record.units, t0, t1, int(next_arrival_s <= t1)))
        if step.job.done:
            self.pending.remove(step)
            rec = step.record
            rec.done_s = t1
            rec.status = "done"
            rec.loss_before, rec.loss_after = step.job.losses()
            self.distiller.finish(step.job, rec.train_s)
            self.publish(rec, clock())

    def after_iteration(self, clock: Callable[[], float], next_arrival_s: float) -> None:
        return None

    def idle_unit(self, clock: Callable[[], float], next_arrival_s: float) -> bool:
        return False

    def poll(self, clock: Callable[[], float]) -> None:
        return None

    def close(self) -> dict[str, Any]:
        return {}

    def _head_in_progress_first(self) -> DueStep:
        for st in self.pending:
            if st.job is not None:
                return st
        return self.pending[0]


class InlinePlacement(Placement):
    """A due step runs to completion right after the iteration that made it due: serving waits."""

    name = "inline"

    def after_iteration(self, clock: Callable[[], float], next_arrival_s: float) -> None:
        while self.pending:
            step = self.pending[0]
            while step in self.pending:
                self._run_unit(step, clock, next_arrival_s)


class HarvestPlacement(Placement):
    """Training only in idle windows (nothing running, nothing waiting), one minibatch per unit;
    a request arriving mid-unit waits for the unit boundary. A started step is finished first."""

    name = "harvest"

    def due(self, samples: list[Any], now: float) -> None:
        # never skip the step already in progress: the cap applies to steps not yet started
        started = [st for st in self.pending if st.job is not None]
        waiting = [st for st in self.pending if st.job is None]
        rec = TrainingRecord(step=len(self.records) + 1, due_s=now, samples=len(samples),
                             positions=sum(s.n_positions for s in samples))
        self.records.append(rec)
        waiting.append(DueStep(rec, samples))
        while len(started) + len(waiting) > self.max_pending and waiting:
            waiting.pop(0).record.status = "skipped"
        self.pending = deque(started + waiting)

    def idle_unit(self, clock: Callable[[], float], next_arrival_s: float) -> bool:
        if not self.pending or next_arrival_s <= clock():
            return False
        self._run_unit(self._head_in_progress_first(), clock, next_arrival_s)
        return True


PARENT_POLL_S = 1.0  # how often an idle trainer checks that its server is still alive


def next_message(inbox: Any, parent_pid: int, poll_s: float = PARENT_POLL_S) -> Any:
    """The trainer's next message, or None when the server asked it to stop or has died: a server killed
    by a signal never sends the stop message, and an orphaned trainer would hold its memory forever."""
    while True:
        try:
            return inbox.get(timeout=poll_s)
        except queue_mod.Empty:
            if os.getppid() != parent_pid:
                return None


def _trainer_main(inbox: Any, outbox: Any, draft: Any, cfg: Any, pad_id: int, seed: int, threads: int) -> None:
    """The dedicated trainer process: receives due steps, trains, sends the new trainable weights.
    Its own torch threads; timestamps on CLOCK_MONOTONIC (time.monotonic), shared by processes."""
    import torch as _torch

    from osdsim.real.distill import OnlineDistiller

    _torch.set_num_threads(threads)
    gen = _torch.Generator().manual_seed(seed)
    distiller = OnlineDistiller(draft=draft, target=None, cfg=cfg, pad_id=pad_id, generator=gen)
    outbox.put("ready")
    parent = os.getppid()
    while True:
        msg = next_message(inbox, parent)
        if msg is None:
            break
        step_id, samples = msg
        t_start = time.monotonic()
        job = distiller.job(samples)
        units = []
        while not job.done:
            u0 = time.monotonic()
            job.run_unit()
            units.append((u0, time.monotonic()))
        t_done = time.monotonic()
        first, last = job.losses()
        weights = {n: p.detach().clone() for n, p in draft.named_parameters() if p.requires_grad}
        outbox.put((step_id, weights, units, first, last, t_start, t_done))


STARTUP_TIMEOUT_S = 300.0


class DedicatedPlacement(Placement):
    """A trainer process with its own torch threads trains due steps one at a time and sends back
    the draft's new trainable weights; the server loads them between iterations (publication).
    Measured: the publication delay (trainer done → weights serving) and which iterations ran
    while the trainer was training (their slowdown is the interference)."""

    name = "dedicated"

    def __init__(self, distiller: Any, max_pending: int, publish: Callable[[TrainingRecord, float], None],
                 serving_draft: Any, clock0_mono: float, seed: int, threads: int) -> None:
        super().__init__(distiller, max_pending, publish)
        import torch.multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.inbox, self.outbox = self.ctx.Queue(), self.ctx.Queue()
        self.serving_draft, self.clock0_mono = serving_draft, clock0_mono
        self.in_flight: DueStep | None = None
        self.publish_delays: list[float] = []
        self.died = False
        master = copy.deepcopy(distiller.draft)
        self.proc = self.ctx.Process(
            target=_trainer_main,
            args=(self.inbox, self.outbox, master, distiller.cfg, distiller.pad_id, seed, threads),
            daemon=True,
        )
        self.proc.start()
        # the stream starts once the trainer has imported torch and holds its draft copy
        try:
            ready = self.outbox.get(timeout=STARTUP_TIMEOUT_S)
        except queue_mod.Empty:
            ready = None
        if ready != "ready":
            self.proc.terminate()
            raise RuntimeError(f"dedicated trainer process did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _send_next(self, clock: Callable[[], float]) -> None:
        if self.in_flight is None and self.pending and not self.died:
            step = self.pending.popleft()
            step.record.started_s = clock()
            self.inbox.put((step.record.step, step.samples))
            self.in_flight = step
            self.busy = True

    def poll(self, clock: Callable[[], float]) -> None:
        if self.in_flight is not None:
            try:
                step_id, weights, units, first, last, t_start, t_done = self.outbox.get_nowait()
            except queue_mod.Empty:
                if not self.proc.is_alive() and not self.died:
                    self.died = True  # keep serving with the last published draft
                    self.in_flight.record.status = "failed"
                    self.in_flight, self.busy = None, False
                return
            rec = self.in_flight.record
            assert rec.step == step_id
            with torch.no_grad():
                params = dict(self.distiller.draft.named_parameters())
                for name, w in weights.items():
                    params[name].copy_(w)
            rec.started_s = t_start - self.clock0_mono
            rec.done_s = t_done - self.clock0_mono
            rec.units = len(units)
            rec.train_s = sum(b - a for a, b in units)
            rec.loss_before, rec.loss_after = first, last
            rec.status = "done"
            for j, (a, b) in enumerate(units):
                self.units.append(UnitRecord(rec.step, j + 1, a - self.clock0_mono, b - self.clock0_mono, 0))
            self.publish(rec, clock())
            self.publish_delays.append(rec.published_s - rec.done_s)
            self.in_flight, self.busy = None, False
        self._send_next(clock)

    def close(self) -> dict[str, Any]:
        try:
            self.inbox.put(None)
            self.proc.join(timeout=10)
        finally:
            if self.proc.is_alive():
                self.proc.terminate()
        if self.in_flight is not None:
            self.in_flight.record.status = "pending"
        return {"publish_delay_s": [round(x, 6) for x in self.publish_delays], "trainer_died": self.died}


# ----------------------------------------------------------------------------------------------
# The serving run
# ----------------------------------------------------------------------------------------------


def build_arrivals(cfg: Any, prep: Any) -> list[Arrival]:
    """Arrival instants (Poisson or trace) for the stream's requests, in arrival order."""
    sv = cfg.serve
    if sv.arrival == "poisson":
        reqs = prep.stream.requests
        times = poisson_times(len(reqs), sv.rate_per_s, cfg.seed, sv.rate_end_per_s)
        return [Arrival(r.index, r.phase, float(t), r.query) for r, t in zip(reqs, times, strict=True)]
    path = Path(sv.trace_file).expanduser()
    rows = read_arrival_trace(path)
    from osdsim.real.data import Query

    by_uid = {q.uid: q for d in prep.splits for q in prep.splits[d].train}
    cursor = dict.fromkeys(prep.splits, 0)
    out = []
    for i, r in enumerate(rows):
        d = r["domain"]
        if d not in prep.splits:
            raise InputError(f"{path}: row {i + 2}: domain {d!r} is not in the stream (has {sorted(prep.splits)})")
        if r.get("prompt"):
            q = Query(domain=d, uid=f"trace-{i}", text=r["prompt"])
        elif r.get("uid"):
            if r["uid"] not in by_uid:
                raise InputError(f"{path}: row {i + 2}: uid {r['uid']!r} is not a training query of {d}")
            q = by_uid[r["uid"]]
        else:
            pool = prep.splits[d].train
            q = pool[cursor[d] % len(pool)]
            cursor[d] += 1
        phase = next((p for p, ph in enumerate(prep.phases) if ph.start <= i < ph.end), len(prep.phases) - 1)
        out.append(Arrival(i, phase, float(r["arrival_s"]), q))
    return out


def idle_windows(records: list[RequestRecord], end_s: float) -> float:
    """Seconds of [0, end_s] during which no request was waiting or running (union of
    [arrival, finish] intervals removed)."""
    spans = sorted((r.arrival_s, r.finish_s if r.finish_s is not None else end_s) for r in records)
    busy, cur_a, cur_b = 0.0, None, None
    for a, b in spans:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                busy += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        busy += cur_b - cur_a
    return max(end_s - busy, 0.0)


def chrome_trace(iterations: list[IterationRecord], units: list[UnitRecord], placement: str,
                 label: str = "real") -> dict[str, Any]:
    """Chrome/Perfetto trace events (µs): per iteration prefill / draft / verify on the server
    thread, training units on a training thread, idle gaps between iterations."""
    ev: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"{label} replica 0"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "serving"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": f"training ({placement})"}},
    ]

    def x(name: str, t0: float, dur: float, tid: int, args: dict[str, Any] | None = None) -> None:
        if dur > 0:
            ev.append({"name": name, "ph": "X", "pid": 0, "tid": tid, "ts": round(t0 * 1e6, 1),
                       "dur": round(dur * 1e6, 1), "args": args or {}})

    prev_end = 0.0
    for it in iterations:
        x("idle", prev_end, it.start_s - prev_end, 0)
        t = it.start_s
        x("prefill", t, it.prefill_s, 0, {"tokens": it.prefill_tokens, "rows": it.prefill_rows})
        t += it.prefill_s
        x("draft", t, it.draft_s, 0, {"batch": it.batch_size, "k": it.k})
        t += it.draft_s
        x("verify", t, it.verify_s, 0, {"batch": it.batch_size, "tokens": it.verify_tokens,
                                        "accepted": it.accepted})
        prev_end = it.end_s
    for u in units:
        x(f"train step {u.step}", u.start_s, u.end_s - u.start_s, 1, {"unit": u.unit, "preempted": u.preempted})
    return {"traceEvents": ev, "displayTimeUnit": "ms"}


@dataclass
class ServeResult:
    summary: dict[str, Any]
    requests: list[RequestRecord]
    iterations: list[IterationRecord]
    steps: list[StepRow]
    training: list[TrainingRecord]
    units: list[UnitRecord]
    alpha: list[dict[str, Any]]
    files: list[Path] = field(default_factory=list)


def write_serve_outputs(res: ServeResult, out_dir: Path) -> list[Path]:
    from osdsim.real.run import _csv_text

    files = []
    for name, rows, cls in (("requests.csv", res.requests, RequestRecord),
                            ("iterations.csv", res.iterations, IterationRecord),
                            ("steps.csv", res.steps, StepRow),
                            ("training.csv", res.training, TrainingRecord),
                            ("training_units.csv", res.units, UnitRecord)):
        atomic_write_text(out_dir / name, records_csv(rows, cls))
        files.append(out_dir / name)
    atomic_write_text(out_dir / "alpha.csv", _csv_text(res.alpha))
    files.append(out_dir / "alpha.csv")
    trace = chrome_trace(res.iterations, res.units, res.summary.get("placement", "?"))
    atomic_write_text(out_dir / "trace.json", json.dumps(trace) + "\n")
    atomic_write_text(out_dir / "summary.json", json.dumps(json_safe(res.summary), indent=2) + "\n")
    files += [out_dir / "trace.json", out_dir / "summary.json"]
    return files


def serve_real(cfg: Any, out_dir: Path | None = None, progress: Progress | None = None) -> ServeResult:
    """Serve the configured stream with the batched server; write outputs to out_dir (if given)."""
    from osdsim.real import distill as Dl
    from osdsim.real.models import model_spec
    from osdsim.real.run import _mean, prepare
    from osdsim.real.stats import summarize

    t_run = time.perf_counter()
    sv, dc = cfg.serve, cfg.decode
    prep = prepare(cfg, separate_serving_draft=True)
    arrivals = build_arrivals(cfg, prep)
    positions = cfg.distill.positions if cfg.distill.enabled else "none"
    models = ServeModels(prep.s_target, prep.s_draft_call, prep.codec.pad_id, tuple(prep.codec.eos_ids), prep.device)
    params = ServeParams(dc.k, dc.greedy, dc.temperature, dc.max_new_tokens, positions, cfg.distill.teacher_topk,
                         sv.max_batch_size, sv.kv_token_budget, sv.chunked_prefill_tokens)
    engine, workdir = _engine_for(cfg, prep)
    server = BatchServer(models, params, prep.generator, engine)
    canary = HostCanary(prep.s_target if sv.host_canary == "target" else prep.s_draft_call,
                        sv.host_canary_every_s, prep.device, sv.host_canary)
    canary.warm_up()
    initial = prep.eval_heldout("initial", 0, 0, engine.served_model(prep.draft), 0.0)

    # published draft weights, kept for the held-out evaluation after the stream
    snapshots: list[tuple[float, int, dict[str, torch.Tensor]]] = []

    def trainable_state() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in prep.draft.named_parameters() if p.requires_grad}

    version = [0]

    def publish(rec: TrainingRecord, now: float) -> None:
        prep.sync_serving()
        engine.publish(prep.draft)  # llama.cpp: GGUF export + reload (timed in its publisher's records)
        version[0] = rec.step
        rec.published_s = clock()
        snapshots.append((rec.published_s, rec.step, trainable_state()))

    distiller = placement = None
    clock0 = time.perf_counter()
    clock0_mono = time.monotonic()

    def clock() -> float:
        return time.perf_counter() - clock0

    if cfg.distill.enabled:
        distiller = Dl.OnlineDistiller(draft=prep.draft, target=prep.target, pad_id=prep.codec.pad_id,
                                       generator=prep.generator, eos_ids=prep.codec.eos_ids,
                                       cfg=Dl.distill_config(cfg.distill))
        if sv.placement == "inline":
            placement = InlinePlacement(distiller, sv.max_pending_steps, publish)
        elif sv.placement == "harvest":
            placement = HarvestPlacement(distiller, sv.max_pending_steps, publish)
        else:
            placement = DedicatedPlacement(distiller, sv.max_pending_steps, publish, prep.s_draft,
                                           clock0_mono, cfg.seed + 1, sv.trainer_threads)
    else:
        placement = Placement(None, sv.max_pending_steps, publish)
    clock0 = time.perf_counter()  # the stream starts now (after the trainer process started)
    clock0_mono = time.monotonic()
    if isinstance(placement, DedicatedPlacement):
        placement.clock0_mono = clock0_mono

    pending = deque(arrivals)
    waiting: deque[Sequence] = deque()
    records = [RequestRecord(a.index, a.phase, prep.phases[a.phase].label, a.query.domain, a.query.uid, a.arrival_s)
               for a in arrivals]
    iterations: list[IterationRecord] = []
    step_rows: list[StepRow] = []
    done = 0
    total = len(arrivals)

    def partial(stopped: str) -> None:
        if out_dir is not None:
            summ = {"mode": "serve", "name": cfg.name, "partial": True, "stopped": stopped, "requests": done}
            write_serve_outputs(ServeResult(summ, records, iterations, step_rows, placement.records,
                                            placement.units, prep.alpha_rows), out_dir)

    try:
        while done < total:
            now = clock()
            while pending and pending[0].arrival_s <= now:
                a = pending.popleft()
                prompt = prep.ids_of(a.query)
                waiting.append(Sequence(records[a.index], prompt, list(prompt)))
            while waiting and server.can_admit(len(waiting[0].prompt)):
                s = waiting.popleft()
                s.rec.admitted_s = now
                s.rec.prompt_tokens = len(s.prompt)
                server.admit(s)
            placement.poll(clock)
            next_arrival = pending[0].arrival_s if pending else math.inf
            if server.running():
                it, finished, rows = server.step(clock, len(waiting), placement.busy, version[0])
                iterations.append(it)
                step_rows.extend(rows)
                for s in finished:
                    _finish_record(s)
                    done += 1
                    if distiller is not None:
                        sample = Dl.sample_from_generation(s.prompt, generation_of(s), s.rec.domain)
                        due = distiller.add_sample(sample)
                        if due is not None:
                            placement.due(due, clock())
                    if progress is not None:
                        progress(done, total, {"domain": s.rec.domain, "alpha": s.rec.alpha,
                                               "batch": it.batch_size, "waiting": len(waiting)})
                placement.after_iteration(clock, next_arrival)
                canary.maybe_run(clock)
                continue
            if placement.idle_unit(clock, next_arrival):
                continue
            # nothing to run: sleep until the next arrival (poll a busy trainer every 5 ms)
            wait = next_arrival - clock()
            if placement.busy:
                wait = min(wait, 0.005)
            if wait > 0 and math.isfinite(wait):
                time.sleep(wait)
            elif not math.isfinite(wait) and not placement.busy:
                break  # defensive: nothing can arrive any more
    except (MemoryError, KeyboardInterrupt):
        partial("interrupted")
        placement.close()
        raise
    finally:
        engine_info = _close_engine(engine, workdir)
    stream_s = clock()
    extra = placement.close()

    # --- held-out α on the published drafts (off the clock), as the engine served them ---------------
    scratch = copy.deepcopy(prep.draft)

    def load_state(state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            params_ = dict(scratch.named_parameters())
            for n, w in engine.served_state(state).items():
                params_[n].copy_(w)

    phase_end_s = []
    for p_idx in range(len(prep.phases)):
        fin = [r.finish_s for r in records if r.phase == p_idx and r.finish_s is not None]
        phase_end_s.append(max(fin) if fin else stream_s)

    def state_at(t: float) -> tuple[int, dict[str, torch.Tensor] | None]:
        best = None
        for ts, step, st in snapshots:
            if ts <= t:
                best = (step, st)
        return best if best is not None else (0, None)

    every = cfg.eval.every_updates
    for ts, step, st in snapshots:
        if step % every == 0:
            load_state(st)
            prep.eval_heldout("online", sum(1 for r in records if r.finish_s is not None and r.finish_s <= ts),
                              step, scratch, ts)
    end_alpha: list[dict[str, float]] = []
    for p_idx, t_end in enumerate(phase_end_s):
        step, st = state_at(t_end)
        if st is None:
            end_alpha.append(dict(initial))
            # No step published by then: the initial evaluation's rows (α and interval), relabelled.
            for row in [r for r in prep.alpha_rows if r["label"] == "initial"]:
                prep.alpha_rows.append({**row, "label": f"end_phase_{p_idx}", "request_index": prep.phases[p_idx].end,
                                        "time_s": round(t_end, 6), "update": 0})
            continue
        load_state(st)
        end_alpha.append(prep.eval_heldout(f"end_phase_{p_idx}", prep.phases[p_idx].end, step, scratch, t_end))

    # --- summary -------------------------------------------------------------------------------------
    steps_by_req: dict[int, list[StepRecord]] = {}
    for r in step_rows:
        steps_by_req.setdefault(r.request_index, []).append(StepRecord(r.proposed, r.accepted, r.emitted, 0, 0, 0, 0))
    per_phase = []
    for p_idx, ph in enumerate(prep.phases):
        rows = [r for r in records if r.phase == p_idx]
        acc = summarize([st for r in rows for st in steps_by_req.get(r.request_index, [])], dc.k)
        start = initial if p_idx == 0 else end_alpha[p_idx - 1]
        per_phase.append({
            "phase": p_idx, "name": ph.label, "requests": len(rows), "acceptance": acc.as_dict(),
            "alpha_heldout_start": start, "alpha_heldout_end": end_alpha[p_idx],
            "alpha_heldout_rise": {d: end_alpha[p_idx][d] - start[d] for d in start},
            "end_s": phase_end_s[p_idx],
        })
    trecs = placement.records
    units = placement.units
    idle_avail = idle_windows(records, stream_s)
    idle_used = sum(u.end_s - u.start_s for u in units) if sv.placement == "harvest" else 0.0
    from osdsim.real.run import device_fingerprint_of

    summary = {
        "mode": "serve", "name": cfg.name, "config": cfg.model_dump(),
        "target": {"id": prep.pair.target_id, **model_spec(prep.target)},
        "draft": {"desc": prep.pair.draft_desc, **model_spec(prep.draft)},
        "threads": cfg.threads, "device": str(prep.device), "device_fingerprint": device_fingerprint_of(prep.device, cfg.threads),
        "torch": torch.__version__, "serve_dtype": prep.serve_dtype, "draft_vocab": prep.draft_vocab_size,
        "placement": sv.placement if cfg.distill.enabled else "none",
        "requests": len(records), "iterations": len(iterations), "stream_s": stream_s,
        "mean_batch": _mean([it.batch_size for it in iterations if it.batch_size]),
        "training": {
            "steps_due": len(trecs), "steps_done": sum(t.status == "done" for t in trecs),
            "steps_skipped": sum(t.status == "skipped" for t in trecs),
            "steps_pending_at_end": sum(t.status == "pending" for t in trecs),
            "steps_failed": sum(t.status == "failed" for t in trecs),
            "units": len(units), "units_preempted": sum(u.preempted for u in units),
            "idle_s_available": idle_avail, "idle_s_used": idle_used,
            "train_s": sum(t.train_s for t in trecs),
        },
        "host_canary": canary.summary(),
        "backend": engine_info,
        "alpha_heldout_initial": initial,
        "phases": per_phase,
        "overall_acceptance": summarize([st for v in steps_by_req.values() for st in v], dc.k).as_dict(),
        "timing_s": {"load": prep.load_s, "heldout_answers": prep.heldout_s, "stream": stream_s,
                     "total": time.perf_counter() - t_run},
    }
    if sv.placement == "dedicated" and cfg.distill.enabled:
        summary["dedicated"] = {**extra, "interference": interference(iterations)}
    res = ServeResult(summary, records, iterations, step_rows, trecs, units, prep.alpha_rows)
    if out_dir is not None:
        res.files = write_serve_outputs(res, out_dir)
    return res


def _engine_for(cfg: Any, prep: Any) -> tuple[Any, Path | None]:
    """The serving engine of `cfg.models.backend`, and the scratch directory it exports GGUFs to."""
    if cfg.models.backend != "llamacpp":
        return TorchEngine(prep.s_target, prep.s_draft_call, prep.codec.pad_id, prep.device), None
    import shutil
    import tempfile

    from osdsim.real.engines import LlamaCppEngine

    sv, dc = cfg.serve, cfg.decode
    # KV cells per sequence: its prompt and max_new_tokens, plus the k drafted tokens before rollback.
    n_ctx_seq = cfg.stream.max_prompt_tokens + dc.max_new_tokens + dc.k + 16
    workdir = Path(tempfile.mkdtemp(prefix="osdsim-llamacpp-serve-"))
    try:
        return LlamaCppEngine(cfg.models.target, prep.target, prep.draft, workdir, cfg.threads,
                              sv.max_batch_size, n_ctx_seq, cfg.models.gguf_draft_type), workdir
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _close_engine(engine: Any, workdir: Path | None) -> dict[str, Any]:
    """Close the engine (its models are not needed after the stream); its description, with the
    sync delays of its publications (llama.cpp: GGUF export + reload, median and p90)."""
    import shutil

    info = engine.describe()
    publisher = getattr(engine, "publisher", None)
    if publisher is not None:
        from osdsim.real.llamacpp import sync_summary

        info["sync"] = sync_summary(publisher.records)
    engine.close()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    return info


def interference(iterations: list[IterationRecord]) -> float | None:
    """Slowdown of serving while the trainer process trains: per (batch size, prefill or not)
    bucket, median iteration time with the trainer busy over the median without; the buckets'
    ratios averaged with weights = busy iterations. None when no bucket has both."""
    buckets: dict[tuple[int, bool], tuple[list[float], list[float]]] = {}
    for it in iterations:
        if not it.batch_size:
            continue
        key = (it.batch_size, it.prefill_tokens > 0)
        busy, quiet = buckets.setdefault(key, ([], []))
        (busy if it.trainer_busy else quiet).append(it.end_s - it.start_s)
    num = den = 0.0
    for busy, quiet in buckets.values():
        if busy and quiet:
            num += len(busy) * float(np.median(busy)) / float(np.median(quiet))
            den += len(busy)
    return num / den - 1.0 if den else None


def _finish_record(s: Sequence) -> None:
    r = s.rec
    drafted = [st for st in s.steps if st.proposed > 0]
    r.output_tokens = len(s.tokens)
    r.steps = len(s.steps)
    r.proposed = sum(st.proposed for st in drafted)
    r.accepted = sum(st.accepted for st in drafted)
    r.rejections = sum(1 for st in drafted if st.accepted < st.proposed)
    from osdsim.specdec import alpha_from_counts

    r.alpha = alpha_from_counts(float(r.accepted), float(r.rejections)) if drafted else None
    r.accepted_lengths = " ".join(str(st.accepted) for st in s.steps)
    assert r.admitted_s is not None and r.first_token_s is not None and r.finish_s is not None
    r.queue_s = r.admitted_s - r.arrival_s
    r.ttft_s = r.first_token_s - r.arrival_s
    r.e2e_s = r.finish_s - r.arrival_s
    r.tpot_s = (r.finish_s - r.first_token_s) / (r.output_tokens - 1) if r.output_tokens > 1 else None
