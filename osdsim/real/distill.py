"""Distilling the draft on the target: losses, the online distiller (OSD) and offline distillation.

Losses (torch's own `F.kl_div`, per position, averaged over positions), with p the target
(teacher) and q the draft (student) next-token distributions:
- 'fkl'  forward KL  KL(p ‖ q) = Σ p (log p − log q)
- 'rkl'  reverse KL  KL(q ‖ p)
- 'jsd'  true generalised Jensen–Shannon, M = β p + (1 − β) q:  β KL(p ‖ M) + (1 − β) KL(q ‖ M)
  (symmetric at β = 0.5; the OSD repo's "jsd" is instead 0.9·FKL + 0.1·RKL).
Top-k-truncated variants: when the teacher is stored as its top-K (to bound memory), both
distributions are collapsed onto the teacher's top-K tokens plus one "rest" category holding the
remaining mass, so every loss stays a divergence between two proper distributions, the student is
still pushed to move its mass into the teacher's top-K, and K = V gives the full losses exactly.
(Renormalising both on the top-K instead lets the student's argmax sit outside it: measured here,
held-out α barely moved.)

Sample sources (OSD §4 / the OSD repo's offline modes, here also online):
- 'teacher'     the served output (a target sample) with the verify pass's target distributions;
- 'student'     the draft generates a continuation of the prompt; one target pass labels it;
- 'mix_request' per request, teacher or student with probability 1/2;
- 'mix_token'   each token is drawn from the target or the draft with probability 1/2; the target
                labels every position.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from osdsim.errors import atomic_write_text
from osdsim.real.specdec import (
    Generation,
    TeacherRecord,
    _keep_teacher,
    forward_logits,
    new_cache,
    target_generate,
)

LossKind = Literal["fkl", "rkl", "jsd"]
SampleSource = Literal["teacher", "student", "mix_request", "mix_token"]


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def divergence(t_lp: torch.Tensor, s_lp: torch.Tensor, kind: LossKind, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher log-probs t_lp and student log-probs s_lp, [N, V]
    (both normalised over the last axis) -> [N]."""

    def kl(a_lp: torch.Tensor, b_lp: torch.Tensor) -> torch.Tensor:  # KL(a ‖ b), [N]
        return F.kl_div(b_lp, a_lp, reduction="none", log_target=True).sum(-1)

    if kind == "fkl":
        return kl(t_lp, s_lp)
    if kind == "rkl":
        return kl(s_lp, t_lp)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD needs 0 < beta < 1, got {beta}")
        m_lp = torch.logsumexp(
            torch.stack([t_lp + math.log(beta), s_lp + math.log(1.0 - beta)]), dim=0
        )
        return beta * kl(t_lp, m_lp) + (1.0 - beta) * kl(s_lp, m_lp)
    raise ValueError(f"unknown loss {kind!r}; use fkl, rkl or jsd")


def _with_rest(lp_k: torch.Tensor) -> torch.Tensor:
    """[N, K] log-probs of K tokens (normalised over the full vocabulary) -> [N, K+1] with a last
    'rest' category holding the remaining mass 1 − Σ_K p (clamped to ≥ 1e-30, fp64 math)."""
    mass = torch.exp(torch.logsumexp(lp_k.double(), dim=-1, keepdim=True))
    rest = torch.log(torch.clamp(1.0 - mass, min=1e-30)).to(lp_k.dtype)
    return torch.cat([lp_k, rest], dim=-1)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_lp: torch.Tensor,
    teacher_idx: torch.Tensor | None,
    kind: LossKind,
    beta: float = 0.5,
) -> torch.Tensor:
    """Mean divergence over N positions. student_logits [N, V]; teacher_lp [N, K] log-probs
    (normalised over the full vocabulary) of the tokens teacher_idx [N, K] (top-K, truncated
    variant), or teacher_idx None and K = V (full).

    Truncated variant: both distributions are collapsed onto the teacher's top-K tokens plus one
    'rest' category (1 − Σ_K), so the student is still penalised for mass outside the top-K and
    K = V gives the full loss."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32
    s_lp = F.log_softmax(student_logits.to(dtype), dim=-1)
    t_lp = teacher_lp.to(dtype)
    if teacher_idx is not None:
        s_lp = _with_rest(s_lp.gather(-1, teacher_idx))
        t_lp = _with_rest(t_lp)
    return divergence(t_lp, s_lp, kind, beta).mean()


# ----------------------------------------------------------------------------------------------
# Samples and the draft's training pass
# ----------------------------------------------------------------------------------------------


@dataclass
class DistillSample:
    """One sequence for distillation: ids [T] (prompt + output); teacher.positions index ids
    where the draft's logits (predicting ids[pos + 1]) are trained toward teacher.logprobs."""

    ids: torch.Tensor
    teacher: TeacherRecord
    domain: str = ""

    @property
    def n_positions(self) -> int:
        return int(self.teacher.positions.numel())


