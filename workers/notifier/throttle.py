"""Pure: the notifier's rate limit. A token bucket per destination bounds messages per minute;
the same news (the same key) within `repeat` seconds is folded into the next message that does
go out ("3 more like this since"), so a flapping service or a storm of failed runs becomes a
summary instead of a flood. Nothing chosen is silently lost: every folded notice is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Throttle:
    per_minute: float = 20.0
    burst: int = 5
    repeat: float = 60.0
    tokens: float = -1.0
    stamp: float = 0.0
    last_sent: dict[str, float] = field(default_factory=dict)
    folded: int = 0
    """notices held back since the last message that went out"""

    def admit(self, key: str, now: float) -> tuple[bool, int]:
        """(send it?, how many notices were folded before it)."""
        if self.tokens < 0:
            self.tokens, self.stamp = float(self.burst), now
        self.tokens = min(
            float(self.burst), self.tokens + (now - self.stamp) * self.per_minute / 60.0
        )
        self.stamp = now
        last = self.last_sent.get(key)
        if (last is not None and now - last < self.repeat) or self.tokens < 1.0:
            self.folded += 1
            return False, 0
        self.tokens -= 1.0
        self.last_sent[key] = now
        if len(self.last_sent) > 10_000:
            cutoff = now - self.repeat
            self.last_sent = {k: t for k, t in self.last_sent.items() if t >= cutoff}
        folded, self.folded = self.folded, 0
        return True, folded


def with_folded(text: str, folded: int) -> str:
    if not folded:
        return text
    return f"{text}\n_({folded} more notification(s) were held back by the rate limit)_"
