"""Sweep files: a base scenario plus axes (grid or random samples) and repeats with seeds."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from osdsim.errors import InputError
from osdsim.scenario import load_model_file, read_yaml


class RandomAxis(BaseModel):
    model_config = ConfigDict(extra="forbid")

    low: float = Field(..., description="Lower bound.")
    high: float = Field(..., description="Upper bound.")
    log: bool = Field(False, description="Sample uniformly in log space.")
    integer: bool = Field(False, description="Round samples to integers.")

    @model_validator(mode="after")
    def _check(self) -> RandomAxis:
        if not self.high > self.low:
            raise ValueError("high: must be greater than low")
        if self.log and self.low <= 0:
            raise ValueError("low: must be > 0 for log sampling")
        return self


class SweepSpec(BaseModel):
    """`osdsim sweep` input."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("sweep", description="Sweep name (output directory prefix).")
    base: str | dict = Field(..., description="Base scenario: a YAML path (relative to this file) or an inline scenario.")
    mode: Literal["grid", "random"] = Field("grid", description="Cartesian grid over `axes`, or random samples.")
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="Grid axes: dotted field path → list of values (e.g. workload.rate_per_s: [1, 2, 4])."
    )
    random_axes: dict[str, RandomAxis] = Field(default_factory=dict, description="Random mode: field → range.")
    samples: int = Field(16, ge=1, le=1_000_000, description="Random mode: number of samples.")
    repeats: int = Field(1, ge=1, le=1000, description="Repeats per point with seeds seed, seed+1, ...")
    seed: int = Field(0, ge=0, description="Seed of the first repeat and of random sampling.")
    strategies: list[str] | None = Field(None, description="Strategies compared at each point (default: the base's compare).")

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if self.mode == "grid":
            if not self.axes:
                raise ValueError("axes: a grid sweep needs at least one axis")
            for k, v in self.axes.items():
                if not v:
                    raise ValueError(f"axes.{k}: needs at least one value")
        elif not self.random_axes:
            raise ValueError("random_axes: a random sweep needs at least one axis")
        return self


@dataclass(frozen=True)
class Point:
    """One simulation to run: the overrides applied to the base scenario."""

    point_id: str
    index: int
    overrides: dict[str, Any]
    repeat: int
    seed: int


def load_sweep(path: Path) -> tuple[SweepSpec, dict, Path]:
    """(spec, base scenario dict, base directory)."""
    spec = load_model_file(path, SweepSpec, "sweep")
    base_dir = path.resolve().parent
    if isinstance(spec.base, str):
        base_path = Path(spec.base)
        if not base_path.is_absolute():
            base_path = base_dir / base_path
        base = read_yaml(base_path)
        if not isinstance(base, dict):
            raise InputError(f"{base_path}: base scenario must be a YAML mapping")
        base_dir = base_path.resolve().parent
    else:
        base = spec.base
    return spec, base, base_dir


def points(spec: SweepSpec) -> list[Point]:
    combos: list[dict[str, Any]] = []
    if spec.mode == "grid":
        keys = list(spec.axes)
        for values in itertools.product(*(spec.axes[k] for k in keys)):
            combos.append(dict(zip(keys, values, strict=True)))
    else:
        rng = np.random.default_rng([spec.seed, 0x5EE9])
        for _ in range(spec.samples):
            combo = {}
            for k, ax in spec.random_axes.items():
                if ax.log:
                    x = math.exp(rng.uniform(math.log(ax.low), math.log(ax.high)))
                else:
                    x = rng.uniform(ax.low, ax.high)
                combo[k] = int(round(x)) if ax.integer else float(f"{x:.6g}")
            combos.append(combo)
    out = []
    for i, combo in enumerate(combos):
        for r in range(spec.repeats):
            seed = spec.seed + r
            key = json.dumps({"o": combo, "seed": seed}, sort_keys=True, default=str)
            pid = hashlib.sha1(key.encode()).hexdigest()[:12]
            out.append(Point(pid, i, dict(combo), r, seed))
    return out
