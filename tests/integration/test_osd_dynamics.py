"""Online distillation in the simulator: α dynamics, placements, spare compute, shift recovery."""

import math

import numpy as np
import pytest

from osdsim.api import compare, simulate
from osdsim.cost.model import CostModel
from osdsim.cost.profile import load_profile, resolve_profile_path
from osdsim.models import PRESETS
from osdsim.sim.distill import DraftState, alpha_curve

FIXED = {"prompt_tokens": {"kind": "fixed", "value_tokens": 50}, "output_tokens": {"kind": "fixed", "value_tokens": 50}}


def sharp(update: dict, n1=300, n2=600, rate=0.2, a_acc=None, b_acc=None, **distill):
    return {
        "strategy": "osd",
        "speculation": {"k": 4},
        "acceptance": {"__replace__": True, "transfer": 0.0, "domains": {
            "a": a_acc or {"alpha_0": 0.9, "alpha_inf": 0.9},
            "b": b_acc or {"alpha_0": 0.3, "alpha_inf": 0.8, "tau_tokens": 5000},
        }},
        "distill": {"placement": "inline", "update_interval_requests": 1, "tokens": "all", **distill},
        "workload": {"__replace__": True, "arrival": "poisson", "rate_per_s": rate,
                     "domains": {"a": FIXED, "b": FIXED},
                     "shift": {"unit": "requests", "phases": [
                         {"start": 0, "end": n1, "mix": {"a": 1.0}},
                         {"start": n1, "end": n2, "mix": {"b": 1.0}}]}},
        "report": {"alpha_window_requests": 1},
        **update,
    }


def test_draft_state_follows_closed_form_and_transfer():
    st = DraftState(0, np.array([0.3, 0.5]), np.array([0.8, 0.7]), np.array([1000.0, 1000.0]), -0.5, True)
    st.train(np.array([500.0, 0.0]))
    assert st.alpha[0] == pytest.approx(alpha_curve(500, 0.3, 0.8, 1000))
    assert st.alpha[1] == pytest.approx(0.5)  # forgetting never takes α below the untrained draft
    st.train(np.array([0.0, 2000.0]))
    # Domain 0 forgot half of 2000 tokens: n_eff = max(500 − 1000, 0) = 0.
    assert st.alpha[0] == pytest.approx(0.3)
    assert st.alpha[1] == pytest.approx(alpha_curve(2000, 0.5, 0.7, 1000))


def test_osd_with_flat_curve_equals_static_exactly(make_scenario):
    # α_0 = α_∞ and harvest without interference: training cannot change serving.
    sc = make_scenario(sharp({}, a_acc={"alpha_0": 0.6, "alpha_inf": 0.6}, b_acc={"alpha_0": 0.4, "alpha_inf": 0.4},
                             placement="harvest", interference=0.0, update_interval_requests=4, rate=5.0))
    cmp = compare(sc, strategies=["static", "osd"])
    cols = ["arrival_s", "first_token_s", "finish_s", "steps", "accepted_tokens", "alpha_model"]
    a = cmp.results["static"].requests[cols]
    b = cmp.results["osd"].requests[cols]
    assert a.equals(b)
    assert cmp.results["osd"].summary["training"]["steps_done"] > 0
    assert cmp.results["static"].summary["latency_s"] == cmp.results["osd"].summary["latency_s"]


def test_inline_training_adds_exactly_its_cost_to_busy_time(make_scenario):
    flat = {"a_acc": {"alpha_0": 0.6, "alpha_inf": 0.6}, "b_acc": {"alpha_0": 0.4, "alpha_inf": 0.4}}
    sc = make_scenario(sharp({}, n1=40, n2=80, rate=0.05, update_interval_requests=4, **flat))
    cmp = compare(sc, strategies=["static", "osd"])
    osd, static = cmp.results["osd"], cmp.results["static"]
    steps = osd.summary["training"]["steps_done"]
    # The last step falls due as the last request finishes, when the simulation ends.
    assert osd.summary["training"]["steps_due"] == 80 // 4
    assert steps + osd.summary["training"]["steps_pending_at_end"] == 80 // 4
    # Each step trains 4 requests of 100 tokens each; price it independently.
    prof = load_profile(resolve_profile_path("a100-80g-datasheet"))
    draft = PRESETS["llama-160m"]
    cost = CostModel(draft, prof).training_step(400.0, 4 * 100.0**2, draft.total_params)
    busy_osd = osd.iterations["duration_s"].sum()
    busy_static = static.iterations["duration_s"].sum()
    assert busy_osd - busy_static == pytest.approx(steps * cost.time_s, rel=1e-9)
    assert osd.summary["training"]["latency_cost_s"] == pytest.approx(steps * cost.time_s, rel=1e-5)


