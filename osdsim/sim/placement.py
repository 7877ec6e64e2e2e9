"""Where due training steps run (docs/architecture.md, "Training placements").

A placement owns its unit of work, its rate and its bookkeeping in DistillStats (busy time,
latency cost, work used); the Distiller owns the steps' life cycle (due, skipped, done). The unit
of training work is TrainingStep.work_s: device-seconds at full speed in the step's own dtype.

- NoTraining: static / offline drafts, or no speculation.
- Inline: the replica stops serving and trains each due step (work_s of device time).
- Harvest: the replica offers spare compute, θ·(spare device seconds), to pending steps in FIFO
  order; serving slows by `interference` while a step is pending.
- Dedicated: trainer GPUs (data-parallel, ideal scaling) train the steps and publish the weights
  after a sync delay; α then changes asynchronously, so replicas plan one iteration at a time. A
  trainer on the same host (CPU cores) slows serving by `dedicated_interference` while it trains.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import simpy

from osdsim.sim.distill import Distiller, DistillStats


class Placement:
    name = "none"
    stretch_ok = True  # α cannot change asynchronously while a replica runs a stretch
    spare_rate = 0.0  # training work (device-seconds at full training speed) per spare device-second

    def __init__(self, stats: DistillStats):
        self.stats = stats

    def blocks_serving(self, distillers: Iterable[Distiller]) -> bool:
        """Whether the replica must train before it serves again (inline)."""
        return False

    def harvesting(self, distillers: Iterable[Distiller]) -> bool:
        """Whether spare compute goes to a pending step now (harvest)."""
        return False

    def harvesting_in_iterations(self, distillers: Iterable[Distiller]) -> bool:
        """Whether serving iterations give their spare compute to a pending step (harvest)."""
        return False

    def co_running(self) -> bool:
        """Whether training runs beside serving on shared hardware right now (dedicated on one host)."""
        return False


class NoTraining(Placement):
    pass


class Inline(Placement):
    name = "inline"

    def __init__(self, stats: DistillStats, publish_pause_s: float = 0.0):
        super().__init__(stats)
        self.publish_pause_s = publish_pause_s  # serving pause to publish each step's weights (export + reload)

    def blocks_serving(self, distillers: Iterable[Distiller]) -> bool:
        return any(d.pending for d in distillers)

    def train(self, replica):
        """Run every pending step on the replica, one after another, at full speed."""
        env = replica.env
        st = self.stats
        for dist in [d for d in replica.distillers if d.pending]:
            while dist.pending:
                step = dist.pending.popleft()
                dist.in_flight += 1
                dur = step.cost.time_s
                step.started_s = env.now
                yield env.timeout(dur)
                replica.busy_s += dur
                st.busy_s += dur
                st.latency_cost_s += dur
                st.work_s_used += step.work_s
                replica.log.add((env.now - dur, dur, 0, 0, 0, 0, np.nan, step.cost.flops, step.cost.bytes,
                                 step.cost.compute_s, 0.0, step.work_s, "train"))
                if self.publish_pause_s > 0:  # the server exports and reloads the draft: no serving, α unchanged
                    pause = self.publish_pause_s
                    yield env.timeout(pause)
                    st.latency_cost_s += pause
                    replica.log.add((env.now - pause, pause, 0, 0, 0, 0, np.nan, 0.0, 0.0, 0.0, 0.0, 0.0, "publish"))
                dist.complete(step, env.now, dur)


class Harvest(Placement):
    name = "harvest"

    def __init__(self, stats: DistillStats, fraction: float, interference: float, in_iterations: bool = True):
        super().__init__(stats)
        self.spare_rate = fraction  # θ
        self.interference = interference
        self.in_iterations = in_iterations  # False: idle windows only, in whole minibatch units

    def harvesting_in_iterations(self, distillers: Iterable[Distiller]) -> bool:
        return self.in_iterations and self.harvesting(distillers)

    def harvesting(self, distillers: Iterable[Distiller]) -> bool:
        return any(d.pending for d in distillers)

    def slow_down(self, duration: float) -> float:
        """Serving time lost to a pending step's interference (booked as latency cost)."""
        if self.interference <= 0:
            return 0.0
        extra = duration * self.interference
        self.stats.latency_cost_s += extra
        return extra

    def give(self, distillers: Iterable[Distiller], spare_s: float, since_s: float, now: float) -> float:
        """Give spare work (accrued since `since_s`) to pending steps in FIFO order; returns the work used."""
        used = 0.0
        for dist in distillers:
            while dist.pending and spare_s > 0:
                step = dist.pending[0]
                if step.started_s is None:
                    step.started_s = max(since_s, step.due_s)
                take = min(spare_s, step.work_s - step.progress_s)
                step.progress_s += take
                spare_s -= take
                used += take
                if step.progress_s >= step.work_s * (1 - 1e-12):
                    dist.pending.popleft()
                    dist.in_flight += 1
                    dist.complete(step, now, now - step.started_s)
        self.stats.work_s_used += used
        return used

    def idle(self, replica, get: simpy.Event):
        """The replica has nothing to serve: train on the idle device until the pending work is done
        or a request arrives (`get`, the replica's inbox get)."""
        if not self.in_iterations:
            yield from self._idle_units(replica, get)
            return
        env = replica.env
        rate = self.spare_rate
        remaining = sum(s.work_s - s.progress_s for d in replica.distillers for s in d.pending)
        t0 = env.now
        yield get | env.timeout(remaining / rate)
        if get.triggered:  # an arrival (possibly at the same instant the work finished)
            spare = (env.now - t0) * rate
            replica.waiting.append(get.value)
        else:
            # The pending work finished; grant it exactly (elapsed time can round to 0 at large t).
            spare = remaining
            get.cancel()
        replica.spare_s += spare
        self.give(replica.distillers, spare, t0, env.now)


    def _idle_units(self, replica, get: simpy.Event):
        """Idle-window training in whole units (one minibatch: work_s / units): a unit, once
        begun, runs to its end; an arrival during it joins the queue when it ends."""
        env = replica.env
        rate = self.spare_rate
        while True:
            step = next((d.pending[0] for d in replica.distillers if d.pending), None)
            if step is None:
                rid = yield get
                replica.waiting.append(rid)
                return
            take = min(step.work_s / step.units, step.work_s - step.progress_s)
            t0 = env.now
            yield env.timeout(take / rate)
            replica.spare_s += take
            self.give(replica.distillers, take, t0, env.now)
            if get.triggered:
                replica.waiting.append(get.value)
                return


