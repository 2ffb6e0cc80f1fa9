"""Pure: a rule's cooldown and rate limit. The state (recent firings) is shared by every copy
of the rules worker through KV; this module only decides.

- cooldown: at least `cooldown` seconds between two firings;
- rate limit: at most `count` firings in any window of `per` seconds (a sliding log);
- a trigger that already fired (a redelivered event) is a repeat: it is sent again with the
  same command id, which JetStream deduplicates, and it uses no budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.schemas.rules import MAX_RECENT, Firing, Rule, RuleState


@dataclass(frozen=True)
class Verdict:
    fire: bool
    repeat: Firing | None = None
    reason: str = ""
    retry_after: float = 0.0


def previous(state: RuleState, trigger: str) -> Firing | None:
    return next((f for f in state.firings if f.trigger == trigger), None)


def decide(rule: Rule, state: RuleState, trigger: str, now: float) -> Verdict:
    """May `rule` fire for `trigger` at `now` (seconds since the epoch)?"""
    repeat = previous(state, trigger)
    if repeat is not None:
        return Verdict(fire=True, repeat=repeat)
    if state.firings and rule.cooldown > 0:
        last = max(f.at for f in state.firings)
        wait = last + rule.cooldown - now
        if wait > 0:
            return Verdict(
                fire=False,
                reason=f"cooldown: fired {now - last:.1f}s ago, cooldown is {rule.cooldown:g}s",
                retry_after=wait,
            )
    limit = rule.rate_limit
    if limit is not None:
        window = sorted(f.at for f in state.firings if f.at > now - limit.per)
        if len(window) >= limit.count:
            wait = window[len(window) - limit.count] + limit.per - now
            return Verdict(
                fire=False,
                reason=f"rate limit: {len(window)} firings in the last {limit.per:g}s "
                f"(limit {limit.count})",
                retry_after=max(0.0, wait),
            )
    return Verdict(fire=True)


def record(rule: Rule, state: RuleState, trigger: str, now: float, command_id: str) -> RuleState:
    """The state after firing: this firing added, and only what limits and deduplication still
    need kept (the last MAX_RECENT, and every firing inside the rate-limit window)."""
    firings = [*state.firings, Firing(trigger=trigger, at=now, command_id=command_id)]
    window = rule.rate_limit.per if rule.rate_limit is not None else 0.0
    keep_from = len(firings) - MAX_RECENT
    kept = [f for i, f in enumerate(firings) if i >= keep_from or f.at > now - window]
    return RuleState(firings=kept)
