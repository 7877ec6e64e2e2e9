"""`osdsim calibrate` without the CLI: detect the device, measure, fit, build and write a profile.

torch is imported inside the functions here (the `real` extra), never at module load.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from osdsim.calibrate import micro
from osdsim.calibrate.devices import DeviceInfo, cpu_info, cpu_native_bf16
from osdsim.calibrate.fit import FitResult, fit_passes
from osdsim.calibrate.measure import Measurement, Timer, rows_to_csv
from osdsim.calibrate.passes import Plan, count_pass_steps, cpu_plan, cuda_plan, measure_passes
from osdsim.cost.profile import (
    SCHEMA_VERSION,
    HardwareProfile,
    Provenance,
    calibration_dir,
    dump_profile,
    load_profile,
)
from osdsim.errors import InputError, atomic_write_text

Tick = Callable[[str], None]
# Dtypes every profile needs a peak for (the model presets are bf16; the validator runs fp32).
REQUIRED_DTYPES: tuple[str, ...] = ("fp32", "bf16")


@dataclass(frozen=True)
class Options:
    device: str  # "cpu" or "cuda" / "cuda:N"
    name: str  # profile name
    quick: bool
    threads: int
    command: str


@dataclass
class Outcome:
    profile: HardwareProfile
    rows: list[Measurement]
    fit: FitResult
    wall_s: float


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise InputError("calibrate needs torch (the `real` extra): pip install torch==2.13.0") from None
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise InputError("calibrate needs transformers: pip install 'transformers>=5'") from None
    return torch


def detect(torch: Any, device: str, threads: int) -> DeviceInfo:
    """What is on `device` ('cpu' or 'cuda[:N]')."""
    if device == "cpu":
        return cpu_info(threads)
    if not torch.cuda.is_available():
        return cpu_info(threads)
    props = torch.cuda.get_device_properties(torch.device(device))
    return DeviceInfo(
        "cuda", torch.cuda.get_device_name(torch.device(device)), float(props.total_memory),
        extra=f", compute capability {props.major}.{props.minor}, {props.multi_processor_count} SMs",
    )


def resolve_out(name: str, out: Path | None) -> Path:
    """`--out`, else calibration/<name>.yaml (under the working directory's calibration/ if any)."""
    if out is not None:
        return out if out.suffix in (".yaml", ".yml") else out / f"{name}.yaml"
    here = Path.cwd() / "calibration"
    return (here if here.is_dir() else calibration_dir()) / f"{name}.yaml"


def check_writable(path: Path) -> None:
    """Fail early (before minutes of measuring) when the profile cannot be written there."""
    if path.is_dir():
        raise InputError(f"--out {path}: is a directory; give a .yaml file or a directory to write <name>.yaml in")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{path.name}.writable"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None


def versions(torch: Any, device: str) -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "numpy", "scipy", "osdsim"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    out["torch_threads"] = str(torch.get_num_threads())
    if device.startswith("cuda"):
        out["cuda"] = str(torch.version.cuda)
        out["cudnn"] = str(torch.backends.cudnn.version())
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                res = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10, check=False)
                out["driver"] = res.stdout.strip().splitlines()[0] if res.stdout.strip() else "unknown"
            except (OSError, subprocess.TimeoutExpired):
                out["driver"] = "unknown"
    return out


def shipped_profile(name: str) -> HardwareProfile | None:
    """The shipped profile calibration/<name>.yaml, or None when absent or unreadable (a known GPU's
    datasheet, whose peaks anchor η on a GPU; the torch profile of a CPU, for its llama.cpp profile)."""
    path = calibration_dir() / f"{name}.yaml"
    if not path.is_file():
        return None
    try:
        return load_profile(path)
    except InputError:
        return None