def student_hidden_at(draft: Any, batch: list[DistillSample], pad_id: int) -> torch.Tensor:
    """Draft final hidden states at every sample's trained positions, concatenated: [Σ n_i, H].

    Right padding needs no attention mask under a causal model."""
    T = max(int(s.ids.numel()) for s in batch)
    device = next(draft.parameters()).device
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long, device=device)
    for b, s in enumerate(batch):
        ids[b, : s.ids.numel()] = s.ids
    hidden = draft.model(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, H]
    rows = torch.cat([torch.full_like(s.teacher.positions, b) for b, s in enumerate(batch)]).to(device)
    cols = torch.cat([s.teacher.positions for s in batch]).to(device)
    return hidden[rows, cols]


def student_logits_at(draft: Any, batch: list[DistillSample], pad_id: int) -> torch.Tensor:
    """Draft logits at the trained positions, [Σ n_i, V] (the LM head only where needed)."""
    return draft.get_output_embeddings()(student_hidden_at(draft, batch, pad_id))


def batch_loss(
    draft: Any, batch: list[DistillSample], kind: LossKind, beta: float, pad_id: int
) -> torch.Tensor:
    """Mean loss over the batch's trained positions (see `distill_loss`)."""
    logits = student_logits_at(draft, batch, pad_id)  # [N, V]: the full head for the normaliser
    t_lp = torch.cat([s.teacher.logprobs for s in batch]).to(logits.device)
    idx = [s.teacher.index for s in batch]
    if all(i is not None for i in idx):
        return distill_loss(logits, t_lp, torch.cat(idx).to(logits.device), kind, beta)  # type: ignore[arg-type]
    if any(i is not None for i in idx):
        raise ValueError("teacher stored as top-K for some samples and full for others")
    return distill_loss(logits, t_lp, None, kind, beta)


