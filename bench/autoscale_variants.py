"""Corral benchmark, trace replay experiments: ways of feeding the HPA rules that were tried
against issue 6's cost goal, replayed on the traces of `autoscale_replay.py` beside its HPA and
KPA baselines. A pure simulation (no NATS, no processes); nothing here is shipped.

    cd /work/main && .venv/bin/python bench/autoscale_variants.py           # seeds 1-20, ~1 min
    .venv/bin/python bench/autoscale_variants.py --seeds 21-40              # a held-out set
    .venv/bin/python bench/autoscale_variants.py --only burst               # rows whose name has it
    .venv/bin/python bench/autoscale_variants.py --recurring 150            # bursts that come back

Every variant runs the HPA rules as Corral's defaults set them, on every 1 s sample: a
proposal of ceil(value) replicas (the value in replicas: load / target), or the current count
while the value is within 10 % of the ready replicas; the scale-down window holds the highest
recorded recommendation of the last 300 s; scale-up by at most max(100 %, 4) per 15 s; min 1,
max 50. A variant chooses only the value fed and what the window records:

- `raw`: every sample as it comes (Corral as shipped; the first row checks that this engine
  gives the real policy's figures);
- `smoothed`: an exponential average of the samples over `tau` s, plus a noise headroom of
  3 noise deviations, at most `cap` replicas (the noise: the median absolute difference of
  consecutive samples over the last 60 s, / 0.954, which a ramp barely moves);
- `two-speed`: the smoothed value, and a sample more than 3 deviations above the average is a
  burst, acted on at once at the sample less `m` deviations. `recorded`: the burst's
  recommendation goes into the 300 s window like any other; `held N s`: the window records
  only the smoothed recommendation, and a burst's holds off a scale-down for N s after the
  last burst sample, then stays only as far as the average confirms it; `drop`: a sample 3
  deviations below the average resets it (the sample + m deviations). The last design, held
  120 s with drop, is `behavior.smoothing.mode: two_speed` (the real policy gives the same
  figures: `autoscale_replay.py --smoothing two_speed`);
- `oracle`: the trace's noise-free load (which no autoscaler can know) plus a headroom of `h`
  (a fraction; `h_burst` while the load is above 80, twice the baseline): the best any value
  fed to these rules could do with that headroom.

Goals (issue 6), per trace: fewer seconds under-provisioned than HPA, replica-seconds no higher
than HPA's, fewer scaling changes than KPA. See bench/README.md, section 3.

`--recurring GAP`: other traces, where each third holds a pair of equal bursts of 40-60 s,
GAP seconds apart (the rest as `autoscale_replay.trace`), replayed through the real policy
with `smoothing` off and `two_speed` beside HPA: what a burst that comes back after
`two_speed`'s hold (120 s) but within the 300 s window costs.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from autoscale_replay import (
    BASELINE,
    DURATION,
    MAX,
    MIN,
    TARGET,
    Fleet,
    Hpa,
    Kpa,
    Result,
    corral,
    run,
    trace,
)

TOLERANCE = 0.1
DOWN_WINDOW = 300.0
NOISE_POINTS = 60
BURST = 3.0
HOLD = 15.0


def clean(seed: int) -> list[float]:
    """The trace of `seed` without its noise: the same draws as `trace`, up to the noise."""
    return trace(seed, noise=0.0)


def paired(seed: int, gap: float) -> list[float]:
    """A trace whose bursts come in pairs, `gap` seconds apart."""
    rng = random.Random(seed)
    bursts = []
    for slot in range(3):
        length = rng.uniform(40, 60)
        start = rng.uniform(slot * 600 + 30, slot * 600 + 600 - 2 * length - gap - 30)
        high = rng.uniform(3, 5)
        bursts += [(start, length, high), (start + length + gap, length, high)]
    load = []
    for t in range(DURATION):
        factor = 1.0
        for start, length, high in bursts:
            if start <= t < start + length:
                ramp = min(1.0, (t - start) / 10, (start + length - t) / 10)
                factor = max(factor, 1 + (high - 1) * ramp)
        value = BASELINE * (1 + 0.2 * math.sin(2 * math.pi * t / 900)) * factor
        load.append(max(0.0, value * (1 + rng.gauss(0, 0.08))))
    return load


def recurring(seeds: range, gap: float) -> int:
    print(f"paired bursts {gap:g} s apart, traces {seeds.start}-{seeds.stop - 1}")
    print("| policy | cost vs HPA: median | under-provisioned s: median | changes: median |")
    print("|---|---:|---:|---:|")
    loads = {seed: paired(seed, gap) for seed in seeds}
    hpa = {seed: run("", Hpa(), load) for seed, load in loads.items()}
    for mode in ("off", "two_speed"):
        mine = {seed: run("", corral(mode), load) for seed, load in loads.items()}
        cost = statistics.median(
            (mine[s].replica_seconds / hpa[s].replica_seconds - 1) * 100 for s in seeds
        )
        under = statistics.median(mine[s].under for s in seeds)
        changes = statistics.median(mine[s].changes for s in seeds)
        print(f"| Corral, smoothing {mode} | {cost:+.1f} % | {under:g} | {changes:g} |")
    under = statistics.median(h.under for h in hpa.values())
    changes = statistics.median(h.changes for h in hpa.values())
    print(f"| HPA | 0 % | {under:g} | {changes:g} |")
    return 0


def hpa_rule(value: float, ready: int, current: int) -> int:
    """The HPA's proposal for a value in replicas, measured against the ready replicas."""
    if ready <= 0 or abs(1 - value / ready) <= TOLERANCE + 1e-9:
        return current
    return max(0, math.ceil(value - 1e-9))


