"""Which device is here, and is it the one the user asked to calibrate? (issue 4, item 1)

No torch at import time: the callers pass what torch saw (`DeviceInfo`), so the name matching is
plain Python and unit-testable without a GPU.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from osdsim.cost.profile import calibration_dir
from osdsim.errors import InputError

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuKind:
    """A `--gpu` name: the substring torch's device name must contain, and a memory range."""

    name: str
    pattern: str  # regex matched (case-insensitive) against torch.cuda.get_device_name()
    min_memory_gib: float = 0.0
    max_memory_gib: float = float("inf")


# `--gpu` names. Memory ranges split the A100 variants (torch reports ~39.4 / ~79.1 GiB).
GPU_KINDS: dict[str, GpuKind] = {
    k.name: k
    for k in (
        GpuKind("a100", r"\bA100\b"),
        GpuKind("a100-40g", r"\bA100\b", max_memory_gib=60.0),
        GpuKind("a100-80g", r"\bA100\b", min_memory_gib=60.0),
        GpuKind("h100", r"\bH100\b"),
        GpuKind("h200", r"\bH200\b"),
        GpuKind("a40", r"\bA40\b"),
        GpuKind("l4", r"\bL4\b"),
        GpuKind("l40s", r"\bL40S\b"),
        GpuKind("a10g", r"\bA10G\b"),
        GpuKind("t4", r"\bT4\b"),
        GpuKind("v100", r"\bV100\b"),
    )
}
KNOWN_NAMES: tuple[str, ...] = (*GPU_KINDS, "cpu")


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What is present: kind 'cpu' or 'cuda', the model name, memory, and (CPU) cores/threads."""

    kind: str
    model: str
    memory_bytes: float
    cores: int = 0
    threads: int = 1
    extra: str = ""  # CPU family/model/flags summary or CUDA capability

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"CPU {self.model} ({self.cores} cores, {self.threads} torch threads{self.extra})"
        return f"GPU {self.model} ({self.memory_bytes / GIB:.0f} GiB{self.extra})"


def slug(text: str) -> str:
    """Lower-case file-name form of a device model: 'AMD EPYC 9B14' -> 'amd-epyc-9b14'."""
    text = re.sub(r"\((?:R|TM)\)|\bCPU\b|\bProcessor\b|@.*$|\b\d+-Core\b", " ", text, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def cpu_model_name() -> str:
    """The processor model from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpuinfo_field(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == field:
                return value.strip()
    except OSError:
        pass
    return ""


def cpu_info(threads: int) -> DeviceInfo:
    """This machine's CPU: model, usable cores, RAM, family/model and the vector extensions."""
    try:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = 0.0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    flags = set(_cpuinfo_field("flags").split())
    vec = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    fam, mod = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    extra = (f", family {fam} model {mod}" if fam else "") + (f", {'/'.join(vec)}" if vec else "")
    return DeviceInfo("cpu", cpu_model_name(), memory, cores=cores, threads=threads, extra=extra)


def shipped_profile_for(info: DeviceInfo) -> str | None:
    """`calibration/<name>.yaml` of a shipped profile that fits the found device, if any."""
    shipped = {p.stem for p in calibration_dir().glob("*.yaml") if not p.stem.endswith(".prev")}
    if info.kind == "cpu":
        name = f"cpu-{slug(info.model)}"
        return f"calibration/{name}.yaml" if name in shipped else None
    # Most specific first (a100-80g before a100).
    for kind in sorted(GPU_KINDS.values(), key=lambda k: -len(k.name)):
        if kind.name in shipped and gpu_matches(kind, info):
            return f"calibration/{kind.name}.yaml"
    return None


def gpu_matches(kind: GpuKind, info: DeviceInfo) -> bool:
    gib = info.memory_bytes / GIB
    return (
        info.kind == "cuda"
        and re.search(kind.pattern, info.model, re.I) is not None
        and kind.min_memory_gib <= gib < kind.max_memory_gib
    )


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); else torch converts them
    to fp32 per call."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def profile_name(info: DeviceInfo) -> str:
    """Profile name for `--device auto`: the known GPU kind, or `cpu-<model>` / the GPU's slug."""
    if info.kind == "cpu":
        return f"cpu-{slug(info.model)}"
    for name in ("a100-80g", "a100-40g", *GPU_KINDS):
        if name != "a100" and gpu_matches(GPU_KINDS[name], info):
            return name
    return slug(info.model.replace("NVIDIA", ""))


def check_requested(requested: str, found: DeviceInfo) -> str:
    """Return the profile name to write, or raise InputError saying what was found and what to use.

    `requested` is a `--gpu` name (or 'cpu'); `found` is what torch sees on the chosen device.
    """
    name = requested.strip().lower()
    if name not in KNOWN_NAMES:
        raise InputError(f"--gpu {requested!r}: unknown device name; known: {', '.join(KNOWN_NAMES)} (or --device auto)")
    if name == "cpu":
        if found.kind != "cpu":
            raise InputError("--gpu cpu: internal error, a CPU calibration got a CUDA device")
        return profile_name(found)
    hint = shipped_profile_for(found)
    use = f"; use the shipped profile {hint}" if hint else ""
    if found.kind != "cuda":
        raise InputError(
            f"--gpu {name}: no CUDA device here (torch sees only the {found.describe()}){use}, "
            f"or calibrate this CPU with --gpu cpu"
        )
    if not gpu_matches(GPU_KINDS[name], found):
        raise InputError(
            f"--gpu {name}: this machine has a {found.describe()}, not {name}{use}, "
            f"or calibrate it with --device auto"
        )
    return name
