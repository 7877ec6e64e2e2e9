"""Real model passes (issue 4, item 2): Llama models from a config at real dimensions, random
weights (fine for timing), timed at the shapes the simulator prices.

Pass types and their cost-model shape (osdsim.cost.model.BatchShape, B sequences, q new tokens
each, c cached tokens each):
  decode  q = 1        tokens = B,   logits = B,   context = B·c, pairs = B·(c + 1/2)
  verify  q = k+1      tokens = B·q, logits = B·q, context = B·c, pairs = B·q·(c + q/2)
  prefill q new tokens tokens = B·q, logits = B (last position only), pairs as above
  train   B sequences of length q: forward + backward + AdamW on the draft's layers
          (CostModel.training_step with Σl = B·q, Σl² = B·q²)
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from osdsim.calibrate.measure import Measurement, Timer
from osdsim.calibrate.micro import tdtype
from osdsim.models import PRESETS, ModelSpec

PASS_TYPES: tuple[str, ...] = ("decode", "verify", "prefill", "train")


@dataclass(frozen=True, slots=True)
class PassShape:
    model: str  # key into the plan's model specs
    pass_type: str
    batch: int
    context: int
    q: int
    split: str  # "fit" or "heldout"

    def aggregates(self) -> tuple[int, int, float, float]:
        """(tokens, logit_tokens, context_tokens, attention_pairs) of this pass."""
        b, c, q = self.batch, self.context, self.q
        logits = b if self.pass_type == "prefill" else b * q
        return b * q, logits, float(b * c), b * q * (c + q / 2.0)


def layer_variant(base: ModelSpec, n_layers: int) -> ModelSpec:
    return base.model_copy(update={"n_layers": n_layers, "name": f"{base.name}-l{n_layers}"})


@dataclass(frozen=True, slots=True)
class Plan:
    """What to measure: model specs (all sharing one architecture's widths), dtypes, pass shapes."""

    models: dict[str, ModelSpec]
    dtypes: tuple[str, ...]
    shapes: tuple[PassShape, ...]
    train_dtypes: tuple[str, ...]
    gemm_tokens: tuple[int, ...]
    gemm_max_flops: float
    bandwidth_bytes: int
    attention_contexts: tuple[int, ...]
    repeats: int
    budget_s: float


def _grid(model: str, pass_type: str, split: str, batches, contexts, qs) -> list[PassShape]:
    return [PassShape(model, pass_type, b, c, q, split) for b in batches for c in contexts for q in qs]


# osdsim real's draft: SmolLM2's first 2 layers with a 4,096-token head (`draft_vocab: 4096`).
DRAFT_H4K = PRESETS["smollm2-135m-l2"].model_copy(update={"name": "smollm2-135m-l2-v4096", "vocab": 4096})


def cpu_plan(quick: bool, bf16: bool = True) -> Plan:
    """CPU grid. Full: SmolLM2-135M (30 layers), its 2-layer draft with the full and with a 4,096-token
    head, fp32 and bf16 (≈ 5 min on one core). Quick (tests): 4- and 2-layer variants, fp32, a handful of shapes (seconds).
    `bf16=False` (a CPU without native bf16: torch converts every bf16 matmul to fp32 per call, 5-40×
    slower, and `serve_dtype: auto` serves fp32 there): the passes in fp32 only; the bf16 GEMM peak is
    still measured."""
    if quick:
        big = layer_variant(PRESETS["smollm2-135m"], 4)
        models = {"big": big, "draft": PRESETS["smollm2-135m-l2"]}
        shapes: list[PassShape] = []
        for m in models:
            shapes += _grid(m, "decode", "fit", (1, 4), (32, 256), (1,))
            shapes += _grid(m, "verify", "fit", (1,), (64,), (3, 6))
            shapes += _grid(m, "prefill", "fit", (1,), (0,), (16, 48, 128))
            shapes += _grid(m, "decode", "heldout", (1,), (128,), (1,))
            shapes += _grid(m, "verify", "heldout", (1,), (128,), (4,))
            shapes += _grid(m, "prefill", "heldout", (1,), (0,), (32,))
        shapes += _grid("draft", "train", "fit", (1, 2), (0,), (32,))
        shapes += _grid("draft", "train", "heldout", (1,), (0,), (48,))
        return Plan(models, ("fp32",), tuple(shapes), ("fp32",), (1, 64), 2e8, 128 << 20, (128,), 5, 0.3)
    models = {"target": PRESETS["smollm2-135m"], "draft": PRESETS["smollm2-135m-l2"], "draft-h4k": DRAFT_H4K}
    shapes = []
    for m in ("target", "draft"):
        shapes += _grid(m, "decode", "fit", (1, 4, 16), (64, 512), (1,))
        shapes += _grid(m, "decode", "fit", (1, 4), (2048,), (1,))
        shapes += _grid(m, "verify", "fit", (1,), (128, 1024), (2, 3, 5, 9))
        shapes += _grid(m, "verify", "fit", (4,), (256,), (5,))
        shapes += _grid(m, "prefill", "fit", (1,), (0,), (16, 64, 256))
        shapes += _grid(m, "prefill", "fit", (1,), (512,), (64,))
        shapes += _grid(m, "decode", "heldout", (2, 8), (256, 1024), (1,))
        shapes += _grid(m, "verify", "heldout", (1,), (512,), (4, 6, 7))
        shapes += _grid(m, "verify", "heldout", (2,), (128,), (5,))
        shapes += _grid(m, "prefill", "heldout", (1,), (0,), (32, 128))
        shapes += _grid(m, "prefill", "heldout", (1,), (256,), (32,))
    shapes += _grid("draft", "train", "fit", (1, 4), (0,), (64,)) + _grid("draft", "train", "fit", (2,), (0,), (128,))
    shapes += _grid("draft", "train", "heldout", (2,), (0,), (64,)) + _grid("draft", "train", "heldout", (1,), (0,), (128,))
    # The draft osdsim real serves: 2 layers with a 4,096-token head. Without it the fit cannot tell a
    # slow LM head from a fixed per-pass cost (both scale alike over the full-vocabulary models).
    shapes += _grid("draft-h4k", "decode", "fit", (1, 4), (64, 512), (1,))
    shapes += _grid("draft-h4k", "verify", "fit", (1,), (128, 1024), (3, 5))
    shapes += _grid("draft-h4k", "prefill", "fit", (1,), (0,), (64, 256))
    shapes += _grid("draft-h4k", "decode", "heldout", (2,), (256,), (1,))
    shapes += _grid("draft-h4k", "verify", "heldout", (1,), (512,), (4,))
    shapes += _grid("draft-h4k", "train", "fit", (4,), (0,), (96,)) + _grid("draft-h4k", "train", "fit", (2,), (0,), (192,))
    shapes += _grid("draft-h4k", "train", "heldout", (4,), (0,), (160,))
    return Plan(
        models, ("fp32", "bf16") if bf16 else ("fp32",), tuple(shapes), ("fp32",), (1, 4, 16, 64, 256, 1024), 6e9, 512 << 20,
        (128, 1024), 11, 1.2,
    )


def cuda_plan(quick: bool) -> Plan:
    """GPU grid (bf16): SmolLM2-135M, its 2-layer draft and a 4-layer slice of Vicuna-7B (real
    7B widths, so large-T passes are compute-bound). Sized to finish in a few minutes on an H100;
    the KV caches of all shapes are held at once (≈ 35 GB for the Vicuna slice, ≈ 10 GB SmolLM2)."""
    wide = layer_variant(PRESETS["vicuna-7b"], 4)
    models = {"target": PRESETS["smollm2-135m"], "draft": PRESETS["smollm2-135m-l2"], "wide": wide}
    if quick:
        models = {"target": layer_variant(PRESETS["smollm2-135m"], 4), "draft": PRESETS["smollm2-135m-l2"]}
    models["draft-h4k"] = DRAFT_H4K  # the reduced-head draft osdsim real serves (see cpu_plan)
    shapes: list[PassShape] = []
    for m in (k for k in models if k != "draft-h4k"):
        shapes += _grid(m, "decode", "fit", (1, 8, 64), (256, 2048), (1,))
        shapes += _grid(m, "decode", "fit", (256,), (256,), (1,))
        shapes += _grid(m, "verify", "fit", (1, 16, 64), (512,), (3, 5, 9))
        shapes += _grid(m, "prefill", "fit", (1,), (0,), (128, 512, 2048))
        shapes += _grid(m, "prefill", "fit", (4,), (1024,), (512,))
        shapes += _grid(m, "decode", "heldout", (4, 32, 128), (1024,), (1,))
        shapes += _grid(m, "verify", "heldout", (8, 32), (256,), (5,))
        shapes += _grid(m, "prefill", "heldout", (1,), (0,), (256, 1024))
    shapes += _grid("draft", "train", "fit", (4, 16), (0,), (256,)) + _grid("draft", "train", "fit", (8,), (0,), (512,))
    shapes += _grid("draft", "train", "heldout", (8,), (0,), (256,)) + _grid("draft", "train", "heldout", (4,), (0,), (512,))
    shapes += _grid("draft-h4k", "decode", "fit", (1, 8), (256, 2048), (1,))
    shapes += _grid("draft-h4k", "verify", "fit", (1,), (512,), (3, 5))
    shapes += _grid("draft-h4k", "decode", "heldout", (4,), (1024,), (1,))
    return Plan(
        models, ("bf16",), tuple(shapes), ("bf16",), (1, 16, 64, 256, 1024, 4096), 1e13, 2 << 30,
        (512, 4096), 10, 0.5,
    )


# --- models ----------------------------------------------------------------------------------------
def llama_config(spec: ModelSpec) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn,
        num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=8192, tie_word_embeddings=spec.tied_embeddings,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def build_models(torch: Any, specs: dict[str, ModelSpec], device: str, seed: int = 0) -> dict[str, Any]:
    """Random-weight Llama models for `specs`. Specs with the same widths share the deepest model's
    embeddings/head and first layers (as the real draft shares the target's), saving init time."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    out: dict[str, Any] = {}
    by_depth = sorted(specs.items(), key=lambda kv: -kv[1].n_layers)
    for key, spec in by_depth:
        donor = next((out[k] for k, s in by_depth if k in out and _same_widths(s, spec)), None)
        cfg = llama_config(spec)
        with torch.device(device):  # initialise on the device (a 1B-parameter init is slow on a CPU)
            model = LlamaForCausalLM(cfg) if donor is None else _sliced(torch, donor, cfg, spec.n_layers)
        model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        out[key] = model
    return out


def _same_widths(a: ModelSpec, b: ModelSpec) -> bool:
    widths = ("hidden", "n_heads", "kv_heads", "ffn", "vocab", "tied_embeddings")
    return all(getattr(a, w) == getattr(b, w) for w in widths)


def _sliced(torch: Any, donor: Any, cfg: Any, n_layers: int) -> Any:
    """A model of `n_layers` that shares the donor's embeddings, norm, head and first layers."""
    from transformers import LlamaForCausalLM

    small = copy.deepcopy(cfg)
    small.num_hidden_layers = 1
    small.vocab_size = 8  # tiny placeholder embeddings, replaced below
    model = LlamaForCausalLM(small)
    cfg._attn_implementation = donor.config._attn_implementation  # sdpa masks, as the donor
    model.config = cfg
    model.model.config = cfg
    model.model.embed_tokens = donor.model.embed_tokens
    model.model.norm = donor.model.norm
    model.model.rotary_emb = donor.model.rotary_emb
    model.lm_head = donor.lm_head
    model.model.layers = torch.nn.ModuleList(donor.model.layers[i] for i in range(n_layers))
    return model


# --- timing ---------------------------------------------------------------------------------------
def _kv_cache(torch: Any, model: Any, spec: ModelSpec, batch: int, context: int, device: str, dt: Any) -> Any:
    """A DynamicCache holding `context` random cached tokens per sequence in every layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if context:
        for layer in range(spec.n_layers):
            shape = (batch, spec.kv_heads, context, spec.head_dim)
            cache.update(torch.randn(shape, device=device, dtype=dt), torch.randn(shape, device=device, dtype=dt), layer)
    return cache


@dataclass
class Bench:
    """One pass shape ready to time: fresh inputs (prepare), the timed call (run), and the
    untimed undo (reset, e.g. crop the KV cache back to `context`)."""

    shape: PassShape
    spec: ModelSpec
    prepare: Callable[[], Any]
    run: Callable[[Any], Any]
    reset: Callable[[Any], None]
    trainable_params: int = 0


def forward_bench(torch: Any, model: Any, spec: ModelSpec, shape: PassShape, device: str) -> Bench:
    """One forward pass of B sequences × q new tokens after a KV cache of `context` random tokens."""
    dt = tdtype(torch, spec.dtype)
    b, c, q = shape.batch, shape.context, shape.q
    last_only = shape.pass_type == "prefill"  # prefill needs the last position's logits only
    persistent = _kv_cache(torch, model, spec, b, c, device, dt) if c else None

    def prepare() -> tuple[Any, Any]:
        ids = torch.randint(3, spec.vocab, (b, q), device=device)
        return ids, persistent if persistent is not None else _kv_cache(torch, model, spec, b, 0, device, dt)

    def run(inp: tuple[Any, Any]) -> Any:
        # Decoder, then the LM head on the positions whose logits are needed. (transformers'
        # logits_to_keep slices a 3-D view that sends bf16 matmul down a path copying the whole
        # head weight on every call; a contiguous 2-D input is what a serving engine feeds.)
        ids, cache = inp
        with torch.inference_mode():
            h = model.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
            h = h[:, -1, :] if last_only else h.reshape(-1, h.shape[-1])
            return model.lm_head(h.contiguous())

    def reset(inp: tuple[Any, Any]) -> None:
        if persistent is not None:
            persistent.crop(-q)  # transformers 5: negative = remove that many tokens

    return Bench(shape, spec, prepare, run, reset)


def train_bench(torch: Any, model: Any, spec: ModelSpec, shape: PassShape, device: str) -> Bench:
    """One distillation step of the draft: forward over B sequences of length q (logits at every
    position), forward KL to a random teacher distribution, backward, AdamW on the decoder layers
    only (embeddings and head frozen, as the real distiller trains)."""
    b, q = shape.batch, shape.q
    layers = model.model.layers
    params = list(layers.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)

    def prepare() -> tuple[Any, Any]:
        model.train()
        layers.requires_grad_(True)
        ids = torch.randint(3, spec.vocab, (b, q), device=device)
        teacher = torch.log_softmax(torch.randn(b, q, spec.vocab, device=device, dtype=torch.float32), dim=-1)
        return ids, teacher

    def run(inp: tuple[Any, Any]) -> None:
        ids, teacher = inp
        logits = model(input_ids=ids, use_cache=False).logits.float()
        student = torch.log_softmax(logits, dim=-1)
        loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def reset(_inp: Any) -> None:
        model.eval()
        layers.requires_grad_(False)

    return Bench(shape, spec, prepare, run, reset, trainable_params=int(sum(p.numel() for p in params)))


def shape_row(spec: ModelSpec, shape: PassShape, times: list[float], trainable_params: int = 0) -> Measurement:
    """The Measurement of `shape` on `spec` with the given call times (median kept)."""
    tokens, logits, ctx, pairs = shape.aggregates()
    if shape.pass_type == "train":
        logits, ctx = tokens, 0.0
        pairs = shape.batch * shape.q * shape.q / 2.0
    return Measurement(
        kind="pass", dtype=spec.dtype, median_s=statistics.median(times), min_s=min(times), max_s=max(times),
        repeats=len(times), model=spec.name, n_layers=spec.n_layers, pass_type=shape.pass_type, split=shape.split,
        batch=shape.batch, context=shape.context, q=shape.q, tokens=tokens, logit_tokens=logits,
        context_tokens=ctx, attention_pairs=pairs, trainable_params=trainable_params,
    )


def plan_rows(plan: Plan) -> list[Measurement]:
    """The plan's pass shapes as rows without timings (median 0), e.g. to synthesise measurements.
    Trainable parameters of a training step: the draft's decoder layers (matmul weights)."""
    rows = []
    for dtype in plan.dtypes:
        for shape in plan.shapes:
            if shape.pass_type == "train" and dtype not in plan.train_dtypes:
                continue
            spec = plan.models[shape.model].model_copy(update={"dtype": dtype})
            trainable = spec.dense_params if shape.pass_type == "train" else 0
            rows.append(shape_row(spec, shape, [0.0], trainable))
    return rows


def measure_passes(
    torch: Any, plan: Plan, device: str, timer: Timer, tick: Callable[[str], None] | None = None
) -> list[Measurement]:
    """Every pass shape of the plan in every dtype (train only in plan.train_dtypes).

    The grid is swept `plan.repeats` times after a warm-up sweep, one call per shape per sweep,
    and each shape keeps the median of its sweeps: load that comes and goes on a shared machine
    then spreads over all shapes instead of biasing the few measured while it lasted."""
    models = build_models(torch, plan.models, device)
    rows: list[Measurement] = []
    for dtype in plan.dtypes:
        for m in models.values():
            m.to(dtype=tdtype(torch, dtype))
        benches: list[Bench] = []
        for shape in plan.shapes:
            if shape.pass_type == "train" and dtype not in plan.train_dtypes:
                continue
            spec = plan.models[shape.model].model_copy(update={"dtype": dtype})
            make = train_bench if shape.pass_type == "train" else forward_bench
            benches.append(make(torch, models[shape.model], spec, shape, device))
        times: list[list[float]] = [[] for _ in benches]
        for sweep in range(plan.repeats + 1):  # sweep 0 warms up (allocations, kernels, AdamW state)
            for i, bench in enumerate(benches):
                dt = timer.once(bench.prepare, bench.run, bench.reset)
                if sweep:
                    times[i].append(dt)
            if tick is not None:
                tick(f"passes {dtype}: sweep {sweep}/{plan.repeats}")
        rows += [shape_row(b.spec, b.shape, t, b.trainable_params) for b, t in zip(benches, times, strict=True)]
        del benches
    return rows


def count_pass_steps(plan: Plan) -> int:
    return len(plan.dtypes) * (plan.repeats + 1)
