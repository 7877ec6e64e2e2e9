"""The shipped validation suites (validate/*.yaml): list them and pick the one for this device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

SUITE_DIR = Path(__file__).resolve().parents[2] / "validate"
DEFAULT_CPU = "cpu-smollm2.yaml"
DEFAULT_GPU = "gpu.yaml"


@dataclass(frozen=True)
class SuiteInfo:
    name: str
    path: Path
    description: str
    device: str  # cpu | cuda
    kind: str  # batch1 | load


def suite_device(doc: dict) -> str:
    """cuda when the suite's real runs ask for a GPU (fit.device cuda/cuda:N), else cpu."""
    dev = str((doc.get("fit") or {}).get("device", "cpu"))
    return "cuda" if dev.startswith("cuda") else "cpu"


def list_suites(directory: Path = SUITE_DIR) -> list[SuiteInfo]:
    out = []
    for p in sorted(directory.glob("*.yaml")):
        try:
            doc = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(doc, dict) or "fit" not in doc:
            continue
        out.append(SuiteInfo(str(doc.get("name", p.stem)), p, str(doc.get("description") or ""),
                             suite_device(doc), "load" if "runs" in doc else "batch1"))
    return out


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken CUDA install counts as none
        return False


def default_suite(directory: Path = SUITE_DIR, cuda: bool | None = None) -> tuple[Path, str]:
    """(suite path, why): gpu.yaml when torch sees CUDA, cpu-smollm2.yaml otherwise."""
    cuda = cuda_available() if cuda is None else cuda
    if cuda:
        return directory / DEFAULT_GPU, "torch sees a CUDA device"
    return directory / DEFAULT_CPU, "no CUDA device here (CPU only)"
