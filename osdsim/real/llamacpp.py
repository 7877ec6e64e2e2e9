"""The llama.cpp serving backend (issue 15): GGUF export of the PyTorch draft, llama.cpp models with
KV rollback, and batch-1 speculative decoding on them with the verifiers of `specdec.py`.

Training stays in PyTorch; serving runs in llama.cpp (llama-cpp-python, the `llamacpp` extra), as OSD
runs in production: after every distillation update the draft is exported to GGUF with the `gguf`
package and the server reloads it; `DraftPublisher` times both (the simulator's `sync_delay_s`).

GGUF layout (llama architecture, what llama.cpp's `llm_build_llama` loads): `token_embd.weight`
[V, d], `output_norm.weight`, optional `output.weight` (absent: tied to the embeddings),
per layer `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
ffn_down}.weight`. Numpy arrays keep torch's [out, in] shape (GGUF stores them with reversed dims).
Q and K rows are permuted from the Hugging Face rotary layout (halves) to GGUF's (interleaved
pairs): `permute_qk`, the inverse of what transformers applies when it loads a GGUF.

A draft exported against a base GGUF (the packaged SmolLM2 target) takes the base's metadata
(tokenizer, rope, norms) and copies its embeddings, final norm and head tensors byte for byte
(the same quantised tensors the target serves with); only the draft's own layers come from
PyTorch, quantised to `layer_type` (`served_draft_type`: the base's layer type, but never coarser
than Q8_0: a 4-bit re-quantisation rounds the first distillation updates away).
Without a base (tiny test models, HF directories) every tensor comes from the model and the
vocabulary is llama.cpp's "none" tokenizer of `vocab_size` ids (token ids are fed directly).

KV rollback: llama.cpp keeps one sequence (id 0); `LlamaCppLM.truncate(n)` removes positions ≥ n
(`llama_memory_seq_rm`), the analogue of `DynamicCache.crop`.

Greedy exactness (speculative output == the target's own greedy output) needs the target's logits
at a position not to depend on how many tokens the pass evaluates (the verify pass evaluates γ+1,
target-only decoding 1). ggml's CPU matmul is batch-invariant (every output element is the same
vec_dot of one weight row with the activation row quantised to the weight's vec_dot type), except
llamafile's tinyBLAS sgemm (GGML_LLAMAFILE, on by default), which takes over passes of ≥ 2 tokens
for F32/F16/Q8_0/Q4_0 weights: SmolLM2's Q8_0 head and the f16 KV attention products. With it the
packaged SmolLM2 GGUF's logits differ by up to 1.4 between a 1-token pass and blocks of 2..5 (117/120
argmaxes agree) and greedy spec == target-only held on 0 of 6 real prompts; built with
-DGGML_LLAMAFILE=OFF (scripts/install.sh does) the logits are bit-identical and it holds on 6/6
(benchmarks/llamacpp_batch_invariance.py). Cost, 1 thread, medians of 8 runs of 20-40 passes on a
shared 2-core machine: verify (4 tokens) 63.8 -> 68.9 ms, 128-token prefill 1385 -> 1480 ms (~7%),
within the noise (the 1-token decode, the same code in both builds, read 22.6 vs 24.4 ms): the Q4_1
layers never used sgemm. `build_info()` says which build runs.
Flash attention (off here) and batches of ≥ 64 query rows (its tiled kernel) are not covered.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osdsim.errors import InputError, replacing
from osdsim.real._deps import MissingDependency

LAYER_TYPES = ("f32", "f16", "q8_0", "q4_1", "q4_0")
_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Tensors a layer draft shares with its target (copied from the base GGUF).
SHARED_TENSORS = ("token_embd.weight", "output_norm.weight", "output.weight")
# Metadata the exporter writes itself (never copied from the base).
_OWN_KEYS = {"general.architecture", "general.name", "general.file_type", "llama.block_count"}


def available() -> tuple[bool, str]:
    """Whether llama-cpp-python imports here, and its version or why not (for `osdsim doctor`)."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError when the shared library fails to load
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'not importable'}"
    return True, str(getattr(llama_cpp, "__version__", "?"))


def build_info() -> dict[str, Any]:
    """The llama.cpp build: version, its CPU features, and `batch_invariant` (False when built with
    llamafile's sgemm: logits then depend on the pass size; see the module docstring)."""
    llama_cpp = require_llama_cpp()
    info = llama_cpp.llama_print_system_info()
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    return {"version": str(getattr(llama_cpp, "__version__", "?")), "system_info": text.strip(),
            "batch_invariant": "LLAMAFILE = 1" not in text}


