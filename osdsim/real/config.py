"""The real run's configuration (pydantic, extra="forbid"), loaded from a YAML scenario.

Kept free of torch so that the CLI can validate a scenario before loading any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelsCfg(_Strict):
    target: str = Field("smollm2", description="'smollm2' (packaged GGUF), 'tiny', a HF dir or a .gguf file.")
    draft: str = Field("layers:2", description="'layers:L' (target's first L layers) or a HF dir.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights and compute dtype.")
    tiny_seed: int = Field(0, description="Seed of the tiny random target (target: tiny).")
    serve_dtype: Literal["float32", "bfloat16", "auto"] | None = Field(
        None, description="Serve (draft + verify + baseline) in this dtype; train in `dtype` (default: same). "
        "auto: bfloat16 where the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or "
        "AMX), else float32 (a CPU without them converts every bf16 matmul: several times slower).",
    )
    draft_vocab: int = Field(
        0, ge=0, description="Reduced draft head: propose only the N most frequent prompt tokens (0: full)."
    )
    backend: Literal["transformers", "llamacpp"] = Field(
        "transformers", description="Serving engine: transformers (eager PyTorch) or llamacpp (llama-cpp-python "
        "on GGUF files: the target's GGUF, the draft exported from PyTorch and reloaded after every update; "
        "training stays in PyTorch). llamacpp serves on the CPU with the full draft head, at batch 1 or "
        "batched (serve section).",
    )
    gguf_draft_type: Literal["auto", "f32", "f16", "q8_0", "q4_1", "q4_0"] = Field(
        "auto", description="backend llamacpp: GGUF type of the exported draft's layers (auto: the type of the "
        "target GGUF's layers but at least q8_0, which keeps the distillation updates a 4-bit type rounds away; "
        "f32 for a target exported from PyTorch).",
    )


class PhaseCfg(_Strict):
    start: int = Field(..., ge=0)
    end: int = Field(..., gt=0)
    mix: dict[str, float]
    mix_end: dict[str, float] | None = None
    name: str | None = None


class StreamCfg(_Strict):
    domains: list[str] = Field(["code", "gsm8k"], min_length=1, description="Domains in phase order.")
    shape: Literal["sharp", "smooth"] = "sharp"
    requests_per_phase: int = Field(100, ge=1)
    phases: list[PhaseCfg] | None = Field(None, description="Explicit phases (overrides domains/shape).")
    heldout_per_domain: int = Field(24, ge=1, description="Held-out queries per domain (α evaluation).")
    max_prompt_tokens: int = Field(384, ge=8, description="Queries with longer prompts are skipped.")


class DecodeCfg(_Strict):
    k: int = Field(4, ge=1, le=32)
    greedy: bool = True
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(64, ge=1)


class DistillCfg(_Strict):
    enabled: bool = True
    loss: Literal["fkl", "rkl", "jsd"] = "fkl"
    beta: float = Field(0.5, gt=0, lt=1)
    sample_source: Literal["teacher", "student", "mix_request", "mix_token"] = "teacher"
    positions: Literal["target", "all"] = Field("all", description="Target-supplied tokens (OSD) or all.")
    update_interval: int = Field(8, ge=1)
    window_requests: int = Field(0, ge=0, description="Requests per update (0: since last update).")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs_per_update: int = Field(1, ge=1)
    batch_size: int = Field(8, ge=1)
    teacher_topk: int = Field(64, ge=0, description="Top-K target log-probs kept per position (0: full).")
    p_student: float = Field(0.5, ge=0, le=1)


class OfflineCfg(_Strict):
    enabled: bool = False
    domains: list[str] | None = Field(None, description="Domains distilled offline (default: all).")
    prompts_per_domain: int = Field(40, ge=1)
    loss: Literal["fkl", "rkl", "jsd"] = "fkl"
    lr: float = Field(2e-5, gt=0)
    epochs: int = Field(2, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    batch_size: int = Field(8, ge=1)


class BaselineCfg(_Strict):
    requests_per_phase: int = Field(12, ge=0, description="Served requests per phase also decoded target-only.")


class EvalCfg(_Strict):
    every_updates: int = Field(2, ge=1, description="Held-out α every this many updates.")


class ServeCfg(_Strict):
    """Serving mode: open-loop arrivals, continuous batching, training placed inline / in idle
    windows / in a trainer process (absent: the batch-1 closed loop)."""

    arrival: Literal["poisson", "trace"] = Field("poisson", description="Arrival process (wall clock).")
    rate_per_s: float | None = Field(None, gt=0, description="Poisson arrival rate, requests/s (arrival: poisson).")
    rate_end_per_s: float | None = Field(
        None, gt=0, description="arrival: poisson: the rate ramps linearly from rate_per_s (first request) to "
        "this (last request), by request index; absent: constant rate.")
    trace_file: str | None = Field(
        None, description="CSV with arrival_s, domain and optional uid or prompt columns (arrival: trace).")
    max_batch_size: int = Field(8, ge=1, description="Sequences running at once (prefilling + decoding).")
    kv_token_budget: int = Field(8192, ge=16, description="Σ (prompt + max_new_tokens) of admitted requests.")
    chunked_prefill_tokens: int = Field(256, ge=1, description="Prefill tokens per iteration (chunked prefill).")
    placement: Literal["inline", "harvest", "dedicated"] = Field(
        "harvest", description="inline: a due step blocks serving; harvest: idle windows only, one "
        "minibatch per unit; dedicated: a trainer process publishing new draft weights.")
    max_pending_steps: int = Field(4, ge=1, description="Due steps queued; beyond this the oldest is skipped.")
    trainer_threads: int = Field(1, ge=1, description="dedicated: torch threads of the trainer process.")
    host_canary_every_s: float = Field(
        10.0, ge=0, description="Seconds between host-speed canaries: one fixed-shape pass (8 tokens, no "
        "cache) timed right after a served iteration, so a run's host speed can be compared with the fit "
        "run's (0: none).")
    host_canary: Literal["target", "draft"] = Field(
        "target", description="The canary's model: target (the serving target: reads all its weights, "
        "memory-bound like the verify passes that take most of a serving iteration, so it sees memory "
        "bandwidth other tenants take) or draft (the serving draft: ~10x cheaper, cache-resident, blind to "
        "bandwidth contention).")

    @model_validator(mode="after")
    def _check(self) -> ServeCfg:
        if self.arrival == "poisson" and self.rate_per_s is None:
            raise ValueError("serve.rate_per_s: required when serve.arrival is poisson (requests/s > 0)")
        if self.rate_end_per_s is not None and self.arrival != "poisson":
            raise ValueError("serve.rate_end_per_s: only with serve.arrival poisson")
        if self.arrival == "trace" and not self.trace_file:
            raise ValueError("serve.trace_file: required when serve.arrival is trace")
        return self


class RealConfig(_Strict):
    name: str = "real"
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads (1 measured best with the other core busy).")
    device: str = Field(
        "cpu", pattern=r"^(cpu|cuda|cuda:\d+|auto)$",
        description="Where the models run: cpu, cuda, cuda:N, or auto (cuda when torch sees one).",
    )
    models: ModelsCfg = ModelsCfg()
    stream: StreamCfg = StreamCfg()
    decode: DecodeCfg = DecodeCfg()
    distill: DistillCfg = DistillCfg()
    offline: OfflineCfg = OfflineCfg()
    baseline: BaselineCfg = BaselineCfg()
    eval: EvalCfg = EvalCfg()
    serve: ServeCfg | None = Field(None, description="Serving mode (batched, open loop); absent: batch-1 closed loop.")

    @model_validator(mode="after")
    def _check(self) -> RealConfig:
        from osdsim.real.data import DOMAINS

        named = set(self.stream.domains)
        for ph in self.stream.phases or []:
            named |= set(ph.mix) | set(ph.mix_end or {})
        unknown = sorted(named - set(DOMAINS))
        if unknown:
            raise ValueError(f"unknown domain(s) {unknown}; known: {list(DOMAINS)}")
        if self.serve is not None and self.distill.enabled and self.distill.sample_source != "teacher":
            raise ValueError("distill.sample_source: serving mode labels with the verify pass only (teacher)")
        if self.models.backend == "llamacpp":
            if self.models.draft_vocab:
                raise ValueError("models.draft_vocab: the llamacpp backend serves the draft with its full head "
                                 "(llama.cpp's output tensor covers the whole vocabulary); use 0")
            if self.device not in ("cpu", "auto"):
                raise ValueError(f"device: the llamacpp backend runs on the CPU (got {self.device})")
        if self.stream.shape == "smooth" and self.stream.phases is None and len(self.stream.domains) < 2:
            raise ValueError("a smooth stream needs at least two domains")
        return self


def load_config(path: Path) -> RealConfig:
    """Read a YAML scenario into a RealConfig (raises ValueError/OSError with a clear message)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return RealConfig.model_validate(data)
