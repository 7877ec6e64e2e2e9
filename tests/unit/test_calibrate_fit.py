"""The calibration fit (issue 4): it recovers known cost-model parameters from measurements the cost
model itself generated, and its vectorised predictor is exactly CostModel. No torch needed."""

from __future__ import annotations

import numpy as np
import pytest

from osdsim.calibrate.fit import (
    PARAM_NAMES,
    fit_passes,
    pass_terms,
    predict,
    spec_for,
    synthetic_rows,
)
from osdsim.calibrate.measure import rows_from_csv, rows_to_csv
from osdsim.calibrate.passes import cpu_plan, cuda_plan, plan_rows
from osdsim.cost.model import CostModel
from osdsim.cost.profile import Efficiency, HardwareProfile, Provenance

PEAKS = {"fp32": 9.0e10, "bf16": 1.7e11}
BANDWIDTH = 3.0e10


def profile_with(eff: Efficiency, by_dtype: dict[str, Efficiency] | None = None) -> HardwareProfile:
    return HardwareProfile(
        schema_version=1, name="synthetic", device="synthetic", peak_flops_per_s=PEAKS,
        memory_bandwidth_bytes_per_s=BANDWIDTH, memory_bytes=1e11, interconnect_bandwidth_bytes_per_s=1e10,
        efficiency=eff, efficiency_by_dtype=by_dtype or {}, provenance=Provenance(source="measured"),
    )


TRUE_FP32 = Efficiency(flops_max=0.62, flops_half_tokens=3.0, bandwidth=0.41,
                       kernel_overhead_s_per_layer=4.0e-4, pass_overhead_s=2.5e-3, kv_bandwidth=0.12,
                       gemv_max_tokens=3, train_efficiency=0.6)
TRUE_BF16 = Efficiency(flops_max=0.8, flops_half_tokens=4.0, bandwidth=0.55,
                       kernel_overhead_s_per_layer=2.0e-4, pass_overhead_s=1.0e-3, kv_bandwidth=0.05)


def assert_recovered(got: Efficiency, true: Efficiency, label: str) -> None:
    for name in PARAM_NAMES:
        want = getattr(true, name)
        if want is None:  # kv_bandwidth unset means η_kv = η_b
            want = true.bandwidth
        assert getattr(got, name) == pytest.approx(want, rel=0.02), (label, name)
    assert got.gemv_max_tokens == true.gemv_max_tokens, label


def test_fit_recovers_known_parameters_within_2_percent():
    truth = profile_with(TRUE_FP32, {"bf16": TRUE_BF16})
    rows = synthetic_rows(plan_rows(cpu_plan(quick=False)), truth)
    result = fit_passes(rows, PEAKS, BANDWIDTH, overhead_guess_s=3e-6)
    assert_recovered(result.efficiency["fp32"], TRUE_FP32, "fp32")
    assert_recovered(result.efficiency["bf16"], TRUE_BF16, "bf16")
    # Training steps are fitted after the forward passes, by their own efficiency.
    assert result.efficiency["fp32"].train_efficiency == pytest.approx(0.6, rel=0.02)
    for summary in result.heldout.values():
        assert summary["max_ape_pct"] < 0.5


def test_quick_grid_fit_recovers_parameters_without_a_separate_kv_efficiency():
    # The quick grid moves little KV-cache traffic, so η_kv stays at η_b (the fit's weak prior).
    true = TRUE_FP32.model_copy(update={"kv_bandwidth": None, "gemv_max_tokens": 0})
    rows = synthetic_rows(plan_rows(cpu_plan(quick=True)), profile_with(true))
    result = fit_passes(rows, PEAKS, BANDWIDTH, overhead_guess_s=3e-6)
    assert_recovered(result.efficiency["fp32"], true, "fp32")


def test_fit_recovers_gpu_grid_parameters():
    eff = Efficiency(flops_max=0.7, flops_half_tokens=64.0, bandwidth=0.8,
                     kernel_overhead_s_per_layer=3e-5, pass_overhead_s=2e-4)
    peaks = {"bf16": 9.89e14, "fp32": 6.7e13}
    prof = profile_with(eff).model_copy(update={"peak_flops_per_s": peaks, "memory_bandwidth_bytes_per_s": 4.8e12})
    rows = synthetic_rows(plan_rows(cuda_plan(False)), prof)
    got = fit_passes(rows, peaks, 4.8e12, overhead_guess_s=5e-6).efficiency["bf16"]
    assert_recovered(got, eff, "bf16")


