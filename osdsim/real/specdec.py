"""Real speculative decoding at batch 1: a draft proposer, a target verifier, KV caches with rollback.

Notation follows Leviathan et al. (2023), Algorithm 1: the draft M_q proposes γ tokens x_1..x_γ
with distributions q_1..q_γ; one target pass gives p_1..p_{γ+1}; x_i is accepted while
r_i ≤ p_i(x_i)/q_i(x_i) (r_i ~ U(0,1)); at the first rejection n the target's token is drawn from
norm(max(0, p_{n+1} − q_{n+1})); when all γ are accepted a bonus token is drawn from p_{γ+1}.
Greedy decoding is the T → 0 limit: x_i = argmax q_i is accepted iff it equals argmax p_i.

KV caches: the target cache holds every committed token but the last; each step feeds
[last committed token, x_1..x_γ] (γ+1 tokens) and then crops the γ − n rejected drafts. The draft
cache holds a prefix of the committed tokens; each step first feeds the committed tokens it has
not seen (1 or 2), then its own proposals, and is cropped back to the committed prefix.

Exactness: in fp32, greedy speculative decoding emits exactly the target's greedy tokens (tested).
In bf16 it may not: a verify pass over γ+1 tokens and a one-token decode pass accumulate in a
different order, so near-ties in the target's logits can round to a different argmax.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import DynamicCache

Positions = Literal["target", "all", "none"]


# ----------------------------------------------------------------------------------------------
# The verifier: pure functions in the paper's notation.
# ----------------------------------------------------------------------------------------------


def verify_sampling(
    p: torch.Tensor, q: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None
) -> tuple[int, int]:
    """Leviathan et al. Algorithm 1 for one step.

    p: [γ+1, V] target probabilities; q: [γ, V] draft probabilities; x: [γ] drafted tokens
    (x_i ~ q_i). Returns (n, t): the number of accepted drafts and the target's next token
    (the correction drawn from norm(max(0, p_{n+1} − q_{n+1})), or the bonus from p_{γ+1}).
    """
    gamma = int(x.numel())
    if gamma:
        idx = torch.arange(gamma, device=p.device)
        px, qx = p[idx, x], q[idx, x]  # [γ]
        # r_i ~ U(0,1), drawn on the CPU generator (the same stream on any device)
        r = torch.rand(gamma, generator=generator, dtype=p.dtype).to(p.device)
        rejected = r * qx > px  # r_i > p_i(x_i)/q_i(x_i), without dividing
        n = int(torch.argmax(rejected.to(torch.int8))) if bool(rejected.any()) else gamma
    else:
        n = 0
    if n < gamma:
        residual = torch.clamp(p[n] - q[n], min=0.0)
        total = residual.sum()
        dist = residual / total if float(total) > 0 else p[n]
    else:
        dist = p[gamma]
    t = int(torch.multinomial(dist.cpu(), 1, generator=generator))
    return n, t


def verify_greedy(p_argmax: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    """Greedy verification. p_argmax: [γ+1] target argmax tokens; x: [γ] drafted tokens.
    n = length of the agreeing prefix; t = the target's token at position n+1."""
    gamma = int(x.numel())
    mismatch = x != p_argmax[:gamma]
    n = int(torch.argmax(mismatch.to(torch.int8))) if bool(mismatch.any()) else gamma
    return n, int(p_argmax[n])


