"""Import measured kernel timings for `osdsim calibrate --from` (issue 13): Vidur's profiling CSVs
and osdsim's own raw calibration CSV. Plain csv + numpy, no torch.

Layouts, told apart by their header (the columns they must have):

| layout | columns | device from |
|---|---|---|
| vidur-mlp | `num_tokens`, `num_tensor_parallel_workers`, model dims `n_head, n_kv_head, n_embd, n_expanded_embd, vocab_size, use_gated_mlp`, `time_stats.<op>.median` (ms) for the GEMMs `attn_pre_proj, attn_post_proj, mlp_up_proj, mlp_down_proj` and the non-GEMM ops present | `compute/<device>/<org>/<model>/mlp.csv` |
| vidur-attention | `n_embd, n_q_head, n_kv_head, num_tensor_parallel_workers, batch_size, prefill_chunk_size, kv_cache_size, is_prefill`, `time_stats.attn_decode.median` / `attn_prefill` (+ reshapes, KV save) | `compute/<device>/...` |
| vidur-all-reduce / vidur-send-recv | `time_stats.all_reduce.median` (or `send_recv`), `num_workers`, `size` (bytes, as Vidur's predictor reads it: fp16 tokens = size / (2·d)) | `network/<device>_<topology>/` |
| vidur-cpu-overhead | `schedule_median, sampler_e2e_median, prepare_inputs_e2e_median, process_model_outputs_median, model_name, batch_size, tensor_parallel_degree` | `cpu_overheads-<device>.csv` |
| osdsim-raw | the columns of osdsim.calibrate.measure.CSV_FIELDS | the sibling `<stem>.yaml`'s `name`, else the file stem |
| trace (skipped) | `num_prefill_tokens, num_decode_tokens` | — |

Every problem is an InputError naming the file: not a known layout, a device other than `--gpu`,
a column a fit needs missing, a value that is not a number.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from osdsim.calibrate.measure import CSV_FIELDS, Measurement, rows_from_csv
from osdsim.errors import InputError

MS = 1e-3
LINEAR_OPS: tuple[str, ...] = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
NONGEMM_OPS: tuple[str, ...] = ("input_layernorm", "attn_rope", "post_attention_layernorm", "mlp_act", "add")
PASS_OPS: tuple[str, ...] = ("emb",)  # once per pass, not per layer
MLP_DIMS: tuple[str, ...] = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")
ATTENTION_COLS: tuple[str, ...] = (
    "n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers", "batch_size", "prefill_chunk_size",
    "kv_cache_size", "is_prefill",
)
ATTENTION_EXTRA_OPS: tuple[str, ...] = ("attn_input_reshape", "attn_output_reshape", "attn_kv_cache_save")
CPU_PARTS: tuple[str, ...] = ("schedule_median", "sampler_e2e_median", "prepare_inputs_e2e_median",
                              "process_model_outputs_median")
CPU_COLS: tuple[str, ...] = (*CPU_PARTS, "model_name", "batch_size", "tensor_parallel_degree")
TRACE_COLS: tuple[str, ...] = ("num_prefill_tokens", "num_decode_tokens")
# `--gpu` name -> the device name Vidur's paths use.
DEVICE_ALIASES: dict[str, str] = {"a100": "a100", "a100-80g": "a100", "h100": "h100", "a40": "a40", "h200": "h200"}


@dataclass
class MlpTable:
    """One model's per-operator times (s) by tokens and tensor-parallel degree."""

    path: Path
    device: str
    model: str  # org/name from the path
    dims: dict[str, int]  # n_head, n_kv_head, n_embd, n_expanded_embd, vocab_size, use_gated_mlp (0/1)
    tp: np.ndarray
    tokens: np.ndarray
    ops: dict[str, np.ndarray]  # op -> median seconds (ops absent from the model are absent here)

    @property
    def linear_s(self) -> np.ndarray:
        return sum(self.ops[o] for o in LINEAR_OPS)

    @property
    def nongemm_s(self) -> np.ndarray:
        return sum((self.ops[o] for o in NONGEMM_OPS if o in self.ops), np.zeros(len(self.tokens)))