def trainable_parameters(draft: Any) -> list[torch.nn.Parameter]:
    params = [p for p in draft.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the draft has no trainable parameters")
    return params


# ----------------------------------------------------------------------------------------------
# Labelling sequences with the target (student / mix sources, offline answers)
# ----------------------------------------------------------------------------------------------


@torch.inference_mode()
def label_with_target(
    target: Any, prompt: list[int], output: list[int], topk: int, domain: str = ""
) -> DistillSample:
    """One target pass over prompt + output; keep its distributions at the output positions."""
    ids = prompt + output
    logits = forward_logits(target, ids[:-1], new_cache(target))  # [T-1, V]
    rows = list(range(len(prompt) - 1, len(ids) - 1))
    lp, idx = _keep_teacher(logits[rows], topk)
    rec = TeacherRecord(positions=torch.tensor(rows, dtype=torch.long), logprobs=lp, index=idx)
    return DistillSample(ids=torch.tensor(ids, dtype=torch.long), teacher=rec, domain=domain)


@torch.inference_mode()
def mixed_generate(
    target: Any,
    draft: Any,
    prompt: list[int],
    max_new_tokens: int,
    topk: int,
    generator: torch.Generator,
    p_student: float = 0.5,
    temperature: float = 1.0,
    greedy: bool = True,
    eos_ids: tuple[int, ...] = (),
    domain: str = "",
) -> DistillSample:
    """OSD's mix_token source: each token comes from the draft with probability p_student, else
    from the target; the target's distribution at every position is kept as the label."""
    tcache, dcache = new_cache(target), new_cache(draft)
    if len(prompt) > 1:
        forward_logits(target, prompt[:-1], tcache)
        forward_logits(draft, prompt[:-1], dcache)
    last, out, rows_lp, rows_idx = prompt[-1], [], [], []
    for _ in range(max_new_tokens):
        lt = forward_logits(target, [last], tcache)  # [1, V]
        ld = forward_logits(draft, [last], dcache)
        lp, idx = _keep_teacher(lt, topk)
        rows_lp.append(lp)
        if idx is not None:
            rows_idx.append(idx)
        use_student = float(torch.rand((), generator=generator)) < p_student
        logits = (ld if use_student else lt)[0]
        if greedy:
            last = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits.double() / temperature, -1)
            last = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        out.append(last)
        if last in eos_ids:
            break
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(out))
    rec = TeacherRecord(
        positions=positions,
        logprobs=torch.cat(rows_lp),
        index=torch.cat(rows_idx) if rows_idx else None,
    )
    return DistillSample(ids=torch.tensor(prompt + out, dtype=torch.long), teacher=rec, domain=domain)


def sample_from_generation(prompt: list[int], gen: Generation, domain: str) -> DistillSample | None:
    """The 'teacher' source: the served sequence with the verify pass's stored distributions."""
    if gen.teacher is None:
        return None
    ids = torch.tensor(prompt + gen.tokens, dtype=torch.long)
    return DistillSample(ids=ids, teacher=gen.teacher, domain=domain)


# ----------------------------------------------------------------------------------------------
# The online distiller
# ----------------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    """Online distillation settings (OSD: update every 8 requests on the buffered positions)."""

    loss: LossKind = "fkl"
    beta: float = 0.5  # JSD mixture weight
    sample_source: SampleSource = "teacher"
    update_interval: int = 8  # requests between updates
    window_requests: int = 0  # requests a update trains on (0 = those since the last update)
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs_per_update: int = 1
    batch_size: int = 8
    grad_clip: float = 1.0
    teacher_topk: int = 64  # keep top-K target log-probs per position (0 = full vocabulary)
    p_student: float = 0.5  # mix_token / mix_request probability of the student


def distill_config(cfg: Any) -> DistillConfig:
    """The trainer's settings from a run config's `distill` section (osdsim.real.config.DistillCfg):
    the same fields, less what only the server reads (enabled, positions)."""
    return DistillConfig(**cfg.model_dump(exclude={"enabled", "positions"}))


@dataclass
class UpdateRecord:
    update: int
    requests_seen: int
    samples: int
    positions: int
    loss_before: float  # mean loss over the first epoch's batches (before their steps)
    loss_after: float  # mean loss of the last epoch
    train_s: float