def run_micro(torch: Any, plan: Plan, device: str, timer: Timer, dtypes: tuple[str, ...], tick: Tick) -> list[Measurement]:
    """GEMM over T × the projections' (K, N) per dtype, bandwidth, attention, launch overhead."""
    rows = [micro.launch_overhead(torch, timer, device)]
    tick("launch overhead")
    rows.append(micro.copy_bandwidth(torch, timer, device, plan.bandwidth_bytes))
    rows.append(micro.read_bandwidth(torch, timer, device, plan.bandwidth_bytes))
    for dtype in dtypes:
        rows.append(micro.gemv_bandwidth(torch, timer, device, dtype, plan.bandwidth_bytes))
    tick("memory bandwidth")
    for dtype in dtypes:
        for k, n in gemm_shapes(plan):
            for t in plan.gemm_tokens:
                if 2.0 * t * k * n <= plan.gemm_max_flops:
                    rows.append(micro.gemm(torch, timer, device, dtype, t, k, n))
        tick(f"GEMM {dtype}")
        spec = next(iter(plan.models.values()))
        for c in plan.attention_contexts:
            rows.append(micro.attention(torch, timer, device, dtype, 1, spec.n_heads, spec.kv_heads, spec.head_dim, 1, c))
            rows.append(micro.attention(torch, timer, device, dtype, 1, spec.n_heads, spec.kv_heads, spec.head_dim, c, 0))
        tick(f"attention {dtype}")
    return rows


def gemm_shapes(plan: Plan) -> list[tuple[int, int]]:
    """(K, N) of every projection of the plan's models: QKV, O, gate/up, down, LM head."""
    shapes: list[tuple[int, int]] = []
    for s in plan.models.values():
        for kn in ((s.hidden, s.hidden + 2 * s.kv_dim), (s.hidden, s.hidden), (s.hidden, s.ffn),
                   (s.ffn, s.hidden), (s.hidden, s.vocab)):
            if kn not in shapes:
                shapes.append(kn)
    return shapes


def micro_steps(plan: Plan, dtypes: tuple[str, ...]) -> int:
    return 2 + 2 * len(dtypes)


