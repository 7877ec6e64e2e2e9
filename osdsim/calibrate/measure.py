"""What a calibration measures: one `Measurement` row per timed shape, and the timer.

Rows are plain data (written to the CSV beside the profile); only `Timer` touches torch, and it
receives the torch module from its caller so importing this file needs no torch.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(slots=True)
class Measurement:
    """One timed shape. `kind` is gemm | bandwidth | attention | launch | pass | canary.

    For passes (`kind='pass'`): `pass_type` is decode | verify | prefill | train; `split` is fit or
    heldout; the shape is B = `batch` sequences of `q` new tokens after `context` cached tokens
    (train: B sequences of length q). The aggregates (tokens, logit_tokens, context_tokens,
    attention_pairs) are those of osdsim.cost.model.BatchShape.
    """

    kind: str
    dtype: str
    median_s: float
    repeats: int
    model: str = ""
    n_layers: int = 0
    pass_type: str = ""
    split: str = ""
    batch: int = 0
    context: int = 0
    q: int = 0
    tokens: int = 0
    logit_tokens: int = 0
    context_tokens: float = 0.0
    attention_pairs: float = 0.0
    trainable_params: int = 0
    m: int = 0  # GEMM rows (tokens) / attention queries
    k: int = 0
    n: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    min_s: float = 0.0
    max_s: float = 0.0
    predicted_s: float = 0.0  # the fitted cost model's price (passes; filled after the fit)
    raw_median_s: float = 0.0  # median before host-speed correction (llama.cpp passes; 0 = not corrected)

    @property
    def rate(self) -> float:
        """Achieved FLOP/s (gemm, attention) or bytes/s (bandwidth)."""
        if self.median_s <= 0:
            return 0.0
        return (self.flops if self.kind != "bandwidth" else self.bytes) / self.median_s


CSV_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Measurement))


def rows_to_csv(rows: list[Measurement]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})
    return buf.getvalue()


def rows_from_csv(text: str) -> list[Measurement]:
    types = {f.name: f.type for f in fields(Measurement)}
    out = []
    for raw in csv.DictReader(io.StringIO(text)):
        kw: dict[str, Any] = {}
        for k, v in raw.items():
            t = types[k]
            kw[k] = int(float(v)) if t == "int" else float(v) if t == "float" else v
        out.append(Measurement(**kw))
    return out


@dataclass(frozen=True, slots=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


class Timer:
    """Median wall time of a callable: warm-up, device synchronize around each call, repeats.

    `prepare()` makes the call's fresh inputs outside the timed region; `run(inputs)` is timed;
    `reset(inputs)` (optional, untimed) restores state such as a KV cache.
    """

    def __init__(self, torch: Any, device: str, repeats: int, warmup: int = 1, budget_s: float = 2.0):
        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.repeats = repeats
        self.warmup = warmup
        self.budget_s = budget_s

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(
        self, prepare: Callable[[], Any], run: Callable[[Any], Any], reset: Callable[[Any], None] | None = None
    ) -> float:
        """Seconds of one synchronized call of run(prepare()); reset() runs untimed afterwards."""
        inputs = prepare()
        self.sync()
        t0 = time.perf_counter()
        run(inputs)
        self.sync()
        dt = time.perf_counter() - t0
        if reset is not None:
            reset(inputs)
        return dt

    def time(
        self, prepare: Callable[[], Any], run: Callable[[Any], Any], reset: Callable[[Any], None] | None = None
    ) -> Timing:
        times: list[float] = []
        spent = 0.0
        for i in range(self.warmup + self.repeats):
            dt = self.once(prepare, run, reset)
            if i >= self.warmup:
                times.append(dt)
                spent += dt
                # Enough repeats for a median once the budget is spent (at least 3).
                if len(times) >= 3 and spent > self.budget_s:
                    break
        return Timing(statistics.median(times), min(times), max(times), len(times))