@dataclass
class OnlineDistiller:
    """Buffer of distillation samples; `request_done()` trains the draft when an update is due."""

    draft: Any
    target: Any
    cfg: DistillConfig
    pad_id: int
    generator: torch.Generator
    eos_ids: tuple[int, ...] = ()
    buffer: deque[DistillSample] = field(default_factory=deque)
    requests_seen: int = 0
    updates: list[UpdateRecord] = field(default_factory=list)
    label_s: float = 0.0  # time spent producing student/mix samples (extra target/draft passes)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.draft), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        window = self.cfg.window_requests or self.cfg.update_interval
        self.buffer = deque(maxlen=window)

    def _coin(self) -> bool:
        return float(torch.rand((), generator=self.generator)) < self.cfg.p_student

    def make_sample(
        self, prompt: list[int], gen: Generation, domain: str, max_new_tokens: int
    ) -> DistillSample | None:
        """Build the request's sample per the configured source (teacher reuses the verify logits)."""
        source = self.cfg.sample_source
        if source == "mix_request":
            source = "student" if self._coin() else "teacher"
        if source == "teacher":
            return sample_from_generation(prompt, gen, domain)
        t0 = time.perf_counter()
        if source == "student":
            out = target_generate(self.draft, prompt, max_new_tokens, eos_ids=self.eos_ids).tokens
            sample = label_with_target(self.target, prompt, out, self.cfg.teacher_topk, domain)
        elif source == "mix_token":
            sample = mixed_generate(
                self.target, self.draft, prompt, max_new_tokens, self.cfg.teacher_topk,
                self.generator, p_student=self.cfg.p_student, eos_ids=self.eos_ids, domain=domain,
            )
        else:
            raise ValueError(f"unknown sample source {source!r}")
        self.label_s += time.perf_counter() - t0
        return sample

    def add_sample(self, sample: DistillSample | None) -> list[DistillSample] | None:
        """Add the request's sample; when `update_interval` requests have passed, return the
        snapshot a due step trains on (the caller decides when and where it runs)."""
        self.requests_seen += 1
        if sample is not None and sample.n_positions > 0:
            self.buffer.append(sample)
        if self.requests_seen % self.cfg.update_interval != 0 or not self.buffer:
            return None
        samples = list(self.buffer)
        if not self.cfg.window_requests:
            self.buffer.clear()  # OSD: the buffer is emptied after each update
        return samples

    def request_done(self, sample: DistillSample | None) -> UpdateRecord | None:
        """Add the request's sample; run an update inline when one is due (batch-1 mode)."""
        samples = self.add_sample(sample)
        return None if samples is None else self.update(samples)

    def job(self, samples: list[DistillSample]) -> TrainJob:
        """A due step over `samples`, to be run one minibatch (unit) at a time."""
        return TrainJob(self.draft, self.optimizer, samples, self.cfg, self.pad_id, self.generator)

    def finish(self, job: TrainJob, train_s: float) -> UpdateRecord:
        first, last = job.losses()
        rec = UpdateRecord(
            update=len(self.updates) + 1,
            requests_seen=self.requests_seen,
            samples=len(job.samples),
            positions=sum(s.n_positions for s in job.samples),
            loss_before=first,
            loss_after=last,
            train_s=train_s,
        )
        self.updates.append(rec)
        return rec

    def update(self, samples: list[DistillSample] | None = None) -> UpdateRecord:
        t0 = time.perf_counter()
        job = self.job(list(self.buffer) if samples is None else samples)
        while not job.done:
            job.run_unit()
        return self.finish(job, time.perf_counter() - t0)


