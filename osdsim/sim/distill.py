"""Draft state (α dynamics) and the online distiller's buffer (docs/architecture.md, "α dynamics" and "Training placements").

α per (draft, domain) moves with the distilled tokens n of that domain:
    α(n) = α_∞ − (α_∞ − α_0)·exp(−n/τ)
Training on another domain e moves n_d by transfer·n_e (negative transfer undoes distilled
progress down to the untrained draft: n_d ≥ 0), and, with forgetting_tokens τ_f, first erodes it:
    n_d ← max(n_d·exp(−n_e/τ_f) + n_own + transfer·n_e, 0)
so a draft trained long enough on e keeps transfer·τ_f of d's progress (positive transfer early,
forgetting later: what the real runs show, docs/architecture.md "α dynamics").
The distiller collects finished requests and makes a training step due every
`update_interval_requests`; the placement (inline / harvest / dedicated) decides where it runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from osdsim.cost.model import CostModel, PassCost


class DraftState:
    """One draft model's acceptance per domain; `alpha` is updated in place after training."""

    def __init__(
        self,
        draft_id: int,
        alpha_0: np.ndarray,
        alpha_inf: np.ndarray,
        tau_tokens: np.ndarray,
        transfer: float,
        trainable: bool,
        forgetting_tokens: float | None = None,
    ):
        self.draft_id = draft_id
        self.alpha_0 = np.asarray(alpha_0, dtype=float)
        self.alpha_inf = np.asarray(alpha_inf, dtype=float)
        self.tau = np.asarray(tau_tokens, dtype=float)
        self.transfer = transfer
        self.forgetting_tokens = forgetting_tokens
        self.trainable = trainable
        self.n_eff = np.zeros_like(self.alpha_0)  # effective distilled tokens per domain
        self.alpha = self.alpha_0.copy()
        self.tokens_trained = np.zeros_like(self.alpha_0)
        self.listeners: list[Callable[[], None]] = []

    def train(self, tokens_by_domain: np.ndarray) -> None:
        """Apply a finished training step: own tokens count fully, others by `transfer`."""
        if not self.trainable:
            return
        own = np.asarray(tokens_by_domain, dtype=float)
        self.tokens_trained += own
        # Forgetting (negative transfer) undoes distilled progress but never goes below the
        # untrained draft: n_eff ≥ 0, so α stays between α_0 and α_∞.
        self.n_eff = next_effective_tokens(self.n_eff, own, self.transfer, self.forgetting_tokens)
        decay = np.exp(-self.n_eff / self.tau)
        self.alpha[:] = np.clip(self.alpha_inf - (self.alpha_inf - self.alpha_0) * decay, 0.0, 1.0)
        for fn in self.listeners:
            fn()


def next_effective_tokens(n_eff: np.ndarray, own: np.ndarray, transfer: float,
                          forgetting_tokens: float | None) -> np.ndarray:
    """n_eff per domain after one step that trained `own` tokens per domain (the module docstring's
    law; also what osdsim.validate.fit fits): max(n·exp(−others/τ_f) + own + transfer·others, 0)."""
    others = own.sum() - own
    kept = n_eff if forgetting_tokens is None else n_eff * np.exp(-others / forgetting_tokens)
    return np.maximum(kept + own + transfer * others, 0.0)


def alpha_curve(n: np.ndarray, alpha_0: float, alpha_inf: float, tau: float) -> np.ndarray:
    """α(n) = α_∞ − (α_∞ − α_0)·exp(−n/τ) (the closed form the simulator follows)."""
    return alpha_inf - (alpha_inf - alpha_0) * np.exp(-np.asarray(n, dtype=float) / tau)


@dataclass
class TrainingStep:
    """A due distillation step over a snapshot of the buffer."""

    draft_id: int
    due_s: float
    requests: int
    tokens_by_domain: np.ndarray  # loss-bearing tokens per domain
    seq_tokens: float  # Σ l_j over buffered sequences (prompt + output)
    cost: PassCost  # priced on one device at full speed, in the training dtype
    # Work in device-seconds at full speed for this step's own dtype (= cost.time_s): the one unit
    # every placement measures training in. Harvest offers spare device time in the same unit
    # (θ · idle seconds), so no peak FLOP/s of either dtype enters the exchange.
    work_s: float
    progress_s: float = 0.0
    started_s: float | None = None
    units: int = 1  # minibatch optimizer steps (epochs × minibatches): harvest's non-preemptible unit


@dataclass
class DistillStats:
    steps_due: int = 0
    steps_done: int = 0
    steps_skipped: int = 0
    tokens_trained: float = 0.0
    tokens_skipped: float = 0.0
    train_flops: float = 0.0  # FLOPs of finished steps (3× forward)
    # Work and spare compute in device-seconds at full training speed (TrainingStep.work_s); the
    # summary reports them as FLOP-equivalents of the training dtype (× F_peak · η_max of its cost).
    work_s_used: float = 0.0  # training work consumed (harvest: ≤ spare)
    spare_s_available: float = 0.0  # harvest: spare device time offered by the replicas (θ · idle s)
    latency_cost_s: float = 0.0  # serving time lost to training (inline blocking, interference)
    busy_s: float = 0.0  # device time spent training (inline/dedicated)
    events: list[tuple] = field(default_factory=list)  # (time_s, draft_id, kind, tokens, flops, duration_s)