def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """β_i = Σ_v min(p_i(v), q_i(v)), the acceptance probability of position i. [.., V] -> [..]."""
    return torch.minimum(p, q).sum(-1)


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One speculative step: `proposed` drafts, `accepted` of them, `emitted` tokens appended
    (accepted + 1, fewer only when EOS cut the step). Times in seconds. beta_sum is
    Σ β_i over the drafted positions up to and including the first rejection (beta_n of them)."""

    proposed: int
    accepted: int
    emitted: int
    draft_s: float
    verify_s: float
    beta_sum: float
    beta_n: int


@dataclass
class TeacherRecord:
    """Target distributions at chosen positions of one sequence, for distillation.

    positions: [n] indices into ids where the logits predict ids[pos + 1];
    logprobs/index: [n, K] the target's top-K log-probabilities and token ids (K = V: full).
    """

    positions: torch.Tensor
    logprobs: torch.Tensor
    index: torch.Tensor | None  # None: logprobs is the full [n, V] distribution


@dataclass
class Generation:
    prompt_len: int
    tokens: list[int]  # generated tokens (EOS included when hit)
    steps: list[StepRecord] = field(default_factory=list)
    prefill_s: float = 0.0  # target (and draft) prefill of prompt[:-1]
    first_token_s: float = 0.0  # from call to first emitted token
    total_s: float = 0.0
    hit_eos: bool = False
    teacher: TeacherRecord | None = None


@dataclass(frozen=True)
class DecodeParams:
    """k drafts per step; greedy or sampling at `temperature`; stop at EOS or max_new_tokens.
    positions: which positions keep the verify pass's target distribution for distillation —
    'target' = the target-supplied tokens (the correction or bonus token of each step, OSD),
    'all' = every emitted token, 'none'. teacher_topk: keep the top-K (0 = full vocabulary)."""

    k: int = 4
    greedy: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 64
    positions: Positions = "none"
    teacher_topk: int = 64


# ----------------------------------------------------------------------------------------------
# Model passes
# ----------------------------------------------------------------------------------------------


def new_cache(model: Any) -> DynamicCache:
    return DynamicCache(config=model.config)


def model_device(model: Any) -> torch.device:
    dev = getattr(model, "device", None)
    return dev if isinstance(dev, torch.device) else next(model.parameters()).device


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timers measure it (no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def forward_logits(model: Any, ids: list[int], cache: DynamicCache) -> torch.Tensor:
    """Feed `ids` after what `cache` holds; returns fp32 logits [len(ids), V]; cache grows."""
    inp = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    out = model(input_ids=inp, cache=cache, use_cache=True)
    return out.logits[0].float()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.double() / temperature, dim=-1)


def _keep_teacher(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [n, V] -> (log-probs [n, K], ids [n, K]) at T=1; full vocabulary when topk <= 0."""
    lp = F.log_softmax(logits.float(), dim=-1)
    if topk <= 0 or topk >= lp.shape[-1]:
        return lp, None
    vals, idx = torch.topk(lp, topk, dim=-1)
    return vals, idx


def _crop(cache: DynamicCache, n_remove: int) -> None:
    if n_remove > 0:
        cache.crop(-n_remove)  # transformers 5: a negative count removes that many tokens


class _TeacherAcc:
    def __init__(self, topk: int) -> None:
        self.topk = topk
        self.pos: list[int] = []
        self.lp: list[torch.Tensor] = []
        self.idx: list[torch.Tensor] = []

    def add(self, first_pos: int, logits: torch.Tensor, rows: list[int]) -> None:
        if not rows:
            return
        lp, idx = _keep_teacher(logits[rows], self.topk)
        self.pos.extend(first_pos + r for r in rows)
        self.lp.append(lp)
        if idx is not None:
            self.idx.append(idx)

    def record(self) -> TeacherRecord | None:
        if not self.pos:
            return None
        return TeacherRecord(
            positions=torch.tensor(self.pos, dtype=torch.long),
            logprobs=torch.cat(self.lp),
            index=torch.cat(self.idx) if self.idx else None,
        )


# ----------------------------------------------------------------------------------------------
# Generation loops
# ----------------------------------------------------------------------------------------------