class Dedicated(Placement):
    name = "dedicated"
    stretch_ok = False

    def __init__(self, stats: DistillStats, trainer_gpus: int, sync_delay_s: float, interference: float = 0.0):
        super().__init__(stats)
        self.trainer_gpus = trainer_gpus
        self.sync_delay_s = sync_delay_s
        self.interference = interference  # serving slowdown while a co-located trainer trains
        self.training = 0  # steps training now

    def co_running(self) -> bool:
        return self.interference > 0 and self.training > 0

    def slow_down(self, duration: float) -> float:
        """Serving time lost to the co-located trainer (booked as latency cost)."""
        extra = duration * self.interference
        self.stats.latency_cost_s += extra
        return extra

    def start(self, env: simpy.Environment, distillers: Iterable[Distiller | None]) -> None:
        """One trainer process per draft: each due step runs there; weights reach replicas after the delay."""
        for dist in dict.fromkeys(x for x in distillers if x is not None):
            env.process(self._trainer(env, dist))

    def _trainer(self, env: simpy.Environment, dist: Distiller):
        wake = {"event": env.event()}

        def on_due() -> None:
            if not wake["event"].triggered:
                wake["event"].succeed()

        dist.on_due = on_due
        while True:
            if not dist.pending:
                wake["event"] = env.event()
                yield wake["event"]
                continue
            step = dist.pending.popleft()
            dist.in_flight += 1
            step.started_s = env.now
            dur = step.cost.time_s / self.trainer_gpus  # data-parallel over the trainer GPUs (ideal)
            self.training += 1
            yield env.timeout(dur)
            self.training -= 1
            self.stats.busy_s += dur
            self.stats.work_s_used += step.work_s
            env.process(self._publish(env, dist, step, dur))

    def _publish(self, env: simpy.Environment, dist: Distiller, step, dur: float):
        if self.sync_delay_s > 0:
            yield env.timeout(self.sync_delay_s)
        dist.complete(step, env.now, dur)


def make_placement(name: str, stats: DistillStats, distill) -> Placement:
    """The placement for a scenario's distill section (`name` is "none" without online training)."""
    if name == "inline":
        return Inline(stats, getattr(distill, "publish_pause_s", 0.0))
    if name == "harvest":
        return Harvest(stats, distill.harvest_fraction, distill.interference,
                       getattr(distill, "harvest_in_iterations", True))
    if name == "dedicated":
        return Dedicated(stats, distill.trainer_gpus, distill.sync_delay_s,
                         getattr(distill, "dedicated_interference", 0.0))
    return NoTraining(stats)
