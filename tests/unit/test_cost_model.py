"""The cost model's formulas (DESIGN.md §4.1)."""

import numpy as np
import pytest

from osdsim.cost.model import BatchShape, CostModel, memory_plan
from osdsim.cost.profile import load_profile, resolve_profile_path
from osdsim.models import PRESETS
from tests.conftest import REPO


@pytest.fixture(scope="module")
def a100():
    # The classic roofline formulas: the datasheet profile (the fitted a100-80g adds kernel-level terms,
    # tested in tests/unit/test_vidur_import.py).
    return load_profile(resolve_profile_path("a100-80g-datasheet"))


def test_dense_flops_equal_two_params_per_token_plus_attention(a100):
    m = PRESETS["llama-2-7b"]
    cm = CostModel(m, a100)
    tokens, ctx = 512, 1000
    shape = BatchShape(tokens=tokens, logit_tokens=0, context_tokens=ctx, attention_pairs=tokens * (ctx + tokens / 2))
    attention = 4 * m.n_layers * m.hidden * tokens * (ctx + tokens / 2)
    assert cm.flops(shape) == pytest.approx(2 * m.dense_params * tokens + attention, rel=1e-12)
    # With logits the LM head adds 2·d·V per logit token.
    shape2 = BatchShape(tokens=tokens, logit_tokens=1, context_tokens=ctx, attention_pairs=shape.attention_pairs)
    assert cm.flops(shape2) - cm.flops(shape) == pytest.approx(2 * m.hidden * m.vocab)


def test_llama7b_parameter_count_matches_published():
    # LLaMA-7B has 6.74e9 parameters (Touvron et al. 2023).
    assert PRESETS["llama-2-7b"].total_params == pytest.approx(6.74e9, rel=0.01)
    assert PRESETS["llama-2-70b"].total_params == pytest.approx(68.98e9, rel=0.01)


def test_decode_batch1_is_memory_bound_and_costs_weight_bytes_over_bandwidth(a100):
    m = PRESETS["llama-2-7b"]
    cm = CostModel(m, a100)
    cost = cm.price(BatchShape(tokens=1, logit_tokens=1, context_tokens=100, attention_pairs=100.5))
    assert cost.memory_s > 5 * cost.compute_s
    weight_time = (m.dense_params + m.head_params) * 2 / (a100.memory_bandwidth_bytes_per_s * a100.efficiency.bandwidth)
    assert cost.memory_s == pytest.approx(weight_time, rel=0.01)
    assert cost.time_s == pytest.approx(weight_time + cost.overhead_s, rel=0.01)
    assert 0 < cost.compute_utilisation < 0.05


def test_large_prefill_is_compute_bound(a100):
    cm = CostModel(PRESETS["llama-2-7b"], a100)
    cost = cm.price(BatchShape(tokens=4096, logit_tokens=1, context_tokens=0, attention_pairs=4096 * 2048))
    assert cost.compute_s > cost.memory_s
    assert cost.compute_utilisation <= 1.0


def test_tensor_parallel_splits_work_and_adds_allreduce(a100):
    m = PRESETS["llama-2-70b"]
    one = CostModel(m, a100, tp=1).price(BatchShape(64, 64, 64 * 500, 64 * 500.5))
    two = CostModel(m, a100, tp=2).price(BatchShape(64, 64, 64 * 500, 64 * 500.5))
    assert two.flops == pytest.approx(one.flops / 2)
    assert two.bytes == pytest.approx(one.bytes / 2)
    assert two.comm_s > 0 and one.comm_s == 0


def test_pass_time_hot_path_equals_price(a100):
    cm = CostModel(PRESETS["vicuna-7b"], a100)
    s = BatchShape(37, 30, 12000, 37 * 400)
    t, f, b, c = cm.pass_time(s.tokens, s.logit_tokens, s.context_tokens, s.attention_pairs)
    p = cm.price(s)
    assert (t, f, b, c) == pytest.approx((p.time_s, p.flops, p.bytes, p.compute_s))