def speculative_generate(
    target: Any,
    draft: Any,
    prompt: list[int],
    params: DecodeParams,
    eos_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Generation:
    """Speculative decoding of one request (batch 1) with KV caches for both models."""
    t_call = time.perf_counter()
    if not prompt:
        raise ValueError("empty prompt")
    seq = list(prompt)
    tcache, dcache = new_cache(target), new_cache(draft)
    device = model_device(target)
    if len(prompt) > 1:
        forward_logits(target, prompt[:-1], tcache)
        forward_logits(draft, prompt[:-1], dcache)
    n_t = n_d = len(prompt) - 1  # tokens held by the target / draft caches
    gen = Generation(prompt_len=len(prompt), tokens=[])
    sync(device)
    gen.prefill_s = time.perf_counter() - t_call
    teacher = _TeacherAcc(params.teacher_topk)
    eos = set(eos_ids)
    while len(gen.tokens) < params.max_new_tokens:
        gamma = min(params.k, params.max_new_tokens - len(gen.tokens) - 1)
        # --- draft: γ sequential passes -----------------------------------------------------
        t0 = time.perf_counter()
        xs: list[int] = []
        qs: list[torch.Tensor] = []
        feed = seq[n_d:]
        for _ in range(gamma):
            logits_q = forward_logits(draft, feed, dcache)[-1]  # [V]
            n_d += len(feed)
            if params.greedy:
                x = int(torch.argmax(logits_q))
                qs.append(logits_q)
            else:
                q = _probs(logits_q, params.temperature)
                x = int(torch.multinomial(q.cpu(), 1, generator=generator))
                qs.append(q)
            xs.append(x)
            feed = [x]
        sync(device)
        t1 = time.perf_counter()
        # --- verify: one target pass over γ+1 tokens -------------------------------------------
        logits_p = forward_logits(target, seq[n_t:] + xs, tcache)  # [γ+1, V]
        n_t = len(seq) + gamma
        x_t = torch.tensor(xs, dtype=torch.long, device=logits_p.device)
        if params.greedy:
            n, t = verify_greedy(torch.argmax(logits_p, dim=-1), x_t)
            p_probs = _probs(logits_p[:gamma], 1.0) if gamma else None
            q_probs = _probs(torch.stack(qs), 1.0) if gamma else None
        else:
            p_probs = _probs(logits_p, params.temperature)
            q_probs = torch.stack(qs) if gamma else p_probs[:0]
            n, t = verify_sampling(p_probs, q_probs, x_t, generator)
        sync(device)
        t2 = time.perf_counter()
        n_beta = min(n + 1, gamma)
        beta_sum = float(overlap(p_probs[:n_beta], q_probs[:n_beta]).sum()) if gamma else 0.0
        new = xs[:n] + [t]
        # --- EOS and the token cap --------------------------------------------------------------
        for j, tok in enumerate(new):
            if tok in eos:
                new = new[: j + 1]
                gen.hit_eos = True
                break
        if params.positions != "none":
            rows = list(range(len(new))) if params.positions == "all" else (
                [n] if len(new) == n + 1 else []
            )
            teacher.add(len(seq) - 1, logits_p, rows)
        # --- roll back the caches to the committed prefix ---------------------------------------
        _crop(tcache, gamma - n)  # target now holds seq + x_1..x_n
        n_t -= gamma - n
        keep = len(seq) + min(n, max(gamma - 1, 0))
        _crop(dcache, n_d - keep)
        n_d = min(n_d, keep)
        seq.extend(new)
        gen.tokens.extend(new)
        if len(gen.steps) == 0:
            gen.first_token_s = time.perf_counter() - t_call
        gen.steps.append(
            StepRecord(
                proposed=gamma,
                accepted=n,
                emitted=len(new),
                draft_s=t1 - t0,
                verify_s=t2 - t1,
                beta_sum=beta_sum,
                beta_n=n_beta,
            )
        )
        if gen.hit_eos:
            break
    gen.teacher = teacher.record()
    gen.total_s = time.perf_counter() - t_call
    return gen


def target_generate(
    target: Any,
    prompt: list[int],
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    eos_ids: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    positions: Positions = "none",
    teacher_topk: int = 64,
) -> Generation:
    """Plain autoregressive decoding with the target (the no-speculation baseline).
    Each step is recorded as a StepRecord with proposed = 0 and its time in verify_s."""
    t_call = time.perf_counter()
    cache = new_cache(target)
    device = model_device(target)
    if len(prompt) > 1:
        forward_logits(target, prompt[:-1], cache)
    gen = Generation(prompt_len=len(prompt), tokens=[])
    sync(device)
    gen.prefill_s = time.perf_counter() - t_call
    teacher = _TeacherAcc(teacher_topk)
    eos = set(eos_ids)
    last = prompt[-1]
    while len(gen.tokens) < max_new_tokens:
        t0 = time.perf_counter()
        logits = forward_logits(target, [last], cache)  # [1, V]
        if greedy:
            last = int(torch.argmax(logits[0]))
        else:
            last = int(torch.multinomial(_probs(logits[0], temperature).cpu(), 1, generator=generator))
        sync(device)
        t1 = time.perf_counter()
        if positions != "none":
            teacher.add(gen.prompt_len - 1 + len(gen.tokens), logits, [0])
        gen.tokens.append(last)
        if len(gen.steps) == 0:
            gen.first_token_s = time.perf_counter() - t_call
        gen.steps.append(StepRecord(0, 0, 1, 0.0, t1 - t0, 0.0, 0))
        if last in eos:
            gen.hit_eos = True
            break
    gen.teacher = teacher.record()
    gen.total_s = time.perf_counter() - t_call
    return gen
