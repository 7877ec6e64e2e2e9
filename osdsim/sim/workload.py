"""Workload generation: arrival times, domains (with a shift schedule) and lengths.

The workload depends only on the scenario's workload section and seed, never on the strategy, so
every strategy of a comparison sees the same arrivals and lengths (common random numbers).
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from osdsim.errors import InputError
from osdsim.scenario import (
    EmpiricalLength,
    FixedLength,
    LognormalLength,
    Scenario,
    UniformLength,
    Workload,
)

MAX_GENERATED_REQUESTS = 50_000_000


@dataclass(frozen=True)
class Requests:
    """The request stream, one entry per request in arrival order (arrays of length N)."""

    arrival_s: np.ndarray  # float64, non-decreasing
    domain: np.ndarray  # int64 index into domain_names
    prompt_tokens: np.ndarray  # int64 ≥ 1
    output_tokens: np.ndarray  # int64 ≥ 1
    phase: np.ndarray  # int64 index into phase_names (0 when there is no shift)
    domain_names: tuple[str, ...]
    phase_names: tuple[str, ...]
    phase_bounds: tuple[tuple[float, float], ...]  # (start, end) per phase, in the schedule's unit
    phase_unit: str  # "requests" or "seconds"
    think_s: np.ndarray | None = None  # closed-loop trace replay: client pause before each request (s)

    def __len__(self) -> int:
        return int(self.arrival_s.size)


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("arrivals", "domains", "lengths")
    children = np.random.SeedSequence([seed, 0x05D5]).spawn(len(names))
    return {n: np.random.default_rng(c) for n, c in zip(names, children, strict=True)}


# --- arrivals ----------------------------------------------------------------------------------------
def _unit_renewal(rng: np.random.Generator, n: int, kind: str, cv: float) -> np.ndarray:
    """Cumulative event times of a unit-rate renewal process (Poisson or Gamma with CV)."""
    if kind == "poisson":
        gaps = rng.exponential(1.0, n)
    else:  # gamma with mean 1 and CV cv: shape = 1/cv², scale = cv²
        shape = 1.0 / (cv * cv)
        gaps = rng.gamma(shape, 1.0 / shape, n)
    return np.cumsum(gaps)


def _rescale(unit_times: np.ndarray, r0: float, r1: float | None, duration: float | None) -> np.ndarray:
    """Time-rescaling: map unit-rate event times through Λ⁻¹ for rate r(t).

    Constant rate: t = u/r0. Linear ramp r(t) = r0 + (r1−r0)·t/D on [0, D] (then r1):
    Λ(t) = r0·t + (r1−r0)·t²/(2D); solve Λ(t) = u for t.
    """
    if r1 is None or duration is None or r1 == r0:
        return unit_times / r0
    slope = (r1 - r0) / duration
    lam_d = r0 * duration + slope * duration**2 / 2
    u = unit_times
    out = np.empty_like(u)
    inside = u <= lam_d
    # slope·t²/2 + r0·t − u = 0 → t = (−r0 + sqrt(r0² + 2·slope·u)) / slope
    ui = u[inside]
    out[inside] = (-r0 + np.sqrt(np.maximum(r0 * r0 + 2 * slope * ui, 0.0))) / slope
    out[~inside] = duration + (u[~inside] - lam_d) / r1
    return out


def _expected_count(w: Workload) -> int:
    if w.num_requests is not None:
        return w.num_requests
    if w.duration_s is not None:
        r_mean = w.rate_per_s if w.rate_ramp_to_per_s is None else (w.rate_per_s + w.rate_ramp_to_per_s) / 2
        mean = r_mean * w.duration_s
        return int(mean + 6 * math.sqrt(mean) + 16)
    return int(w.shift.phases[-1].end)  # type: ignore[union-attr]


def generate_arrivals(w: Workload, rng: np.random.Generator) -> np.ndarray:
    n_cap = w.num_requests
    if n_cap is None and w.shift is not None and w.shift.unit == "requests" and w.duration_s is None:
        n_cap = int(w.shift.phases[-1].end)
    n = _expected_count(w)
    if n > MAX_GENERATED_REQUESTS:
        raise InputError(f"workload: {n:,} requests exceed the limit of {MAX_GENERATED_REQUESTS:,}")
    unit = _unit_renewal(rng, n, w.arrival, w.cv)
    times = _rescale(unit, w.rate_per_s, w.rate_ramp_to_per_s, w.duration_s)  # type: ignore[arg-type]
    if w.duration_s is not None:
        times = times[times < w.duration_s]
    if n_cap is not None:
        times = times[:n_cap]
    return times


# --- domains and phases ------------------------------------------------------------------------
def _mix_matrix(w: Workload, positions: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-request domain weights (N × D) and phase index (N) at each request's position."""
    d = len(names)
    idx = {n: i for i, n in enumerate(names)}

    def vec(m: dict[str, float]) -> np.ndarray:
        v = np.zeros(d)
        for k, x in m.items():
            v[idx[k]] = x
        return v

    if w.shift is None:
        mix = vec(w.mix) if w.mix is not None else np.full(d, 1.0 / d)
        return np.broadcast_to(mix, (positions.size, d)), np.zeros(positions.size, dtype=np.int64)
    phases = w.shift.phases
    starts = np.array([p.start for p in phases])
    ends = np.array([p.end for p in phases])
    m0 = np.stack([vec(p.mix) for p in phases])
    m1 = np.stack([vec(p.mix_end if p.mix_end is not None else p.mix) for p in phases])
    ph = np.clip(np.searchsorted(starts, positions, side="right") - 1, 0, len(phases) - 1)
    frac = np.clip((positions - starts[ph]) / (ends[ph] - starts[ph]), 0.0, 1.0)[:, None]
    return (1 - frac) * m0[ph] + frac * m1[ph], ph.astype(np.int64)