def test_inline_publish_pause_blocks_serving_and_delays_the_new_alpha(make_scenario):
    """distill.publish_pause_s (a llama.cpp server exporting and reloading the draft after a step):
    each done step adds exactly the pause to the serving timeline, logged as a "publish" row, and the
    step's α reaches serving only after it."""
    pause = 0.75
    plain = simulate(make_scenario(sharp({}, n1=20, n2=40, rate=0.02, update_interval_requests=4)))
    res = simulate(make_scenario(sharp({}, n1=20, n2=40, rate=0.02, update_interval_requests=4, publish_pause_s=pause)))
    pubs = res.iterations[res.iterations["kind"] == "publish"]
    trains = res.iterations[res.iterations["kind"] == "train"].reset_index(drop=True)
    done = res.training[res.training["kind"] == "done"].reset_index(drop=True)
    assert len(pubs) == len(trains) == len(done) > 0
    assert pubs["duration_s"].to_numpy() == pytest.approx(np.full(len(pubs), pause))
    # The publication starts as its training step ends, and the step completes when it ends.
    assert pubs["t_s"].to_numpy() == pytest.approx((trains["t_s"] + trains["duration_s"]).to_numpy())
    assert done["time_s"].to_numpy() == pytest.approx((pubs["t_s"] + pause).to_numpy())
    assert res.summary["training"]["latency_cost_s"] == pytest.approx(
        plain.summary["training"]["latency_cost_s"] + pause * len(pubs), rel=1e-6)
    assert plain.iterations["kind"].isin(["serve", "train"]).all()  # 0 (the default): no publish rows


def test_harvest_at_near_zero_load_trains_at_the_spare_rate(make_scenario):
    sc = make_scenario(sharp({}, n1=10, n2=20, rate=0.01, placement="harvest", update_interval_requests=2,
                             harvest_fraction=0.25))
    res = simulate(sc)
    ev = res.training[res.training["kind"] == "done"]
    assert len(ev) == 9  # the 10th falls due as the last request finishes, when the run ends
    prof = load_profile(resolve_profile_path("a100-80g-datasheet"))
    draft = PRESETS["llama-160m"]
    cost = CostModel(draft, prof).training_step(200.0, 2 * 100.0**2, draft.total_params)
    # Idle device: spare = F·η·θ per second, so a step takes its full-speed time / θ.
    assert ev["duration_s"].to_numpy() == pytest.approx(np.full(9, cost.time_s / 0.25), rel=1e-6)
    t = res.summary["training"]
    assert t["train_work_flops_used"] <= t["spare_flops_available"] * (1 + 1e-9)


