"""Run sweep points on a local process pool or on Ray; stream rows to disk; resume.

Every point is independent and deterministic (its seed is part of the point), so the table does not
depend on the backend, the worker count or the completion order: rows are sorted by point at the end.
Rows are appended to `points.jsonl` (one fsync'ed line per finished point, the resume log) and the
tables `results.parquet` / `results.csv` are rebuilt atomically from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import pandas as pd

from osdsim.errors import InputError, atomic_write_bytes, atomic_write_text
from osdsim.sweep.spec import Point, SweepSpec

ProgressFn = Callable[[int, int], None]
LOG = "points.jsonl"


# --- one point (runs in a worker) -------------------------------------------------------------------
def _flatten(cmp) -> dict[str, Any]:
    row: dict[str, Any] = {}
    speed = {v["variant"]: v for v in cmp.summary["variants"]}
    for name, res in cmp.results.items():
        s = res.summary
        p = f"{name}."
        row[p + "alpha"] = s["speculation"]["alpha_measured"]
        row[p + "tokens_per_step"] = s["speculation"]["mean_tokens_per_step"]
        row[p + "mean_k"] = s["speculation"]["mean_k"]
        row[p + "ttft_p50_s"] = s["latency_s"]["ttft"]["p50"]
        row[p + "tpot_p50_s"] = s["latency_s"]["tpot"]["p50"]
        row[p + "e2e_p50_s"] = s["latency_s"]["e2e"]["p50"]
        row[p + "e2e_p99_s"] = s["latency_s"]["e2e"]["p99"]
        row[p + "throughput_tokens_per_s"] = s["throughput"]["output_tokens_per_s"]
        row[p + "goodput_requests_per_s"] = s["throughput"]["goodput_requests_per_s"]
        row[p + "busy_fraction"] = s["utilisation"]["busy_fraction"]
        row[p + "unfinished"] = s["requests"]["unfinished"]
        row[p + "speedup_e2e_mean"] = speed[name].get("speedup_e2e_mean")
        row[p + "speedup_tpot_mean"] = speed[name].get("speedup_tpot_mean")
        t = s["training"]
        if t.get("placement"):
            row[p + "steps_skipped"] = t["steps_skipped"]
            row[p + "training_latency_cost_s"] = t["latency_cost_s"]
            row[p + "train_flops_used"] = t["train_work_flops_used"]
            row[p + "spare_flops_available"] = t["spare_flops_available"]
            if "cost_neutral" in t:
                row[p + "cost_neutral"] = t["cost_neutral"]
                row[p + "stalled_at_rate_per_s"] = t["stalled_at_rate_per_s"]
        rec = [r["recovered_after_requests"] for r in s["recovery"]]
        if rec:
            row[p + "recovery_requests_max"] = None if any(r is None for r in rec) else max(rec)
            secs = [r["recovered_after_s"] for r in s["recovery"]]
            row[p + "recovery_s_max"] = None if any(x is None for x in secs) else max(secs)
    return row


def run_point(base: dict, base_dir: str, point: Point, strategies: list[str] | None) -> dict[str, Any]:
    """Simulate one point; never raises: a failure becomes a row with status 'failed'."""
    from osdsim.api import compare
    from osdsim.scenario import apply_overrides, scenario_from_dict

    t0 = time.perf_counter()
    shown = {k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, sort_keys=True)
             for k, v in point.overrides.items()}
    row: dict[str, Any] = {"point_id": point.point_id, "point": point.index, "repeat": point.repeat,
                           "seed": point.seed, **shown}
    try:
        data = apply_overrides(base, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                      for k, v in point.overrides.items()])
        data["seed"] = point.seed
        sc = scenario_from_dict(data, Path(base_dir), source=f"point {point.point_id}")
        cmp = compare(sc, strategies=strategies)
        row.update(_flatten(cmp))
        row["status"] = "ok"
        row["error"] = None
    except InputError as exc:
        row["status"] = "failed"
        row["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - a point's crash must not stop the sweep
        row["status"] = "failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["_wall_s"] = time.perf_counter() - t0
    return row


# --- the results directory ------------------------------------------------------------------------
def read_log(out_dir: Path) -> list[dict]:
    path = out_dir / LOG
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by an interrupt: that point reruns
    return rows


def _append(out_dir: Path, row: dict) -> None:
    with open(out_dir / LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, allow_nan=False, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def build_table(rows: list[dict]) -> pd.DataFrame:
    latest: dict[str, dict] = {}
    for r in rows:
        latest[r["point_id"]] = r  # a rerun after resume supersedes a failed attempt
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in latest.values()])
    if df.empty:
        return df
    return df.sort_values(["point", "repeat"], kind="stable").reset_index(drop=True)


def write_tables(out_dir: Path, rows: list[dict]) -> pd.DataFrame:
    df = build_table(rows)
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out_dir / "results.parquet", buf.getvalue())
    atomic_write_text(out_dir / "results.csv", df.to_csv(index=False))
    return df


# --- backends --------------------------------------------------------------------------------------
def _run_pool(todo: list[Point], base: dict, base_dir: str, strategies, workers: int, on_row) -> None:
    if workers <= 1:
        for p in todo:
            on_row(run_point(base, base_dir, p, strategies))
        return
    with ProcessPoolExecutor(max_workers=workers) as ex:
        pending = {ex.submit(run_point, base, base_dir, p, strategies) for p in todo}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    on_row(f.result())
        except BaseException:
            for f in pending:
                f.cancel()
            ex.shutdown(wait=False, cancel_futures=True)
            raise


def _run_ray(todo: list[Point], base: dict, base_dir: str, strategies, workers: int, address: str | None, on_row) -> None:
    try:
        import ray
    except ImportError:
        raise InputError("--backend ray: Ray is not installed; pip install 'osdsim[ray]' (or pip install ray)") from None
    started_here = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = workers
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"--address {address or 'local'}: cannot start or reach Ray ({str(exc).splitlines()[0]})") from None
        started_here = True
    try:
        remote = ray.remote(num_cpus=1)(run_point)
        base_ref = ray.put(base)
        pending = [remote.remote(base_ref, base_dir, p, strategies) for p in todo]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                on_row(ray.get(ref))
    finally:
        if started_here:
            ray.shutdown()


def run_sweep(
    spec: SweepSpec,
    base: dict,
    base_dir: Path,
    points: list[Point],
    out_dir: Path,
    workers: int = 1,
    backend: str = "pool",
    address: str | None = None,
    resume: bool = False,
    progress: ProgressFn | None = None,
) -> tuple[pd.DataFrame, int, int]:
    """Run the missing points; returns (table, points run now, points skipped as already done)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out_dir}: cannot create ({exc.strerror or exc})") from None
    previous = read_log(out_dir)
    if previous and not resume:
        raise InputError(f"--out {out_dir}: already holds sweep results; use --resume to continue or another --out")
    done_ok = {r["point_id"] for r in previous if r.get("status") == "ok"}
    todo = [p for p in points if p.point_id not in done_ok]
    skipped = len(points) - len(todo)
    (out_dir / "sweep.json").write_text(json.dumps(spec.model_dump(mode="json"), indent=2))
    rows = list(previous)
    finished = [skipped]

    def on_row(row: dict) -> None:
        _append(out_dir, row)
        rows.append(row)
        finished[0] += 1
        if progress is not None:
            progress(finished[0], len(points))

    if progress is not None:
        progress(skipped, len(points))
    strategies = spec.strategies
    try:
        if backend == "ray":
            _run_ray(todo, base, str(base_dir), strategies, workers, address, on_row)
        else:
            _run_pool(todo, base, str(base_dir), strategies, workers, on_row)
    finally:
        table = write_tables(out_dir, rows)
    return table, len(todo), skipped
