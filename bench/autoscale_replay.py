"""Corral benchmark, trace replay: one load trace fed to Corral's autoscale policy and to
baselines written here from their published algorithms (Kubernetes HPA, KEDA's defaults,
Knative's KPA). A pure simulation on a simulated clock: no NATS, no processes.

    cd /work/main && .venv/bin/python bench/autoscale_replay.py      # about 2 s
    .venv/bin/python bench/autoscale_replay.py --seed 7              # another trace
    .venv/bin/python bench/autoscale_replay.py --seeds 1-20          # a line per trace
    .venv/bin/python bench/autoscale_replay.py --smoothing two_speed # the opt-in two speeds

- The trace: 30 minutes at 1 s; a baseline of 40 units with a slow +-20 % swell, three
  bursts of 3-5x lasting 1-3 minutes (10 s ramps), gaussian noise of 8 %; seeded.
- Each replica serves `target` (10) units. A replica added at t is ready at t + 2 s, for every
  policy; a removal is immediate (a starting replica goes first).
- Corral: `workers.autoscaler.policy.evaluate` with the spec defaults (`min: 1, max: 50`, one
  push metric `load` with target 10), evaluated on every sample as the worker does for push
  metrics; every ready replica sends load / ready. `--smoothing` sets
  `behavior.smoothing.mode` (`off` by default).
- HPA: every 15 s; a Pods metric (average per ready pod, against the target); tolerance 0.1;
  the highest recommendation of the last 300 s on the way down; up by at most
  max(100 %, 4 pods) per 15 s.
- KEDA: the metric (the total load) read every 30 s (`pollingInterval`), fed to the HPA above
  as an AverageValue target: desired = ceil(total / target), against the spec's count.
- KPA: every 2 s (the tick); the average total load over 60 s (stable) and 6 s (panic); per
  pod target x 0.7 (`container-concurrency-target-percentage`); panic when the 6 s want is
  2x the ready pods, held 60 s after the last such tick, never scaling down meanwhile; scale
  up at most 1000x and down at most /2 per tick.

Reported per policy: replica-seconds (every replica that exists, starting or ready), seconds
under-provisioned (load above target x ready replicas), scaling changes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.schemas.autoscale import Autoscale
from corral.workers.autoscaler.policy import History, Inputs, Reading, evaluate

DURATION = 1800
TARGET = 10.0
MIN, MAX = 1, 50
START_DELAY = 2.0
BASELINE = 40.0


def trace(seed: int, noise: float = 0.08) -> list[float]:
    """Load per second: baseline, slow swell, bursts, gaussian noise of `noise` (0: the same
    trace without its noise)."""
    rng = random.Random(seed)
    bursts = []
    for slot in range(3):  # one burst in each third of the trace, at a random place
        length = rng.uniform(60, 180)
        start = rng.uniform(slot * 600 + 30, slot * 600 + 600 - length - 30)
        bursts.append((start, length, rng.uniform(3, 5)))
    load = []
    for t in range(DURATION):
        factor = 1.0
        for start, length, high in bursts:
            if start <= t < start + length:
                ramp = min(1.0, (t - start) / 10, (start + length - t) / 10)
                factor = max(factor, 1 + (high - 1) * ramp)
        value = BASELINE * (1 + 0.2 * math.sin(2 * math.pi * t / 900)) * factor
        load.append(max(0.0, value * (1 + rng.gauss(0, noise))))
    return load


@dataclass
class Fleet:
    """Replicas by the time each is (or will be) ready."""

    ready_at: list[float] = field(default_factory=list)
    changes: int = 0

    def ready(self, now: float) -> int:
        return sum(1 for at in self.ready_at if at <= now)

    def scale(self, desired: int, now: float) -> None:
        current = len(self.ready_at)
        if desired == current:
            return
        self.changes += 1
        if desired > current:
            self.ready_at += [now + START_DELAY] * (desired - current)
        else:
            self.ready_at = sorted(self.ready_at)[:desired]  # the latest to be ready leave first


Decide = Callable[[int, list[float], Fleet], int | None]
"""(second, load so far, fleet) -> the new count, or None to leave it"""


def corral(smoothing: str = "off") -> Decide:
    policy = Autoscale.model_validate(
        {
            "max": MAX,
            "metrics": [{"type": "metric", "name": "load", "target": TARGET}],
            "behavior": {"smoothing": {"mode": smoothing}},
        }
    )
    assert policy.min == MIN
    state = {"history": History()}

    def decide(t: int, load: list[float], fleet: Fleet) -> int | None:
        ready = fleet.ready(t)
        names = tuple(f"r{i}" for i in range(ready))
        each = load[t] / ready if ready else 0.0
        inputs = Inputs(
            current=len(fleet.ready_at),
            replicas=names,
            ready=ready,
            readings=(Reading(per_replica=dict.fromkeys(names, each)),),
        )
        decision, state["history"] = evaluate(policy, inputs, state["history"], float(t))
        return decision.desired

    return decide


@dataclass
class Hpa:
    """The HPA's sync loop with its defaults; `total` switches to an AverageValue target on
    an external total (what KEDA creates), read every `poll` seconds."""

    total: bool = False
    poll: int = 0
    sync: int = 15
    tolerance: float = 0.1
    down_window: float = 300.0
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)
    polled: float = 0.0

    def __call__(self, t: int, load: list[float], fleet: Fleet) -> int | None:
        if self.poll and t % self.poll == 0:
            self.polled = load[t]
        if t % self.sync:
            return None
        current = len(fleet.ready_at)
        if self.total:
            value = self.polled if self.poll else load[t]
            ratio = value / (TARGET * current)
            wanted = current if abs(1 - ratio) <= self.tolerance else math.ceil(value / TARGET)
        else:
            ready = fleet.ready(t)
            ratio = load[t] / ready / TARGET
            if abs(1 - ratio) <= self.tolerance:
                wanted = current
            else:
                wanted = math.ceil(ratio * ready)
                missing = current - ready  # pods without a metric: 0 going up, target down
                if missing > 0:
                    fill = 0.0 if ratio > 1 else TARGET
                    again = (load[t] + fill * missing) / (current * TARGET)
                    flipped = (again > 1) != (ratio > 1)
                    if flipped or abs(1 - again) <= self.tolerance:
                        wanted = current
                    else:
                        wanted = math.ceil(again * current)
        self.recommendations = [(a, r) for a, r in self.recommendations if a > t - self.down_window]
        self.recommendations.append((t, wanted))
        # up window 0: the recommendation itself; down: the highest of the last 300 s
        stabilised = min(max(current, wanted), max(r for _, r in self.recommendations))
        # scale-up limit: max(100 %, 4 pods) per 15 s, from the count 15 s ago
        recent = sum(n for a, n in self.events if a > t - 15)
        start = current - recent
        desired = min(stabilised, max(2 * start, start + 4))
        desired = max(MIN, min(MAX, desired))
        if desired != current:
            self.events.append((t, desired - current))
        return desired


@dataclass
class Kpa:
    stable: int = 60
    panic: int = 6
    threshold: float = 2.0
    utilisation: float = 0.7
    tick: int = 2
    up_rate: float = 1000.0
    down_rate: float = 2.0
    panic_since: float | None = None
    max_panic: int = 0

    def __call__(self, t: int, load: list[float], fleet: Fleet) -> int | None:
        if t % self.tick:
            return None
        ready = max(1, fleet.ready(t))
        stable = load[max(0, t - self.stable + 1) : t + 1]
        panic = load[max(0, t - self.panic + 1) : t + 1]
        per_pod = TARGET * self.utilisation
        up, down = math.ceil(self.up_rate * ready), math.floor(ready / self.down_rate)
        want_stable = min(max(math.ceil(sum(stable) / len(stable) / per_pod), down), up)
        want_panic = min(max(math.ceil(sum(panic) / len(panic) / per_pod), down), up)
        over = want_panic / ready >= self.threshold
        if over:
            self.panic_since = t  # entering, or extending, panic
        elif self.panic_since is not None and t >= self.panic_since + self.stable:
            self.panic_since, self.max_panic = None, 0
        if self.panic_since is not None:
            self.max_panic = max(self.max_panic, want_panic)
            desired = self.max_panic
        else:
            desired = want_stable
        return max(MIN, min(MAX, desired))


@dataclass
class Result:
    name: str
    replica_seconds: float
    under: int
    changes: int


def run(name: str, decide: Decide, load: list[float]) -> Result:
    fleet = Fleet()
    fleet.ready_at = [-1.0] * math.ceil(load[0] / TARGET)  # everyone starts right-sized
    cost, under = 0.0, 0
    for t in range(len(load)):
        desired = decide(t, load, fleet)
        if desired is not None:
            fleet.scale(desired, float(t))
        cost += len(fleet.ready_at)
        if load[t] > TARGET * fleet.ready(t) + 1e-9:
            under += 1
    return Result(name, cost, under, fleet.changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seed", type=int, default=6, help="the trace's seed")
    parser.add_argument(
        "--seeds", help="a range such as 1-10: one summary line per trace, and the goals met"
    )
    parser.add_argument(
        "--smoothing",
        choices=["off", "two_speed"],
        default="off",
        help="Corral's behavior.smoothing.mode (off, the default: every sample as it comes)",
    )
    args = parser.parse_args(argv)
    if args.seeds:
        first, _, last = args.seeds.partition("-")
        return summary(range(int(first), int(last or first) + 1), args.smoothing)
    load = trace(args.seed)
    results = [
        run(f"Corral (every 1 s sample; smoothing {args.smoothing})", corral(args.smoothing), load),
        run("HPA (15 s sync)", Hpa(), load),
        run("KEDA (30 s poll -> HPA)", Hpa(total=True, poll=30), load),
        run("Knative KPA (60 s / 6 s panic)", Kpa(), load),
    ]
    print(
        f"trace: seed {args.seed}, {len(load)} s, load mean {sum(load) / len(load):.1f}, "
        f"max {max(load):.1f}; target {TARGET:g} per replica; start delay {START_DELAY:g} s"
    )
    print("| policy | replica-seconds | seconds under-provisioned | scaling changes |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r.name} | {r.replica_seconds:,.0f} | {r.under} | {r.changes} |")
    mine, hpa, kpa = results[0], results[1], results[3]
    goals = [
        ("fewer seconds under-provisioned than HPA", mine.under < hpa.under),
        ("at no higher cost than HPA", mine.replica_seconds <= hpa.replica_seconds),
        ("fewer scaling changes than KPA", mine.changes < kpa.changes),
    ]
    for text, met in goals:
        print(f"goal: Corral {text}: {'met' if met else 'MISSED'}")
    return 0


def summary(seeds: range, smoothing: str = "off") -> int:
    print("| seed | Corral: replica-s / under s / changes | HPA | KEDA | KPA | cost vs HPA |")
    print("|---:|---|---|---|---|---:|")
    met = [0, 0, 0]
    for seed in seeds:
        load = trace(seed)
        mine, hpa, keda, kpa = (
            run("", corral(smoothing), load),
            run("", Hpa(), load),
            run("", Hpa(total=True, poll=30), load),
            run("", Kpa(), load),
        )
        cells = [
            f"{r.replica_seconds:,.0f} / {r.under} / {r.changes}" for r in (mine, hpa, keda, kpa)
        ]
        cost = (mine.replica_seconds / hpa.replica_seconds - 1) * 100
        print(f"| {seed} | " + " | ".join(cells) + f" | {cost:+.1f}% |")
        met[0] += mine.under < hpa.under
        met[1] += mine.replica_seconds <= hpa.replica_seconds
        met[2] += mine.changes < kpa.changes
    n = len(seeds)
    print(f"goal: fewer seconds under-provisioned than HPA: met on {met[0]} of {n} traces")
    print(f"goal: at no higher cost than HPA: met on {met[1]} of {n} traces")
    print(f"goal: fewer scaling changes than KPA: met on {met[2]} of {n} traces")
    return 0


if __name__ == "__main__":
    sys.exit(main())