@pytest.mark.parametrize("train_dtype", [None, "fp32"])
def test_harvest_step_on_an_idle_device_takes_its_full_speed_time_over_theta(make_scenario, train_dtype):
    """Spare compute and training work are in one unit whatever the training dtype: on an idle
    replica a harvest step takes exactly its inline (full-speed) time / θ. With fp32 training under
    bf16 serving (19.5 vs 312 TFLOP/s on an A100) the spare rate must be the fp32 device's, not the
    serving dtype's (which finished the step 16× too soon)."""
    theta = 0.5
    extra = {} if train_dtype is None else {"train_dtype": train_dtype}

    def durations(placement):
        sc = make_scenario(sharp({}, n1=10, n2=20, rate=0.01, placement=placement, update_interval_requests=2,
                                 harvest_fraction=theta, interference=0.0, **extra))
        res = simulate(sc)
        ev = res.training[res.training["kind"] == "done"]
        assert len(ev) == 9
        return ev["duration_s"].to_numpy(), res.summary["training"]

    inline, _ = durations("inline")
    harvest, t = durations("harvest")
    assert harvest == pytest.approx(inline / theta, rel=1e-9)
    prof = load_profile(resolve_profile_path("a100-80g-datasheet"))
    draft = PRESETS["llama-160m"]
    if train_dtype is not None:
        draft = draft.model_copy(update={"dtype": train_dtype})
    cost = CostModel(draft, prof).training_step(200.0, 2 * 100.0**2, draft.total_params)
    assert inline == pytest.approx(np.full(9, cost.time_s), rel=1e-12)
    # FLOP-equivalent work of the training dtype: the used work is the 9 steps' full-speed time.
    used = 9 * cost.time_s * prof.peak_flops(draft.dtype) * CostModel(draft, prof).eta_max
    assert t["train_work_flops_used"] == pytest.approx(used, rel=1e-5)
    assert t["train_work_flops_used"] <= t["spare_flops_available"] * (1 + 1e-9)


def test_harvest_at_saturation_trains_almost_nothing(make_scenario):
    # Long prompts with large prefill chunks and k = 8 verify passes keep the GPU compute-bound.
    heavy = {"prompt_tokens": {"kind": "fixed", "value_tokens": 3000},
             "output_tokens": {"kind": "fixed", "value_tokens": 20}}
    upd = {"batching": {"max_batch_size": 256, "chunked_prefill_tokens": 8192}, "speculation": {"k": 8}}

    def run(rate):
        spec = sharp(upd, n1=200, n2=1200, rate=rate, placement="harvest", update_interval_requests=8,
                     interference=0.0, harvest_fraction=0.5)
        spec["workload"]["domains"] = {"a": heavy, "b": heavy}
        spec["acceptance"]["domains"]["b"] = {"alpha_0": 0.3, "alpha_inf": 0.8, "tau_tokens": 2000}
        return simulate(make_scenario(spec))

    idle, saturated = run(0.5), run(200.0)
    a_idle = idle.requests[idle.requests["domain"] == "b"]["alpha_model"].iloc[-50:].mean()
    a_sat = saturated.requests[saturated.requests["domain"] == "b"]["alpha_model"].iloc[-50:].mean()
    assert a_idle > 0.75
    assert a_sat - 0.3 < 0.1 * (a_idle - 0.3)
    t = saturated.summary["training"]
    assert t["steps_skipped"] > 0 and t["cost_neutral"] is False
    assert t["train_work_flops_used"] <= t["spare_flops_available"] * (1 + 1e-9)


def test_sharp_shift_drop_and_recovery_matches_closed_form(make_scenario):
    tau, a0, ainf, tol = 5000.0, 0.3, 0.8, 0.02
    sc = make_scenario(sharp({}, n1=300, n2=900))
    res = simulate(sc)
    req = res.requests
    first_b = req[req["domain"] == "b"].iloc[0]
    assert first_b["alpha_model"] == pytest.approx(a0)  # drops at once to the new domain's value
    rec = res.summary["recovery"][0]
    assert rec["alpha_after_shift"] == pytest.approx(a0)
    # n* = τ·ln((α_∞ − α_0)/tol) tokens; every request distils its 50 output tokens.
    n_star = tau * math.log((ainf - a0) / tol)
    assert rec["recovered_after_requests"] == pytest.approx(n_star / 50, rel=0.10)
    # The trajectory follows α(n) with n = 50 tokens per earlier b-request (low load, inline).
    b = req[req["domain"] == "b"]["alpha_model"].to_numpy()[:200]
    expected = alpha_curve(50 * np.arange(200), a0, ainf, tau)
    assert b == pytest.approx(expected, abs=0.02)


