"""Hardware profiles: peak rates of a device plus the calibrated efficiency/overhead parameters.

A profile is a YAML file under ``calibration/``. Datasheet profiles carry conservative default
efficiencies and say so in ``provenance``; ``osdsim calibrate`` writes measured ones.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osdsim.errors import InputError, format_validation_error

SCHEMA_VERSION = 1


class Efficiency(BaseModel):
    """Fitted (or default) parameters of the roofline cost model (docs/architecture.md, Physics: cost of a pass)."""

    model_config = ConfigDict(extra="forbid")

    flops_max: float = Field(..., gt=0, le=1, description="Asymptotic matmul efficiency η_f at large T.")
    flops_half_tokens: float = Field(
        ..., ge=0, description="Tokens per pass at which η_f(T) = flops_max/2 (η_f = max·T/(T+T½))."
    )
    bandwidth: float = Field(..., gt=0, le=1, description="Achieved fraction η_b of memory bandwidth.")
    kernel_overhead_s_per_layer: float = Field(
        ..., ge=0, description="Fixed launch/kernel cost per decoder layer per forward pass (s)."
    )
    pass_overhead_s: float = Field(
        ..., ge=0, description="Fixed cost per forward pass: embedding, sampling, framework (s)."
    )
    allreduce_latency_s: float = Field(
        1e-5, ge=0, description="Latency of one tensor-parallel all-reduce (s)."
    )
    gemv_max_tokens: int = Field(
        0, ge=0,
        description="Passes of at most this many tokens run each matmul as that many matrix-vector "
        "products (CPU BLAS small-M paths): the weights are read once per token and the FLOPs run "
        "at flops_max; 0 = never.",
    )
    kv_bandwidth: float | None = Field(
        None, gt=0, le=1,
        description="Achieved fraction of memory bandwidth on KV-cache bytes (attention, cache "
        "appends); None = `bandwidth`. Measured CPUs stream the cache far slower than GEMMs stream weights.",
    )
    train_efficiency: float = Field(
        1.0, gt=0, le=4,
        description="Speed of a training step's work relative to forward passes at the same efficiencies "
        "(backward kernels, autograd, loss and optimizer): its roofline time is divided by this; 1 = "
        "3x-forward rule only. Fitted by `osdsim calibrate` on measured training steps.",
    )
    # --- GPU terms fitted on per-operator kernel timings (`osdsim calibrate --from`); all off by
    # default, so every profile without them prices exactly as before (osdsim/cost/model.py).
    roofline_sharpness: float | None = Field(
        None, ge=1, le=64,
        description="p of the smooth roofline (c^p + m^p)^(1/p) that replaces max(c, m) (kernels near "
        "the ridge point are slower than either bound); None = max.",
    )
    attention_flops: float | None = Field(
        None, gt=0, le=1,
        description="When set, attention is priced as its own kernel: roofline(attention FLOPs / (peak·this), "
        "KV bytes / (BW·kv_bandwidth)) added to the GEMMs' roofline instead of sharing it; None = shared.",
    )
    nongemm_s_per_token_hidden: float | None = Field(
        None, ge=0,
        description="When set, the non-GEMM ops (norms, rotary, activation, residual adds) are priced per "
        "layer as T·(this·d + nongemm_s_per_token_ffn·ffn/tp + nongemm_s_per_token_qkv·(d+d_kv)/tp) "
        "seconds, outside the roofline, instead of as activation bytes inside it; None = activation bytes.",
    )
    nongemm_s_per_token_ffn: float = Field(0.0, ge=0, description="See nongemm_s_per_token_hidden (per ffn element).")
    nongemm_s_per_token_qkv: float = Field(0.0, ge=0, description="See nongemm_s_per_token_hidden (per q+k element).")
    nongemm_min_tokens: float = Field(
        0.0, ge=0,
        description="The non-GEMM ops cost as if they ran max(T, this) tokens (a few rows do not fill the GPU: "
        "below this the time is set by the rows' width, not their number).",
    )
    pass_overhead_s_per_seq: float = Field(
        0.0, ge=0,
        description="Serving-engine CPU time per sequence per pass (scheduling, input preparation, sampling, "
        "output processing), priced per logit token; 0 = a fixed pass_overhead_s only.",
    )

    @property
    def gpu_terms(self) -> bool:
        """True when any of the kernel-level GPU terms above is on."""
        return (self.roofline_sharpness is not None or self.attention_flops is not None
                or self.nongemm_s_per_token_hidden is not None or self.pass_overhead_s_per_seq != 0.0)


class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(..., description="'datasheet' or 'measured'.")
    measured_on: str | None = Field(None, description="Device description (measured profiles).")
    date: str | None = None
    command: str | None = Field(None, description="Exact command that produced the profile.")
    efficiencies_are_defaults: bool = Field(
        False, description="True when efficiencies are conservative defaults, not measurements."
    )
    notes: str | None = None
    versions: dict[str, str] = Field(default_factory=dict, description="torch/CUDA/driver versions.")
    raw_measurements: str | None = Field(None, description="CSV of raw measurements beside the file.")
    data_source: str | None = Field(
        None, description="Where imported measurements come from (repository, commit, license)."
    )
    files: dict[str, int] = Field(default_factory=dict, description="Imported files and their row counts.")
    derived_from: str | None = Field(
        None, description="Profile this one is derived from (not measured on this device itself)."
    )
    attention: str | None = Field(None, description="How attention is priced (what it was fitted on).")
    fit_seconds: float | None = Field(None, description="Wall time of the import and fit (s).")


class HardwareProfile(BaseModel):
    """One device: peak rates, memory, interconnect, fitted efficiencies, provenance."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(..., description="Profile schema version.")
    name: str
    device: str = Field(..., description="Human-readable device name.")
    peak_flops_per_s: dict[str, float] = Field(
        ..., description="Dense matmul peak per dtype (FLOP/s), e.g. {bf16: 3.12e14}."
    )
    memory_bandwidth_bytes_per_s: float = Field(..., gt=0)
    memory_bytes: float = Field(..., gt=0)
    interconnect_bandwidth_bytes_per_s: float = Field(
        ..., gt=0, description="Per-direction device-to-device bandwidth used by all-reduce."
    )
    efficiency: Efficiency
    efficiency_by_dtype: dict[str, Efficiency] = Field(
        default_factory=dict,
        description="Per-dtype efficiencies where they differ (e.g. fp32 vs bf16 kernels on a CPU); "
        "a dtype not listed uses `efficiency`.",
    )
    provenance: Provenance
    fit_errors: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Held-out errors of the fit, per pass type."
    )

    def efficiency_for(self, dtype: str) -> Efficiency:
        """The fitted efficiencies for passes in `dtype` (falls back to `efficiency`)."""
        return self.efficiency_by_dtype.get(dtype, self.efficiency)

    def peak_flops(self, dtype: str) -> float:
        try:
            return self.peak_flops_per_s[dtype]
        except KeyError:
            raise InputError(
                f"profile {self.name}: no peak_flops_per_s for dtype {dtype!r}; "
                f"has {sorted(self.peak_flops_per_s)}"
            ) from None


