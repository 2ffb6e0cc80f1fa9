"""The pipeline worker: runs DAGs of jobs on the agents (stages and needs, matrix, retries
with backoff, timeouts, approvals, artifacts, resource groups, deploys, cron). Deciding is pure
(`dag.py`, `planning.py`, `assigning.py`); `worker.py`, `commands.py`, `locking.py`,
`active.py` and `triggers.py` do the I/O."""