def test_dedicated_trainer_publishes_after_sync_delay(make_scenario):
    sc = make_scenario(sharp({}, n1=20, n2=60, rate=1.0, placement="dedicated", sync_delay_s=5.0,
                             update_interval_requests=4))
    res = simulate(sc)
    t = res.summary["training"]
    assert t["steps_due"] == 60 // 4 and t["steps_done"] > 10
    assert t["latency_cost_s"] == 0
    al = res.alpha[res.alpha["time_s"] > 0]
    ev = res.training[res.training["kind"] == "done"]
    # α changes only when a step is published: sync delay after it finished training.
    assert np.all(al["time_s"].to_numpy() == pytest.approx(ev["time_s"].to_numpy()))


def test_colocated_dedicated_trainer_slows_only_the_iterations_it_overlaps(make_scenario):
    def spec(**kw):
        return sharp({}, n1=20, n2=60, rate=1.0, placement="dedicated", sync_delay_s=0.5,
                     update_interval_requests=4, epochs_per_step=50, **kw)  # steps of ~0.24 s

    base = simulate(make_scenario(spec()))
    slow = simulate(make_scenario(spec(dedicated_interference=0.5)))
    it = slow.iterations[slow.iterations["kind"] != "train"]
    t = slow.training[slow.training["kind"] == "done"]
    spans = list(zip(t["time_s"] - t["duration_s"] - 0.5, t["time_s"] - 0.5, strict=True))  # trainer busy
    lost = slow.summary["training"]["latency_cost_s"]
    assert base.summary["training"]["latency_cost_s"] == 0 and lost > 0
    # Exactly a third of the serving time of the iterations that began while the trainer trained
    # (not one that began at the very instant its step became due: the trainer starts after it).
    during = [any(a < s0 < b for a, b in spans) for s0 in it["t_s"]]
    assert lost == pytest.approx(float(it["duration_s"][during].sum()) / 3, abs=2e-6)  # summary: 6 decimals
    assert slow.requests["e2e_s"].mean() > base.requests["e2e_s"].mean()


def test_per_domain_drafts_do_not_forget(make_scenario):
    spec = sharp({}, n1=200, n2=400, rate=0.2)
    spec["acceptance"]["transfer"] = -1.0
    spec["acceptance"]["domains"]["a"] = {"alpha_0": 0.3, "alpha_inf": 0.8, "tau_tokens": 2000}
    spec["workload"]["shift"]["phases"].append({"name": "a-again", "start": 400, "end": 450, "mix": {"a": 1.0}})
    cmp = compare(make_scenario(spec), strategies=["osd", "osd-per-domain"])
    back = lambda r: r.requests[r.requests["phase"] == "a-again"]["alpha_model"].iloc[0]  # noqa: E731
    assert back(cmp.results["osd-per-domain"]) > 0.75
    assert back(cmp.results["osd"]) < 0.4  # the shared draft forgot domain a while learning b


def test_forgetting_erodes_a_shared_drafts_progress_and_per_domain_drafts_keep_theirs(make_scenario):
    """acceptance.forgetting_tokens: with positive transfer, a shared draft trained long on b comes
    back to a below where it left it (eroded, then topped up by the transfer); without forgetting it
    comes back higher (transfer only); per-domain drafts keep a's progress either way."""
    def spec(forgetting):
        sp = sharp({}, n1=200, n2=400, rate=0.2)
        sp["acceptance"]["transfer"] = 0.2
        sp["acceptance"]["forgetting_tokens"] = forgetting
        sp["acceptance"]["domains"]["a"] = {"alpha_0": 0.3, "alpha_inf": 0.8, "tau_tokens": 20000}
        sp["workload"]["shift"]["phases"][0]["name"] = "a-first"
        sp["workload"]["shift"]["phases"].append({"name": "a-again", "start": 400, "end": 450, "mix": {"a": 1.0}})
        return make_scenario(sp)

    def alpha_at(res, phase, first):
        rows = res.requests[res.requests["phase"] == phase]["alpha_model"]
        return rows.iloc[0] if first else rows.iloc[-1]

    forget = compare(spec(3000.0), strategies=["osd", "osd-per-domain"]).results
    keep = simulate(spec(None))
    left = alpha_at(forget["osd"], "a-first", first=False)
    assert alpha_at(forget["osd"], "a-again", first=True) < left - 0.05
    assert alpha_at(keep, "a-again", first=True) > alpha_at(keep, "a-first", first=False)
    assert alpha_at(forget["osd-per-domain"], "a-again", first=True) == pytest.approx(
        alpha_at(forget["osd-per-domain"], "a-first", first=False), abs=0.02)


