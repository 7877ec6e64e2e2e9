"""Invariants that every simulation must keep, and determinism."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from osdsim.api import compare, simulate
from tests.conftest import merge


def check_invariants(res, arrived: int, complete: bool = True) -> None:
    """complete: the run had no time cap, so every request must have finished or been rejected."""
    req = res.requests
    assert len(req) == arrived
    # Each request ends in exactly one state. A rejected request was never admitted nor served.
    assert not (req["finished"] & req["rejected"]).any()
    rej = req[req["rejected"]]
    assert rej["admitted_s"].isna().all() and (rej["emitted_tokens"] == 0).all()
    if complete:  # nothing lost: finished or rejected, nothing else
        assert (req["finished"] | req["rejected"]).all()
    fin = req[req["finished"]]
    # Emitted tokens equal requested output tokens.
    assert (fin["emitted_tokens"] == fin["output_tokens"]).all()
    # Conservation between what the replicas served (iteration log) and what the requests received
    # (request table): a request lost from a batch or served / finished twice breaks the equality.
    it = res.iterations
    if complete and not it.empty:
        assert int(it["emitted_tokens"].sum()) == int(req["emitted_tokens"].sum())
        if "decode_seqs" in it:
            serve = it[it["kind"] == "serve"]
            assert int(serve["decode_seqs"].sum()) == int(req["steps"].sum())
    # Accepted never exceeds proposed; causality of timestamps.
    assert (req["accepted_tokens"] <= req["proposed_tokens"]).all()
    assert (fin["admitted_s"] >= fin["arrival_s"]).all()
    assert (fin["first_token_s"] > fin["admitted_s"]).all()
    assert (fin["finish_s"] >= fin["first_token_s"]).all()
    a = req["alpha_measured"].dropna()
    assert ((a >= 0) & (a <= 1)).all()
    # Utilisation ≤ 1, time never goes backwards within a replica.
    ts = res.timeseries
    for col in ("compute_utilisation", "bandwidth_utilisation", "busy_fraction"):
        assert (ts[col] <= 1 + 1e-9).all()
    for _, it in res.iterations.groupby("replica"):
        t = it["t_s"].to_numpy()
        end = t + it["duration_s"].to_numpy()
        assert np.all(np.diff(t) >= 0)
        assert np.all(t[1:] >= end[:-1] - 1e-12)
        assert (it["duration_s"] > 0).all()
    u = res.summary["utilisation"]
    for key in ("busy_fraction", "compute", "bandwidth"):
        assert u[key] is None or 0 <= u[key] <= 1


@pytest.mark.parametrize("strategy", ["no-spec", "static"])
@pytest.mark.parametrize("router,replicas", [("round-robin", 1), ("least-outstanding", 3), ("random", 2)])
def test_invariants_hold(make_scenario, strategy, router, replicas):
    sc = make_scenario({"strategy": strategy, "router": router, "hardware": {"replicas": replicas},
                        "workload": {"rate_per_s": 20.0}})
    res = simulate(sc)
    check_invariants(res, 200)
    assert res.summary["requests"]["finished"] == 200
    if replicas > 1:
        assert res.requests["replica"].nunique() == replicas


def test_check_invariants_catches_a_lost_or_double_counted_request(make_scenario):
    res = simulate(make_scenario({"workload": {"rate_per_s": 20.0}}))
    check_invariants(res, 200)

    def broken(edit):
        req = res.requests.copy()
        it = res.iterations.copy()
        edit(req, it)
        return SimpleNamespace(requests=req, iterations=it, timeseries=res.timeseries, summary=res.summary)

    def lose(req, it):  # a request that never finished and was not rejected
        req.loc[7, ["finish_s", "finished", "emitted_tokens"]] = [np.nan, False, 0]

    def served_twice(req, it):  # one decode iteration booked twice
        it.loc[len(it)] = it[it["emitted_tokens"] > 0].iloc[0]

    def finished_and_rejected(req, it):
        req.loc[3, "rejected"] = True

    for edit in (lose, served_twice, finished_and_rejected):
        with pytest.raises(AssertionError):
            check_invariants(broken(edit), 200)


def test_requests_too_long_for_kv_are_reported_not_lost(make_scenario):
    sc = make_scenario({"batching": {"kv_cache_tokens": 300}})
    res = simulate(sc)
    check_invariants(res, 200)
    s = res.summary["requests"]
    assert s["rejected_too_long"] > 0
    assert s["finished"] + s["rejected_too_long"] == 200


def test_same_seed_same_summary_different_seed_differs(make_scenario):
    def summary(seed):
        cmp = compare(make_scenario({"seed": seed}), strategies=["no-spec", "static"])
        return json.dumps({k: r.summary for k, r in cmp.results.items()})

    assert summary(3) == summary(3)
    assert summary(3) != summary(4)


def test_common_random_numbers_across_strategies(make_scenario):
    cmp = compare(make_scenario(), strategies=["no-spec", "static"])
    a, b = cmp.results["no-spec"].requests, cmp.results["static"].requests
    assert (a["arrival_s"] == b["arrival_s"]).all()
    assert (a["output_tokens"] == b["output_tokens"]).all()
    assert (a["domain"] == b["domain"]).all()


def test_gamma_arrivals_have_the_requested_cv(make_scenario):
    from osdsim.sim.workload import generate_requests

    sc = make_scenario({"workload": {"arrival": "gamma", "cv": 3.0, "num_requests": 40_000, "rate_per_s": 10.0}})
    gaps = np.diff(generate_requests(sc).arrival_s)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.08)


def test_trace_arrivals(tmp_path, make_scenario):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,domain,prompt_tokens,output_tokens\n0.5,a,10,5\n0.1,b,20,7\n2.0,a,30,9\n")
    sc = make_scenario({"workload": {"arrival": "trace", "trace_file": str(trace)}})
    res = simulate(sc)
    req = res.requests
    assert list(req["arrival_s"]) == [0.1, 0.5, 2.0]
    assert list(req["output_tokens"]) == [7, 5, 9]
    check_invariants(res, 3)


def test_binned_iteration_log_gives_the_same_summary(make_scenario):
    full = simulate(make_scenario({"report": {"iteration_log": "full"}, "workload": {"rate_per_s": 20.0}}))
    binned = simulate(make_scenario({"report": {"iteration_log": "binned", "time_bin_s": 0.5},
                                     "workload": {"rate_per_s": 20.0}}))
    assert binned.iterations["kind"].eq("bin").all()
    assert full.summary["latency_s"] == binned.summary["latency_s"]
    for key in ("busy_fraction", "compute", "bandwidth", "mean_batch"):
        assert binned.summary["utilisation"][key] == pytest.approx(full.summary["utilisation"][key], rel=1e-5)
    assert binned.summary["speculation"]["mean_k"] == pytest.approx(full.summary["speculation"]["mean_k"])


@pytest.mark.parametrize("update", [
    {},  # the base scenario
    {"strategy": "no-spec"},
    {"strategy": "osd", "speculation": {"k": "auto"}, "distill": {"placement": "inline", "update_interval_requests": 4}},
    {"strategy": "osd", "distill": {"placement": "harvest", "update_interval_requests": 2}},
    {"hardware": {"replicas": 3}, "router": "least-outstanding", "workload": {"rate_per_s": 6.0}},
    {"batching": {"max_batch_size": 2, "chunked_prefill_tokens": 64}},
    {"batching": {"max_batch_size": 4, "chunked_prefill_tokens": 64, "prefill_pass": "separate"}},
    {"batching": {"chunked_prefill_tokens": 96, "prefill_pass": "separate", "attention_padding": 1.2}},
])
def test_macro_steps_give_exactly_the_one_iteration_at_a_time_results(make_scenario, update):
    """Replica._stretch covers several iterations (prefill chunks included) in one event: every
    request's times and outcomes and every iteration record must equal one event per iteration
    (macro_steps=0: the same code with m = 1) bit for bit."""
    from osdsim.sim.engine import build_and_run

    sc = make_scenario(merge({"workload": {"num_requests": 400}}, update))
    slow, fast = build_and_run(sc, macro_steps=0), build_and_run(sc, macro_steps=64)
    for f in ("arrival", "admitted", "first_token", "finish", "accepted", "rejections", "steps", "emitted", "proposed"):
        assert np.array_equal(getattr(slow.table, f), getattr(fast.table, f), equal_nan=True), f
    assert slow.iterations.equals(fast.iterations)
    assert slow.stats.spare_s_available == fast.stats.spare_s_available
    assert slow.busy_s == fast.busy_s


def test_a_stretch_cut_mid_iteration_lands_on_the_boundary_itself():
    """A stretch woken by an arrival mid-iteration sleeps on to that iteration's end: it must land on
    the boundary's own sum (one iteration at a time does), not on now + (end − now), which misses it by
    an ulp here (found by the property test: request 3 admitted at ...72500 instead of ...72498)."""
    from osdsim.scenario import scenario_from_dict
    from osdsim.sim.engine import build_and_run

    lengths = {"prompt_tokens": {"kind": "uniform", "low_tokens": 1, "high_tokens": 3},
               "output_tokens": {"kind": "uniform", "low_tokens": 1, "high_tokens": 3}}
    spec = {"name": "ulp", "seed": 2304, "models": {"target": "vicuna-7b", "draft": "llama-160m"},
            "hardware": {"profile": "a100-80g", "replicas": 2}, "router": "least-outstanding",
            "batching": {"max_batch_size": 2, "chunked_prefill_tokens": None}, "strategy": "no-spec",
            "acceptance": {"domains": {"a": {"alpha_0": 0.0}, "b": {"alpha_0": 0.0}}},
            "workload": {"arrival": "gamma", "rate_per_s": 171.5, "cv": 1.875, "domains": {"a": lengths, "b": lengths},
                         "shift": {"unit": "requests", "phases": [
                             {"start": 0, "end": 3, "mix": {"a": 1.0}},
                             {"start": 3, "end": 6, "mix": {"a": 0.3, "b": 0.7}, "mix_end": {"b": 1.0}}]}}}
    sc = scenario_from_dict(spec)
    slow, fast = build_and_run(sc, macro_steps=0), build_and_run(sc, macro_steps=64)
    for f in ("admitted", "first_token", "finish"):
        assert getattr(slow.table, f).tolist() == getattr(fast.table, f).tolist(), f
    assert slow.iterations.equals(fast.iterations)


def _two_requests(tmp_path, make_scenario, prompts, padding, strategy="no-spec"):
    trace = tmp_path / f"pad-{prompts[0]}-{prompts[1]}.csv"
    trace.write_text(f"arrival_s,domain,prompt_tokens,output_tokens\n0,a,{prompts[0]},40\n0,a,{prompts[1]},40\n")
    # α = 1: every row accepts all k drafts (rows grow alike, so n · longest tracks Σ context exactly).
    sc = make_scenario({"workload": {"arrival": "trace", "trace_file": str(trace)}, "strategy": strategy,
                        "acceptance": {"domains": {"a": {"alpha_0": 1.0}, "b": {"alpha_0": 1.0}}},
                        "batching": {"attention_padding": padding, "chunked_prefill_tokens": None},
                        "report": {"iteration_log": "full"}})
    res = simulate(sc)
    it = res.iterations
    return res, it[(it["prefill_tokens"] == 0) & (it["decode_seqs"] == 2)]["duration_s"].to_numpy()


@pytest.mark.parametrize("strategy", ["no-spec", "static"])
def test_padded_attention_prices_every_row_at_the_longest_context(tmp_path, make_scenario, strategy):
    # A padded batch cache: rows of 100 and 3000 prompt tokens decode as two rows of 3000 would with
    # paged attention (n · longest = Σ context when the rows are alike), bit for bit.
    _, padded = _two_requests(tmp_path, make_scenario, (100, 3000), 1.0, strategy)
    _, alike = _two_requests(tmp_path, make_scenario, (3000, 3000), None, strategy)
    _, paged = _two_requests(tmp_path, make_scenario, (100, 3000), None, strategy)
    assert len(padded) > 5 and len(padded) == len(alike) == len(paged)
    assert (padded == alike).all() and (padded > paged).all()
    # Holes beyond the longest row (ρ > 1) cost more; alike rows with ρ = 1 are paged attention exactly.
    _, holes = _two_requests(tmp_path, make_scenario, (100, 3000), 1.5, strategy)
    assert (holes > padded).all()
    res_pad, _ = _two_requests(tmp_path, make_scenario, (3000, 3000), 1.0, strategy)
    res_paged, _ = _two_requests(tmp_path, make_scenario, (3000, 3000), None, strategy)
    assert res_pad.requests["finish_s"].tolist() == res_paged.requests["finish_s"].tolist()


@pytest.mark.parametrize("update", [
    {},  # static, k = 4
    {"strategy": "no-spec"},
    {"hardware": {"replicas": 2}, "workload": {"rate_per_s": 12.0}},  # round-robin: routing known ahead
    {"batching": {"max_batch_size": 4, "chunked_prefill_tokens": 48, "kv_cache_tokens": 900}},  # queues, tiny chunks
    {"strategy": "no-spec", "batching": {"kv_cache_tokens": 700}, "workload": {"rate_per_s": 30.0}},  # KV-bound, rejects
    {"batching": {"max_batch_size": 4, "chunked_prefill_tokens": 48, "prefill_pass": "separate"}},  # own prefill passes
])
def test_chains_give_exactly_the_one_iteration_at_a_time_results(make_scenario, update, monkeypatch):
    """Replica._chain runs iterations across finishes and admissions in one event when only the known
    arrivals steer a replica: the same bits as one event per iteration, and chains did run."""
    from osdsim.sim import replica
    from osdsim.sim.engine import build_and_run

    runs = []
    chain_run = replica.Replica._chain_run
    monkeypatch.setattr(replica.Replica, "_chain_run", lambda self, *a: runs.append(1) or chain_run(self, *a))
    sc = make_scenario(merge({"workload": {"num_requests": 300}}, update))
    slow = build_and_run(sc, macro_steps=0)
    assert not runs  # macro_steps = 0: one iteration per event, the reference
    fast = build_and_run(sc, macro_steps=64)
    assert runs
    for f in ("arrival", "admitted", "first_token", "finish", "accepted", "rejections", "steps", "emitted", "proposed",
              "rejected"):
        assert np.array_equal(getattr(slow.table, f), getattr(fast.table, f), equal_nan=True), f
    assert slow.iterations.equals(fast.iterations)
    assert slow.busy_s == fast.busy_s
    assert slow.sim_time_s == fast.sim_time_s


def _prefill_iterations(tmp_path, make_scenario, prefill_pass, strategy="static"):
    """Request 0 (40 prompt tokens) decodes alone when request 1 (300 prompt tokens) arrives; the
    budget is 64 tokens per iteration, k = 4, α = 0 (one token per step: the rows stay put)."""
    trace = tmp_path / f"pf-{prefill_pass}-{strategy}.csv"
    trace.write_text("arrival_s,domain,prompt_tokens,output_tokens\n0,a,40,400\n0.05,a,300,20\n")
    sc = make_scenario({"workload": {"arrival": "trace", "trace_file": str(trace)}, "strategy": strategy,
                        "acceptance": {"domains": {"a": {"alpha_0": 0.0}, "b": {"alpha_0": 0.0}}},
                        "speculation": {"k": 4},
                        "batching": {"chunked_prefill_tokens": 64, "prefill_pass": prefill_pass},
                        "report": {"iteration_log": "full"}})
    res = simulate(sc)
    return sc, res.iterations


def test_separate_prefill_prices_its_own_passes_with_the_whole_budget(tmp_path, make_scenario):
    """prefill_pass: separate (osdsim.real's server): an iteration with B decoders and P prefill tokens
    costs k draft passes over B + the draft's prefill pass over P + the target's verify pass over
    B·(k+1) + its prefill pass over P, and P may take the whole chunked_prefill_tokens budget; fused
    (vLLM) puts P in the verify pass and gives it what B·(k+1) leaves."""
    from osdsim.cost.model import CostModel
    from osdsim.sim.engine import load_scenario_profile

    sc, sep = _prefill_iterations(tmp_path, make_scenario, "separate")
    _, fus = _prefill_iterations(tmp_path, make_scenario, "fused")
    mixed_sep = sep[(sep["decode_seqs"] == 1) & (sep["prefill_tokens"] > 0)]
    mixed_fus = fus[(fus["decode_seqs"] == 1) & (fus["prefill_tokens"] > 0)]
    assert mixed_sep["prefill_tokens"].iloc[0] == 64  # the whole budget
    assert mixed_fus["prefill_tokens"].iloc[0] == 64 - 5  # what the verify tokens B·(k+1) = 5 leave
    assert len(mixed_sep) == 5 and len(mixed_fus) == 6  # ⌈300 / 64⌉ vs ⌈300 / 59⌉ chunks
    # The first mixed iteration, priced by hand: request 0's context c, the chunk's 64 tokens from 0.
    row = mixed_sep.iloc[0]
    prof = load_scenario_profile(sc)
    target, draft = CostModel(sc.target, prof), CostModel(sc.draft, prof)
    prev = sep[sep["t_s"] < row["t_s"]]
    c = 40 + int(prev["emitted_tokens"].sum())  # request 0's prompt + tokens emitted so far
    k, b, q, p = 4, 1, 5, 64
    mean_extra = b * (k - 1) / 2.0
    expected = (k * draft.pass_time(b, b, c + mean_extra, c + mean_extra + b / 2.0)[0]
                + draft.pass_time(p, 0, 0.0, p * p / 2.0)[0]
                + target.pass_time(b * q, b * q, c, q * c + b * q * q / 2.0)[0]
                + target.pass_time(p, 0, 0.0, p * p / 2.0)[0])
    assert row["duration_s"] == pytest.approx(expected, rel=1e-12)
    fused_row = mixed_fus.iloc[0]
    pf = 64 - 5
    expected_fused = (k * draft.pass_time(b, b, c + mean_extra, c + mean_extra + b / 2.0)[0]
                      + draft.pass_time(pf, 0, 0.0, pf * pf / 2.0)[0]
                      + target.pass_time(b * q + pf, b * q, c, q * c + b * q * q / 2.0 + pf * pf / 2.0)[0])
    assert fused_row["duration_s"] == pytest.approx(expected_fused, rel=1e-12)


@pytest.mark.parametrize("prefill_pass", ["fused", "separate"])
def test_a_speculating_replica_prices_the_drafts_prefill_when_nobody_decodes(tmp_path, make_scenario, prefill_pass):
    """The draft builds its own KV cache of every prompt: a prefill-only iteration (nobody decodes
    yet) of a speculating replica costs the target's and the draft's prefill passes; no-spec has no draft."""
    _, spec = _prefill_iterations(tmp_path, make_scenario, prefill_pass, "static")
    _, nospec = _prefill_iterations(tmp_path, make_scenario, prefill_pass, "no-spec")
    first_spec, first_nospec = spec.iloc[0], nospec.iloc[0]
    assert first_spec["decode_seqs"] == 0 and first_spec["prefill_tokens"] == 40
    assert first_spec["duration_s"] > first_nospec["duration_s"]