def require_llama_cpp() -> Any:
    ok, why = available()
    if not ok:
        raise MissingDependency(
            "the llamacpp backend needs llama-cpp-python (the `llamacpp` extra; it builds from source, "
            f"needs a C/C++ compiler and cmake): pip install -e '.[llamacpp]' ({why})"
        )
    import llama_cpp

    return llama_cpp


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise MissingDependency("the llamacpp backend needs the 'gguf' package: pip install gguf") from None
    return gguf


# The coarsest GGUF type a *trained* draft is published in by default. Distillation moves the draft's
# weights by about 1e-3 per optimizer step (median |ΔW| 2.0e-3 after one update, 4.3e-3 after three:
# SmolLM2's 2-layer draft, lr 2e-3); a Q4_1 block of 32 weights has a step of (max − min)/15, so
# re-quantising to the packaged model's Q4_1 rounds most of that back to the original weights. Measured
# (teacher-forced α on 16 held-out code prompts, the cpu-llamacpp-load fit config): after 3 updates
# fp32 0.192, Q4_1 round trip 0.038, Q8_0 0.192; after 5: 0.234 / 0.109 / 0.235; after 9: 0.293 /
# 0.266 / 0.293. With Q4_1 the served α lagged the trained draft's by 2–4 updates in every served run.
TRAINED_DRAFT_MIN_TYPE = "q8_0"
_TYPE_PRECISION = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "f16": 3, "f32": 4}


def served_draft_type(requested: str, base_type: str | None) -> str:
    """The GGUF type the draft's layers are exported in: `requested`, or for "auto" the base's layer
    type (f32 without a base), raised to TRAINED_DRAFT_MIN_TYPE where the base is coarser."""
    if requested != "auto":
        _qtype(requested)
        return requested
    if base_type is None:
        return "f32"
    floor = TRAINED_DRAFT_MIN_TYPE
    return base_type if _TYPE_PRECISION.get(base_type, 3) >= _TYPE_PRECISION[floor] else floor


def round_trip(arr: np.ndarray, layer_type: str) -> np.ndarray:
    """`arr` [out, in] as llama.cpp holds it after an export in `layer_type` (quantise, dequantise):
    the served weights, for evaluating what is served rather than the fp32 master."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if layer_type == "f32":
        return a
    if layer_type == "f16":
        return a.astype(np.float16).astype(np.float32)
    gguf = _gguf()
    qt = _qtype(layer_type)
    return gguf.quants.dequantize(gguf.quants.quantize(a, qt), qt).reshape(a.shape).astype(np.float32)


def served_weights(state: dict[str, Any], layer_type: str) -> dict[str, Any]:
    """Trainable weights (name -> tensor) as a `layer_type` export serves them: the matrices through
    round_trip, the norms as exported (f32). What the held-out evaluation of a llama.cpp run scores."""
    import torch

    return {n: torch.from_numpy(round_trip(t.detach().cpu().numpy(), layer_type)) if t.dim() == 2 else t
            for n, t in state.items()}


def served_model(model: Any, layer_type: str) -> Any:
    """A copy of the PyTorch draft with its trainable weights as served (served_weights)."""
    import copy

    import torch

    out = copy.deepcopy(model)
    params = {n: p for n, p in out.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, w in served_weights(params, layer_type).items():
            params[n].copy_(w)
    return out


def _qtype(name: str) -> Any:
    gguf = _gguf()
    table = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}
    if name not in table:
        raise InputError(f"GGUF layer type {name!r}: use one of {', '.join(LAYER_TYPES)}")
    return table[name]


# ----------------------------------------------------------------------------------------------
# Reading a GGUF: metadata, the llama-architecture check, the tensors a draft shares
# ----------------------------------------------------------------------------------------------


@dataclass
class GGUFBase:
    """What a draft export takes from the target's GGUF (read once, kept in memory)."""

    path: Path
    fields: list[tuple[str, Any, Any, Any]]  # (key, value, vtype, sub_type) to copy
    tensors: dict[str, tuple[np.ndarray, Any]]  # shared tensor name -> (raw data, ggml type)
    n_layers: int
    vocab: int
    hidden: int
    layer_type: str  # the type of the base's attn_q weights, as a LAYER_TYPES name (else f16)
    head_type: str = "f32"  # the type of its embeddings (and head, when tied)


def _field_value(f: Any, gguf: Any) -> tuple[Any, Any, Any]:
    main = f.types[0]
    if main == gguf.GGUFValueType.ARRAY:
        sub = f.types[-1]
        return f.contents(), main, sub
    return f.contents(), main, None


