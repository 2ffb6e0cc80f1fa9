"""Subject, stream and bucket names, all under one prefix so installations can share a NATS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    prefix: str = "corral"

    # streams
    @property
    def cmd_stream(self) -> str:
        return f"{self.prefix.upper()}_CMD"

    @property
    def evt_stream(self) -> str:
        return f"{self.prefix.upper()}_EVT"

    @property
    def dlq_stream(self) -> str:
        return f"{self.prefix.upper()}_DLQ"

    # buckets
    @property
    def services(self) -> str:
        return f"{self.prefix}-services"

    @property
    def service_status(self) -> str:
        return f"{self.prefix}-service-status"

    @property
    def assignments(self) -> str:
        """The name the assignments go by; they live in `assignment_part(k)` buckets (and
        in this one bucket before they were split)."""
        return f"{self.prefix}-assignments"

    def assignment_part(self, k: int) -> str:
        return f"{self.prefix}-assignments-{k:02d}"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}-replicas"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}-nodes"

    @property
    def health(self) -> str:
        return f"{self.prefix}-health"

    @property
    def leases(self) -> str:
        return f"{self.prefix}-leases"

    @property
    def autoscale(self) -> str:
        return f"{self.prefix}-autoscale"

    @property
    def allocations(self) -> str:
        """The scheduler's per-node ledgers of booked replicas (compare-and-set)."""
        return f"{self.prefix}-allocations"

    @property
    def rules(self) -> str:
        return f"{self.prefix}-rules"

    @property
    def rule_state(self) -> str:
        return f"{self.prefix}-rule-state"

    # subjects
    def cmd(self, resource: str = "*", name: str = "*", verb: str = "*") -> str:
        return f"{self.prefix}.cmd.{resource}.{name}.{verb}"

    def evt(self, resource: str = "*", name: str = "*", what: str = "*") -> str:
        return f"{self.prefix}.evt.{resource}.{name}.{what}"

    def dlq(self, subject: str) -> str:
        return f"{self.prefix}.dlq.{subject}"

    def metrics(self, service: str = "*") -> str:
        return f"{self.prefix}.metrics.{service}"

    @property
    def place(self) -> str:
        """Placement requests to the scheduler (core NATS request/reply, a queue group)."""
        return f"{self.prefix}.sched.place"

    @property
    def all_cmd(self) -> str:
        return f"{self.prefix}.cmd.>"

    @property
    def all_evt(self) -> str:
        return f"{self.prefix}.evt.>"

    def parse_cmd(self, subject: str) -> tuple[str, str, str] | None:
        """`corral.cmd.service.web.deploy` -> ("service", "web", "deploy")."""
        parts = subject.split(".")
        head = self.prefix.split(".")
        if len(parts) != len(head) + 4 or parts[: len(head)] != head or parts[len(head)] != "cmd":
            return None
        resource, name, verb = parts[len(head) + 1 :]
        return resource, name, verb