def test_forgetting_tokens_must_be_positive(make_scenario):
    from osdsim.errors import InputError

    sp = sharp({})
    sp["acceptance"]["forgetting_tokens"] = -5.0
    with pytest.raises(InputError, match="forgetting_tokens"):
        make_scenario(sp)


def test_rising_load_reports_where_harvest_stalls(make_scenario):
    heavy = {"prompt_tokens": {"kind": "fixed", "value_tokens": 3000},
             "output_tokens": {"kind": "fixed", "value_tokens": 20}}
    spec = sharp({"batching": {"max_batch_size": 256, "chunked_prefill_tokens": 8192}, "speculation": {"k": 8}},
                 placement="harvest", update_interval_requests=8, interference=0.0)
    spec["workload"] = {"__replace__": True, "arrival": "poisson", "rate_per_s": 1.0, "rate_ramp_to_per_s": 60.0,
                        "duration_s": 60.0, "domains": {"a": heavy}}
    spec["acceptance"]["domains"] = {"a": {"alpha_0": 0.3, "alpha_inf": 0.8, "tau_tokens": 2000}}
    res = simulate(make_scenario(spec))
    stall = res.summary["training"]["stalled_at_rate_per_s"]
    assert stall is not None and 1.0 < stall < 60.0


def test_training_step_options_price_dtype_padding_head_and_minibatches(make_scenario):
    """train_dtype, batch_sequences (padded shuffled minibatches), logits_at and epochs_per_step
    change the step's price exactly as CostModel.training_step says (fixed lengths: no padding)."""
    flat = {"a_acc": {"alpha_0": 0.6, "alpha_inf": 0.6}, "b_acc": {"alpha_0": 0.4, "alpha_inf": 0.4}}
    sc = make_scenario(sharp({}, n1=20, n2=40, rate=0.05, update_interval_requests=4, train_dtype="fp32",
                             batch_sequences=3, logits_at="loss", epochs_per_step=2, **flat))
    res = simulate(sc)
    prof = load_profile(resolve_profile_path("a100-80g-datasheet"))
    draft = PRESETS["llama-160m"].model_copy(update={"dtype": "fp32"})
    # 4 requests of 50 + 50 tokens in minibatches of 3 + 1, twice; the head only at the 50 outputs.
    want = CostModel(draft, prof).training_step(2 * 400.0, 2 * 4 * 100.0**2, draft.total_params,
                                                logit_tokens=2 * 200.0, minibatches=4)
    done = res.training[res.training["kind"] == "done"]
    assert len(done) > 0
    assert done["duration_s"].to_numpy() == pytest.approx(want.time_s, rel=1e-12)
    bf16 = CostModel(PRESETS["llama-160m"], prof).training_step(400.0, 4 * 100.0**2, draft.total_params)
    assert want.time_s > 2 * bf16.time_s  # fp32, two epochs, four minibatches


def test_padded_minibatches_match_enumeration():
    import itertools

    from osdsim.sim.distill import padded_minibatches

    lengths = [3.0, 10.0, 4.0, 7.0, 7.0, 1.0]
    for b in (1, 2, 3, 4, 6):
        tokens, sq = padded_minibatches(lengths, b)
        # Brute force: the expected padded size of the full minibatches and of the remainder.
        full, rest = divmod(len(lengths), b)
        want_t = want_sq = 0.0
        for size, count in ((b, full), (rest, 1 if rest else 0)):
            if count:
                subsets = list(itertools.combinations(lengths, size))
                want_t += count * size * np.mean([max(s) for s in subsets])
                want_sq += count * size * np.mean([max(s) ** 2 for s in subsets])
        assert tokens == pytest.approx(want_t) and sq == pytest.approx(want_sq)
    assert padded_minibatches(lengths, 1) == pytest.approx((sum(lengths), sum(x * x for x in lengths)))