@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "calibration").glob("*.yaml")))
def test_scalar_pass_time_closure_gives_pass_time_bit_for_bit(profile):
    """The simulator's closure (CostModel.scalar_pass_time) repeats pass_time's expressions: every
    result must be the same float, for every profile's terms (GEMV regime, smooth roofline, attention
    kernel, non-GEMM seconds) and tensor-parallel degree."""
    rng = np.random.default_rng(14)
    prof = load_profile(resolve_profile_path(profile))
    for name, tp in (("llama-2-70b", 2), ("llama-160m", 1), ("vicuna-7b", 4)):
        cm = CostModel(PRESETS[name], prof, tp)
        fast = cm.scalar_pass_time()
        for _ in range(300):
            tokens = int(rng.choice([0, 1, 2, 3, 5, 64, 130, 512, 4096]) if rng.random() < 0.5 else rng.integers(1, 3000))
            logits = int(rng.integers(0, tokens + 1))
            ctx = float(rng.integers(0, 200_000)) + rng.choice([0.0, 0.5])
            pairs = float(rng.uniform(0, 5e7))
            ws = int(rng.integers(1, 4))
            assert fast(tokens, logits, ctx, pairs, ws) == cm.pass_time(tokens, logits, ctx, pairs, ws)
            assert fast(tokens, logits, ctx, pairs) == cm.pass_time(tokens, logits, ctx, pairs)



@pytest.mark.parametrize("profile", sorted(p.stem for p in (REPO / "calibration").glob("*.yaml")))
def test_shape_pass_time_gives_pass_time_bit_for_bit(profile):
    """CostModel.shape_pass_time evaluates a shape's own terms once: f(c, p) must equal pass_time at
    that shape for every context and pair count, bit for bit, for every profile's terms."""
    rng = np.random.default_rng(15)
    prof = load_profile(resolve_profile_path(profile))
    for name, tp in (("llama-2-70b", 2), ("llama-160m", 1), ("vicuna-7b", 4)):
        cm = CostModel(PRESETS[name], prof, tp)
        for _ in range(60):
            tokens = int(rng.choice([0, 1, 2, 3, 5, 64, 130, 512, 4096]) if rng.random() < 0.5 else rng.integers(1, 3000))
            logits = int(rng.integers(0, tokens + 1))
            ws = int(rng.integers(1, 4))
            f = cm.shape_pass_time(tokens, logits, ws)
            for _ in range(5):
                ctx = float(rng.integers(0, 200_000)) + rng.choice([0.0, 0.5])
                pairs = float(rng.uniform(0, 5e7))
                assert f(ctx, pairs) == cm.pass_time(tokens, logits, ctx, pairs, ws)

def test_training_step_is_three_forwards(a100):
    cm = CostModel(PRESETS["llama-160m"], a100)
    step = cm.training_step(1000.0, 1000.0 * 100, trainable_params=0)
    fwd = cm.flops(BatchShape(1000, 1000, 0, 1000.0 * 100 / 2))
    assert step.flops == pytest.approx(3 * fwd)


def test_memory_plan_rejects_models_that_do_not_fit(a100):
    avail, weights, cap = memory_plan(PRESETS["llama-2-70b"], [], a100, 1, 0.9)
    assert weights > avail and cap == 0
    avail, weights, cap = memory_plan(PRESETS["llama-2-70b"], [], a100, 2, 0.9)
    assert weights < avail and cap > 10_000


def test_training_step_minibatches_and_train_efficiency():
    from osdsim.cost.model import CostModel
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.models import PRESETS

    prof = load_profile(resolve_profile_path("a100-80g-datasheet"))
    draft = PRESETS["llama-160m"]
    one = CostModel(draft, prof).training_step(4000.0, 4000.0 * 500, draft.total_params)
    same = CostModel(draft, prof).training_step(4000.0, 4000.0 * 500, draft.total_params, minibatches=1)
    assert one == same
    four = CostModel(draft, prof).training_step(4000.0, 4000.0 * 500, draft.total_params, minibatches=4)
    assert four.overhead_s == pytest.approx(4 * one.overhead_s) and four.flops == one.flops
    head = CostModel(draft, prof).training_step(4000.0, 4000.0 * 500, draft.total_params, logit_tokens=1000.0)
    assert head.flops < one.flops
    slow = prof.model_copy(update={"efficiency": prof.efficiency.model_copy(update={"train_efficiency": 0.5})})
    half = CostModel(draft, slow).training_step(4000.0, 4000.0 * 500, draft.total_params)
    assert half.time_s - half.overhead_s == pytest.approx(2 * (one.time_s - one.overhead_s))
