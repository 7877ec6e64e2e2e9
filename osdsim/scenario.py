"""Scenario files: pydantic models (extra="forbid", units in field names) and loading.

A scenario says what cluster serves which workload with which speculation strategy. Relative
file paths inside a scenario (trace, empirical lengths, acceptance files) are resolved against the
scenario file's directory.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from osdsim.errors import InputError, format_validation_error
from osdsim.models import DTYPE_BYTES, ModelSpec, resolve_model

STRATEGIES = ("no-spec", "static", "offline", "osd", "osd-per-domain")
Strategy = Literal["no-spec", "static", "offline", "osd", "osd-per-domain"]
MIX_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- length distributions ------------------------------------------------------------------------
class FixedLength(_Strict):
    kind: Literal["fixed"]
    value_tokens: int = Field(..., ge=1, description="Every request has this many tokens.")


class UniformLength(_Strict):
    kind: Literal["uniform"]
    low_tokens: int = Field(..., ge=1)
    high_tokens: int = Field(..., ge=1, description="Inclusive upper bound.")

    @model_validator(mode="after")
    def _order(self) -> UniformLength:
        if self.high_tokens < self.low_tokens:
            raise ValueError("high_tokens: must be >= low_tokens")
        return self


class LognormalLength(_Strict):
    kind: Literal["lognormal"]
    mean_tokens: float = Field(..., gt=0, description="Mean of the distribution (before clipping).")
    cv: float = Field(..., gt=0, description="Coefficient of variation σ/μ.")
    min_tokens: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)


class EmpiricalLength(_Strict):
    kind: Literal["empirical"]
    file: str = Field(..., description="Text/CSV file with one token count per line (or a `tokens` column).")


LengthDist = Annotated[
    FixedLength | UniformLength | LognormalLength | EmpiricalLength, Field(discriminator="kind")
]


class DomainSpec(_Strict):
    prompt_tokens: LengthDist | None = Field(None, description="Prompt length distribution (not needed with a trace).")
    output_tokens: LengthDist | None = Field(None, description="Output length distribution (not needed with a trace).")


# --- shift schedule --------------------------------------------------------------------------------
class Phase(_Strict):
    name: str | None = Field(None, description="Label shown in reports (default: dominant domain).")
    start: float = Field(..., ge=0, description="Phase start, in the schedule's unit.")
    end: float = Field(..., gt=0, description="Phase end (exclusive), in the schedule's unit.")
    mix: dict[str, float] = Field(..., description="Domain weights at the phase start (sum to 1).")
    mix_end: dict[str, float] | None = Field(
        None, description="Weights at the phase end; linear drift in between (OSD 'smooth')."
    )

    @model_validator(mode="after")
    def _check(self) -> Phase:
        if self.end <= self.start:
            raise ValueError(f"end: must be greater than start ({self.end:g} <= {self.start:g})")
        for label, m in (("mix", self.mix), ("mix_end", self.mix_end)):
            if m is None:
                continue
            _check_mix(m, label)
        return self


def _check_mix(m: dict[str, float], label: str) -> None:
    if not m:
        raise ValueError(f"{label}: must name at least one domain")
    if any((not math.isfinite(w)) or w < 0 for w in m.values()):
        raise ValueError(f"{label}: weights must be finite and >= 0")
    total = sum(m.values())
    if abs(total - 1.0) > MIX_TOLERANCE:
        raise ValueError(f"{label}: weights must sum to 1 (got {total:g})")


class ShiftSchedule(_Strict):
    unit: Literal["requests", "seconds"] = Field("requests", description="Phase bounds count requests or seconds.")
    phases: list[Phase] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _contiguous(self) -> ShiftSchedule:
        if self.phases[0].start != 0:
            raise ValueError("phases.0.start: must be 0")
        for i in range(1, len(self.phases)):
            prev, cur = self.phases[i - 1], self.phases[i]
            if cur.start < prev.end:
                raise ValueError(f"phases.{i}: overlaps phases.{i - 1} (starts at {cur.start:g}, previous ends at {prev.end:g})")
            if cur.start > prev.end:
                raise ValueError(f"phases.{i}: leaves a gap after phases.{i - 1} (starts at {cur.start:g}, previous ends at {prev.end:g})")
        return self


# --- workload ------------------------------------------------------------------------------------
class Workload(_Strict):
    arrival: Literal["poisson", "gamma", "trace"] = Field("poisson", description="Arrival process.")
    rate_per_s: float | None = Field(None, gt=0, description="Mean arrival rate (requests/s) for the whole cluster.")
    rate_ramp_to_per_s: float | None = Field(
        None, gt=0, description="Rate rises (or falls) linearly from rate_per_s to this over duration_s."
    )
    cv: float = Field(1.0, gt=0, description="Gamma arrivals: coefficient of variation of inter-arrival times.")
    trace_file: str | None = Field(
        None, description="CSV with arrival_s, domain, prompt_tokens, output_tokens (arrival: trace); optional think_s."
    )
    trace_replay: Literal["open", "closed"] = Field(
        "open",
        description="open: requests arrive at arrival_s. closed: one client replays the trace as a closed loop; "
        "request i is sent think_s (trace column, default 0) after request i-1 completed (its reply, and any "
        "inline training step it made due); arrival_s of every request after the first is ignored.",
    )
    num_requests: int | None = Field(None, ge=1, description="Requests to generate.")
    duration_s: float | None = Field(None, gt=0, description="Generate arrivals for this long (s).")
    domains: dict[str, DomainSpec] = Field(..., min_length=1, description="Query domains and their lengths.")
    mix: dict[str, float] | None = Field(None, description="Static domain weights (default uniform) when no shift.")
    shift: ShiftSchedule | None = Field(None, description="Domain-mix schedule (sharp phases / smooth drift).")

    @model_validator(mode="after")
    def _check(self) -> Workload:
        if self.arrival == "trace":
            if not self.trace_file:
                raise ValueError("trace_file: required when arrival is 'trace'")
        else:
            if self.rate_per_s is None:
                raise ValueError(f"rate_per_s: required for arrival '{self.arrival}' (a positive number)")
            last_end = None
            if self.shift is not None and self.shift.unit == "requests":
                last_end = self.shift.phases[-1].end
            if self.num_requests is None and self.duration_s is None and last_end is None:
                raise ValueError("num_requests: give num_requests or duration_s")
            for name, d in self.domains.items():
                if d.prompt_tokens is None or d.output_tokens is None:
                    which = "prompt_tokens" if d.prompt_tokens is None else "output_tokens"
                    raise ValueError(f"domains.{name}.{which}: required unless arrival is 'trace'")
        if self.rate_ramp_to_per_s is not None and self.duration_s is None:
            raise ValueError("rate_ramp_to_per_s: needs duration_s (the ramp's length)")
        if self.mix is not None:
            _check_mix(self.mix, "mix")
            self._known(self.mix, "mix")
        if self.shift is not None:
            for i, ph in enumerate(self.shift.phases):
                self._known(ph.mix, f"shift.phases.{i}.mix")
                if ph.mix_end is not None:
                    self._known(ph.mix_end, f"shift.phases.{i}.mix_end")
        return self

    def _known(self, m: dict[str, float], where: str) -> None:
        unknown = sorted(set(m) - set(self.domains))
        if unknown:
            raise ValueError(f"{where}: unknown domain {unknown[0]!r}; domains are {sorted(self.domains)}")


# --- acceptance ----------------------------------------------------------------------------------
class DomainAcceptance(_Strict):
    alpha_0: float = Field(..., ge=0, le=1, description="α of the draft on this domain before online distillation.")
    alpha_inf: float | None = Field(None, ge=0, le=1, description="Plateau α under online distillation (default alpha_0).")
    tau_tokens: float = Field(1.0e5, gt=0, description="Distilled tokens of this domain per e-fold of α's approach.")
    alpha_offline: float | None = Field(
        None, ge=0, le=1, description="α of an offline-distilled draft (default alpha_inf)."
    )
    source: str | None = Field(None, description="Where these numbers came from.")

    @property
    def plateau(self) -> float:
        return self.alpha_0 if self.alpha_inf is None else self.alpha_inf

    @property
    def offline(self) -> float:
        return self.plateau if self.alpha_offline is None else self.alpha_offline


class Acceptance(_Strict):
    law: Literal["geometric", "empirical"] = Field(
        "geometric", description="Accepted-length law: i.i.d. geometric in α, or empirical histograms indexed by α."
    )
    empirical_file: str | None = Field(None, description="YAML/JSON {k, entries: [{alpha, histogram}]} (law: empirical).")
    file: str | None = Field(None, description="Acceptance-parameter file written by `osdsim validate` (same schema).")
    transfer: float = Field(
        0.0, ge=-1, le=1, description="Cross-domain transfer: distilling on one domain moves others by this fraction (negative = forgetting)."
    )
    forgetting_tokens: float | None = Field(
        None, gt=0, description="Forgetting: training on other domains erodes a domain's distilled progress n by "
        "exp(-their tokens / this) before the transfer adds to it (null: no erosion).")
    distillation_helps: bool = Field(True, description="Require alpha_inf >= alpha_0 for every domain.")
    domains: dict[str, DomainAcceptance] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Acceptance:
        if self.law == "empirical" and not self.empirical_file:
            raise ValueError("empirical_file: required when law is 'empirical'")
        if self.distillation_helps:
            for name, d in self.domains.items():
                if d.alpha_inf is not None and d.alpha_inf < d.alpha_0:
                    raise ValueError(
                        f"domains.{name}.alpha_inf: {d.alpha_inf} < alpha_0 {d.alpha_0} although distillation_helps is true"
                    )
        return self


# --- serving system ------------------------------------------------------------------------------
class Models(_Strict):
    target: str | ModelSpec = Field(..., description="Preset name (vicuna-7b, llama-2-70b, ...) or explicit dimensions.")
    draft: str | ModelSpec | None = Field(None, description="Draft model (preset or dimensions); required with speculation.")

    @field_validator("target", "draft", mode="before")
    @classmethod
    def _resolve(cls, v: Any) -> Any:
        if v is None or isinstance(v, ModelSpec):
            return v
        return resolve_model(v)


class Hardware(_Strict):
    profile: str = Field(..., description="Profile name under calibration/ (a100-80g, h100, h200, ...) or a YAML path.")
    tensor_parallel: int = Field(1, ge=1, le=64, description="GPUs per replica (tensor parallel).")
    replicas: int = Field(1, ge=1, le=4096, description="Independent serving replicas.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Fraction of GPU memory for weights + KV cache.")


class Batching(_Strict):
    max_batch_size: int = Field(256, ge=1, description="Maximum running sequences per replica.")
    chunked_prefill_tokens: int | None = Field(
        512, ge=1, description="Token budget per iteration (decode/verify tokens first, then prefill chunks); null = unlimited."
    )
    kv_cache_tokens: int | None = Field(None, ge=1, description="KV capacity per replica in tokens; null = from GPU memory.")
    prefill_pass: Literal["fused", "separate"] = Field(
        "fused", description="fused: an iteration's prefill chunks ride in the target's verify pass (one pass of "
        "B·(k+1) + P tokens; the budget goes to decode/verify tokens first: vLLM, Sarathi). separate: the chunks get "
        "their own target and draft passes and the whole chunked_prefill_tokens budget, and the verify pass covers "
        "B·(k+1) tokens only (osdsim.real's server: prefill into each sequence's own cache, then draft, then verify).")
    attention_padding: float | None = Field(
        None, ge=1, description="null: paged attention (each sequence reads its own context: Σ context, as vLLM). "
        "A number ρ ≥ 1: a padded batch cache (one KV tensor per batch, as osdsim.real's server): every decoding "
        "row attends over ρ × the longest row's context (ρ − 1: the holes beyond it).")


class Speculation(_Strict):
    k: int | Literal["auto"] = Field(4, description="Draft tokens per step (≥ 1), or 'auto' (k* from α and c per iteration).")
    k_max: int = Field(8, ge=1, le=99, description="Largest k the 'auto' optimiser considers.")

    @field_validator("k")
    @classmethod
    def _k(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


class Distill(_Strict):
    placement: Literal["inline", "harvest", "dedicated"] = Field(
        "harvest", description="Where training steps run: block serving, spare compute, or trainer GPUs."
    )
    update_interval_requests: int = Field(8, ge=1, description="A training step every this many finished requests (OSD: 8).")
    window_requests: int | None = Field(
        None, ge=1, description="Each step trains on the last this-many requests (a sliding window); default = update interval."
    )
    tokens: Literal["target", "all"] = Field(
        "target", description="Positions distilled on: where the target supplied the token (OSD) or all output tokens."
    )
    harvest_fraction: float = Field(0.5, gt=0, le=1, description="θ: fraction of idle compute training can use.")
    harvest_in_iterations: bool = Field(
        True, description="harvest: also train in the spare compute of serving iterations. false: only while "
        "the replica is idle (nothing running or waiting), one minibatch unit at a time; a request arriving "
        "mid-unit waits for the unit boundary (the real server of osdsim/real/serve.py on a CPU).")
    interference: float = Field(
        0.05, ge=0, le=10, description="Fractional slowdown of an iteration that co-runs with harvest training."
    )
    trainer_gpus: int = Field(1, ge=1, description="Dedicated trainer GPUs (placement: dedicated).")
    dedicated_interference: float = Field(
        0.0, ge=0, le=10, description="dedicated: fractional slowdown of a serving iteration while the trainer "
        "trains on the same host (CPU cores sharing memory bandwidth and cache; 0: separate hardware).")
    sync_delay_s: float = Field(1.0, ge=0, description="Delay until new draft weights reach replicas (dedicated).")
    publish_pause_s: float = Field(
        0.0, ge=0, description="inline: serving pause after each step while the new draft weights are handed to "
        "the serving engine (a llama.cpp server: GGUF export + reload, osdsim real's sync_s); α changes after it. "
        "0: the trained weights are the served ones.")
    max_pending_steps: int = Field(2, ge=1, description="Due steps that may wait; beyond this the oldest is skipped.")
    trainable: Literal["all", "layers"] = Field("all", description="Train all draft parameters or only decoder layers.")
    train_dtype: str | None = Field(
        None, description=f"Dtype the step computes in (one of {sorted(DTYPE_BYTES)}); default: the draft's dtype."
    )
    train_vocab: int | None = Field(
        None, ge=1, description="Vocabulary of the LM head a step trains (a draft served with a reduced head, "
        "FR-Spec style, still trains its full head); default: the draft's vocab."
    )
    epochs_per_step: int = Field(1, ge=1, description="Passes over the window in one step (cost and α progress scale with it).")
    batch_sequences: int | None = Field(
        None, ge=1,
        description="Sequences per optimizer step: the window runs as shuffled minibatches, each padded to its "
        "longest sequence and paying its own pass overheads and AdamW update; default: one unpadded batch.",
    )
    logits_at: Literal["all", "loss"] = Field(
        "all", description="LM head over every position of the sequences, or only at the distilled (loss) positions."
    )
    progress: Literal["new_tokens", "trained_tokens"] = Field(
        "new_tokens",
        description="What moves α(n): tokens distilled for the first time, or every token a step trains on "
        "(window × epochs: a sliding window trains each request window/interval times).",
    )

    @field_validator("train_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPE_BYTES:
            raise ValueError(f"must be one of {sorted(DTYPE_BYTES)}, got {v!r}")
        return v


class Slo(_Strict):
    ttft_s: float = Field(2.0, gt=0, description="Goodput: time-to-first-token bound (s).")
    tpot_s: float = Field(0.2, gt=0, description="Goodput: time-per-output-token bound (s).")


class Report(_Strict):
    time_bin_s: float | None = Field(None, gt=0, description="Time-series bin width (s); default ≈ run length / 200.")
    alpha_window_requests: int = Field(
        50, ge=1, description="Requests per window of the α trajectory used for recovery times."
    )
    recovery_tolerance: float = Field(0.02, gt=0, lt=1, description="α within this of its target counts as recovered.")
    iteration_log: Literal["auto", "full", "binned"] = Field(
        "auto", description="Keep every iteration (full) or sums per time bin (binned, bounded memory); auto = full up to 200,000 requests."
    )


class Limits(_Strict):
    max_sim_time_s: float | None = Field(None, gt=0, description="Stop the simulation at this simulated time.")
    max_events: float = Field(
        1e8, gt=0, description="Refuse up front when the run needs at least this many simulation events (≈ 30 min)."
    )
    max_memory_gb: float = Field(8.0, gt=0, description="Refuse up front when results would need at least this much memory.")


class Scenario(_Strict):
    name: str = Field("scenario", description="Scenario name used in reports.")
    description: str | None = None
    seed: int = Field(0, ge=0, description="Seed of every random draw.")
    models: Models
    hardware: Hardware
    router: Literal["round-robin", "least-outstanding", "random"] = "round-robin"
    batching: Batching = Field(default_factory=Batching)
    strategy: Strategy = Field("static", description=f"Serving strategy: {', '.join(STRATEGIES)}.")
    compare: list[Strategy] | None = Field(None, description="Strategies to run side by side (same arrivals).")
    speculation: Speculation = Field(default_factory=Speculation)
    acceptance: Acceptance = Field(default_factory=Acceptance)
    distill: Distill = Field(default_factory=Distill)
    workload: Workload
    slo: Slo = Field(default_factory=Slo)
    report: Report = Field(default_factory=Report)
    limits: Limits = Field(default_factory=Limits)

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        strategies = self.compare or [self.strategy]
        if any(s != "no-spec" for s in strategies) and self.models.draft is None:
            raise ValueError("models.draft: required for speculative strategies (or use strategy: no-spec)")
        if any(s != "no-spec" for s in strategies) and not self.acceptance.file:
            missing = sorted(set(self.workload.domains) - set(self.acceptance.domains))
            if missing:
                raise ValueError(f"acceptance.domains: no acceptance parameters for domain {missing[0]!r}")
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve_path(self, p: str) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self._base_dir / path

    @property
    def target(self) -> ModelSpec:
        return self.models.target  # type: ignore[return-value]

    @property
    def draft(self) -> ModelSpec | None:
        return self.models.draft  # type: ignore[return-value]

    def with_strategy(self, strategy: str) -> Scenario:
        return _clone(self, {"strategy": strategy, "compare": None})


def _clone(s: Scenario, update: dict[str, Any]) -> Scenario:
    new = s.model_copy(update=update)
    new._base_dir = s._base_dir
    return new


# --- loading -------------------------------------------------------------------------------------
def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a","b","c"], YAML-parsed value)."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected FIELD.PATH=VALUE")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise InputError(f"--set {text!r}: empty field path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise InputError(f"--set {text!r}: {part} is not a mapping")
            node = nxt
        node[path[-1]] = value
    return data


def scenario_from_dict(data: Any, base_dir: Path | None = None, source: str = "scenario") -> Scenario:
    if not isinstance(data, dict):
        raise InputError(f"{source}: a scenario must be a YAML mapping (got {type(data).__name__})")
    try:
        sc = Scenario(**data)
    except ValidationError as exc:
        raise InputError(f"{source}: {format_validation_error(exc)}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise InputError(f"{source}: {str(exc).splitlines()[0]}") from None
    sc._base_dir = base_dir or Path.cwd()
    return sc


def read_yaml(path: Path, what: str = "scenario") -> Any:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: {what} file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a {what} YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).replace("\n", " ")[:160]
        raise InputError(f"{path}: not valid YAML ({first})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None


def load_model_file(path: Path, model: type[BaseModel], what: str) -> BaseModel:
    """Read a YAML mapping and validate it as `model`; bad files raise one-line InputErrors."""
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise InputError(f"{path}: a {what} must be a YAML mapping")
    try:
        return model(**data)
    except ValidationError as exc:
        raise InputError(f"{path}: {format_validation_error(exc)}") from None


def load_scenario(path: Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override (`--set`), and validate a scenario file."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        raise InputError(f"{path}: empty scenario file")
    if overrides:
        if not isinstance(data, dict):
            raise InputError(f"{path}: a scenario must be a YAML mapping")
        data = apply_overrides(data, overrides)
    return scenario_from_dict(data, base_dir=path.resolve().parent, source=str(path))