def _sample_categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One category per row of `weights` (rows sum to 1), by inverse CDF."""
    u = rng.random(weights.shape[0])  # drawn even for one domain, so streams stay aligned
    if weights.shape[1] == 1:
        return np.zeros(weights.shape[0], dtype=np.int64)
    cdf = np.cumsum(weights, axis=1)
    cdf[:, -1] = np.inf
    return (u[:, None] >= cdf).sum(axis=1).astype(np.int64)


# --- lengths -------------------------------------------------------------------------------------
def read_length_file(path: Path) -> np.ndarray:
    """The token counts of an empirical length file (read-only: a file is parsed once per version)."""
    if not path.is_file():
        raise InputError(f"{path}: empirical length file not found")
    st = path.stat()
    return _read_length_file(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _read_length_file(name: str, _mtime_ns: int, _size: int) -> np.ndarray:
    values = _parse_length_file(Path(name))
    values.flags.writeable = False
    return values


def _parse_length_file(path: Path) -> np.ndarray:
    values: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if lines and not lines[0].replace(".", "", 1).isdigit():
        header = [h.strip() for h in lines[0].split(",")]
        if "tokens" not in header:
            raise InputError(f"{path}: expected one integer per line or a CSV with a 'tokens' column")
        col = header.index("tokens")
        lines = [ln.split(",")[col] for ln in lines[1:]]
    try:  # all lines at once; the loop below finds the line to report when one is not a count
        counts = np.asarray(lines, dtype=np.float64)
    except ValueError:
        counts = np.empty(0)
    if counts.size and np.isfinite(counts).all() and counts.min() >= 1:
        return np.trunc(counts).astype(np.int64)  # int(float(line)) of every line
    for i, ln in enumerate(lines):
        try:
            v = int(float(ln))
        except ValueError:
            raise InputError(f"{path}: line {i + 1}: not a token count ({ln[:30]!r})") from None
        if v < 1:
            raise InputError(f"{path}: line {i + 1}: token counts must be >= 1")
        values.append(v)
    if not values:
        raise InputError(f"{path}: no token counts in file")
    return np.asarray(values, dtype=np.int64)


def sample_lengths(dist, n: int, rng: np.random.Generator, scenario: Scenario) -> np.ndarray:
    if isinstance(dist, FixedLength):
        return np.full(n, dist.value_tokens, dtype=np.int64)
    if isinstance(dist, UniformLength):
        return rng.integers(dist.low_tokens, dist.high_tokens + 1, n).astype(np.int64)
    if isinstance(dist, LognormalLength):
        sigma2 = math.log1p(dist.cv**2)
        mu = math.log(dist.mean_tokens) - sigma2 / 2
        x = np.rint(rng.lognormal(mu, math.sqrt(sigma2), n))
        hi = dist.max_tokens if dist.max_tokens is not None else np.inf
        return np.clip(x, dist.min_tokens, hi).astype(np.int64)
    if isinstance(dist, EmpiricalLength):
        values = read_length_file(scenario.resolve_path(dist.file))
        return values[rng.integers(0, values.size, n)]
    raise TypeError(f"unknown length distribution {dist!r}")


# --- traces -------------------------------------------------------------------------------------
TRACE_COLUMNS = ("arrival_s", "domain", "prompt_tokens", "output_tokens")


def read_trace(path: Path, domains: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """(arrival_s, domain index, prompt_tokens, output_tokens, think_s) sorted by arrival (stable).

    think_s (optional column, default 0) is the client's pause before a request in a closed-loop replay."""
    if not path.is_file():
        raise InputError(f"workload.trace_file: {path} not found")
    idx = {n: i for i, n in enumerate(domains)}
    arr, dom, pr, out, think = [], [], [], [], []
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            missing = [c for c in TRACE_COLUMNS if c not in fields]
            if missing:
                raise InputError(f"{path}: trace is missing column {missing[0]!r} (needs {', '.join(TRACE_COLUMNS)})")
            has_think = "think_s" in fields
            for line, row in enumerate(reader, start=2):
                try:
                    a = float(row["arrival_s"])
                    p = int(float(row["prompt_tokens"]))
                    o = int(float(row["output_tokens"]))
                    z = float(row["think_s"]) if has_think and row["think_s"] not in (None, "") else 0.0
                except (TypeError, ValueError):
                    raise InputError(
                        f"{path}: line {line}: arrival_s/prompt_tokens/output_tokens/think_s must be numbers"
                    ) from None
                if not math.isfinite(a) or a < 0 or p < 1 or o < 1:
                    raise InputError(f"{path}: line {line}: need arrival_s >= 0 and token counts >= 1")
                if not math.isfinite(z) or z < 0:
                    raise InputError(f"{path}: line {line}: think_s must be a number >= 0")
                d = row["domain"]
                if d not in idx:
                    raise InputError(f"{path}: line {line}: domain {d!r} is not in workload.domains {sorted(idx)}")
                arr.append(a)
                dom.append(idx[d])
                pr.append(p)
                out.append(o)
                think.append(z)
    except UnicodeDecodeError:
        raise InputError(f"{path}: trace is not UTF-8 text") from None
    if not arr:
        raise InputError(f"{path}: trace has no requests")
    order = np.argsort(np.asarray(arr), kind="stable")
    return (
        np.asarray(arr)[order],
        np.asarray(dom, dtype=np.int64)[order],
        np.asarray(pr, dtype=np.int64)[order],
        np.asarray(out, dtype=np.int64)[order],
        np.asarray(think, dtype=float)[order],
    )


