"""Pure: crash loops within a window."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from corral.schemas.spec import CrashLoop


@dataclass
class CrashWindow:
    """Times (monotonic seconds) of a service's recent crashes and restarts."""

    times: deque[float] = field(default_factory=deque)
    last_cause: str = ""

    def note(self, at: float, cause: str) -> None:
        self.times.append(at)
        self.last_cause = cause

    def count(self, now: float, window: float) -> int:
        while self.times and now - self.times[0] > window:
            self.times.popleft()
        return len(self.times)

    def looping(self, now: float, policy: CrashLoop) -> bool:
        return self.count(now, policy.window) >= policy.restarts

    def quiet_for(self, now: float) -> float:
        return now - self.times[-1] if self.times else float("inf")