@dataclass
class AttentionTable:
    path: Path
    device: str
    dims: dict[str, int]  # n_embd, n_q_head, n_kv_head, tp
    prefill: np.ndarray  # bool
    batch: np.ndarray
    chunk: np.ndarray  # prefill chunk (0 for decode)
    kv: np.ndarray  # cached tokens per sequence
    time_s: np.ndarray  # kernel + reshapes + KV save


@dataclass
class CollectiveTable:
    path: Path
    device: str
    cluster: str  # e.g. a100_dgx
    collective: str  # all_reduce | send_recv
    workers: np.ndarray
    size_bytes: np.ndarray
    time_s: np.ndarray


@dataclass
class CpuOverheadTable:
    path: Path
    device: str
    model: np.ndarray  # str
    batch: np.ndarray
    tp: np.ndarray
    time_s: np.ndarray  # schedule + sampler + prepare inputs + process outputs, per iteration


@dataclass
class RawTable:
    path: Path
    device: str
    rows: list[Measurement]


@dataclass
class Imported:
    device: str
    mlp: list[MlpTable] = field(default_factory=list)
    attention: list[AttentionTable] = field(default_factory=list)
    collectives: list[CollectiveTable] = field(default_factory=list)
    cpu: list[CpuOverheadTable] = field(default_factory=list)
    raw: list[RawTable] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # file (relative to --from) -> rows
    skipped: list[str] = field(default_factory=list)  # files of other devices, traces
    # Another device's attention / CPU-overhead tables in the same directory (used, and said so in the
    # provenance, when this device has none: attention is measured only on the A100).
    foreign_attention: list[AttentionTable] = field(default_factory=list)
    foreign_cpu: list[CpuOverheadTable] = field(default_factory=list)


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise InputError(f"{path}: empty file (not a known measurement layout)")
    return rows[0], rows[1:]


def layout_of(header: list[str]) -> str | None:
    cols = set(header)
    if {"kind", "dtype", "median_s", "pass_type"} <= cols:
        return "osdsim-raw"
    if "time_stats.all_reduce.median" in cols:
        return "vidur-all-reduce"
    if "time_stats.send_recv.median" in cols:
        return "vidur-send-recv"
    if {"time_stats.attn_decode.median", "time_stats.attn_prefill.median"} & cols or "kv_cache_size" in cols:
        return "vidur-attention"
    if "num_tokens" in cols and any(c.startswith("time_stats.") for c in cols):
        return "vidur-mlp"
    if "schedule_median" in cols or "sampler_e2e_median" in cols:
        return "vidur-cpu-overhead"
    if set(TRACE_COLS) <= cols:
        return "trace"
    return None


def device_from_path(path: Path, layout: str) -> str | None:
    """Vidur's directory names carry the device: compute/<dev>/..., network/<dev>_<topology>/...,
    cpu_overheads-<dev>.csv."""
    parts = [p.lower() for p in path.resolve().parts]
    if layout in ("vidur-mlp", "vidur-attention") and "compute" in parts:
        i = len(parts) - 1 - parts[::-1].index("compute")
        if i + 1 < len(parts) - 1:
            return parts[i + 1]
    if layout in ("vidur-all-reduce", "vidur-send-recv"):
        return parts[-2].split("_")[0] if len(parts) >= 2 else None
    if layout == "vidur-cpu-overhead":
        m = re.search(r"cpu_overheads?-([a-z0-9]+)", parts[-1])
        return m.group(1) if m else None
    return None