def calibrate(opts: Options, tick: Tick | None = None, total: Callable[[int], None] | None = None) -> Outcome:
    """Measure the device, fit the cost model, return the profile (nothing written here)."""
    t0 = time.perf_counter()
    load_start = _load_average()
    torch = import_torch()
    torch.set_num_threads(opts.threads)
    cuda = opts.device.startswith("cuda")
    plan = cuda_plan(opts.quick) if cuda else cpu_plan(opts.quick, bf16=cpu_native_bf16())
    info = detect(torch, opts.device, opts.threads)
    gemm_dtypes = tuple(dict.fromkeys((*plan.dtypes, *REQUIRED_DTYPES)))
    if total is not None:
        total(micro_steps(plan, gemm_dtypes) + count_pass_steps(plan) + 1)
    tick = tick or (lambda _msg: None)
    timer = Timer(torch, opts.device, plan.repeats, warmup=1, budget_s=plan.budget_s)
    rows = run_micro(torch, plan, opts.device, timer, gemm_dtypes, tick)
    measured_peaks = {d: max(r.rate for r in rows if r.kind == "gemm" and r.dtype == d) for d in gemm_dtypes}
    measured_bw = max(r.rate for r in rows if r.kind == "bandwidth")
    launch_s = next(r.median_s for r in rows if r.kind == "launch")

    datasheet = shipped_profile(opts.name) if cuda else None
    if datasheet is not None:  # GPU: η relative to the datasheet peaks, comparable across profiles
        peaks = dict(datasheet.peak_flops_per_s)
        bandwidth = datasheet.memory_bandwidth_bytes_per_s
        link = datasheet.interconnect_bandwidth_bytes_per_s
        anchor = f"peaks and bandwidth from the datasheet profile {opts.name}.yaml"
    else:  # CPU / unknown GPU: the best measured GEMM and streaming rates are the 'peaks'
        peaks = measured_peaks
        bandwidth = measured_bw
        link = measured_bw if not cuda else 32e9  # CPU: no interconnect (shared memory); GPU: PCIe 4 x16
        anchor = (f"peak_flops_per_s = best measured GEMM per dtype at {opts.threads} thread(s); "
                  "memory bandwidth = best of a large copy (read+write), a large reduction and a large "
                  "matrix-vector product per dtype (bytes of the matrix)")

    rows += measure_passes(torch, plan, opts.device, timer, tick)
    fit = fit_passes(rows, peaks, bandwidth, overhead_guess_s=launch_s)
    tick("fit")
    primary = plan.dtypes[0]
    effs = fit.efficiency
    wall_s = time.perf_counter() - t0
    notes = (
        f"Measured by osdsim calibrate ({'quick' if opts.quick else 'full'} grid, {len(fit.rows)} real passes: "
        f"Llama models at {', '.join(s.name for s in plan.models.values())} dimensions, random weights, "
        f"transformers eager, KV cache in DynamicCache). {anchor}. Efficiencies fitted per dtype by least "
        f"squares on log time of the 'fit' passes; fit_errors are on held-out shapes (split=heldout in the "
        f"CSV) not used to fit. `efficiency` is {primary}; efficiency_by_dtype holds the others"
        f"{'' if cuda or 'bf16' in plan.dtypes else ' (bf16 passes not measured: no native bf16 on this CPU)'}. "
        f"Measured on this device: GEMM peak {', '.join(f'{d} {v / 1e9:.1f} GFLOP/s' for d, v in measured_peaks.items())}; "
        f"bandwidth {measured_bw / 1e9:.1f} GB/s; per-op launch {launch_s * 1e6:.1f} us. "
        f"allreduce_latency_s is not measured (single device). Wall time {wall_s:.0f} s; 1-minute load "
        f"average {load_start} at start, {_load_average()} at end ({info.cores or 'n/a'} CPU cores; other "
        f"processes competing for them slow and scatter the timings)."
    )
    profile = HardwareProfile(
        schema_version=SCHEMA_VERSION,
        name=opts.name,
        device=info.describe(),
        peak_flops_per_s=peaks,
        memory_bandwidth_bytes_per_s=bandwidth,
        memory_bytes=info.memory_bytes,
        interconnect_bandwidth_bytes_per_s=link,
        efficiency=effs[primary],
        efficiency_by_dtype={d: e for d, e in effs.items() if d != primary},
        provenance=Provenance(
            source="measured", measured_on=info.describe(),
            date=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), command=opts.command,
            efficiencies_are_defaults=False, notes=notes, versions=versions(torch, opts.device),
        ),
        fit_errors=fit.heldout,
    )
    return Outcome(profile, rows, fit, wall_s)


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (OSError, AttributeError):
        return "n/a"


def write_outputs(outcome: Outcome, path: Path, force: bool) -> tuple[Path, Path, Path | None]:
    """Write the YAML and the CSV beside it, atomically. An existing profile is kept as
    <name>.prev.yaml (and its CSV as <name>.prev.csv) unless `force`. Returns (yaml, csv, prev)."""
    csv_path = path.with_suffix(".csv")
    prev: Path | None = None
    if path.exists() and not force:
        prev = path.with_name(f"{path.stem}.prev.yaml")
        path.replace(prev)
        if csv_path.exists():
            csv_path.replace(csv_path.with_name(f"{path.stem}.prev.csv"))
    profile = outcome.profile.model_copy(
        update={"provenance": outcome.profile.provenance.model_copy(update={"raw_measurements": csv_path.name})}
    )
    atomic_write_text(csv_path, rows_to_csv(outcome.rows))
    header = (f"# Measured hardware profile written by `{profile.provenance.command}`.\n"
              f"# Raw measurements: {csv_path.name}. Held-out fit errors in fit_errors (percent).\n")
    atomic_write_text(path, header + dump_profile(profile))
    outcome.profile = profile
    return path, csv_path, prev
