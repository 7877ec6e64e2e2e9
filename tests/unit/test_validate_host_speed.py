"""The host-speed index from baseline decodes, and per-pass errors with the host's drift taken out."""

from types import SimpleNamespace

import pytest

from osdsim.scenario import load_scenario
from osdsim.validate.pipeline import _cost_models, _per_pass_errors, host_speed_index
from tests.conftest import REPO

K = 4


def _twin():
    return SimpleNamespace(scenario=load_scenario(REPO / "scenarios" / "shift.yaml"))


def _run(sim, speed_at):
    """Requests (one every 10 s, prompt 40) whose baseline decode and speculative passes all run at
    the host speed speed_at(start_s) times the cost model's price; every other request has no baseline."""
    draft, target = _cost_models(sim)
    reqs, steps = [], []
    for i in range(10):
        start, prompt, tokens = 10.0 * i, 40, 12
        f = speed_at(start)
        row = {"request_index": i, "start_s": start, "prompt_tokens": prompt, "baseline_tokens": "",
               "baseline_decode_s": ""}
        if i % 2 == 0:
            row["baseline_tokens"] = tokens
            row["baseline_decode_s"] = f * sum(target.decode_time(1, prompt - 1 + j) for j in range(tokens))
        reqs.append(row)
        ctx = prompt + 1
        for _ in range(3):
            steps.append({"request_index": i, "emitted": 3,
                          "draft_s": f * sum(draft.decode_time(1, ctx + j) for j in range(K)),
                          "verify_s": f * target.decode_time(1, ctx, tokens_per_seq=K + 1)})
            ctx += 3
    return reqs, steps


def test_host_speed_index_reads_the_host_speed_off_the_baseline_decodes():
    sim = _twin()
    reqs, _ = _run(sim, lambda t: 1.0 + 0.01 * t)  # 1% slower per second of the run
    speed = host_speed_index(sim, reqs)
    assert [t for t, _ in speed] == [0.0, 20.0, 40.0, 60.0, 80.0]  # baseline requests only, in time order
    assert [x for _, x in speed] == pytest.approx([1.0, 1.2, 1.4, 1.6, 1.8])


def test_drift_taken_out_leaves_only_the_cost_models_own_error():
    sim = _twin()
    reqs, steps = _run(sim, lambda t: 1.0 + 0.01 * t)
    raw = _per_pass_errors(sim, reqs, steps, K)
    corrected = _per_pass_errors(sim, reqs, steps, K, host_speed_index(sim, reqs))
    assert all(v > 0.2 for v in raw.values())  # the host got up to 1.9× slower: raw errors see it
    assert len(corrected) == 2 and all(v == pytest.approx(0.0, abs=1e-9) for v in corrected.values())
    assert all(label.endswith("host drift taken out (information)") for label in corrected)


def test_a_steady_host_changes_nothing():
    sim = _twin()
    reqs, steps = _run(sim, lambda t: 1.0)
    assert list(_per_pass_errors(sim, reqs, steps, K).values()) == pytest.approx([0.0, 0.0], abs=1e-12)
    assert [x for _, x in host_speed_index(sim, reqs)] == pytest.approx([1.0] * 5)