def calibration_dir() -> Path:
    """The shipped `calibration/` directory (repository root), or $OSDSIM_CALIBRATION_DIR."""
    import os

    env = os.environ.get("OSDSIM_CALIBRATION_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "calibration"


def resolve_profile_path(name_or_path: str, base_dir: Path | None = None) -> Path:
    """A profile name (`a100-80g`) or a path to a YAML file → an existing path."""
    candidates: list[Path] = []
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        candidates.append(p)
        if base_dir is not None and not p.is_absolute():
            candidates.append(base_dir / p)
    else:
        candidates.append(Path.cwd() / "calibration" / f"{name_or_path}.yaml")
        candidates.append(calibration_dir() / f"{name_or_path}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(q.stem for q in calibration_dir().glob("*.yaml") if not q.stem.endswith(".prev"))
    raise InputError(
        f"hardware.profile: profile {name_or_path!r} not found (looked for {candidates[0]}); "
        f"shipped profiles: {', '.join(known)}"
    )


_FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_load(text: str):
    """yaml.safe_load, parsed by libyaml when present (the same resolver and constructor, so the same
    objects, several times faster); its error messages differ, so a bad file is parsed again by the
    Python parser for the message."""
    try:
        return yaml.load(text, Loader=_FAST_LOADER)
    except yaml.YAMLError:
        return yaml.safe_load(text)


def load_profile(path: Path) -> HardwareProfile:
    """Read and validate a profile YAML; bad files raise InputError naming file and field."""
    try:
        data = _safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: profile file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a profile must be a YAML mapping")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise InputError(f"{path}: schema_version: required integer (this osdsim reads {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise InputError(
            f"{path}: schema_version {version} is from a newer osdsim (this one reads {SCHEMA_VERSION}); upgrade osdsim"
        )
    if version < SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {version} is no longer supported (need {SCHEMA_VERSION})")
    try:
        return HardwareProfile(**data)
    except ValidationError as exc:
        raise InputError(f"{path}: {format_validation_error(exc)}") from None


def dump_profile(profile: HardwareProfile) -> str:
    return yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
