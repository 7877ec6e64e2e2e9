"""The real batched server on tiny random Llamas: batched greedy exactness with mid-flight joins,
ragged KV caches, admission, and the training placements checked from the recorded run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from osdsim.real import batching  # noqa: E402
from osdsim.real.models import layer_draft, tiny_llama  # noqa: E402
from osdsim.real.serve import (  # noqa: E402
    BatchServer,
    RequestRecord,
    Sequence,
    ServeModels,
    ServeParams,
    idle_windows,
    poisson_times,
)
from osdsim.real.specdec import target_generate  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def pair():
    target = tiny_llama(seed=0, num_layers=4)
    return target, layer_draft(target, 1)


def _serve_all(target, draft, prompts, join_at, k=3, max_new=20, max_batch=3, chunk=16, greedy=True,
               eos=(2,), engine=None):
    """Run the server by iteration count: prompt j is queued at iteration join_at[j]."""
    models = ServeModels(target, draft, 0, eos, torch.device("cpu"))
    params = ServeParams(k, greedy, 1.0, max_new, "all", 8, max_batch, 10_000, chunk)
    server = BatchServer(models, params, torch.Generator().manual_seed(0), engine)
    waiting, seqs, it = [], [], 0
    tick = [0.0]

    def clock():
        tick[0] += 1.0
        return tick[0]

    while len([s for s in seqs if s.done]) < len(prompts):
        for j, p in enumerate(prompts):
            if join_at[j] == it:
                s = Sequence(RequestRecord(j, 0, "p", "d", str(j), float(it)), list(p), list(p))
                waiting.append(s)
                seqs.append(s)
        while waiting and server.can_admit(len(waiting[0].prompt)):
            server.admit(waiting.pop(0))
        if server.running():
            server.step(clock, len(waiting))
        it += 1
        assert it < 10_000
    return {int(s.rec.uid): s for s in seqs}, server


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 60, (n,), generator=g).tolist()
    return [torch.randint(3, 500, (L,), generator=g).tolist() for L in lengths]


def test_batched_target_only_decoding_is_exact(pair):
    """k = 0: the server decodes with the target alone (the no-speculation baseline)."""
    target, draft = pair
    prompts = _prompts(5, seed=2)
    seqs, server = _serve_all(target, draft, prompts, [0, 1, 1, 2, 5], k=0)
    for j, p in enumerate(prompts):
        assert seqs[j].tokens == target_generate(target, p, 20, eos_ids=(2,)).tokens
        assert all(st.proposed == 0 for st in seqs[j].steps)
    assert server.e.kv["draft"].rows == 0  # the draft never ran


@pytest.mark.parametrize("compact", [False, True])
def test_batched_greedy_exact_with_mid_flight_joins(pair, monkeypatch, compact):
    target, draft = pair
    if compact:  # compact at every chance: the gathered caches must give the same tokens
        monkeypatch.setattr(batching, "COMPACT_WIDTH_RATIO", 1.0)
        monkeypatch.setattr(batching, "COMPACT_MIN_HOLES", 1)
    prompts = _prompts(7)
    join_at = [0, 0, 1, 3, 4, 4, 9]  # more requests than batch slots: some queue
    seqs, server = _serve_all(target, draft, prompts, join_at)
    accepted = sum(st.accepted for s in seqs.values() for st in s.steps)
    rejected = sum(st.accepted < st.proposed for s in seqs.values() for st in s.steps)
    assert accepted > 0 and rejected > 0  # ragged acceptance really happened
    for j, p in enumerate(prompts):
        ref = target_generate(target, p, 20, eos_ids=(2,)).tokens
        assert seqs[j].tokens == ref, f"request {j} differs from the target's own greedy output"
    assert server.e.kv["target"].rows == 0 and server.kv_reserved == 0


def test_ragged_cache_matches_single_sequence_logits(pair):
    """Rows of different lengths, a rejected column, a join and a compaction: every row's logits
    equal a batch-1 pass over its committed tokens."""
    target, _ = pair
    prompts = _prompts(3, seed=5)
    kv = batching.BatchKV(target.config)
    for p in prompts[:2]:
        kv.add_row(batching.prefill_single(target, p[:-1], None), len(p) - 1, torch.device("cpu"))
    batching.batched_forward(target, kv, [[prompts[0][-1], 7, 8], [prompts[1][-1], 9]], 0)
    kv.drop_newest(0, 1)  # row 0 rejected its last draft (8)
    kv.add_row(batching.prefill_single(target, prompts[2][:-1], None), len(prompts[2]) - 1, torch.device("cpu"))
    out = batching.batched_forward(target, kv, [[11], [12, 13], [prompts[2][-1]]], 0)
    committed = [prompts[0] + [7, 11], prompts[1] + [9, 12, 13], prompts[2]]
    for i, seq in enumerate(committed):
        with torch.no_grad():
            ref = target(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float()
        n = out[i].shape[0]
        assert torch.allclose(out[i], ref[-n:], atol=1e-4), i
    assert kv.lengths == [len(c) for c in committed]


def test_admission_respects_batch_and_kv_budget(pair):
    target, draft = pair
    models = ServeModels(target, draft, 0, (2,), torch.device("cpu"))
    params = ServeParams(3, True, 1.0, 10, "none", 8, 2, 100, 64)
    server = BatchServer(models, params, torch.Generator())
    s = [Sequence(RequestRecord(j, 0, "p", "d", str(j), 0.0), [5] * 40, [5] * 40) for j in range(3)]
    assert server.can_admit(40)
    server.admit(s[0])
    assert not server.can_admit(60)  # 50 reserved + 70 > 100 tokens
    assert server.can_admit(40)
    server.admit(s[1])
    assert not server.can_admit(2)  # batch full


def test_poisson_times_and_idle_windows():
    t = poisson_times(20_000, 4.0, seed=3)
    assert t[0] == 0.0 and (t[1:] >= t[:-1]).all()
    assert abs((t[-1] / (len(t) - 1)) - 0.25) < 0.01
    assert (poisson_times(50, 4.0, 3) == t[:50]).all()  # deterministic in the seed
    recs = [RequestRecord(0, 0, "p", "d", "0", 1.0, finish_s=2.0),
            RequestRecord(1, 0, "p", "d", "1", 1.5, finish_s=3.0),
            RequestRecord(2, 0, "p", "d", "2", 5.0, finish_s=6.0)]
    assert idle_windows(recs, 10.0) == pytest.approx(10.0 - 2.0 - 1.0)


def test_poisson_ramp_rises_linearly_by_request_index():
    n = 40_000
    t = poisson_times(n, 1.0, seed=5, rate_end_per_s=10.0)
    gaps = np.diff(t)
    assert t[0] == 0.0 and (gaps >= 0).all()
    # Gap i is Exp(1)/λ_i with λ_i = 1 + 9·i/(n−1): the first and last tenth run at ≈1.45 and ≈9.55 req/s.
    for sl, rates in ((slice(0, n // 10), np.linspace(1.0, 10.0, n)[1 : n // 10 + 1]),
                      (slice(-n // 10, None), np.linspace(1.0, 10.0, n)[-n // 10 :])):
        assert gaps[sl].mean() == pytest.approx(np.mean(1.0 / rates), rel=0.03)
    # The same Exp(1) draws as the constant-rate process: a flat ramp is that process (to rounding).
    assert np.allclose(poisson_times(200, 4.0, 3, rate_end_per_s=4.0), poisson_times(200, 4.0, 3), rtol=1e-12)
    from osdsim.real.config import ServeCfg

    with pytest.raises(ValueError, match="rate_end_per_s"):
        ServeCfg(arrival="trace", trace_file="x.csv", rate_end_per_s=2.0)
    with pytest.raises(ValueError, match="rate_end_per_s"):
        ServeCfg(rate_per_s=1.0, rate_end_per_s=0.0)


# --- the full serving loop on the wall clock (tiny models, real data prompts) ------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _f(x: str) -> float:
    return float(x) if x != "" else float("nan")


def _config(placement: str, rate: float, **serve):
    from osdsim.real.config import RealConfig

    return RealConfig(
        name=f"tiny-{placement}", seed=1, threads=1,
        models={"target": "tiny", "draft": "layers:1", "dtype": "float32"},
        stream={"domains": ["code", "spider"], "shape": "sharp", "requests_per_phase": 10,
                "heldout_per_domain": 2, "max_prompt_tokens": 300},
        decode={"k": 3, "greedy": True, "max_new_tokens": 12},
        distill={"enabled": True, "update_interval": 3, "batch_size": 1, "positions": "all", "lr": 0.01},
        baseline={"requests_per_phase": 0}, eval={"every_updates": 1},
        serve={"arrival": "poisson", "rate_per_s": rate, "max_batch_size": 3, "chunked_prefill_tokens": 64,
               "placement": placement, "max_pending_steps": 2, **serve},
    )


@pytest.fixture(scope="module")
def harvest_run(tmp_path_factory):
    from osdsim.real.serve import serve_real

    out = tmp_path_factory.mktemp("harvest")
    # Bursts of three requests 30 ms apart (the second and third land mid-iteration), 1.5 s between
    # bursts: idle windows exist however slow the machine is, and bursts land inside training units.
    trace = out / "bursts.csv"
    rows = [f"{(i // 3) * 1.5 + (i % 3) * 0.03:.3f},{'code' if i < 10 else 'spider'}" for i in range(20)]
    trace.write_text("arrival_s,domain\n" + "\n".join(rows) + "\n")
    cfg = _config("harvest", 1.0, arrival="trace", trace_file=str(trace))
    return serve_real(cfg, out), out


def test_harvest_units_never_run_while_a_request_waits(harvest_run):
    res, out = harvest_run
    reqs = _rows(out / "requests.csv")
    units = _rows(out / "training_units.csv")
    assert units, "the run trained nothing: the test would prove nothing"
    for u in units:
        t = float(u["start_s"])
        present = [r for r in reqs if float(r["arrival_s"]) <= t < float(r["finish_s"])]
        assert not present, f"unit {u} started while request {present[0]['request_index']} was in the system"
        # a request that arrived during the unit is flagged (it waited for the unit boundary)
        arrived = [r for r in reqs if t < float(r["arrival_s"]) <= float(u["end_s"])]
        assert int(u["preempted"]) == int(bool(arrived))
    s = res.summary["training"]
    assert s["steps_due"] == s["steps_done"] + s["steps_skipped"] + s["steps_pending_at_end"] + s["steps_failed"]
    assert 0 < s["idle_s_used"] <= s["idle_s_available"] + sum(
        float(u["end_s"]) - float(u["start_s"]) for u in units if u["preempted"] == "1")


def test_host_canary_runs_right_after_a_served_iteration(harvest_run):
    """The canary times the serving target right after an iteration, never after an idle wait (a
    cold core reads the host slower than serving finds it)."""
    res, out = harvest_run
    canary = res.summary["host_canary"]
    assert canary["model"] == "target" and canary["n"] >= 1
    ends = [_f(r["end_s"]) for r in _rows(out / "iterations.csv")]
    for start, _ in canary["samples"]:
        assert any(0.0 <= start - e < 0.02 for e in ends), start


def test_request_arriving_mid_iteration_joins_at_the_next_iteration(harvest_run):
    _, out = harvest_run
    its = _rows(out / "iterations.csv")
    reqs = _rows(out / "requests.csv")
    starts = [float(i["start_s"]) for i in its]
    ends = [float(i["end_s"]) for i in its]
    checked = 0
    for r in reqs:
        a, adm = float(r["arrival_s"]), float(r["admitted_s"])
        assert adm >= a
        for j, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if s < a < e:  # arrived while iteration j ran
                assert adm >= e
                if j + 1 < len(starts) and float(r["queue_s"]) < 1e-3 + (e - a):
                    assert adm <= starts[j + 1]  # admitted before the next iteration began
                checked += 1
                break
    assert checked > 0
    # records: every request finished once, latencies add up
    assert sorted(int(r["request_index"]) for r in reqs) == list(range(20))
    for r in reqs:
        assert float(r["e2e_s"]) == pytest.approx(float(r["finish_s"]) - float(r["arrival_s"]), abs=2e-6)
        assert float(r["ttft_s"]) <= float(r["e2e_s"]) + 1e-9


def test_inline_training_shows_in_the_latency_of_queued_requests(tmp_path):
    from osdsim.real.serve import serve_real

    serve_real(_config("inline", 40.0), tmp_path)
    reqs = _rows(tmp_path / "requests.csv")
    steps = [t for t in _rows(tmp_path / "training.csv") if t["status"] == "done"]
    assert steps
    behind = 0
    for t in steps:
        t0, t1 = float(t["started_s"]), float(t["done_s"])
        for r in reqs:
            a, adm = float(r["arrival_s"]), float(r["admitted_s"])
            assert not t0 < adm < t1 - 1e-6, "a request was admitted while the inline step ran"
            if a < t1 and adm >= t1 - 1e-6:  # waiting (queued or arriving) behind the step
                assert float(r["queue_s"]) >= t1 - max(a, t0) - 1e-6
                behind += 1
    assert behind > 0


def test_dedicated_publication_changes_the_serving_draft_after_the_delay(tmp_path):
    from osdsim.real.serve import serve_real

    res = serve_real(_config("dedicated", 8.0), tmp_path)
    steps = [t for t in _rows(tmp_path / "training.csv") if t["status"] == "done"]
    assert steps, "the trainer process finished no step"
    its = _rows(tmp_path / "iterations.csv")
    for t in steps:
        assert float(t["published_s"]) >= float(t["done_s"]) >= float(t["started_s"]) >= float(t["due_s"])
    first_pub = float(steps[0]["published_s"])
    for it in its:
        if float(it["end_s"]) <= first_pub:
            assert it["draft_version"] == "0"  # the untrained draft served until publication
        if float(it["start_s"]) >= first_pub:
            assert int(it["draft_version"]) >= 1
    delays = res.summary["dedicated"]["publish_delay_s"]
    assert len(delays) == len(steps) and min(delays) >= 0
    assert not res.summary["dedicated"]["trainer_died"]
    # training overlapped serving (the trainer is another process)
    assert any(it["trainer_busy"] == "1" for it in its)


def test_trace_file_arrivals_and_bad_traces(tmp_path):
    from osdsim.errors import InputError
    from osdsim.real.serve import read_arrival_trace, serve_real

    bad = tmp_path / "bad.csv"
    bad.write_text("time,domain\n0.0,code\n")
    with pytest.raises(InputError, match="missing column 'arrival_s'"):
        read_arrival_trace(bad)
    bad.write_text("arrival_s,domain\n1.0,code\n0.5,code\n")
    with pytest.raises(InputError, match="non-decreasing"):
        read_arrival_trace(bad)
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,domain\n" + "".join(f"{0.05 * i:.2f},{'code' if i < 4 else 'spider'}\n"
                                                    for i in range(6)))
    cfg = _config("harvest", 1.0)
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"arrival": "trace", "trace_file": str(trace)}),
                                 "stream": cfg.stream.model_copy(update={"requests_per_phase": 3})})
    res = serve_real(cfg, tmp_path / "out")
    got = [(r.arrival_s, r.domain) for r in res.requests]
    assert got == [(round(0.05 * i, 2), "code" if i < 4 else "spider") for i in range(6)]


@pytest.mark.slow
def test_batched_greedy_exact_on_smollm2():
    """SmolLM2-135M fp32, its 2-layer draft, real prompts of mixed lengths joining mid-flight:
    every request emits exactly the target's own greedy tokens."""
    from osdsim.real import data as D
    from osdsim.real.models import load_pair

    pair = load_pair("smollm2", "layers:2", "float32")
    codec = pair.codec
    queries = D.load_domain("spider")[:3] + D.load_domain("code")[:3]
    prompts = [codec.chat_prompt(q.text, q.system) for q in queries]
    prompts = [p[:200] for p in prompts]
    seqs, _ = _serve_all(pair.target, pair.draft, prompts, [0, 0, 2, 3, 3, 6], max_new=24,
                         max_batch=4, chunk=64, eos=tuple(codec.eos_ids))
    for j, p in enumerate(prompts):
        ref = target_generate(pair.target, p, 24, eos_ids=tuple(codec.eos_ids)).tokens
        assert seqs[j].tokens == ref, j