@dataclass
class Fed:
    act: float
    """the value the rules get now"""
    record: float
    """the value whose recommendation the 300 s window keeps"""
    burst: bool = False


@dataclass
class Rules:
    """The HPA's rules on every 1 s sample, with the value fed chosen by `feed`."""

    feed: Callable[[int, float], Fed]
    keep_bursts: bool = True
    hold: float = HOLD
    window: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)
    held: int = 0
    held_until: float = -1.0

    def __call__(self, t: int, load: list[float], fleet: Fleet) -> int | None:
        ready, current = fleet.ready(t), len(fleet.ready_at)
        fed = self.feed(t, load[t] / TARGET)
        act = hpa_rule(fed.act, ready, current)
        recorded = hpa_rule(fed.record, ready, current)
        if fed.burst and act > recorded and not self.keep_bursts:
            self.held = max(act, self.held if t < self.held_until else 0)
            self.held_until = t + self.hold
        kept = max(act, recorded) if self.keep_bursts else recorded
        self.window = [(at, r) for at, r in self.window if at > t - DOWN_WINDOW]
        holding = [r for _, r in self.window] + [kept]
        if t < self.held_until:
            holding.append(self.held)
        stabilised = act if act > current else min(current, max(holding))
        recent = [(at, n) for at, n in self.events if at > t - 15]
        start = current - sum(n for _, n in recent)
        desired = min(stabilised, max(current, 2 * start, start + 4))
        desired = max(MIN, min(MAX, desired))
        self.window.append((t, kept))
        if desired != current:
            self.events = [*recent, (t, desired - current)]
        return desired


def raw() -> Rules:
    return Rules(lambda t, value: Fed(value, value))


