"""The load validation's twin of a recorded serve run, comparisons and timelines (no torch needed)."""

import csv
import json

import numpy as np
import pytest
import yaml

from osdsim.errors import InputError
from osdsim.validate import load
from osdsim.validate.trace import combine, serve_run_trace, sim_trace
from tests.conftest import REPO, analytic_profile

SPEC = {"layers": 4, "hidden": 64, "heads": 4, "kv_heads": 2, "ffn": 128, "vocab": 512, "tied_embeddings": True}


def _write(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def fake_serve_run(d, n=24, rate=4.0, placement="harvest", seed=0):
    """A recorded serve run of the server's format: arrivals, lengths, iterations, training rows."""
    from osdsim.real.config import RealConfig

    rng = np.random.default_rng(seed)
    cfg = RealConfig(name="fake", models={"target": "tiny"}, stream={"domains": ["finance", "gsm8k"],
                     "requests_per_phase": n // 2}, decode={"k": 3, "max_new_tokens": 12},
                     distill={"update_interval": 4},
                     serve={"rate_per_s": rate, "placement": placement, "max_batch_size": 4,
                            "kv_token_budget": 4096, "chunked_prefill_tokens": 64, "max_pending_steps": 2})
    d.mkdir(parents=True)
    arrivals = np.round(np.cumsum(rng.exponential(1 / rate, n)), 6)
    arrivals[0] = 0.0
    reqs = []
    for i, a in enumerate(arrivals):
        out = int(rng.integers(2, 13))
        acc = int(rng.integers(0, 2 * out))
        reqs.append({"request_index": i, "phase": int(i >= n // 2), "phase_name": "finance" if i < n // 2 else "gsm8k",
                     "domain": "finance" if i < n // 2 else "gsm8k", "uid": f"u{i}", "arrival_s": float(a),
                     "admitted_s": a + 0.001, "first_token_s": a + 0.01, "finish_s": a + 0.05, "queue_s": 0.001,
                     "ttft_s": 0.01, "tpot_s": 0.004, "e2e_s": 0.05, "prompt_tokens": int(rng.integers(20, 200)),
                     "output_tokens": out, "hit_eos": False, "steps": out // 2 + 1, "proposed": 3 * (out // 2 + 1),
                     "accepted": acc, "rejections": out // 2, "alpha": "", "accepted_lengths": "1 0"})
    _write(d / "requests.csv", reqs)
    its = [{"iteration": j, "start_s": 0.01 * j, "end_s": 0.01 * j + 0.008, "batch_size": 1 + j % 3,
            "prefill_rows": 0, "prefill_tokens": 0, "prefill_s": 0.0, "draft_s": 0.003, "verify_s": 0.004, "k": 3,
            "verify_tokens": 4 * (1 + j % 3), "context_tokens": 100, "waiting": 0, "proposed": 3, "accepted": 1,
            "emitted": 2, "trainer_busy": 0, "draft_version": 0} for j in range(30)]
    _write(d / "iterations.csv", its)
    _write(d / "steps.csv", [{"request_index": 0, "iteration": 0, "proposed": 3, "accepted": 1, "emitted": 2}])
    tr = [{"step": s + 1, "due_s": 0.5 * s, "started_s": 0.5 * s + 0.1 if s % 2 == 0 else "", "done_s":
           0.5 * s + 0.2 if s % 2 == 0 else "", "published_s": "", "status": "done" if s % 2 == 0 else "skipped",
           "samples": 4, "positions": 40, "units": 1, "train_s": 0.1 if s % 2 == 0 else 0.0, "loss_before": "",
           "loss_after": ""} for s in range(6)]
    _write(d / "training.csv", tr)
    _write(d / "training_units.csv", [{"step": 1, "unit": 0, "start_s": 0.1, "end_s": 0.2, "preempted": 0}])
    summary = {"mode": "serve", "name": "fake", "config": cfg.model_dump(mode="json"), "device": "cpu",
               "threads": 1, "serve_dtype": "float32", "draft_vocab": None, "target": SPEC,
               "draft": {**SPEC, "layers": 1}, "placement": placement, "requests": n,
               "training": {"steps_due": 6, "steps_done": 3, "steps_skipped": 3, "steps_pending_at_end": 0,
                            "idle_s_used": 0.3},
               "phases": [{"phase": 0, "name": "finance", "alpha_heldout_end": {"finance": 0.5, "gsm8k": 0.1}},
                          {"phase": 1, "name": "gsm8k", "alpha_heldout_end": {"finance": 0.4, "gsm8k": 0.3}}]}
    (d / "summary.json").write_text(json.dumps(summary))
    return load.load_serve_run(d)


def _acceptance(tmp_path):
    acc = {"transfer": 0.0, "distillation_helps": False,
           "domains": {d: {"alpha_0": 0.3, "alpha_inf": 0.7, "tau_tokens": 200.0} for d in ("finance", "gsm8k")}}
    law = {"k": 3, "entries": [{"alpha": 0.2, "histogram": [8, 2, 1, 1]}, {"alpha": 0.8, "histogram": [1, 2, 3, 8]}]}
    (tmp_path / "acc.yaml").write_text(yaml.safe_dump(acc))
    (tmp_path / "law.yaml").write_text(yaml.safe_dump(law))
    return tmp_path / "acc.yaml", tmp_path / "law.yaml"


def _twin(tmp_path, run):
    prof = analytic_profile(tmp_path, kernel_s=2e-4, pass_s=1e-3)
    acc, law = _acceptance(tmp_path)
    doc = load.serve_twin_scenario(run, str(prof), acc, law, tmp_path / "trace.csv")
    return doc, load.simulate_twin(doc, tmp_path)


@pytest.mark.parametrize("placement", ["harvest", "dedicated", "inline"])
def test_twin_of_a_recorded_serve_run_reproduces_its_arrivals_exactly(tmp_path, placement):
    run = fake_serve_run(tmp_path / "run", placement=placement)
    doc, twin = _twin(tmp_path, run)
    assert doc["workload"]["arrival"] == "trace" and doc["workload"]["trace_replay"] == "open"
    assert doc["batching"] == {"max_batch_size": 4, "chunked_prefill_tokens": 64, "kv_cache_tokens": 4096,
                               "attention_padding": None, "prefill_pass": "separate"}
    assert doc["distill"]["placement"] == placement and doc["distill"]["max_pending_steps"] == 2
    assert doc["distill"]["update_interval_requests"] == 4
    sim = twin.result.requests.sort_values("request_id")
    rec = sorted(run.requests, key=lambda r: float(r["arrival_s"]))
    assert sim["arrival_s"].tolist() == [float(r["arrival_s"]) for r in rec]  # exactly, not approximately
    assert sim["domain"].tolist() == [r["domain"] for r in rec]
    assert sim["prompt_tokens"].tolist() == [int(r["prompt_tokens"]) for r in rec]
    assert sim["output_tokens"].tolist() == [int(r["output_tokens"]) for r in rec]
    assert sim["phase"].tolist() == [r["phase_name"] for r in rec]


def test_comparison_rows_and_fall_behind_rate(tmp_path):
    run = fake_serve_run(tmp_path / "run", n=40, rate=20.0)
    _, twin = _twin(tmp_path, run)
    rows, series = load.compare_serve("r", run, twin, load.LoadTolerances())
    names = [r.name for r in rows]
    for want in ("r: TTFT p50", "r: TPOT p90", "r: E2E p50", "r: mean batch (decoding rows, time-weighted)",
                 "r: queueing delay, mean", "r: α, phase finance", "r: tokens per step (incl. bonus)",
                 "r: training steps due", "r: training steps done", "r: training steps skipped",
                 "r: seconds of idle time used for training", "r: α at the end of phase gsm8k (gsm8k)"):
        assert want in names
    by = {r.name: r for r in rows}
    assert by["r: training steps due"].measured == 6 and by["r: E2E p50"].measured == pytest.approx(0.05)
    # Measured mean batch: Σ batch·duration / Σ duration of the recorded iterations.
    assert by["r: mean batch (decoding rows, time-weighted)"].measured == pytest.approx(np.mean([1 + j % 3 for j in range(30)]))
    assert series["train_done_measured"] == [pytest.approx(0.2), pytest.approx(1.2), pytest.approx(2.2)]
    # Measured fall-behind: first skipped step due at 0.5 s; trailing rate of the arrivals before it.
    arr = np.array([float(r["arrival_s"]) for r in run.requests])
    assert load.stall_rate(arr, 0.5) is None or load.stall_rate(arr, 0.5) > 0
    t = np.arange(100) * 0.1  # 10 req/s exactly
    assert load.stall_rate(t, 9.95) == pytest.approx(10.0)
    assert load.stall_rate(t, 0.5) is None  # fewer than 10 arrivals: undefined
    fb = load.fall_behind_rows([("a", run, twin), ("b", run, twin)], load.LoadTolerances())
    assert len(fb) == 1 and "falls behind" in fb[0].name


def test_traces_of_both_sides_share_one_schema(tmp_path):
    run = fake_serve_run(tmp_path / "run")
    _, twin = _twin(tmp_path, run)
    meas, pred = serve_run_trace(tmp_path / "run", pid=1), sim_trace(twin.result, pid=2)
    for tr in (meas, pred):
        ev = tr["traceEvents"]
        json.dumps(tr)
        assert {e["name"] for e in ev if e["ph"] == "X"} >= {"iteration", "train"}
        assert all(e["dur"] >= 0 for e in ev if e["ph"] == "X")
        assert {e["args"]["name"] for e in ev if e["name"] == "thread_name"} == {"replica 0 serving", "replica 0 training"}
        for e in ev:
            if e["name"] == "iteration":
                assert set(e["args"]) == {"batch", "prefill_tokens", "k", "emitted"}
    names = {e["name"] for e in meas["traceEvents"]}
    assert {"draft", "verify", "idle", "step skipped"} <= names
    assert len([e for e in meas["traceEvents"] if e["name"] == "iteration"]) == 30
    both = combine(meas, pred)
    assert {e["pid"] for e in both["traceEvents"]} == {1, 2}


def test_load_suite_bad_input_names_the_run_and_field(tmp_path):
    doc = yaml.safe_load((REPO / "validate" / "cpu-load.yaml").read_text())
    suite = load.LoadSuite(**doc)
    fit, runs = load.run_configs(suite, REPO / "validate" / "cpu-load.yaml")
    assert len(runs) >= 3 and fit.serve is not None
    placements = [c.serve.placement for _, c in runs]
    assert placements.count("harvest") >= 2 and "dedicated" in placements
    assert len({c.serve.rate_per_s for _, c in runs if c.serve.placement == "harvest"}) >= 2
    for bad, msg in (({"serve": {"placement": "elsewhere"}}, "placement"), ({"serve": {"rate_per_s": 0}}, "rate_per_s"),
                     ({"serve": {"max_batch_size": 0}}, "max_batch_size")):
        d = {**doc, "runs": [{"label": "x", "overrides": bad}]}
        with pytest.raises(InputError, match=rf"run 'x': .*{msg}"):
            load.run_configs(load.LoadSuite(**d), tmp_path / "s.yaml")
    d = {**doc, "heldout": {**doc["heldout"], "serve": None}, "runs": [{"label": "x"}]}
    with pytest.raises(InputError, match="needs a serve"):
        load.run_configs(load.LoadSuite(**d), tmp_path / "s.yaml")
    # the second fit run: its fields are checked like the fit's, and it must be served
    with pytest.raises(InputError, match=r"fit_reverse: .*rate_per_s"):
        load.run_configs(load.LoadSuite(**{**doc, "fit_reverse": {"serve": {"rate_per_s": 0}}}), tmp_path / "s.yaml")
    with pytest.raises(InputError, match="fit_reverse: the second fit run needs a served fit run"):
        load.run_configs(load.LoadSuite(**{**doc, "fit_reverse": {"serve": None}}), tmp_path / "s.yaml")
    rev = load.reverse_fit_config(suite, tmp_path / "s.yaml", fit)
    assert rev.seed != fit.seed and rev.stream.domains == list(reversed(fit.stream.domains))
    assert rev.name == f"{fit.name}-reverse" and rev.serve.placement == fit.serve.placement == "inline"


def test_runs_given_as_a_load_take_their_rate_from_the_capacity(tmp_path):
    doc = yaml.safe_load((REPO / "validate" / "cpu-load.yaml").read_text())
    doc["runs"] = [{"label": "low", "load": 0.25}, {"label": "ramp", "load": 0.5, "load_end": 2.0},
                   {"label": "abs", "overrides": {"serve": {"rate_per_s": 0.7}}}]
    suite = load.LoadSuite(**doc)
    _, runs = load.run_configs(suite, tmp_path / "s.yaml", capacity_per_s=0.4)
    sv = {lbl: c.serve for lbl, c in runs}
    assert sv["low"].rate_per_s == pytest.approx(0.1) and sv["low"].rate_end_per_s is None
    assert (sv["ramp"].rate_per_s, sv["ramp"].rate_end_per_s) == (pytest.approx(0.2), pytest.approx(0.8))
    assert sv["abs"].rate_per_s == 0.7  # an absolute rate stays as given
    limited = {**doc, "runs": [{"label": "low", "load": 0.5, "load_of": "harvest_limit"}]}
    _, (only,) = load.run_configs(load.LoadSuite(**limited), tmp_path / "s.yaml", 0.4, harvest_limit_per_s=0.1)
    assert only[1].serve.rate_per_s == pytest.approx(0.05)  # half the harvest limit, not of the capacity
    _, placeholder = load.run_configs(suite, tmp_path / "s.yaml")  # before S1: the rest is still checked
    assert len(placeholder) == 3
    with pytest.raises(ValueError, match="load_end: needs load"):
        load.RunSpec(label="x", load_end=2.0)
    with pytest.raises(ValueError, match="load"):
        load.RunSpec(label="x", load=0)
    trace = {**doc, "runs": [{"label": "t", "load": 0.5,
                              "overrides": {"serve": {"arrival": "trace", "trace_file": "a.csv"}}}]}
    with pytest.raises(InputError, match="run 't': load: needs serve.arrival poisson"):
        load.run_configs(load.LoadSuite(**trace), tmp_path / "s.yaml", 1.0)


def test_capacity_is_the_twins_saturated_throughput(tmp_path):
    run = fake_serve_run(tmp_path / "run", n=40)
    prof = analytic_profile(tmp_path, kernel_s=2e-4, pass_s=1e-3)
    acc, law = _acceptance(tmp_path)
    cap = load.predicted_capacity(run, str(prof), acc, law, tmp_path, tmp_path)
    assert cap > 0 and cap == load.predicted_capacity(run, str(prof), acc, law, tmp_path, tmp_path)
    # Batching is what raises it: the same requests one at a time are served more slowly.
    run.summary["config"]["serve"]["max_batch_size"] = 1
    one = load.predicted_capacity(run, str(prof), acc, law, tmp_path, tmp_path)
    assert one < cap
    with pytest.raises(InputError, match="too few requests"):
        load.predicted_capacity(fake_serve_run(tmp_path / "tiny", n=4), str(prof), acc, law, tmp_path, tmp_path)


def test_harvest_limit_is_where_the_twins_harvest_training_falls_behind(tmp_path):
    """predicted_harvest_limit: S1's requests on a rising rate with harvest training; the rate at
    which training falls behind for good is within the ramp, deterministic, and falls when a
    training step costs more (every step's work ×8: the idle windows suffice at fewer arrivals)."""
    from osdsim.real.config import DistillCfg, ServeCfg

    run = fake_serve_run(tmp_path / "run", n=40)
    prof = analytic_profile(tmp_path, kernel_s=2e-4, pass_s=1e-3)
    acc, law = _acceptance(tmp_path)
    cap = load.predicted_capacity(run, str(prof), acc, law, tmp_path, tmp_path)

    class Heldout:
        distill = DistillCfg(update_interval=2)
        serve = ServeCfg(rate_per_s=1.0, placement="harvest", max_pending_steps=1)

    limit = load.predicted_harvest_limit(run, Heldout, cap, str(prof), acc, law, tmp_path, tmp_path)
    lo, hi = (f * cap for f in load.HARVEST_LIMIT_RAMP)
    assert lo <= limit <= hi
    assert limit == load.predicted_harvest_limit(run, Heldout, cap, str(prof), acc, law, tmp_path, tmp_path)

    class Heavier(Heldout):
        distill = DistillCfg(update_interval=2, epochs_per_update=8)

    assert load.predicted_harvest_limit(run, Heavier, cap, str(prof), acc, law, tmp_path, tmp_path) < limit


def test_training_falls_behind_for_good_not_at_a_chance_skip():
    D, S = "done", "skipped"
    assert load.behind_from([S, D, S, S, D, D, D, D, D, D]) is None  # an early burst, then it keeps up
    assert load.behind_from([D, D, S, D, S, S, S, D, S]) == 2  # from step 3 on, 5 of 7 skipped
    assert load.behind_from([S, D, S, S, S, S]) == 0
    assert load.behind_from([D, D, D]) is None and load.behind_from([]) is None
    # The rate there: the configured rate at the requests that had arrived when that step was due
    # (a step is due at every `interval`-th finish); a ramp rises by request index.
    arrivals = np.arange(20, dtype=float)  # one per second
    finishes = arrivals + 0.5
    ramp = {"arrival": "poisson", "rate_per_s": 1.0, "rate_end_per_s": 20.0}
    # behind from the 3rd step: due at the 6th finish (5.5 s), 6 requests arrived -> index 5
    rate = load.fall_behind_rate([D, D, S, S, S, S], finishes, arrivals, ramp, interval=2)
    assert rate == pytest.approx(1.0 + 19.0 * 5 / 19)
    assert load.fall_behind_rate([D, D, S, S], finishes, arrivals, {"arrival": "poisson", "rate_per_s": 3.0}, 2) == 3.0
    assert load.fall_behind_rate([D, D, D], finishes, arrivals, ramp, 2) is None
    # A trace has no configured rate: the trailing arrival rate (undefined before 10 arrivals).
    assert load.fall_behind_rate([D] * 6 + [S] * 3, finishes, arrivals, {"arrival": "trace"}, 2) == pytest.approx(1.0)
    assert load.fall_behind_rate([S], finishes, arrivals, {"arrival": "trace"}, 2) is None


def test_host_speed_rows_scale_the_twin_by_the_canary_ratio():
    """A held-out run whose canary took 10% longer than the fit run's: the host-speed row reads 1.1;
    at fixed speed the latency rows scale the gated twin by it, under replay they show the unscaled
    fixed-speed twin; none of them gates the report; no canary (or too few), no ratio and no rows."""
    from types import SimpleNamespace

    import pandas as pd

    from osdsim.validate.load import ServeRun, Twin, host_speed_ratio, host_speed_rows

    def run(median, n=5, tpot=0.3, e2e=10.0):
        summ = {"host_canary": {"n": n, "median_s": median}}
        return ServeRun(summ, [{"tpot_s": str(tpot), "e2e_s": str(e2e)}] * 3, [], [], [], [])

    twin = Twin(SimpleNamespace(requests=pd.DataFrame({"tpot_s": [0.25, 0.25], "e2e_s": [9.0, 9.0]})), None, None)
    ratio = host_speed_ratio(run(0.011), run(0.010))
    assert ratio == pytest.approx(1.1)
    rows = host_speed_rows("low", run(0.011), ratio, twin, replayed=False)
    assert [r.gate for r in rows] == [False, False, False]
    assert rows[0].measured == pytest.approx(1.1)
    assert rows[1].predicted == pytest.approx(0.275) and rows[1].measured == pytest.approx(0.3)
    assert rows[2].predicted == pytest.approx(9.9)
    replay = host_speed_rows("low", run(0.011), ratio, twin, replayed=True)
    assert [r.gate for r in replay] == [False, False, False]
    assert replay[1].predicted == pytest.approx(0.25) and "fit run's host speed" in replay[1].name
    assert host_speed_ratio(run(0.011), run(None)) is None
    assert host_speed_ratio(run(0.011, n=2), run(0.010)) is None  # too few canaries to tell
    # Only like canaries compare: a target canary vs a draft canary (runs recorded before
    # serve.host_canary timed the draft) says nothing about the host.
    target = run(0.060)
    target.summary["host_canary"]["model"] = "target"
    assert host_speed_ratio(target, run(0.010)) is None
    assert host_speed_ratio(run(0.011), ServeRun({"host_canary": {"n": 5, "median_s": 0.010, "model": "draft"}},
                                                 [], [], [], [], [])) == pytest.approx(1.1)
    assert host_speed_rows("low", run(0.011), None, twin, replayed=False) == []


@pytest.mark.parametrize("ratio", [0.8, 1.137])
@pytest.mark.parametrize("profile,tp", [("cpu-amd-epyc-zen3", 1), ("a100-80g-datasheet", 2)])
def test_a_host_speed_replayed_profile_prices_every_pass_and_step_ratio_times(ratio, profile, tp):
    """scale_host_speed: every pass (prefill, decode, verify, either dtype, tensor-parallel too) and
    every training step the cost model prices takes exactly ratio × as long."""
    from osdsim.cost.model import CostModel
    from osdsim.cost.profile import load_profile, resolve_profile_path
    from osdsim.models import PRESETS
    from osdsim.validate.costfit import scale_host_speed

    prof = load_profile(resolve_profile_path(profile))
    slow_prof = scale_host_speed(prof, ratio)
    for dtype in sorted(prof.peak_flops_per_s):
        spec = PRESETS["smollm2-135m"].model_copy(update={"dtype": dtype})
        fast, slow = CostModel(spec, prof, tp), CostModel(spec, slow_prof, tp)
        for tokens, ctx in ((1, 200), (4, 300), (32, 0), (128, 64), (512, 4096)):
            a = fast.pass_time(tokens, tokens, tokens * ctx, tokens * ctx)[0]
            assert slow.pass_time(tokens, tokens, tokens * ctx, tokens * ctx)[0] == pytest.approx(ratio * a, rel=1e-9)
        assert slow.decode_time(4, 300, 4) == pytest.approx(ratio * fast.decode_time(4, 300, 4), rel=1e-9)
        step = fast.training_step(512.0, 4 * 128.0**2, spec.total_params, minibatches=2).time_s
        assert slow.training_step(512.0, 4 * 128.0**2, spec.total_params, minibatches=2).time_s == \
            pytest.approx(ratio * step, rel=1e-9)
    with pytest.raises(ValueError):
        scale_host_speed(prof, 0.0)


def test_served_observations_follow_the_server_step_by_step():
    """Steps train on finish-order windows; each speculative step counts at the draft version it
    ran with (a request served across a publication counts on both sides); skipped steps move
    nothing; held-out checkpoints count at the steps done by the step id evaluated."""
    cfg = {"distill": {"update_interval": 2, "window_requests": 3, "epochs_per_update": 1, "positions": "all"},
           "stream": {"heldout_per_domain": 2}}
    # finish order: 1 (a, 10 tokens), 0 (a, 20), 2 (b, 30), 3 (b, 40)
    reqs = [{"request_index": i, "domain": d, "finish_s": f, "output_tokens": t}
            for i, d, f, t in ((0, "a", 2.0, 20), (1, "a", 1.0, 10), (2, "b", 3.0, 30), (3, "b", 4.0, 40))]
    training = [{"step": 1, "status": "done"}, {"step": 2, "status": "skipped"}]
    iterations = [{"iteration": 0, "draft_version": 0}, {"iteration": 1, "draft_version": 1}]
    steps = [  # request 2 runs with version 0 (1 accepted, then a rejection) and version 1 (3 of 3)
        {"request_index": 2, "iteration": 0, "proposed": 3, "accepted": 1},
        {"request_index": 2, "iteration": 1, "proposed": 3, "accepted": 3},
        {"request_index": 3, "iteration": 1, "proposed": 3, "accepted": 0},
    ]
    alpha = [{"label": "initial", "update": 0, "domain": "a", "alpha_heldout": 0.1},
             {"label": "end_phase_1", "update": 2, "domain": "b", "alpha_heldout": 0.4}]
    run = load.ServeRun({"config": cfg}, reqs, iterations, steps, training, [], alpha)
    o = load.served_observations(run, ["a", "b"])
    # step 1 (the only one done) was due at the 2nd finish: requests 1 and 0 (window 3 > 2 finished)
    assert o.step_tokens.tolist() == [[30.0, 0.0]]
    got = sorted(zip(o.obs_domain.tolist(), o.obs_steps.tolist(), o.obs_alpha.tolist(), o.obs_weight.tolist(), strict=True))
    assert got == sorted([
        (1, 0, 0.5, 2.0),   # request 2, version 0: a = 1, one rejection
        (1, 1, 1.0, 3.0),   # request 2, version 1: 3 accepted, no rejection
        (1, 1, 0.0, 1.0),   # request 3, version 1: a rejection at once
        (0, 0, 0.1, 2 * 15.0),  # held-out initial: 2 prompts × a's mean output length
        (1, 1, 0.4, 2 * 35.0),  # step id 2 was skipped: one step done by then
    ])


def test_a_joint_fit_over_runs_in_both_domain_orders_recovers_the_shared_parameters():
    """fit_joint_runs: two runs, each with its own training schedule (a → b and b → a), share one
    set of curves and one transfer; the joint fit recovers them."""
    from osdsim.sim.distill import alpha_curve
    from osdsim.validate.fit import RunObservations, effective_tokens, fit_joint_runs

    truth = {"a": (0.02, 0.30, 300.0), "b": (0.01, 0.25, 500.0)}
    transfer = 0.2

    def run(order):
        steps = np.zeros((12, 2))
        for s in range(12):
            steps[s, order[s // 6]] = 200.0
        n = effective_tokens(steps, transfer)
        od, os_, y = [], [], []
        for s in range(13):
            for d, name in enumerate(truth):
                a0, ainf, tau = truth[name]
                od.append(d)
                os_.append(s)
                y.append(float(alpha_curve(n[s, d], a0, ainf, tau)))
        return RunObservations(steps, np.array(od), np.array(os_), np.array(y), np.full(len(y), 100.0))

    both = fit_joint_runs(list(truth), [run((0, 1)), run((1, 0))])
    assert both.transfer == pytest.approx(transfer, abs=1e-3)
    for name, (_a0, ainf, tau) in truth.items():
        c = both.curves[name]
        assert (c.alpha_inf, c.tau_tokens) == (pytest.approx(ainf, abs=1e-3), pytest.approx(tau, rel=1e-2))
