"""Stateless workers, one subpackage each. Each reacts to events and KV changes on the bus;
its deciding is pure (`planning.py`, `placement.py`, ...) and its acting is a thin handler.
No worker imports another: they talk over the bus."""

NAMES = ("api", "deployer", "scheduler", "healer", "autoscaler", "rules", "pipeline", "notifier")
"""The control-plane workers `corral up` runs and `corral worker NAME` runs one of."""