def test_trained_tokens_progress_counts_every_pass_over_the_window(make_scenario):
    # Window 8, a step every 2 requests, 2 epochs: after the first 8 requests each later step trains
    # 8 × 50 tokens twice; "new_tokens" counts only the 2 new requests' 100 tokens.
    base = dict(n1=20, n2=40, rate=0.05, update_interval_requests=2, window_requests=8, epochs_per_step=2)
    runs = {}
    for progress in ("new_tokens", "trained_tokens"):
        sc = make_scenario(sharp({}, progress=progress, **base))
        runs[progress] = simulate(sc).training
    new = runs["new_tokens"][runs["new_tokens"]["kind"] == "done"]["tokens"].to_numpy()
    trained = runs["trained_tokens"][runs["trained_tokens"]["kind"] == "done"]["tokens"].to_numpy()
    assert set(new.tolist()) == {100.0}
    assert trained[:4].tolist() == [200.0, 400.0, 600.0, 800.0] and set(trained[4:].tolist()) == {800.0}


def test_closed_loop_trace_replays_one_request_after_another(make_scenario, tmp_path):
    """trace_replay: closed — request i is sent think_s after request i−1 came back, including the
    inline training step it made due; latency excludes that training (as in the real harness)."""
    trace = tmp_path / "t.csv"
    rows = ["arrival_s,domain,prompt_tokens,output_tokens,think_s"]
    rows += [f"{100.0 * i},b,50,50,{0.5 if i % 3 else 0.0}" for i in range(12)]
    trace.write_text("\n".join(rows) + "\n")
    upd = sharp({}, update_interval_requests=4)
    upd["workload"] = {"__replace__": True, "arrival": "trace", "trace_file": str(trace), "trace_replay": "closed",
                       "domains": {"a": {}, "b": {}},
                       "shift": {"unit": "requests", "phases": [{"start": 0, "end": 12, "mix": {"b": 1.0}}]}}
    upd["batching"] = {"max_batch_size": 1}
    res = simulate(make_scenario(upd))
    req = res.requests.sort_values("request_id")
    arrival, finish = req["arrival_s"].to_numpy(), req["finish_s"].to_numpy()
    train = res.training[res.training["kind"] == "done"]
    step_s = float(train["duration_s"].iloc[0])
    assert len(train) == 2  # the third falls due as the last request finishes, when the run ends
    for i in range(1, 12):
        think = 0.5 if i % 3 else 0.0
        trained = step_s if i % 4 == 0 else 0.0  # a step falls due after every 4th request
        assert arrival[i] == pytest.approx(finish[i - 1] + trained + think, abs=1e-9)
    assert np.all(req["admitted_s"].to_numpy() == arrival)  # nobody waits behind training


def test_idle_only_harvest_trains_in_whole_units_and_never_in_serving_iterations(make_scenario):
    """harvest_in_iterations: false (the real CPU server): busy iterations give no spare compute;
    at near-zero load a step still takes its full-speed time / θ, run as whole minibatch units; at
    a load with no idle windows nothing trains, where in-iteration harvest still trains."""
    def run(rate, in_iter, n=(10, 20)):
        spec = sharp({}, n1=n[0], n2=n[1], rate=rate, placement="harvest", update_interval_requests=2,
                     harvest_fraction=0.5, interference=0.0, harvest_in_iterations=in_iter, batch_sequences=1)
        return simulate(make_scenario(spec))

    idle_units, idle_spare = run(0.01, False), run(0.01, True)
    a = idle_units.training[idle_units.training["kind"] == "done"]["duration_s"].to_numpy()
    b = idle_spare.training[idle_spare.training["kind"] == "done"]["duration_s"].to_numpy()
    assert len(a) == len(b) == 9
    assert a == pytest.approx(b, rel=1e-9)  # an idle device: the same work at the same rate
    busy_units, busy_spare = run(400.0, False, (100, 400)), run(400.0, True, (100, 400))
    assert busy_spare.summary["training"]["steps_done"] > 0
    assert busy_units.summary["training"]["steps_done"] < busy_spare.summary["training"]["steps_done"]
    t = busy_units.summary["training"]
    assert t["train_work_flops_used"] <= t["spare_flops_available"] * (1 + 1e-9)
