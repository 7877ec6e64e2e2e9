"""Timelines (issue 12 item 6): Chrome / Perfetto trace JSON of a simulated twin and of a recorded serve
run, in one event schema, so both load side by side in ui.perfetto.dev or chrome://tracing.

Schema (Trace Event Format, times in µs from the stream start): one process per run (pid; its name
says measured or predicted), per replica r two threads: tid 2r "replica r serving" and tid 2r+1
"replica r training". Complete events ("ph": "X") named
  iteration (args: batch, prefill_tokens, k, emitted), with nested prefill / draft / verify slices where
            the run measured them (the simulator prices an iteration as one duration: no nesting),
  idle      a gap of at least 1 ms between iterations on the serving thread,
  train     a training unit (server) or step (simulator, inline / harvest span / dedicated trainer),
and instant events ("ph": "i") "step skipped" on the training thread.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from osdsim.errors import atomic_write_text

IDLE_MIN_S = 1e-3


def _us(t: float) -> float:
    return round(float(t) * 1e6, 3)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _meta(pid: int, name: str, replicas: list[int]) -> list[dict]:
    ev = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": name}}]
    for r in replicas:
        ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 2 * r, "args": {"name": f"replica {r} serving"}})
        ev.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": 2 * r + 1,
                   "args": {"name": f"replica {r} training"}})
    return ev


def _x(name: str, pid: int, tid: int, t0: float, dur: float, args: dict | None = None) -> dict:
    return {"name": name, "cat": name, "ph": "X", "pid": pid, "tid": tid, "ts": _us(t0), "dur": _us(max(dur, 0.0)),
            "args": args or {}}


def _idle(spans: list[tuple[float, float]], pid: int, tid: int) -> list[dict]:
    out = []
    spans = sorted(spans)
    for (_, e0), (s1, _) in zip(spans, spans[1:], strict=False):
        if s1 - e0 >= IDLE_MIN_S:
            out.append(_x("idle", pid, tid, e0, s1 - e0))
    return out


def sim_trace(result: Any, name: str = "predicted (osdsim)", pid: int = 2) -> dict:
    """Trace of a simulated run (a Result with the full iteration log and training events)."""
    it = result.iterations
    events: list[dict] = []
    replicas = sorted({int(r) for r in it["replica"]}) if len(it) and "replica" in it else [0]
    events += _meta(pid, name, replicas)
    if len(it) and "kind" in it and (it["kind"] == "bin").any():
        raise ValueError("the simulated run has a binned iteration log; set report.iteration_log: full")
    spans: dict[int, list[tuple[float, float]]] = {r: [] for r in replicas}
    for row in it.itertuples(index=False):
        r = int(getattr(row, "replica", 0))
        t0, d = float(row.t_s), float(row.duration_s)
        if row.kind == "train":
            events.append(_x("train", pid, 2 * r + 1, t0, d, {"placement": "inline"}))
        elif row.kind == "publish":
            events.append(_x("publish draft", pid, 2 * r + 1, t0, d, {"placement": "inline"}))
        else:
            events.append(_x("iteration", pid, 2 * r, t0, d, {
                "batch": int(row.decode_seqs), "prefill_tokens": int(row.prefill_tokens), "k": int(row.k),
                "emitted": int(row.emitted_tokens)}))
        spans[r].append((t0, t0 + d))
    for r in replicas:
        events += _idle(spans[r], pid, 2 * r)
    tr = result.training
    placement = result.summary.get("training", {}).get("placement")
    for row in tr.itertuples(index=False):
        if row.kind == "done" and placement in ("harvest", "dedicated"):
            d = float(row.duration_s)
            events.append(_x("train", pid, 1, float(row.time_s) - d, d, {"placement": placement}))
        elif row.kind == "skipped":
            events.append({"name": "step skipped", "ph": "i", "s": "t", "pid": pid, "tid": 1, "ts": _us(row.time_s)})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"source": "osdsim simulator", "name": name}}


def _csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def serve_run_trace(run_dir: Path, name: str = "measured (real server)", pid: int = 1) -> dict:
    """Trace of a recorded serve run from its iterations.csv, training_units.csv and training.csv."""
    its = _csv(run_dir / "iterations.csv")
    units = _csv(run_dir / "training_units.csv")
    training = _csv(run_dir / "training.csv")
    try:
        placement = json.loads((run_dir / "summary.json").read_text()).get("placement")
    except (OSError, ValueError):
        placement = None
    events = _meta(pid, name, [0])
    spans = []
    for row in its:
        t0, t1 = _num(row["start_s"]), _num(row["end_s"])
        events.append(_x("iteration", pid, 0, t0, t1 - t0, {
            "batch": int(_num(row["batch_size"])), "prefill_tokens": int(_num(row["prefill_tokens"])),
            "k": int(_num(row["k"])), "emitted": int(_num(row["emitted"]))}))
        t = t0
        for part in ("prefill", "draft", "verify"):
            d = _num(row.get(f"{part}_s"))
            if math.isfinite(d) and d > 0:
                events.append(_x(part, pid, 0, t, d))
                t += d
        spans.append((t0, t1))
    events += _idle(spans, pid, 0)
    if placement == "dedicated":
        for row in training:
            s, e = _num(row.get("started_s")), _num(row.get("done_s"))
            if row.get("status") == "done" and math.isfinite(s) and math.isfinite(e):
                events.append(_x("train", pid, 1, s, e - s, {"placement": "dedicated", "step": int(_num(row["step"]))}))
    else:
        for row in units:
            s, e = _num(row["start_s"]), _num(row["end_s"])
            events.append(_x("train", pid, 1, s, e - s, {"placement": placement, "step": int(_num(row["step"])),
                                                        "unit": int(_num(row["unit"])),
                                                        "preempted": int(_num(row["preempted"]))}))
    for row in training:
        if row.get("status") == "skipped":
            events.append({"name": "step skipped", "ph": "i", "s": "t", "pid": pid, "tid": 1, "ts": _us(_num(row["due_s"]))})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"source": "osdsim real serve", "name": name}}


def combine(*traces: dict) -> dict:
    """Several traces (distinct pids) in one file: the side-by-side view."""
    return {"traceEvents": [e for t in traces for e in t["traceEvents"]], "displayTimeUnit": "ms",
            "otherData": {"combined": [t.get("otherData", {}).get("name") for t in traces]}}


def write_trace(trace: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(trace, separators=(",", ":")) + "\n")
    return path
