"""Cron triggers of stored pipelines. Every copy of the worker watches the clock; a fire's
run id is derived from the pipeline and the minute, so when several copies fire at once the
run is created once (the others' compare-and-set create fails). A time that passed while no
worker ran is not made up for, as with a Kubernetes CronJob without a starting deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from corral.schemas.envelope import utcnow
from corral.schemas.pipeline import next_cron, run_id_for
from corral.workers.pipeline import dag

if TYPE_CHECKING:
    from corral.workers.pipeline.worker import PipelineWorker

log = logging.getLogger(__name__)
LONGEST_NAP = 30.0


class CronTrigger:
    def __init__(self, worker: PipelineWorker) -> None:
        self.worker = worker
        self.changed = asyncio.Event()
        self.since = utcnow()

    async def run(self) -> None:
        while self.worker.loops.running:
            try:
                nap = await self.fire_due(utcnow())
            except Exception as exc:
                log.warning("cron triggers: %s", exc)
                nap = 5.0
            self.changed.clear()
            waits = [asyncio.ensure_future(self.changed.wait())]
            waits.append(asyncio.ensure_future(self.worker.loops.stopping.wait()))
            try:
                await asyncio.wait(waits, timeout=nap, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await wait

    async def fire_due(self, now: datetime) -> float:
        """Start every run that is due; return the seconds until the next one may be."""
        store = self.worker.store
        nap = LONGEST_NAP
        for stored in (v.value for v in (await store.specs.items()).values()):
            spec = stored.spec
            if spec.triggers.cron is None:
                continue
            after = max(self.since, stored.updated_at - timedelta(seconds=1))
            due = next_cron(spec.triggers.cron, after)
            while due <= now:
                run_id = run_id_for(spec.name, f"cron-{due:%Y%m%d%H%M}")
                run = dag.new_run(
                    run_id,
                    spec,
                    {},
                    now,
                    requested_by="cron",
                    trigger="cron",
                    command_id=run_id,
                )
                assert self.worker.commands is not None
                if await self.worker.commands.start_run(run):
                    log.info("cron started %s for %s", run_id, due.isoformat())
                due = next_cron(spec.triggers.cron, due)
            nap = min(nap, max(0.05, (due - now).total_seconds()))
        self.since = now
        return nap