@dataclass
class Smoother:
    tau: float
    cap: float
    burst_m: float | None = None
    """None: no burst path"""
    drop: bool = False
    level: float | None = None
    points: list[float] = field(default_factory=list)

    def noise(self) -> float:
        recent = self.points[-NOISE_POINTS:]
        if len(recent) < 6:
            return 0.0
        steps = sorted(abs(b - a) for a, b in itertools.pairwise(recent))
        return steps[len(steps) // 2] / 0.954  # the median |difference| of two N(0, s) draws

    def __call__(self, t: int, value: float) -> Fed:
        self.points.append(value)
        if self.level is None:
            self.level = value
        sigma = self.noise()
        burst = self.burst_m is not None and value - self.level > BURST * sigma
        if self.drop and self.burst_m is not None and self.level - value > BURST * sigma:
            self.level = value + self.burst_m * sigma
        else:
            self.level += (1 - math.exp(-1 / self.tau)) * (value - self.level)
        slow = self.level + min(self.cap, BURST * sigma)
        if burst and self.burst_m is not None:
            return Fed(max(slow, value - self.burst_m * sigma), slow, burst=True)
        return Fed(slow, slow)


def smoothed(tau: float, cap: float) -> Rules:
    return Rules(Smoother(tau, cap))


def two_speed(
    tau: float, cap: float, m: float, *, recorded: bool, drop: bool, hold: float = HOLD
) -> Rules:
    return Rules(Smoother(tau, cap, burst_m=m, drop=drop), keep_bursts=recorded, hold=hold)


def oracle(seed: int, h: float, h_burst: float | None = None) -> Rules:
    mean = clean(seed)

    def feed(t: int, value: float) -> Fed:
        headroom = h if h_burst is None or mean[t] <= 2 * BASELINE else h_burst
        fed = mean[t] / TARGET * (1 + headroom)
        return Fed(fed, fed)

    return Rules(feed)


Variant = tuple[str, Callable[[int], Callable[[int, list[float], Fleet], int | None]]]
VARIANTS: list[Variant] = [
    ("Corral as shipped (the real policy)", lambda seed: corral()),
    ("raw: this engine, every sample (must equal the row above)", lambda seed: raw()),
    ("smoothed tau 10 s, headroom <= 0.7", lambda seed: smoothed(10, 0.7)),
    ("smoothed tau 20 s, headroom <= 0.8", lambda seed: smoothed(20, 0.8)),
    (
        "two-speed tau 20 s, m 3, headroom <= 0.6, burst recorded",
        lambda seed: two_speed(20, 0.6, 3, recorded=True, drop=False),
    ),
    (
        "two-speed tau 45 s, m 3, headroom <= 0.6, burst recorded, drop",
        lambda seed: two_speed(45, 0.6, 3, recorded=True, drop=True),
    ),
    (
        "two-speed tau 90 s, m 2, headroom <= 1.0, burst recorded",
        lambda seed: two_speed(90, 1.0, 2, recorded=True, drop=False),
    ),
    (
        "two-speed tau 45 s, m 2, headroom <= 0.9, burst held 15 s",
        lambda seed: two_speed(45, 0.9, 2, recorded=False, drop=False),
    ),
    (
        "two-speed tau 90 s, m 2, headroom <= 1.0, burst held 15 s",
        lambda seed: two_speed(90, 1.0, 2, recorded=False, drop=False),
    ),
    (
        "two-speed tau 90 s, m 2, headroom <= 1.0, burst held 15 s, drop",
        lambda seed: two_speed(90, 1.0, 2, recorded=False, drop=True),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst held 15 s",
        lambda seed: two_speed(150, 1.0, 1, recorded=False, drop=False),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst held 15 s, drop",
        lambda seed: two_speed(150, 1.0, 1, recorded=False, drop=True),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst held 60 s, drop",
        lambda seed: two_speed(150, 1.0, 1, recorded=False, drop=True, hold=60),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst held 120 s, drop",
        lambda seed: two_speed(150, 1.0, 1, recorded=False, drop=True, hold=120),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst held 180 s, drop",
        lambda seed: two_speed(150, 1.0, 1, recorded=False, drop=True, hold=180),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst held 300 s, drop",
        lambda seed: two_speed(150, 1.0, 1, recorded=False, drop=True, hold=300),
    ),
    (
        "two-speed tau 150 s, m 1, headroom <= 1.0, burst recorded, drop",
        lambda seed: two_speed(150, 1.0, 1, recorded=True, drop=True),
    ),
    ("oracle: noise-free load + 5 %", lambda seed: oracle(seed, 0.05)),
    ("oracle: noise-free load + 10 %", lambda seed: oracle(seed, 0.10)),
    ("oracle: + 20 % at baseline, + 0 % in bursts", lambda seed: oracle(seed, 0.20, 0.0)),
]


def spread(values: Sequence[float], fmt: str) -> str:
    med = statistics.median(values)
    return f"{med:{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--seeds", default="1-20", help="a range of traces, such as 21-40")
    parser.add_argument("--only", default="", help="run only the variants whose name has this")
    parser.add_argument(
        "--recurring", type=float, help="paired bursts this many seconds apart (see above)"
    )
    args = parser.parse_args(argv)
    first, _, last = args.seeds.partition("-")
    seeds = range(int(first), int(last or first) + 1)
    if args.recurring is not None:
        return recurring(seeds, args.recurring)
    loads = {seed: trace(seed) for seed in seeds}
    baselines: dict[int, tuple[Result, Result]] = {
        seed: (run("", Hpa(), load), run("", Kpa(), load)) for seed, load in loads.items()
    }
    hpa_under = statistics.median(hpa.under for hpa, _ in baselines.values())
    kpa_changes = statistics.median(kpa.changes for _, kpa in baselines.values())
    print(
        f"traces {args.seeds}: HPA's median under-provisioned s {hpa_under:g}, "
        f"KPA's median changes {kpa_changes:g}"
    )
    print(
        "| variant | cost vs HPA: median (range) | under-provisioned s: median (range) "
        "| changes: median (range) | under < HPA / cost <= HPA / changes < KPA | all three |"
    )
    print("|---|---|---|---|---|---:|")
    for name, make in VARIANTS:
        if args.only and args.only not in name:
            continue
        costs, unders, changes, met = [], [], [], [0, 0, 0, 0]
        for seed, load in loads.items():
            mine = run("", make(seed), load)
            hpa, kpa = baselines[seed]
            costs.append((mine.replica_seconds / hpa.replica_seconds - 1) * 100)
            unders.append(float(mine.under))
            changes.append(float(mine.changes))
            goals = (
                mine.under < hpa.under,
                mine.replica_seconds <= hpa.replica_seconds,
                mine.changes < kpa.changes,
            )
            for i, ok in enumerate(goals):
                met[i] += ok
            met[3] += all(goals)
        n = len(seeds)
        print(
            f"| {name} | {spread(costs, '+.1f')} % | {spread(unders, '.0f')} "
            f"| {spread(changes, '.0f')} | {met[0]} / {met[1]} / {met[2]} of {n} "
            f"| {met[3]} / {n} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