def test_vectorised_prediction_is_the_cost_model():
    prof = profile_with(TRUE_FP32)
    rows = plan_rows(cpu_plan(False))
    rows = [r for r in rows if r.dtype == "fp32"]
    params = np.array([getattr(TRUE_FP32, n) for n in PARAM_NAMES])
    pred = predict(params, pass_terms(rows, PEAKS, BANDWIDTH), TRUE_FP32.gemv_max_tokens, TRUE_FP32.train_efficiency)
    for r, p in zip(rows, pred, strict=True):
        cm = CostModel(spec_for(r.model, r.dtype), prof)
        if r.pass_type == "train":
            want = cm.training_step(float(r.tokens), float(r.batch * r.q * r.q), r.trainable_params).time_s
        else:
            want = cm.pass_time(r.tokens, r.logit_tokens, r.context_tokens, r.attention_pairs)[0]
        assert p == pytest.approx(want, rel=1e-12)


def test_small_passes_read_the_weights_once_per_token_when_gemv_max_tokens_is_set():
    spec = spec_for("smollm2-135m-l2", "fp32")
    plain = CostModel(spec, profile_with(TRUE_FP32.model_copy(update={"gemv_max_tokens": 0})))
    gemv = CostModel(spec, profile_with(TRUE_FP32))  # g = 3
    for tokens in (1, 2, 3, 4):
        t_plain, _, b_plain, _ = plain.pass_time(tokens, tokens, 100.0 * tokens, 100.5 * tokens)
        t_gemv, _, b_gemv, _ = gemv.pass_time(tokens, tokens, 100.0 * tokens, 100.5 * tokens)
        reads = tokens if tokens <= 3 else 1
        assert b_gemv - b_plain == pytest.approx((reads - 1) * plain.weight_bytes)
        assert (t_gemv > t_plain) == (reads > 1)


def test_efficiency_by_dtype_prices_that_dtype_and_defaults_to_efficiency():
    prof = profile_with(TRUE_FP32, {"bf16": TRUE_BF16})
    fp32 = CostModel(spec_for("smollm2-135m", "fp32"), prof)
    bf16 = CostModel(spec_for("smollm2-135m", "bf16"), prof)
    assert fp32._fixed_s == pytest.approx(30 * 4.0e-4 + 2.5e-3)
    assert bf16._fixed_s == pytest.approx(30 * 2.0e-4 + 1.0e-3)
    plain = profile_with(TRUE_FP32)
    assert CostModel(spec_for("smollm2-135m", "bf16"), plain)._fixed_s == pytest.approx(fp32._fixed_s)


def test_layer_variant_names_resolve_to_specs():
    s = spec_for("vicuna-7b-l4", "bf16")
    assert (s.n_layers, s.hidden, s.dtype) == (4, 4096, "bf16")
    with pytest.raises(ValueError):
        spec_for("no-such-model", "fp32")


def test_measurements_round_trip_through_csv():
    rows = synthetic_rows(plan_rows(cpu_plan(True)), profile_with(TRUE_FP32))
    back = rows_from_csv(rows_to_csv(rows))
    assert len(back) == len(rows)
    for a, b in zip(rows, back, strict=True):
        assert (a.model, a.pass_type, a.split, a.batch, a.context, a.q, a.tokens) == (
            b.model, b.pass_type, b.split, b.batch, b.context, b.q, b.tokens)
        assert b.median_s == pytest.approx(a.median_s, rel=1e-5)


def test_model_names_with_a_reduced_head():
    spec = spec_for("smollm2-135m-l2-v4096", "bf16")
    assert (spec.n_layers, spec.vocab, spec.dtype) == (2, 4096, "bf16")
    assert spec_for("smollm2-135m-l4", "fp32").vocab == 49152
    with pytest.raises(ValueError):
        spec_for("smollm2-135m-x2", "fp32")


def test_a_cpu_without_native_bf16_times_its_passes_in_fp32_only():
    with_bf16, without = cpu_plan(False), cpu_plan(False, bf16=False)
    assert with_bf16.dtypes == ("fp32", "bf16") and without.dtypes == ("fp32",)
    assert without.shapes == with_bf16.shapes and without.train_dtypes == ("fp32",)
    fp32_rows = [r for r in plan_rows(with_bf16) if r.dtype == "fp32"]
    assert plan_rows(without) == fp32_rows