def test_an_orphaned_trainer_stops_when_its_server_dies():
    import os
    import queue

    from osdsim.real.serve import next_message

    inbox: queue.Queue = queue.Queue()
    inbox.put(("step", 1))
    assert next_message(inbox, os.getppid(), poll_s=0.01) == ("step", 1)
    # Nothing arrives and the parent it was started by is gone (getppid differs): stop.
    assert next_message(inbox, os.getppid() + 1, poll_s=0.01) is None
    inbox.put(None)  # the server's own stop message
    assert next_message(inbox, os.getppid(), poll_s=0.01) is None


def test_prefill_emits_the_first_token_and_the_row_speculates_from_the_next_iteration(pair):
    """As the simulator prices it (and vLLM serves it): the iteration that completes a prompt yields
    its first token at that iteration's end, and the row joins the decoding batch afterwards."""
    target, draft = pair
    prompt = _prompts(1, seed=5)[0]
    models = ServeModels(target, draft, 0, (), torch.device("cpu"))
    tick = [0.0]

    def clock():
        tick[0] += 1.0
        return tick[0]

    for max_new in (1, 6):
        params = ServeParams(3, True, 1.0, max_new, "all", 8, 2, 10_000, 16)
        server = BatchServer(models, params, torch.Generator().manual_seed(0))
        s = Sequence(RequestRecord(0, 0, "p", "d", "0", 0.0), list(prompt), list(prompt))
        server.admit(s)
        recs = []
        while not s.done:
            rec, finished, _ = server.step(clock, 0)
            recs.append(rec)
        chunks = -(-len(prompt) // 16)
        first = recs[chunks - 1]  # the iteration that prefilled the prompt's last chunk
        assert sum(r.prefill_tokens for r in recs) == len(prompt)  # the whole prompt, once
        assert first.batch_size == 0 and first.emitted == 1 and s.rec.first_token_s == first.end_s
        assert s.tokens[0] == int(torch.argmax(target(torch.tensor([prompt])).logits[0, -1]))
        if max_new == 1:
            assert len(recs) == chunks and s.rec.finish_s == first.end_s and not s.steps
        else:
            assert all(r.batch_size == 1 for r in recs[chunks:])
            assert s.tokens == target_generate(target, prompt, max_new).tokens
            assert sum(st.emitted for st in s.steps) == max_new - 1  # the first token is no step
        assert server.kv_reserved == 0 and server.running() == 0


def test_host_canary_runs_when_due_and_only_then(pair):
    from osdsim.real.serve import HostCanary

    target, _ = pair
    t = [0.0]

    def clock():
        t[0] += 0.5
        return t[0]

    canary = HostCanary(target, 10.0, torch.device("cpu"))
    for _ in range(60):  # 30 s of a clock that moves 0.5 s per reading
        canary.maybe_run(clock)
    starts = [s for s, _ in canary.samples]
    assert len(starts) == 3 and all(b - a >= 10.0 for a, b in zip(starts, starts[1:], strict=False))
    summ = canary.summary()
    assert summ["n"] == 3 and summ["median_s"] == pytest.approx(0.5)  # one clock tick per pass
    off = HostCanary(target, 0.0, torch.device("cpu"))
    off.maybe_run(clock)
    assert off.samples == [] and off.summary()["median_s"] is None