# --- the stream ----------------------------------------------------------------------------------
def generate_requests(scenario: Scenario) -> Requests:
    """The request stream of a scenario (deterministic in scenario.seed)."""
    w = scenario.workload
    names = tuple(w.domains)
    rngs = _streams(scenario.seed)
    if w.shift is not None:
        phase_names = tuple(
            p.name or max((p.mix_end or p.mix).items(), key=lambda kv: kv[1])[0] for p in w.shift.phases
        )
        bounds = tuple((p.start, p.end) for p in w.shift.phases)
        unit = w.shift.unit
    else:
        phase_names, bounds, unit = ("all",), ((0.0, math.inf),), "requests"

    if w.arrival == "trace":
        arrival, domain, prompt, output, think = read_trace(scenario.resolve_path(w.trace_file), names)  # type: ignore[arg-type]
        positions = np.arange(arrival.size, dtype=float) if unit == "requests" else arrival
        _, phase = _mix_matrix(w, positions, names)
        return Requests(arrival, domain, prompt, output, phase, names, phase_names, bounds, unit,
                        think if w.trace_replay == "closed" else None)

    arrival = generate_arrivals(w, rngs["arrivals"])
    n = arrival.size
    positions = np.arange(n, dtype=float) if unit == "requests" else arrival
    weights, phase = _mix_matrix(w, positions, names)
    domain = _sample_categorical(rngs["domains"], np.ascontiguousarray(weights))
    prompt = np.empty(n, dtype=np.int64)
    output = np.empty(n, dtype=np.int64)
    for i, name in enumerate(names):
        mask = domain == i
        count = int(mask.sum())
        spec = w.domains[name]
        prompt[mask] = sample_lengths(spec.prompt_tokens, count, rngs["lengths"], scenario)
        output[mask] = sample_lengths(spec.output_tokens, count, rngs["lengths"], scenario)
    return Requests(arrival, domain, prompt, output, phase, names, phase_names, bounds, unit)
