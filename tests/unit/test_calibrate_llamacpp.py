"""The llama.cpp calibration's measurement loop: host-speed correction by a bracketing canary.

The loop's models are stand-ins with a fake clock (a pass costs a fixed time per shape times the
host's current slowness), so the correction can be checked exactly; the real passes are measured by
the `real`-marked CLI test in tests/integration/test_calibrate_cli.py."""

from __future__ import annotations

import types

import numpy as np
import pytest

from osdsim.calibrate import llamacpp as lcal


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slowness = 1.0

    def perf_counter(self) -> float:
        return self.now


class FakeLM:
    """n_past / n_vocab / reset / truncate / feed as LlamaCppLM; feed advances the clock."""

    def __init__(self, clock: Clock, layers: int) -> None:
        self.clock, self.layers, self.n_past, self.n_vocab = clock, layers, 0, 1000

    def cost_s(self, q: int, all_logits: bool) -> float:
        return 1e-3 * self.layers * q * (1.5 if all_logits else 1.0) + 1e-6 * self.n_past

    def feed(self, ids: list[int], all_logits: bool = True) -> None:
        self.clock.now += self.cost_s(len(ids), all_logits) * self.clock.slowness
        self.n_past += len(ids)

    def truncate(self, n: int) -> None:
        self.n_past = n

    def reset(self) -> None:
        self.n_past = 0


class FakeBatchLM:
    """decode(blocks) / seq_rm / n_vocab as LlamaCppBatchLM: each block costs as a FakeLM pass."""

    def __init__(self, clock: Clock, layers: int) -> None:
        self.clock, self.layers, self.n_vocab = clock, layers, 1000
        self.lengths: dict[int, int] = {}

    def decode(self, blocks) -> None:
        for blk in blocks:
            assert self.lengths.get(blk.seq_id, 0) == blk.pos0  # appended right after what it holds
            one = FakeLM(self.clock, self.layers)
            one.n_past = blk.pos0
            one.feed(blk.tokens, all_logits=len(blk.want) == len(blk.tokens))
            self.lengths[blk.seq_id] = blk.pos0 + len(blk.tokens)

    def seq_rm(self, seq_id: int, p0: int) -> None:
        self.lengths[seq_id] = min(self.lengths.get(seq_id, 0), p0)


def batched_cost_s(shape, layers: int) -> float:
    """The fake clock's time of a batched shape: B blocks of q tokens after c."""
    one = FakeLM(Clock(), layers)
    one.n_past = shape.context
    return shape.batch * one.cost_s(shape.q, shape.pass_type != "prefill")


class DriftingCanary(FakeLM):
    """The canary model; the host changes speed just before each bracketed pass (at every second
    canary reset), so a pass and its two canaries run at one speed, each pass at its own."""

    def __init__(self, clock: Clock, rng: np.random.Generator) -> None:
        super().__init__(clock, layers=1)
        self.rng, self.resets = rng, 0

    def reset(self) -> None:
        if self.resets % 2 == 0:
            self.clock.slowness = float(self.rng.choice([1.0, 1.7]))
        self.resets += 1
        super().reset()


def _measure(monkeypatch, with_canary: bool):
    clock = Clock()
    monkeypatch.setattr(lcal, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    lplan = lcal.plan(quick=True)
    models = {name: FakeLM(clock, layers) for name, layers in lplan.models.items()}
    seqs = {}
    for shape in lplan.shapes:
        if shape.batch > 1:
            seqs.setdefault(shape.model, {})[shape.context] = list(range(100, 100 + shape.batch))
    banks = {m: lcal.BatchedBank(FakeBatchLM(clock, lplan.models[m]), v) for m, v in seqs.items()}
    canary = DriftingCanary(clock, np.random.default_rng(3)) if with_canary else None
    return lplan, models, lcal.measure(models, lplan, canary=canary, batched=banks)


def _truth_s(shape, lplan, models) -> float:
    if shape.batch > 1:
        return batched_cost_s(shape, lplan.models[shape.model])
    lm = models[shape.model]
    lm.n_past = shape.context
    return lm.cost_s(shape.q, shape.pass_type != "prefill")


def test_host_corrected_scales_each_sample_by_the_reference_over_its_canary():
    assert lcal.host_corrected([2.0, 3.4, 1.0], [1.0, 1.7, 0.5], 1.0) == pytest.approx([2.0, 2.0, 2.0])
    assert lcal.host_corrected([2.0], [2.0], 2.0) == [2.0]


def test_bracketing_canaries_remove_the_host_drift_from_every_shape(monkeypatch):
    lplan, models, rows = _measure(monkeypatch, with_canary=True)
    passes = [r for r in rows if r.kind == "pass"]
    (canary,) = [r for r in rows if r.kind == "canary"]
    assert canary.model == lcal.canary_model(lplan) == min(lplan.models, key=lplan.models.get)
    assert canary.tokens == lcal.CANARY_TOKENS and canary.repeats == 2 * len(passes) * lplan.repeats
    # the reference speed is the median canary's: 1 layer × 8 tokens × 1 ms at the median slowness
    reference_slowness = canary.median_s / (1e-3 * lcal.CANARY_TOKENS)
    assert canary.min_s == pytest.approx(8e-3) and canary.max_s == pytest.approx(8e-3 * 1.7)
    drifted = 0
    for r, shape in zip(passes, lplan.shapes, strict=True):
        truth = _truth_s(shape, lplan, models) * reference_slowness
        assert r.median_s == pytest.approx(truth, rel=1e-9)  # every sample lands on the same time
        assert r.min_s == pytest.approx(r.max_s, rel=1e-9)
        drifted += abs(r.raw_median_s / truth - 1) > 0.05  # the uncorrected medians keep the drift
    assert drifted > 0


def test_batched_shapes_run_b_sequences_after_their_context_and_leave_it_as_it_was(monkeypatch):
    lplan, models, rows = _measure(monkeypatch, with_canary=False)
    batched = [(r, s) for r, s in zip(rows, lplan.shapes, strict=True) if s.batch > 1]
    assert {s.pass_type for _, s in batched} >= {"decode", "verify"} and {s.split for _, s in batched} == {"fit", "heldout"}
    for r, shape in batched:
        assert (r.batch, r.tokens, r.context_tokens) == (shape.batch, shape.batch * shape.q, shape.batch * shape.context)
        assert r.median_s == pytest.approx(_truth_s(shape, lplan, models), rel=1e-9)


def test_a_batched_shape_without_its_batched_context_is_refused(monkeypatch):
    lplan = lcal.plan(quick=True)
    clock = Clock()
    monkeypatch.setattr(lcal, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    with pytest.raises(ValueError, match="batched context"):
        lcal.measure({m: FakeLM(clock, n) for m, n in lplan.models.items()}, lplan)


def test_without_a_canary_the_medians_are_the_raw_times(monkeypatch):
    _, _, rows = _measure(monkeypatch, with_canary=False)
    assert not [r for r in rows if r.kind == "canary"]
    for r in rows:
        assert r.median_s == r.raw_median_s > 0