class _Columns:
    """Numeric columns of a table, with errors naming the file and the column."""

    def __init__(self, path: Path, header: list[str], rows: list[list[str]]):
        self.path, self.index, self.rows = path, {c: i for i, c in enumerate(header)}, rows
        for n, r in enumerate(rows, start=2):
            if len(r) != len(header):
                raise InputError(f"{path}: line {n} has {len(r)} fields, the header has {len(header)}")

    def has(self, col: str) -> bool:
        return col in self.index

    def require(self, cols, what: str) -> None:
        missing = [c for c in cols if c not in self.index]
        if missing:
            raise InputError(f"{self.path}: {what} needs column(s) {', '.join(missing)}")

    def text(self, col: str) -> np.ndarray:
        i = self.index[col]
        return np.array([r[i] for r in self.rows], dtype=object)

    def num(self, col: str, empty: float | None = None) -> np.ndarray:
        i = self.index[col]
        out = np.empty(len(self.rows))
        for n, r in enumerate(self.rows):
            v = r[i].strip()
            if v == "" and empty is not None:
                out[n] = empty
                continue
            if v in ("True", "False"):
                out[n] = 1.0 if v == "True" else 0.0
                continue
            try:
                out[n] = float(v)
            except ValueError:
                raise InputError(f"{self.path}: line {n + 2}, column {col}: not a number ({v[:30]!r})") from None
        return out