def open_reader(path: Path) -> Any:
    """gguf.GGUFReader of `path` (parsing a 49k-token vocabulary takes seconds: open once)."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise InputError(f"{path}: not a readable GGUF file ({str(exc).splitlines()[0] if str(exc) else exc})") from None


def read_base(path: Path, reader: Any = None) -> GGUFBase:
    """Read a target GGUF; a GGUF that is not a Llama-architecture model is an InputError."""
    gguf = _gguf()
    path = Path(path)
    if reader is None:
        reader = open_reader(path)
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    if arch != "llama":
        raise InputError(f"{path}: GGUF architecture is {arch!r}; the llamacpp backend needs a Llama-architecture model")
    fields: list[tuple[str, Any, Any, Any]] = []
    meta: dict[str, Any] = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or not f.types:
            continue
        value, vtype, sub = _field_value(f, gguf)
        meta[key] = value
        if key not in _OWN_KEYS:
            fields.append((key, value, vtype, sub))
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    layer_type = "f16"
    names = {t.name: t for t in reader.tensors}
    for name in SHARED_TENSORS:
        if name in names:
            t = names[name]
            tensors[name] = (np.array(t.data), t.tensor_type)
    type_names = {_qtype(n): n for n in LAYER_TYPES}
    q = names.get("blk.0.attn_q.weight")
    if q is not None:
        layer_type = type_names.get(q.tensor_type, "f16")
    head = names.get("output.weight", names.get("token_embd.weight"))
    head_type = type_names.get(head.tensor_type, head.tensor_type.name.lower()) if head is not None else "f32"
    if "token_embd.weight" not in tensors or "output_norm.weight" not in tensors:
        raise InputError(f"{path}: GGUF lacks token_embd/output_norm tensors (not a Llama model file)")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = int(meta.get("llama.vocab_size") or (len(tokens) if tokens is not None else 0))
    return GGUFBase(path=path, fields=fields, tensors=tensors, n_layers=int(meta.get("llama.block_count", 0)),
                    vocab=vocab, hidden=int(meta.get("llama.embedding_length", 0)), layer_type=layer_type,
                    head_type=head_type)


# ----------------------------------------------------------------------------------------------
# Export: a PyTorch Llama (or its first layers) -> GGUF
# ----------------------------------------------------------------------------------------------


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout (rotate halves) -> GGUF/llama.cpp layout (adjacent pairs), per head
    (convert_hf_to_gguf's `LlamaModel.permute`); rows [n_head·head_dim, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _np32(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float32, copy=False)


def _add_matrix(writer: Any, name: str, arr: np.ndarray, layer_type: str) -> None:
    gguf = _gguf()
    if layer_type == "f32":
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    elif layer_type == "f16":
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
    else:
        qt = _qtype(layer_type)
        if arr.shape[-1] % gguf.GGML_QUANT_SIZES[qt][0]:
            raise InputError(f"{name}: row length {arr.shape[-1]} is not a multiple of the {layer_type} block "
                             f"size {gguf.GGML_QUANT_SIZES[qt][0]}; export with layer type f16 or f32")
        writer.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), qt), raw_dtype=qt)


def _layer_tensors(model: Any, i: int) -> dict[str, np.ndarray]:
    cfg = model.config
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    layer = model.model.layers[i]
    out: dict[str, np.ndarray] = {}
    for hf, gg in _HF_TO_GGUF.items():
        mod = layer
        for part in hf.split("."):
            mod = getattr(mod, part)
        arr = _np32(mod.weight)
        if gg == "attn_q":
            arr = permute_qk(arr, n_head)
        elif gg == "attn_k":
            arr = permute_qk(arr, n_kv)
        out[f"blk.{i}.{gg}.weight"] = arr
    return out


def _check_llama(model: Any) -> None:
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype != "llama":
        raise InputError(f"GGUF export: model type {mtype!r} is not a Llama model")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise InputError("GGUF export: Llama models with attention/MLP biases are not supported")
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise InputError(f"GGUF export: rope scaling {scaling} is not supported")


def _rope_theta(cfg: Any) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _add_raw(writer: Any, name: str, data: np.ndarray, ttype: Any) -> None:
    """A tensor read from a GGUF, written back byte for byte in its own type."""
    gguf = _gguf()
    if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=ttype)


def _write_gguf(out: Path, fill: Callable[[Any], None], what: str) -> None:
    """Write a llama-architecture GGUF to `out` atomically (`errors.replacing`); `fill(writer)` adds
    its metadata and tensors. An OSError is a one-line InputError; nothing is left behind."""
    gguf = _gguf()
    try:
        with replacing(out) as tmp:
            writer = gguf.GGUFWriter(str(tmp), arch="llama")
            try:
                fill(writer)
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_tensors_to_file()
            finally:
                writer.close()
    except OSError as exc:
        raise InputError(f"GGUF {what} to {out} failed: {exc.strerror or exc}") from None


@dataclass
class ExportRecord:
    path: Path
    seconds: float
    bytes: int
    layer_type: str


def export_gguf(model: Any, out: Path, layer_type: str | None = None, base: GGUFBase | None = None,
                name: str = "osdsim-draft") -> ExportRecord:
    """Write `model` (a transformers Llama: a layer draft or a whole model) to `out` atomically.

    With `base`, metadata and the shared tensors come from the base GGUF and the model's
    vocabulary must equal the base's; without, everything comes from the model (f32 norms)."""
    t0 = time.perf_counter()
    _gguf()  # a missing gguf package fails before any work
    _check_llama(model)
    cfg = model.config
    n_layers = int(cfg.num_hidden_layers)
    hidden = int(cfg.hidden_size)
    vocab = int(cfg.vocab_size)
    lt = layer_type or (base.layer_type if base is not None else "f32")
    _qtype(lt)
    if base is not None:
        if vocab != base.vocab:
            raise InputError(f"draft vocabulary ({vocab} tokens) differs from the target GGUF's ({base.vocab}) "
                             f"in {base.path.name}: speculative decoding needs the target's vocabulary")
        if hidden != base.hidden:
            raise InputError(f"draft width {hidden} differs from the target GGUF's {base.hidden} ({base.path.name}): "
                             "a draft exported against the target shares its embeddings and head")
    out = Path(out)

    def fill(writer: Any) -> None:
        writer.add_name(name)
        writer.add_block_count(n_layers)
        writer.add_file_type({"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7}[lt])
        if base is not None:
            for key, value, vtype, sub in base.fields:
                writer.add_key_value(key, value, vtype, sub_type=sub)
        else:
            n_head = int(cfg.num_attention_heads)
            writer.add_context_length(int(cfg.max_position_embeddings))
            writer.add_embedding_length(hidden)
            writer.add_feed_forward_length(int(cfg.intermediate_size))
            writer.add_head_count(n_head)
            writer.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or n_head))
            writer.add_rope_dimension_count(int(getattr(cfg, "head_dim", None) or hidden // n_head))
            writer.add_rope_freq_base(_rope_theta(cfg))
            writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
            writer.add_vocab_size(vocab)
            writer.add_tokenizer_model("none")
        tensors: list[tuple[str, np.ndarray, Any]] = []
        if base is not None:
            for tname, (data, ttype) in base.tensors.items():
                tensors.append((tname, data, ttype))
        else:
            tensors.append(("token_embd.weight", _np32(model.model.embed_tokens.weight), "matrix"))
            tensors.append(("output_norm.weight", _np32(model.model.norm.weight), "f32"))
            if not getattr(cfg, "tie_word_embeddings", False):
                tensors.append(("output.weight", _np32(model.lm_head.weight), "matrix"))
        for i in range(n_layers):
            for tname, arr in _layer_tensors(model, i).items():
                tensors.append((tname, arr, "f32" if tname.endswith("norm.weight") else "matrix"))
        for tname, arr, kind in tensors:
            if kind == "matrix":
                _add_matrix(writer, tname, arr, lt)
            elif kind == "f32":
                writer.add_tensor(tname, np.ascontiguousarray(arr, dtype=np.float32))
            else:  # raw bytes of a base tensor, in its own type
                _add_raw(writer, tname, arr, kind)

    _write_gguf(out, fill, "export")
    return ExportRecord(out, time.perf_counter() - t0, out.stat().st_size, lt)


# ----------------------------------------------------------------------------------------------
# A llama.cpp model with one sequence and KV rollback
# ----------------------------------------------------------------------------------------------


class LlamaCppLM:
    """A GGUF model in llama.cpp: feed tokens after the cached ones, get fp32 logits, truncate."""

    def __init__(self, path: Path, n_ctx: int = 2048, threads: int = 1, n_batch: int = 512,
                 flash_attn: bool = False) -> None:
        llama_cpp = require_llama_cpp()
        from llama_cpp._internals import LlamaBatch

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: GGUF file not found")
        t0 = time.perf_counter()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                n_threads_batch=threads, logits_all=False, flash_attn=flash_attn, verbose=False,
            )
        except ValueError as exc:  # llama-cpp-python raises ValueError when llama.cpp cannot load it
            raise InputError(f"{self.path}: llama.cpp cannot load this model ({exc})") from None
        self.load_s = time.perf_counter() - t0
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_vocab = int(self.llm.n_vocab())
        self._batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._llama_cpp = llama_cpp
        self.n_past = 0

    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions (remove positions ≥ n from sequence 0)."""
        if n < self.n_past:
            if not self.llm._ctx.kv_cache_seq_rm(0, n, -1):
                raise RuntimeError(f"llama.cpp could not remove KV positions {n}.. (sequence 0)")
        self.n_past = min(self.n_past, n)

    def feed(self, ids: list[int], all_logits: bool = True) -> np.ndarray:
        """Feed `ids` after the cached tokens; returns a copy of the logits [len(ids), V] of the
        last chunk of ≤ n_batch tokens (all_logits), or [1, V] of the last token."""
        if not ids:
            raise ValueError("feed: no tokens")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"context of {self.n_past + len(ids)} tokens exceeds n_ctx {self.n_ctx}")
        out = None
        for i in range(0, len(ids), self.n_batch):
            chunk = ids[i:i + self.n_batch]
            self._batch.set_batch(batch=chunk, n_past=self.n_past, logits_all=all_logits)
            self.llm._ctx.decode(self._batch)
            self.n_past += len(chunk)
            rows = len(chunk) if all_logits else 1
            ptr = self.llm._ctx.get_logits()
            out = np.ctypeslib.as_array(ptr, shape=(rows, self.n_vocab)).copy()
        assert out is not None
        return out

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


# ----------------------------------------------------------------------------------------------
# Speculative decoding and target-only decoding on llama.cpp (batch 1)
# ----------------------------------------------------------------------------------------------


def speculative_generate_llamacpp(target: LlamaCppLM, draft: LlamaCppLM, prompt: list[int], params: Any,
                                  eos_ids: tuple[int, ...] = (), generator: Any = None) -> Any:
    """`specdec.speculative_generate` on llama.cpp models: γ draft passes, one target pass over γ+1
    positions with logits for all, verification with `verify_greedy` / `verify_sampling`, rollback
    of both KV caches to the committed prefix. Returns a `specdec.Generation`."""
    import torch

    from osdsim.real.specdec import (
        Generation,
        StepRecord,
        _probs,
        _TeacherAcc,
        overlap,
        verify_greedy,
        verify_sampling,
    )

    t_call = time.perf_counter()
    if not prompt:
        raise ValueError("empty prompt")
    seq = list(prompt)
    target.reset()
    draft.reset()
    if len(prompt) > 1:
        target.feed(prompt[:-1], all_logits=False)
        draft.feed(prompt[:-1], all_logits=False)
    gen = Generation(prompt_len=len(prompt), tokens=[])
    gen.prefill_s = time.perf_counter() - t_call
    teacher = _TeacherAcc(params.teacher_topk)
    eos = set(eos_ids)
    while len(gen.tokens) < params.max_new_tokens:
        gamma = min(params.k, params.max_new_tokens - len(gen.tokens) - 1)
        t0 = time.perf_counter()
        xs: list[int] = []
        qs: list[torch.Tensor] = []
        feed = seq[draft.n_past:]
        for _ in range(gamma):
            logits_q = torch.from_numpy(draft.feed(feed, all_logits=False)[-1])
            if params.greedy:
                x = int(torch.argmax(logits_q))
                qs.append(logits_q)
            else:
                q = _probs(logits_q, params.temperature)
                x = int(torch.multinomial(q, 1, generator=generator))
                qs.append(q)
            xs.append(x)
            feed = [x]
        t1 = time.perf_counter()
        logits_p = torch.from_numpy(target.feed(seq[target.n_past:] + xs, all_logits=True))  # [γ+1, V]
        x_t = torch.tensor(xs, dtype=torch.long)
        if params.greedy:
            n, t = verify_greedy(torch.argmax(logits_p, dim=-1), x_t)
            p_probs = _probs(logits_p[:gamma], 1.0) if gamma else None
            q_probs = _probs(torch.stack(qs), 1.0) if gamma else None
        else:
            p_probs = _probs(logits_p, params.temperature)
            q_probs = torch.stack(qs) if gamma else p_probs[:0]
            n, t = verify_sampling(p_probs, q_probs, x_t, generator)
        t2 = time.perf_counter()
        n_beta = min(n + 1, gamma)
        beta_sum = float(overlap(p_probs[:n_beta], q_probs[:n_beta]).sum()) if gamma else 0.0
        new = xs[:n] + [t]
        for j, tok in enumerate(new):
            if tok in eos:
                new = new[: j + 1]
                gen.hit_eos = True
                break
        if params.positions != "none":
            rows = list(range(len(new))) if params.positions == "all" else ([n] if len(new) == n + 1 else [])
            teacher.add(len(seq) - 1, logits_p, rows)
        # roll back: the target keeps seq + x_1..x_n, the draft the committed prefix it has seen
        target.truncate(len(seq) + n)
        draft.truncate(min(draft.n_past, len(seq) + min(n, max(gamma - 1, 0))))
        seq.extend(new)
        gen.tokens.extend(new)
        if len(gen.steps) == 0:
            gen.first_token_s = time.perf_counter() - t_call
        gen.steps.append(StepRecord(proposed=gamma, accepted=n, emitted=len(new), draft_s=t1 - t0,
                                    verify_s=t2 - t1, beta_sum=beta_sum, beta_n=n_beta))
        if gen.hit_eos:
            break
    gen.teacher = teacher.record()
    gen.total_s = time.perf_counter() - t_call
    return gen


def target_generate_llamacpp(target: LlamaCppLM, prompt: list[int], max_new_tokens: int, greedy: bool = True,
                             temperature: float = 1.0, eos_ids: tuple[int, ...] = (), generator: Any = None) -> Any:
    """Plain autoregressive decoding on llama.cpp (the no-speculation baseline); one StepRecord per
    token with its time in verify_s, as `specdec.target_generate`."""
    import torch

    from osdsim.real.specdec import Generation, StepRecord, _probs

    t_call = time.perf_counter()
    if not prompt:
        raise ValueError("empty prompt")
    target.reset()
    if len(prompt) > 1:
        target.feed(prompt[:-1], all_logits=False)
    gen = Generation(prompt_len=len(prompt), tokens=[])
    gen.prefill_s = time.perf_counter() - t_call
    eos = set(eos_ids)
    last = prompt[-1]
    while len(gen.tokens) < max_new_tokens:
        t0 = time.perf_counter()
        logits = torch.from_numpy(target.feed([last], all_logits=False)[0])
        if greedy:
            last = int(torch.argmax(logits))
        else:
            last = int(torch.multinomial(_probs(logits, temperature), 1, generator=generator))
        t1 = time.perf_counter()
        gen.tokens.append(last)
        if len(gen.steps) == 0:
            gen.first_token_s = time.perf_counter() - t_call
        gen.steps.append(StepRecord(0, 0, 1, 0.0, t1 - t0, 0.0, 0))
        if last in eos:
            gen.hit_eos = True
            break
    gen.total_s = time.perf_counter() - t_call
    return gen


# ----------------------------------------------------------------------------------------------
# Publishing distilled drafts: export + reload, timed
# ----------------------------------------------------------------------------------------------


@dataclass
class SyncRecord:
    export_s: float
    reload_s: float
    bytes: int

    @property
    def total_s(self) -> float:
        return self.export_s + self.reload_s


def p90(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return float(s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))])


def sync_summary(records: list[SyncRecord]) -> dict[str, Any]:
    """Median and p90 of export, reload and their sum (the simulator's sync_delay_s)."""
    out: dict[str, Any] = {"n": len(records)}
    for key, vals in (("export_s", [r.export_s for r in records]), ("reload_s", [r.reload_s for r in records]),
                      ("sync_s", [r.total_s for r in records])):
        out[f"{key}_median"] = statistics.median(vals) if vals else float("nan")
        out[f"{key}_p90"] = p90(vals)
    out["bytes"] = records[-1].bytes if records else 0
    return out


@dataclass
class DraftPublisher:
    """Owns the served llama.cpp draft: `publish(model)` exports the PyTorch draft to GGUF and
    reloads it (the old model is freed first), recording the time of both."""

    workdir: Path
    base: GGUFBase | None
    layer_type: str | None
    threads: int = 1
    n_ctx: int = 2048
    records: list[SyncRecord] = field(default_factory=list)
    lm: LlamaCppLM | None = None

    @property
    def path(self) -> Path:
        return self.workdir / "draft.gguf"

    def publish(self, model: Any) -> SyncRecord:
        rec = export_gguf(model, self.path, self.layer_type, self.base)
        t0 = time.perf_counter()
        if self.lm is not None:
            self.lm.close()
        self.lm = LlamaCppLM(self.path, n_ctx=self.n_ctx, threads=self.threads)
        sr = SyncRecord(rec.seconds, time.perf_counter() - t0, rec.bytes)
        self.records.append(sr)
        return sr

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
            self.lm = None


# ----------------------------------------------------------------------------------------------
# The run's llama.cpp server: target GGUF + published draft (used by `run.run_real`)
# ----------------------------------------------------------------------------------------------


def target_gguf_for(spec: str, model: Any, workdir: Path, layer_type: str = "f32") -> Path:
    """The GGUF the server loads as target: the packaged SmolLM2 GGUF, a .gguf path as given, or
    the PyTorch target (tiny, an HF directory) exported to `workdir/target.gguf`."""
    from osdsim.real.models import smollm2_gguf_path

    if spec == "smollm2":
        return smollm2_gguf_path()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path
    return export_gguf(model, workdir / "target.gguf", layer_type, name="osdsim-target").path


class LlamaCppServer:
    """Target and draft on llama.cpp for one run; `publish` exports + reloads the trained draft."""

    def __init__(self, target_spec: str, target_model: Any, draft_model: Any, workdir: Path, threads: int,
                 n_ctx: int, draft_type: str = "auto") -> None:
        llama_cpp = require_llama_cpp()
        self.version = str(getattr(llama_cpp, "__version__", "?"))
        exported_type = "f32" if draft_type == "auto" else draft_type
        path = target_gguf_for(target_spec, target_model, workdir, exported_type)
        self.base = read_base(path)
        if self.base.vocab != int(target_model.config.vocab_size):
            raise InputError(f"{path.name}: GGUF vocabulary ({self.base.vocab}) differs from the PyTorch target's "
                             f"({int(target_model.config.vocab_size)})")
        self.target = LlamaCppLM(path, n_ctx=n_ctx, threads=threads)
        self.publisher = DraftPublisher(workdir, self.base, served_draft_type(draft_type, self.base.layer_type),
                                        threads=threads, n_ctx=n_ctx)
        self.initial_sync = self.publisher.publish(draft_model)
        self.publisher.records.clear()  # the initial export is not a distillation update

    @property
    def draft(self) -> LlamaCppLM:
        assert self.publisher.lm is not None
        return self.publisher.lm

    def describe(self) -> dict[str, Any]:
        return {"engine": "llama.cpp", "llama_cpp_python": self.version,
                "batch_invariant": build_info()["batch_invariant"], "target_gguf": str(self.base.path),
                "target_layer_type": self.base.layer_type, "head_type": self.base.head_type,
                "draft_layer_type": self.publisher.layer_type or self.base.layer_type,
                "draft_gguf_bytes": self.initial_sync.bytes,
                "initial_export_s": self.initial_sync.export_s, "initial_reload_s": self.initial_sync.reload_s}

    def close(self) -> None:
        self.target.close()
        self.publisher.close()


def slice_gguf(src: Path, n_layers: int, out: Path, reader: Any = None, layer_type: str | None = None) -> Path:
    """A GGUF of `src`'s first `n_layers` layers with its embeddings, norm and head, every tensor
    copied byte for byte (the untrained layer draft exactly as served; no torch needed). With
    `layer_type`, the layers' matrices are dequantised and re-quantised to it (norms stay f32), as
    `export_gguf` writes the untrained draft in that type."""
    reader = reader if reader is not None else open_reader(src)
    base = read_base(src, reader)
    if not 1 <= n_layers <= base.n_layers:
        raise InputError(f"{src.name}: cannot take {n_layers} layers of a {base.n_layers}-layer model")
    out = Path(out)

    def fill(writer: Any) -> None:
        writer.add_name(f"{src.stem}-l{n_layers}")
        writer.add_block_count(n_layers)
        ftype = reader.fields.get("general.file_type")
        if ftype is not None:
            writer.add_file_type(int(ftype.contents()))
        for key, value, vtype, sub in base.fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        gguf = _gguf()
        for t in reader.tensors:
            if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= n_layers:
                continue
            if layer_type is not None and t.name.startswith("blk.") and not t.name.endswith("norm.weight"):
                arr = gguf.quants.dequantize(np.array(t.data), t.tensor_type)  # [out, in] f32
                _add_matrix(writer, t.name, arr, layer_type)
            else:
                _add_raw(writer, t.name, np.array(t.data), t.tensor_type)

    _write_gguf(out, fill, "slice")
    return out


# ----------------------------------------------------------------------------------------------
# Batched serving on llama.cpp: one context, one KV sequence per running request
# ----------------------------------------------------------------------------------------------


@dataclass
class Block:
    """Tokens of one sequence in a batched llama.cpp pass: `tokens` go to positions pos0.., and the
    logits of the block rows in `want` (indices into `tokens`) are returned."""

    seq_id: int
    pos0: int
    tokens: list[int]
    want: list[int]


class LlamaCppBatchLM:
    """A GGUF model in one llama.cpp context holding `n_seq` sequences (KV sequence ids 0..n_seq-1),
    each in its own stream of `n_ctx_seq` KV cells (kv_unified off). A unified cache would let any
    sequence use any cell, but then every query attends over every used cell (masked): with 8
    sequences of 300 cached tokens a 1-token decode of SmolLM2 took 22.9 ms vs 13.4 ms with streams
    (1 thread, this CPU). One `decode` evaluates the blocks of many sequences in one llama_decode
    (split at n_batch tokens); each token carries its own sequence id and position, so ragged
    blocks need no padding and a rejected draft is removed from its own sequence only (`seq_rm`)."""

    def __init__(self, path: Path, n_seq: int, n_ctx_seq: int, threads: int = 1, n_batch: int = 512) -> None:
        llama_cpp = require_llama_cpp()
        from llama_cpp import _internals as internals
        from llama_cpp._logger import set_verbose

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: GGUF file not found")
        set_verbose(False)  # llama.cpp's log goes to stderr unless told (the Llama class does this)
        t0 = time.perf_counter()
        mparams = llama_cpp.llama_model_default_params()
        cparams = llama_cpp.llama_context_default_params()
        # llama.cpp pads the context to 256 cells and splits it evenly: keep both exact (no warning)
        n_ctx_seq = -(-n_ctx_seq // 256) * 256
        n_ctx = n_seq * n_ctx_seq
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = n_ctx, n_batch, n_batch
        cparams.n_seq_max, cparams.kv_unified = n_seq, False
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.no_perf = True
        try:
            self.model = internals.LlamaModel(path_model=str(self.path), params=mparams, verbose=False)
            self.ctx = internals.LlamaContext(model=self.model, params=cparams, verbose=False)
        except ValueError as exc:
            raise InputError(f"{self.path}: llama.cpp cannot load this model ({exc})") from None
        self.load_s = time.perf_counter() - t0
        self.n_seq, self.n_ctx_seq, self.n_batch = n_seq, n_ctx_seq, n_batch
        self.n_vocab = int(self.model.n_vocab())
        self._batch = internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._llama_cpp = llama_cpp

    def decode(self, blocks: list[Block]) -> list[np.ndarray]:
        """Evaluate every block's tokens; returns per block the fp32 logits [len(want), V] (copies)."""
        lc, b = self._llama_cpp, self._batch.batch
        flat = [(bi, j) for bi, blk in enumerate(blocks) for j in range(len(blk.tokens))]
        wanted = [set(blk.want) for blk in blocks]
        out: list[list[np.ndarray]] = [[] for _ in blocks]
        for start in range(0, len(flat), self.n_batch):
            part = flat[start:start + self.n_batch]
            outputs: list[tuple[int, int]] = []  # (block, batch index) of the rows with logits
            for i, (bi, j) in enumerate(part):
                blk = blocks[bi]
                b.token[i] = blk.tokens[j]
                b.pos[i] = blk.pos0 + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = blk.seq_id
                want = j in wanted[bi]
                b.logits[i] = want
                if want:
                    outputs.append((bi, i))
            b.n_tokens = len(part)
            rc = lc.llama_decode(self.ctx.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} ({len(part)} tokens; {self.n_ctx_seq} KV cells per "
                                   "sequence)")
            for bi, i in outputs:
                ptr = lc.llama_get_logits_ith(self.ctx.ctx, i)
                out[bi].append(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy())
        return [np.stack(rows) if rows else np.zeros((0, self.n_vocab), np.float32) for rows in out]

    def seq_rm(self, seq_id: int, p0: int) -> None:
        """Remove positions ≥ p0 of one sequence (p0 = 0 frees the sequence)."""
        if not self.ctx.kv_cache_seq_rm(seq_id, p0, -1):
            raise RuntimeError(f"llama.cpp could not remove KV positions {p0}.. of sequence {seq_id}")

    def state(self) -> bytes:
        """The context's state (every sequence's KV cells), for `set_state` on a reloaded model."""
        lc = self._llama_cpp
        size = lc.llama_state_get_size(self.ctx.ctx)
        buf = (ctypes.c_uint8 * size)()
        n = lc.llama_state_get_data(self.ctx.ctx, buf, size)
        return bytes(buf[:n])

    def set_state(self, data: bytes) -> None:
        lc = self._llama_cpp
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if lc.llama_state_set_data(self.ctx.ctx, buf, len(data)) != len(data):
            raise RuntimeError(f"{self.path.name}: llama.cpp could not restore the serving state")

    def close(self) -> None:
        for obj in ("_batch", "ctx", "model"):
            x = getattr(self, obj, None)
            if x is not None:
                x.close()
                setattr(self, obj, None)


@dataclass
class BatchDraftPublisher:
    """The served batched llama.cpp draft: `publish(model)` exports the PyTorch draft to GGUF, loads
    it in a new context and carries the running sequences' KV cells over (llama_state_get/set_data:
    the cells the old weights wrote stay, as a PyTorch server's cache does when weights change under
    it; verification keeps the output exact either way), then frees the old model. Timed: export,
    and reload including the state copy (together the simulator's `sync_delay_s`)."""

    workdir: Path
    base: GGUFBase | None
    layer_type: str | None
    n_seq: int
    n_ctx_seq: int
    threads: int = 1
    records: list[SyncRecord] = field(default_factory=list)
    lm: LlamaCppBatchLM | None = None

    def publish(self, model: Any) -> SyncRecord:
        # Alternate two file names: the old model may still map its file while the new one loads.
        path = self.workdir / f"draft-{len(self.records) % 2}.gguf"
        rec = export_gguf(model, path, self.layer_type, self.base)
        t0 = time.perf_counter()
        new = LlamaCppBatchLM(path, self.n_seq, self.n_ctx_seq, self.threads)
        if self.lm is not None:
            new.set_state(self.lm.state())
            self.lm.close()
        self.lm = new
        sr = SyncRecord(rec.seconds, time.perf_counter() - t0, rec.bytes)
        self.records.append(sr)
        return sr

    def close(self) -> None:
        if self.lm is not None:
            self.lm.close()
            self.lm = None