def padded_minibatches(lengths: list[float], batch: int) -> tuple[float, float]:
    """Expected (Σ padded tokens, Σ padded length²) when `lengths` are shuffled into minibatches of
    `batch` sequences (the last one smaller) and each minibatch is padded to its longest sequence.

    For a random b-subset of W sorted lengths l_(1) ≤ … ≤ l_(W), P(max = l_(j)) = C(j−1, b−1)/C(W, b);
    a minibatch of b sequences then holds b·E[max] tokens and b·E[max²] query-key span.
    """
    ls = sorted(lengths)
    w = len(ls)
    full, rest = divmod(w, batch)
    tokens = sq = 0.0
    for size, count in ((batch, full), (rest, 1 if rest else 0)):
        if count == 0:
            continue
        total = math.comb(w, size)
        e_max = e_max_sq = 0.0
        for j in range(size, w + 1):  # j = rank (1-based) of the maximum
            p = math.comb(j - 1, size - 1) / total
            e_max += p * ls[j - 1]
            e_max_sq += p * ls[j - 1] * ls[j - 1]
        tokens += count * size * e_max
        sq += count * size * e_max_sq
    return tokens, sq


class Distiller:
    """Buffer of finished requests for one draft; decides when a training step is due."""

    def __init__(
        self,
        draft: DraftState,
        cost: CostModel,
        update_interval: int,
        tokens_mode: str,
        max_pending: int,
        trainable_params: int,
        num_domains: int,
        stats: DistillStats,
        window_requests: int | None = None,
        epochs: int = 1,
        batch_sequences: int | None = None,
        logits_at: str = "all",
        progress: str = "new_tokens",
    ):
        self.draft = draft
        # Sliding window: each step trains on the last `window` requests' sequences (the cost). α moves
        # with the tokens of requests not trained on before (progress "new_tokens") or with every
        # token the step trains on, window × epochs ("trained_tokens").
        self.window = max(window_requests or update_interval, 1)
        self._recent: deque[tuple[float, float, int]] = deque(maxlen=self.window)  # (seq, loss tokens, domain)
        self.cost = cost  # prices the step (in the training dtype)
        self.interval = update_interval
        self.tokens_mode = tokens_mode
        self.max_pending = max_pending
        self.trainable_params = trainable_params
        self.epochs = epochs
        self.batch_sequences = batch_sequences
        self.logits_at = logits_at
        self.progress = progress
        self.stats = stats
        self.pending: deque[TrainingStep] = deque()
        self.in_flight = 0  # steps taken off the queue and not yet applied to the draft
        self.on_due: Callable[[], None] | None = None
        self._num_domains = num_domains
        self._buf_tokens = np.zeros(num_domains)
        self._buf_requests = 0

    def add_request(self, domain: int, prompt: int, output: int, target_supplied: int, now: float) -> None:
        loss_tokens = target_supplied if self.tokens_mode == "target" else output
        self._buf_tokens[domain] += loss_tokens
        self._recent.append((float(prompt + output), float(loss_tokens), domain))
        self._buf_requests += 1
        if self._buf_requests >= self.interval:
            self._make_step(now)

    def _make_step(self, now: float) -> None:
        seqs = [x[0] for x in self._recent]
        if self.batch_sequences is None:
            length, length_sq, minibatches = float(sum(seqs)), float(sum(x * x for x in seqs)), 1
        else:
            length, length_sq = padded_minibatches(seqs, self.batch_sequences)
            minibatches = -(-len(seqs) // self.batch_sequences)
        loss_tokens = float(sum(x[1] for x in self._recent))
        e = self.epochs
        cost = self.cost.training_step(
            e * length, e * length_sq, self.trainable_params,
            logit_tokens=None if self.logits_at == "all" else e * loss_tokens, minibatches=e * minibatches,
        )
        if self.progress == "trained_tokens":
            tokens = np.zeros(self._num_domains)
            for _, loss, dom in self._recent:
                tokens[dom] += loss
            tokens *= e
        else:
            tokens = self._buf_tokens.copy()
        step = TrainingStep(
            draft_id=self.draft.draft_id,
            due_s=now,
            requests=self._buf_requests,
            tokens_by_domain=tokens,
            seq_tokens=float(sum(seqs)),
            cost=cost,
            work_s=cost.time_s,
            units=max(int(e * minibatches), 1),
        )
        self._buf_tokens[:] = 0
        self._buf_requests = 0
        self.stats.steps_due += 1
        self.pending.append(step)
        while len(self.pending) > self.max_pending:
            dropped = self.pending.popleft()
            self.stats.steps_skipped += 1
            self.stats.tokens_skipped += float(dropped.tokens_by_domain.sum())
            self.stats.events.append((now, dropped.draft_id, "skipped", float(dropped.tokens_by_domain.sum()), 0.0, 0.0))
        if self.on_due is not None:
            self.on_due()

    def complete(self, step: TrainingStep, now: float, duration_s: float) -> None:
        """Record a finished step and move the draft's α (callers apply sync delays first)."""
        self.in_flight = max(self.in_flight - 1, 0)
        self.stats.steps_done += 1
        self.stats.tokens_trained += float(step.tokens_by_domain.sum())
        self.stats.train_flops += step.cost.flops
        self.draft.train(step.tokens_by_domain)
        self.stats.events.append(
            (now, step.draft_id, "done", float(step.tokens_by_domain.sum()), step.cost.flops, duration_s)
        )