def _dims(cols: _Columns, names: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for name in names:
        values = np.unique(cols.num(name))
        if len(values) != 1:
            raise InputError(f"{cols.path}: column {name} must hold one model's value, has {len(values)} different")
        out[name] = int(values[0])
    return out


def parse_mlp(path: Path, device: str, header, rows) -> MlpTable:
    cols = _Columns(path, header, rows)
    cols.require((*MLP_DIMS, "num_tokens", "num_tensor_parallel_workers"), "a vidur-mlp table")
    cols.require([f"time_stats.{o}.median" for o in LINEAR_OPS], "the linear-op fit")
    ops = {o: cols.num(f"time_stats.{o}.median") * MS
           for o in (*LINEAR_OPS, *NONGEMM_OPS, *PASS_OPS) if cols.has(f"time_stats.{o}.median")}
    bad = [o for o, v in ops.items() if not np.all(np.isfinite(v) & (v >= 0))]
    if bad:
        raise InputError(f"{path}: time_stats.{bad[0]}.median: negative or missing times")
    parts = path.resolve().parts
    model = "/".join(parts[-3:-1]) if len(parts) >= 3 else path.stem
    return MlpTable(path, device, model, _dims(cols, MLP_DIMS), cols.num("num_tensor_parallel_workers"),
                    cols.num("num_tokens"), ops)


def parse_attention(path: Path, device: str, header, rows) -> AttentionTable:
    cols = _Columns(path, header, rows)
    cols.require(ATTENTION_COLS, "a vidur-attention table")
    cols.require(("time_stats.attn_decode.median", "time_stats.attn_prefill.median"), "the attention fit")
    prefill = cols.num("is_prefill") > 0
    kernel = np.where(prefill, cols.num("time_stats.attn_prefill.median", empty=np.nan),
                      cols.num("time_stats.attn_decode.median", empty=np.nan))
    if not np.all(np.isfinite(kernel)):
        raise InputError(f"{path}: rows without a time in time_stats.attn_prefill/attn_decode.median")
    extra = sum((cols.num(f"time_stats.{o}.median", empty=0.0) for o in ATTENTION_EXTRA_OPS
                 if cols.has(f"time_stats.{o}.median")), np.zeros(len(rows)))
    dims = _dims(cols, ("n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers"))
    dims["tp"] = dims.pop("num_tensor_parallel_workers")
    return AttentionTable(path, device, dims, prefill, cols.num("batch_size"), cols.num("prefill_chunk_size"),
                          cols.num("kv_cache_size"), (kernel + extra) * MS)


def parse_collective(path: Path, device: str, header, rows, collective: str) -> CollectiveTable:
    cols = _Columns(path, header, rows)
    cols.require((f"time_stats.{collective}.median", "num_workers", "size"), f"a vidur {collective} table")
    workers = cols.num("num_workers")
    # Tensor parallelism stays inside a node: keep the rows whose GPUs all sit on one node.
    keep = workers == cols.num("devices_per_node") if cols.has("devices_per_node") else np.ones(len(workers), bool)
    return CollectiveTable(path, device, path.resolve().parent.name, collective, workers[keep],
                           cols.num("size")[keep], cols.num(f"time_stats.{collective}.median")[keep] * MS)


def parse_cpu(path: Path, device: str, header, rows) -> CpuOverheadTable:
    cols = _Columns(path, header, rows)
    cols.require(CPU_COLS, "the CPU-overhead fit")
    total = sum(cols.num(c) for c in CPU_PARTS)
    return CpuOverheadTable(path, device, cols.text("model_name"), cols.num("batch_size"),
                            cols.num("tensor_parallel_degree"), total * MS)


def parse_raw(path: Path, header) -> RawTable:
    missing = [c for c in CSV_FIELDS if c not in header]
    if missing:
        raise InputError(f"{path}: an osdsim raw calibration CSV needs column(s) {', '.join(missing[:5])}")
    try:
        rows = rows_from_csv(path.read_text())
    except (ValueError, KeyError) as exc:
        raise InputError(f"{path}: bad value in the osdsim raw calibration CSV ({exc})") from None
    sibling = path.with_suffix(".yaml")
    device = path.stem
    if sibling.is_file():
        try:
            device = str((yaml.safe_load(sibling.read_text()) or {}).get("name") or device)
        except yaml.YAMLError:
            pass
    return RawTable(path, device, rows)


def _same_device(found: str, wanted: str) -> bool:
    return DEVICE_ALIASES.get(found, found) == DEVICE_ALIASES.get(wanted, wanted) or found == wanted


def import_measurements(source: Path, gpu: str) -> Imported:
    """Every measurement file under `source` (a file or a directory, recursively) for device `gpu`.

    In a directory, files of other devices (Vidur's tree holds several) and request traces are
    skipped; a single file of another device is a mismatch. Nothing for `gpu` at all is an error."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"--from {source}: no such file or directory")
    files = sorted(source.rglob("*.csv")) if source.is_dir() else [source]
    if not files:
        raise InputError(f"--from {source}: no .csv measurement files there")
    out = Imported(device=gpu)
    others: set[str] = set()
    for path in files:
        header, rows = _read(path)
        layout = layout_of(header)
        rel = str(path.relative_to(source)) if source.is_dir() else path.name
        if layout is None:
            raise InputError(f"{path}: not a known measurement layout (Vidur mlp/attention/all_reduce/send_recv/"
                             f"cpu_overheads CSV or osdsim raw calibration CSV); header starts {','.join(header[:4])}")
        if layout == "trace":
            out.skipped.append(f"{rel} (request trace)")
            continue
        if layout == "osdsim-raw":
            table = parse_raw(path, header)
            device = table.device
        else:
            device = device_from_path(path, layout)
            if device is None:
                raise InputError(f"{path}: cannot tell the device from the path (Vidur's layout: "
                                 "compute/<device>/..., network/<device>_<topology>/, cpu_overheads-<device>.csv)")
        if not _same_device(device, gpu):
            if source.is_dir():
                others.add(device)
                out.skipped.append(f"{rel} ({device})")
                if layout == "vidur-attention":
                    out.foreign_attention.append(parse_attention(path, device, header, rows))
                    out.files[rel] = len(rows)
                elif layout == "vidur-cpu-overhead":
                    out.foreign_cpu.append(parse_cpu(path, device, header, rows))
                    out.files[rel] = len(rows)
                continue
            raise InputError(f"{path}: measured on {device}, not on --gpu {gpu}")
        if layout == "osdsim-raw":
            out.raw.append(table)
        elif layout == "vidur-mlp":
            out.mlp.append(parse_mlp(path, device, header, rows))
        elif layout == "vidur-attention":
            out.attention.append(parse_attention(path, device, header, rows))
        elif layout == "vidur-all-reduce":
            out.collectives.append(parse_collective(path, device, header, rows, "all_reduce"))
        elif layout == "vidur-send-recv":
            out.collectives.append(parse_collective(path, device, header, rows, "send_recv"))
        else:
            out.cpu.append(parse_cpu(path, device, header, rows))
        out.files[rel] = len(rows)
    if not (out.mlp or out.attention or out.collectives or out.cpu or out.raw):
        seen = f" (it holds {', '.join(sorted(others))})" if others else ""
        raise InputError(f"--from {source}: no measurements of --gpu {gpu}{seen}")
    return out