class TrainJob:
    """One distillation step: `epochs` shuffled passes over a snapshot of samples, in minibatches.

    A unit is one minibatch (forward, backward, AdamW step): the smallest piece of training a
    server can run in an idle window and stop after. The shuffles are drawn when an epoch starts
    (as `train_epochs`), so running every unit back to back is exactly `train_epochs`.
    """

    def __init__(self, draft: Any, optimizer: torch.optim.Optimizer, samples: list[DistillSample],
                 cfg: DistillConfig, pad_id: int, generator: torch.Generator) -> None:
        self.draft, self.optimizer, self.samples, self.cfg = draft, optimizer, samples, cfg
        self.pad_id, self.generator = pad_id, generator
        self.epoch, self.order, self.cursor = 0, [], 0
        self.epoch_losses: list[list[float]] = []
        self.units_done = 0
        per_epoch = -(-len(samples) // cfg.batch_size)
        self.units_total = per_epoch * cfg.epochs_per_update

    @property
    def done(self) -> bool:
        return self.units_done >= self.units_total

    def run_unit(self) -> float:
        """Train on the next minibatch; returns its loss."""
        if self.cursor >= len(self.order):
            self.order = torch.randperm(len(self.samples), generator=self.generator).tolist()
            self.cursor = 0
            self.epoch_losses.append([])
        batch = [self.samples[j] for j in self.order[self.cursor : self.cursor + self.cfg.batch_size]]
        self.cursor += self.cfg.batch_size
        self.draft.train()
        try:
            loss = batch_loss(self.draft, batch, self.cfg.loss, self.cfg.beta, self.pad_id)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable_parameters(self.draft), self.cfg.grad_clip)
            self.optimizer.step()
        finally:
            self.draft.eval()
        value = float(loss.detach())
        self.epoch_losses[-1].append(value)
        self.units_done += 1
        return value

    def losses(self) -> tuple[float, float]:
        """(mean loss of the first epoch's minibatches, of the last epoch's)."""
        means = [sum(x) / len(x) for x in self.epoch_losses if x]
        return (means[0], means[-1]) if means else (float("nan"), float("nan"))


