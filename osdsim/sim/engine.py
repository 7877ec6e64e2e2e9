"""Builds the SimPy model of a scenario (arrivals → router → replicas, distillers) and runs it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import simpy
from pydantic import ValidationError

from osdsim.cost.model import CostModel, memory_plan
from osdsim.cost.profile import HardwareProfile, load_profile, resolve_profile_path
from osdsim.errors import InputError, format_validation_error
from osdsim.scenario import Acceptance, DomainAcceptance, Scenario, read_yaml
from osdsim.sim.distill import Distiller, DistillStats, DraftState
from osdsim.sim.placement import Dedicated, make_placement
from osdsim.sim.replica import Replica, ReplicaConfig, RequestTable
from osdsim.sim.workload import Requests, generate_requests
from osdsim.specdec import EmpiricalLaw, GeometricLaw

ProgressFn = Callable[[int, int], None]


@dataclass
class RawRun:
    """Everything a finished simulation produced, before summarising."""

    scenario: Scenario
    strategy: str
    requests: Requests
    table: RequestTable
    iterations: pd.DataFrame
    alpha_events: pd.DataFrame  # time_s, replica, draft_id, alpha_<domain>...
    training_events: pd.DataFrame
    stats: DistillStats
    sim_time_s: float
    busy_s: list[float]
    acceptance_law: str
    kv_capacity_tokens: int
    k_setting: str
    extra: dict = field(default_factory=dict)


# --- inputs ------------------------------------------------------------------------------------------
def load_scenario_profile(scenario: Scenario) -> HardwareProfile:
    path = resolve_profile_path(scenario.hardware.profile, scenario.base_dir)
    return load_profile(path)


def acceptance_params(scenario: Scenario) -> tuple[Acceptance, dict[str, DomainAcceptance]]:
    """Inline acceptance parameters, over those of `acceptance.file` when one is given."""
    acc = scenario.acceptance
    domains: dict[str, DomainAcceptance] = {}
    transfer, forgetting = acc.transfer, acc.forgetting_tokens
    if acc.file:
        path = scenario.resolve_path(acc.file)
        data = read_yaml(path, "acceptance")
        if not isinstance(data, dict):
            raise InputError(f"{path}: acceptance file must be a mapping with 'domains'")
        try:
            file_acc = Acceptance(**{k: v for k, v in data.items() if k in ("domains", "transfer", "forgetting_tokens", "law",
                                                                "distillation_helps")})
        except ValidationError as exc:
            raise InputError(f"{path}: {format_validation_error(exc)}") from None
        domains.update(file_acc.domains)
        if "transfer" in data and "transfer" not in acc.model_fields_set:
            transfer = file_acc.transfer
        if "forgetting_tokens" in data and "forgetting_tokens" not in acc.model_fields_set:
            forgetting = file_acc.forgetting_tokens
    domains.update(acc.domains)
    missing = sorted(set(scenario.workload.domains) - set(domains))
    if missing:
        raise InputError(f"acceptance.domains: no acceptance parameters for domain {missing[0]!r}")
    return acc.model_copy(update={"transfer": transfer, "forgetting_tokens": forgetting}), domains


def load_empirical_law(path: Path) -> EmpiricalLaw:
    data = read_yaml(path, "empirical accepted-length") if path.suffix in (".yaml", ".yml") else None
    if data is None and path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read empirical law ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not data["entries"]:
        raise InputError(f"{path}: empirical law needs 'entries: [{{alpha, histogram}}, ...]'")
    try:
        alphas = np.array([float(e["alpha"]) for e in data["entries"]])
        hists = [np.asarray(e["histogram"], dtype=float) for e in data["entries"]]
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{path}: each entry needs a numeric 'alpha' and a 'histogram' list") from None
    if len({h.size for h in hists}) != 1 or hists[0].size < 2:
        raise InputError(f"{path}: all histograms need the same length k+1 >= 2")
    if np.any((alphas < 0) | (alphas > 1)):
        raise InputError(f"{path}: entries.alpha must be in [0, 1]")
    try:
        return EmpiricalLaw(alphas, np.stack(hists))
    except ValueError as exc:
        raise InputError(f"{path}: {exc}") from None


# --- building ------------------------------------------------------------------------------------
EVENTS_PER_WALL_S = 50_000  # measured order of magnitude (benchmarks/sim_speed.py)
BYTES_PER_REQUEST = 400  # request table + per-request DataFrame
BYTES_PER_LOGGED_ITERATION = 200  # one tuple in the full iteration log + its DataFrame row
# report.iteration_log: auto keeps the full per-iteration log up to this many requests, then bins it.
FULL_LOG_MAX_REQUESTS = 200_000
# expected_size: the output-token estimate feeds check_limits, which must only refuse runs that
# certainly overrun, so the estimate is halved to stay a lower bound (lognormal clipping at
# max_tokens, sampling spread) whatever the length kind.
OUTPUT_ESTIMATE_LOWER_BOUND = 0.5
PROGRESS_UPDATES = 200  # progress callbacks per run (at most)
# The `replica` of α events of drafts shared by all replicas (dedicated trainer): not one replica.
SHARED_DRAFTS_REPLICA = -1


def expected_size(scenario: Scenario) -> tuple[int, float]:
    """(requests, output tokens) a scenario will generate, from its distributions (before sampling)."""
    from osdsim.scenario import EmpiricalLength, FixedLength, LognormalLength, UniformLength
    from osdsim.sim.workload import _expected_count, read_length_file

    w = scenario.workload
    if w.arrival == "trace":
        return 0, 0.0
    n = _expected_count(w)
    means = []
    for d in w.domains.values():
        o = d.output_tokens
        if isinstance(o, FixedLength):
            means.append(o.value_tokens)
        elif isinstance(o, UniformLength):
            means.append((o.low_tokens + o.high_tokens) / 2)
        elif isinstance(o, LognormalLength):
            means.append(min(o.mean_tokens, o.max_tokens or o.mean_tokens))
        elif isinstance(o, EmpiricalLength):
            means.append(float(read_length_file(scenario.resolve_path(o.file)).mean()))
    return n, n * float(np.mean(means)) * OUTPUT_ESTIMATE_LOWER_BOUND


def check_limits(scenario: Scenario, n: int, output_tokens: float) -> None:
    """Refuse runs that certainly exceed the event or memory caps, with the estimate.

    Lower bound on iterations: every output token needs a decode slot, at most max_batch
    sequences per iteration and at most k+1 tokens per sequence per iteration.
    """
    k = scenario.speculation.k if scenario.speculation.k != "auto" else scenario.speculation.k_max
    per_iter = scenario.batching.max_batch_size * ((k + 1) if scenario.strategy != "no-spec" else 1)
    min_iterations = output_tokens / per_iter
    events = 2.0 * n + min_iterations
    lim = scenario.limits
    if events > lim.max_events:
        minutes = events / EVENTS_PER_WALL_S / 60
        raise InputError(
            f"limits.max_events: {n:,} requests need at least {events:.3g} simulation events "
            f"(≈ {minutes:,.0f} min or more); raise limits.max_events ({lim.max_events:.3g}) or shorten the run"
        )
    log_full = scenario.report.iteration_log == "full" or (scenario.report.iteration_log == "auto" and n <= FULL_LOG_MAX_REQUESTS)
    mem = n * BYTES_PER_REQUEST + (min_iterations * BYTES_PER_LOGGED_ITERATION if log_full else 0.0)
    if mem / 1e9 > lim.max_memory_gb:
        raise InputError(
            f"limits.max_memory_gb: results need at least {mem / 1e9:.1f} GB; raise limits.max_memory_gb "
            f"({lim.max_memory_gb:g}), use report.iteration_log: binned, or shorten the run"
        )


def _uses_drafts(strategy: str) -> bool:
    return strategy != "no-spec"


def _memory_and_costs(scenario: Scenario, profile: HardwareProfile, draft, n_drafts: int):
    """(KV capacity in tokens, target, draft and training cost models). Weights must fit; the KV
    capacity is what is left (or the scenario's number)."""
    tp = scenario.hardware.tensor_parallel
    target = scenario.target
    available, weights, kv_cap = memory_plan(
        target, [draft] * n_drafts if draft else [], profile, tp, scenario.hardware.gpu_memory_utilization
    )
    if weights > available:
        raise InputError(
            f"models.target: {target.name} (+{n_drafts} draft) needs {weights / 1e9:.1f} GB per GPU but "
            f"{profile.name} offers {available / 1e9:.1f} GB at gpu_memory_utilization "
            f"{scenario.hardware.gpu_memory_utilization}; raise hardware.tensor_parallel"
        )
    if scenario.batching.kv_cache_tokens is not None:
        kv_cap = scenario.batching.kv_cache_tokens
    if kv_cap < 1:
        raise InputError(f"batching.kv_cache_tokens: no GPU memory left for the KV cache on {profile.name}")
    target_cost = CostModel(target, profile, tp)
    draft_cost = CostModel(draft, profile, tp) if draft is not None else None
    # Training may compute in another dtype than serving (e.g. fp32 master weights, bf16 serving),
    # and a draft served with a reduced LM head still trains its full head.
    train_cost = draft_cost
    if draft is not None:
        change = {key: value for key, value in (("dtype", scenario.distill.train_dtype),
                                                ("vocab", scenario.distill.train_vocab))
                  if value is not None and value != getattr(draft, key)}
        if change:
            train_cost = CostModel(draft.model_copy(update=change), profile, tp)
    return kv_cap, target_cost, draft_cost, train_cost


def _acceptance_law(scenario: Scenario, draft, names: tuple[str, ...]):
    """(law, its name for the summary, per-domain curves (α_0, α_∞, α_offline, τ, transfer,
    forgetting_tokens) or None without a draft)."""
    if draft is None:
        return GeometricLaw(), "none", None
    acc, dom_acc = acceptance_params(scenario)
    law = GeometricLaw()
    law_name = "geometric"
    if acc.law == "empirical":
        law = load_empirical_law(scenario.resolve_path(acc.empirical_file))  # type: ignore[arg-type]
        k_req = scenario.speculation.k if scenario.speculation.k != "auto" else scenario.speculation.k_max
        if k_req > law.k_file:
            raise InputError(
                f"speculation.k: {k_req} exceeds the k={law.k_file} the empirical law was measured with"
            )
        lo, hi = law.alpha_range
        law_name = f"empirical (alpha {lo:.2f}..{hi:.2f}, clamped outside)"
    curves = tuple(np.array([getattr(dom_acc[d], f) for d in names]) for f in ("alpha_0", "plateau", "offline", "tau_tokens"))
    return law, law_name, (*curves, acc.transfer, acc.forgetting_tokens)


def build_and_run(scenario: Scenario, requests: Requests | None = None, progress: ProgressFn | None = None,
                  macro_steps: int | None = None) -> RawRun:
    """Simulate `scenario`. macro_steps: iterations one event may cover (Replica._stretch; the
    results are the same for any value; 0 = one event per iteration; default 64, or the
    OSDSIM_MACRO_STEPS environment variable, for A/B speed measurements)."""
    if macro_steps is None:
        macro_steps = int(os.environ.get("OSDSIM_MACRO_STEPS", "64"))
    strategy = scenario.strategy
    profile = load_scenario_profile(scenario)
    draft = scenario.draft if _uses_drafts(strategy) else None
    if requests is None:
        check_limits(scenario, *expected_size(scenario))
    req = requests if requests is not None else generate_requests(scenario)
    check_limits(scenario, len(req), float(req.output_tokens.sum()))
    names = req.domain_names
    n_dom = len(names)

    n_drafts = 0 if draft is None else (n_dom if strategy == "osd-per-domain" else 1)
    kv_cap, target_cost, draft_cost, train_cost = _memory_and_costs(scenario, profile, draft, n_drafts)

    law, law_name, curves = _acceptance_law(scenario, draft, names)
    if curves is not None:
        a0, ainf, aoff, tau, transfer, forgetting = curves
    # The α each domain's stream converges to under this strategy (served-α recovery targets).
    plateau = None if curves is None else {"static": a0, "offline": aoff}.get(strategy, ainf)

    env = simpy.Environment()
    table = RequestTable(req.arrival_s.copy(), req.domain, req.prompt_tokens, req.output_tokens)
    stats = DistillStats()
    alpha_rows: list[tuple] = []
    seeds = np.random.SeedSequence([scenario.seed, 0xACC]).spawn(scenario.hardware.replicas + 1)
    d = scenario.distill
    placement = make_placement(d.placement if strategy in ("osd", "osd-per-domain") else "none", stats, d)
    trainable_params = 0
    if draft is not None:
        trainable_params = draft.total_params if d.trainable == "all" else draft.dense_params

    def make_drafts(replica_idx: int) -> tuple[list[Distiller | None], list[DraftState | None]]:
        if draft is None:
            return [None] * n_dom, [None] * n_dom
        if strategy in ("static", "offline"):
            start = a0 if strategy == "static" else aoff
            st = DraftState(0, start, start, tau, 0.0, trainable=False)
            return [None] * n_dom, [st] * n_dom
        per_domain = strategy == "osd-per-domain"
        states = [
            DraftState(i, a0, ainf, tau, 0.0 if per_domain else transfer, trainable=True,
                       forgetting_tokens=None if per_domain else forgetting)
            for i in range(n_dom if per_domain else 1)
        ]
        dists = [
            Distiller(s, train_cost, d.update_interval_requests, d.tokens, d.max_pending_steps,
                      trainable_params, n_dom, stats, d.window_requests, epochs=d.epochs_per_step,
                      batch_sequences=d.batch_sequences, logits_at=d.logits_at, progress=d.progress)
            for s in states
        ]
        for s in states:
            s.listeners.append(
                lambda s=s, r=replica_idx: alpha_rows.append((env.now, r, s.draft_id, *s.alpha.tolist()))
            )
        if per_domain:
            return list(dists), list(states)
        return [dists[0]] * n_dom, [states[0]] * n_dom

    cfg = ReplicaConfig(
        target_cost=target_cost,
        draft_cost=draft_cost,
        max_batch=scenario.batching.max_batch_size,
        chunk_tokens=float(scenario.batching.chunked_prefill_tokens or np.inf),
        kv_capacity=kv_cap,
        attention_padding=scenario.batching.attention_padding,
        separate_prefill=scenario.batching.prefill_pass == "separate",
        k=None if scenario.speculation.k == "auto" else int(scenario.speculation.k),
        k_max=scenario.speculation.k_max,
        placement=placement,
        macro_steps=macro_steps,
    )
    replicas: list[Replica] = []
    log_mode = scenario.report.iteration_log
    if log_mode == "auto":
        log_mode = "full" if len(req) <= FULL_LOG_MAX_REQUESTS else "binned"
    log_bin_s = None if log_mode == "full" else (scenario.report.time_bin_s or 1.0)
    shared = make_drafts(SHARED_DRAFTS_REPLICA) if isinstance(placement, Dedicated) else None
    for r in range(scenario.hardware.replicas):
        dists, states = shared if shared is not None else make_drafts(r)
        rep = Replica(env, r, cfg, table, np.random.default_rng(seeds[r]), dists, states, law, log_bin_s)
        for s in dict.fromkeys(x for x in states if x is not None):
            s.listeners.append(rep.refresh_alpha)
        replicas.append(rep)
        env.process(rep.run())

    if shared is not None:
        placement.start(env, shared[0])  # type: ignore[union-attr]

    # Initial α snapshot of every draft (time 0).
    if draft is not None:
        seen = set()
        for r, rep in enumerate(replicas):
            for s in rep.alpha_source:
                if s is not None and id(s) not in seen:
                    seen.add(id(s))
                    alpha_rows.append((0.0, SHARED_DRAFTS_REPLICA if shared is not None else r, s.draft_id, *s.alpha.tolist()))

    _run_until_done(env, scenario, req, table, replicas, np.random.default_rng(seeds[-1]), progress)

    all_distillers = list(dict.fromkeys(x for rep in replicas for x in rep.distillers))
    # Each replica sums the spare compute it offered; the total is added in replica order, so it does
    # not depend on how events of different replicas interleave (stretches or single iterations).
    for rep in replicas:
        stats.spare_s_available += rep.spare_s
    # Training work and spare compute are simulated in device-seconds at full training speed; the
    # outputs give them as FLOP-equivalents of the training dtype (seconds × F_peak · η_max).
    flops_per_work_s = train_cost.peak_flops * train_cost.eta_max if train_cost is not None else 0.0
    iterations = _iteration_frame(replicas, flops_per_work_s)
    alpha_cols = ["time_s", "replica", "draft_id", *[f"alpha_{n}" for n in names]]
    alpha_events = pd.DataFrame(alpha_rows, columns=alpha_cols)
    training = pd.DataFrame(stats.events, columns=["time_s", "draft_id", "kind", "tokens", "flops", "duration_s"])
    k_setting = "off" if draft is None else str(scenario.speculation.k)
    return RawRun(
        scenario=scenario,
        strategy=strategy,
        requests=req,
        table=table,
        iterations=iterations,
        alpha_events=alpha_events,
        training_events=training,
        stats=stats,
        sim_time_s=float(env.now),
        busy_s=[rep.busy_s for rep in replicas],
        acceptance_law=law_name,
        kv_capacity_tokens=int(kv_cap),
        k_setting=k_setting,
        extra={"peak_flops": target_cost.peak_flops, "bandwidth": target_cost.bandwidth,
               "train_flops_per_work_s": flops_per_work_s,
               "plateau_by_domain": plateau,
               "pending_steps": sum(len(x.pending) + x.in_flight for x in all_distillers)},
    )


def _run_until_done(env: simpy.Environment, scenario: Scenario, req: Requests, table: RequestTable,
                    replicas: list[Replica], route_rng: np.random.Generator, progress: ProgressFn | None) -> None:
    """Start the arrivals (open loop, or a closed-loop client) and run until every request is done
    (finished or rejected) or the scenario's time cap."""
    n_req = len(req)
    all_done = env.event()
    total = n_req
    step = max(1, total // PROGRESS_UPDATES)

    def on_done() -> None:
        if progress is not None and (table.done % step == 0 or table.done == total):
            progress(table.done, total)
        if table.done >= total and not all_done.triggered:
            all_done.succeed()

    table.on_done = on_done
    if req.think_s is not None:
        env.process(_closed_loop(env, req.arrival_s[0] if n_req else 0.0, req.think_s, table, replicas,
                                 scenario.router, route_rng))
    else:
        if scenario.router == "round-robin" or len(replicas) == 1:  # routing known ahead (_route)
            rids = np.arange(n_req)
            # With no time limit, only the arrivals steer a replica (Replica._chain needs their instants).
            clock = _arrival_instants(req.arrival_s) if scenario.limits.max_sim_time_s is None else None
            for r, rep in enumerate(replicas):
                sl = slice(r, None, len(replicas))
                rep.know_arrivals(req.arrival_s[sl], rids[sl], None if clock is None else clock[sl])
        env.process(_arrivals(env, req.arrival_s, replicas, scenario.router, route_rng))
    if n_req == 0:
        all_done.succeed()
    until = all_done
    if scenario.limits.max_sim_time_s is not None:
        until = all_done | env.timeout(scenario.limits.max_sim_time_s)
    env.run(until=until)


def _iteration_frame(replicas: list[Replica], flops_per_work_s: float) -> pd.DataFrame:
    """All replicas' iteration logs, spare and training work as FLOP-equivalents of the training dtype."""
    if not replicas:
        return pd.DataFrame()
    # One frame first, then its columns: each column operation on a DataFrame costs more than the
    # arithmetic, so doing them once instead of once per replica is the cheaper order.
    iters = [rep.log.frame() for rep in replicas]
    df = pd.concat(iters, ignore_index=True)
    df["spare_flops"] *= flops_per_work_s
    df["train_work_flops"] *= flops_per_work_s
    df.insert(0, "replica", np.repeat([rep.index for rep in replicas], [len(it) for it in iters]))
    return df


def _arrivals(env: simpy.Environment, times: np.ndarray, replicas: list[Replica], router: str, rng):
    now = 0.0
    for rid, at in enumerate(times.tolist()):
        if at > now:
            yield env.timeout(at - now)
            now = at
        _route(rid, replicas, router, rng).submit(rid)


def _arrival_instants(times: np.ndarray) -> np.ndarray:
    """The clock's instants when _arrivals submits each request: it sleeps the gaps between distinct
    times, and the clock adds each sleep to itself, so the instants may differ from `times` in the
    last bits (Replica._chain checks each against the instant its arrival came at)."""
    out = np.empty(times.size)
    now = clock = 0.0
    for i, at in enumerate(times.tolist()):
        if at > now:
            clock = clock + (at - now)  # Environment.timeout: now + delay
            now = at
        out[i] = clock
    return out


def _route(rid: int, replicas: list[Replica], router: str, rng) -> Replica:
    n_rep = len(replicas)
    if router == "round-robin" or n_rep == 1:
        return replicas[rid % n_rep]
    if router == "random":
        return replicas[int(rng.integers(n_rep))]
    # least-outstanding: fewest requests queued or running; ties → lowest index
    return replicas[min(range(n_rep), key=lambda i: replicas[i].outstanding)]


def _closed_loop(env: simpy.Environment, first_s: float, think_s: np.ndarray, table: RequestTable,
                 replicas: list[Replica], router: str, rng):
    """One client replaying a trace as a closed loop (a synchronous benchmark harness): request i is
    sent think_s[i] after request i−1 came back, i.e. finished and any inline training step it made
    due has run (the real OSD prototype trains between requests)."""
    released: dict[int, simpy.Event] = {}

    def on_release(rid: int) -> None:
        ev = released.setdefault(rid, env.event())
        if not ev.triggered:
            ev.succeed()

    table.on_release = on_release
    if first_s > 0:
        yield env.timeout(first_s)
    for rid in range(think_s.size):
        if rid > 0:
            yield released.setdefault(rid - 1, env.event())
            released.pop(rid - 1, None)
            if think_s[rid] > 0:
                yield env.timeout(float(think_s[rid]))
        _route(rid, replicas, router, rng).submit(rid)