def train_epochs(
    draft: Any,
    samples: list[DistillSample],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epochs: int,
    batch_size: int,
    kind: LossKind,
    beta: float,
    pad_id: int,
    grad_clip: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Train for `epochs` shuffled passes; returns (mean loss of the first epoch, of the last)."""
    draft.train()
    epoch_means: list[float] = []
    try:
        for _ in range(epochs):
            order = torch.randperm(len(samples), generator=generator).tolist()
            losses = []
            for i in range(0, len(order), batch_size):
                batch = [samples[j] for j in order[i : i + batch_size]]
                loss = batch_loss(draft, batch, kind, beta, pad_id)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(trainable_parameters(draft), grad_clip)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                losses.append(float(loss.detach()))
            epoch_means.append(sum(losses) / len(losses))
    finally:
        draft.eval()
    return epoch_means[0], epoch_means[-1]


@torch.no_grad()
def eval_loss(draft: Any, samples: list[DistillSample], kind: LossKind, beta: float, pad_id: int,
              batch_size: int = 8) -> float:
    """Mean per-position loss of the draft on samples (no update)."""
    total, n = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = samples[i : i + batch_size]
        m = sum(s.n_positions for s in batch)
        total += float(batch_loss(draft, batch, kind, beta, pad_id)) * m
        n += m
    return total / max(n, 1)


# ----------------------------------------------------------------------------------------------
# Offline distillation (the "offline-distilled draft" baseline)
# ----------------------------------------------------------------------------------------------


@dataclass
class OfflineConfig:
    """The OSD repo's offline defaults: lr 2e-5 with cosine decay, 3% warm-up, 2 epochs."""

    loss: LossKind = "fkl"
    beta: float = 0.5
    lr: float = 2e-5
    epochs: int = 2
    warmup_ratio: float = 0.03
    batch_size: int = 8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    warm = max(1, math.ceil(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def offline_distill(
    draft: Any, samples: list[DistillSample], cfg: OfflineConfig, pad_id: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """Distil the draft on prepared target-labelled samples; returns (first, last) epoch loss."""
    if not samples:
        raise ValueError("offline distillation needs at least one sample")
    optimizer = torch.optim.AdamW(
        trainable_parameters(draft), lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    steps = cfg.epochs * math.ceil(len(samples) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, cfg.warmup_ratio))
    return train_epochs(draft, samples, optimizer, scheduler, cfg.epochs, cfg.batch_size,
                        cfg.loss, cfg.beta, pad_id, cfg.grad_clip, generator)


# ----------------------------------------------------------------------------------------------
# Target answers, cached per (model, domain, prompt set) — the OSD repo's generate_answer step
# ----------------------------------------------------------------------------------------------


def answers_key(model_id: str, codec_fp: str, domain: str, prompts: list[list[int]],
                max_new_tokens: int) -> str:
    """Cache key: the model's content identity, tokenizer, domain, exact prompt ids, cap."""
    blob = json.dumps([model_id, codec_fp, domain, prompts, max_new_tokens, "greedy"])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@torch.inference_mode()
def greedy_answers_batched(target: Any, prompts: list[list[int]], max_new_tokens: int,
                           eos_ids: tuple[int, ...], pad_id: int, batch_size: int = 16) -> list[list[int]]:
    """Greedy target answers, left-padded batches through `generate` (cut after the first EOS)."""
    answers: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        L = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for b, p in enumerate(chunk):
            ids[b, L - len(p) :] = torch.tensor(p)
            mask[b, L - len(p) :] = 1
        device = next(target.parameters()).device
        out = target.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=list(eos_ids) or None, pad_token_id=pad_id,
        )[:, L:]
        for row in out.tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
            answers.append(row[:cut])
    return answers


class AnswerCache:
    """JSON files of target answers under `root`, one per key (see `answers_key`)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get_or_make(self, key: str, make: Any, meta: dict[str, Any]) -> list[list[int]]:
        path = self.root / f"{key}.json"
        if path.is_file():
            return [list(map(int, a)) for a in json.loads(path.read_text())["answers"]]
        answers = make()
        atomic_write_text(path, json.dumps({"meta": meta, "answers": answers}))
        return answers


@torch.no_grad()
def teacher_forced_counts(draft: Any, samples: list[tuple[list[int], list[int]]], pad_id: int,
                          batch_size: int = 8, vocab_ids: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Per (prompt, greedy target answer) pair: (hits, answer tokens), hits = answer tokens the
    draft's argmax predicts given the target's prefix (the per-token acceptance of greedy speculative
    decoding; the answer token *is* the target's argmax). With `vocab_ids` the draft's argmax is
    restricted to those tokens (a reduced-vocabulary draft head). Pairs with an empty answer: (0, 0)."""
    counts: list[tuple[int, int]] = []
    for i in range(0, len(samples), batch_size):
        part = samples[i : i + batch_size]
        chunk = [(p, a) for p, a in part if a]
        if not chunk:
            counts += [(0, 0)] * len(part)
            continue
        batch = [
            DistillSample(
                ids=torch.tensor(p + a, dtype=torch.long),
                teacher=TeacherRecord(
                    positions=torch.arange(len(p) - 1, len(p) - 1 + len(a)),
                    logprobs=torch.empty(0), index=None,
                ),
            )
            for p, a in chunk
        ]
        logits = student_logits_at(draft, batch, pad_id)  # [Σ len(a), V], pairs in order
        if vocab_ids is not None:
            vocab_ids = vocab_ids.to(logits.device)
            masked = torch.full_like(logits, float("-inf"))
            masked[:, vocab_ids] = logits[:, vocab_ids]
            logits = masked
        want = torch.tensor([t for _, a in chunk for t in a], device=logits.device)
        hit = (logits.argmax(-1) == want).tolist()
        pos = 0
        for _p, a in part:
            counts.append((int(sum(hit[pos : pos + len(a)])), len(a)))
            pos += len(a)
    return counts


def teacher_forced_alpha(draft: Any, samples: list[tuple[list[int], list[int]]], pad_id: int,
                         batch_size: int = 8, vocab_ids: torch.Tensor | None = None) -> float:
    """Held-out greedy α: answer tokens predicted / answer tokens over all pairs (teacher_forced_counts)."""
    return pooled_hit_rate(teacher_forced_counts(draft, samples, pad_id, batch_size, vocab_ids))


def pooled_hit_rate(counts: list[tuple[int, int]]) -> float:
    """Σ hits / Σ tokens of teacher_forced_counts (nan when nothing was counted)."""
    hits, n = sum(h for h, _ in counts), sum(m for _, m in counts)
    return hits / n if n else float("nan")
