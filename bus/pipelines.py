"""What pipelines keep on the bus: runs, stored specs, job assignments and resource-group
locks in KV, job logs in a stream, artifacts (and complete logs) in an object store.
Provisioned idempotently by whoever needs them first (worker, agent or CLI)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from corral.bus.connection import DAY, Bus
from corral.bus.store import Bucket
from corral.schemas.runs import JobAssignment, RunRecord, StoredPipeline

LOG_MAX_MSG = 256 * 1024
ARTIFACTS_TTL = 30 * DAY


@dataclass(frozen=True)
class PipelineNames:
    prefix: str

    @property
    def runs(self) -> str:
        return f"{self.prefix}-pipelines"

    @property
    def specs(self) -> str:
        return f"{self.prefix}-pipeline-specs"

    @property
    def jobs(self) -> str:
        return f"{self.prefix}-jobs"

    @property
    def active(self) -> str:
        return f"{self.prefix}-pipeline-active"

    @property
    def locks(self) -> str:
        return f"{self.prefix}-pipeline-locks"

    @property
    def artifacts(self) -> str:
        return f"{self.prefix}-artifacts"

    @property
    def log_stream(self) -> str:
        return f"{self.prefix.upper()}_LOG"

    def log(self, run: str = "*", job: str = "*") -> str:
        return f"{self.prefix}.log.{run}.{job}"

    @staticmethod
    def artifact_object(run: str, job: str) -> str:
        return f"artifacts/{run}/{job}.tar.gz"

    @staticmethod
    def log_object(run: str, job: str, attempt: int) -> str:
        return f"logs/{run}/{job}/{attempt}.log"


@dataclass
class PipelineStore:
    names: PipelineNames
    runs: Bucket[RunRecord]
    specs: Bucket[StoredPipeline]
    jobs: Bucket[JobAssignment]
    locks: KeyValue
    active: KeyValue
    """one key per unfinished run, so that nobody replays every run ever kept"""
    artifacts: ObjectStore


async def pipeline_store(bus: Bus) -> PipelineStore:
    names = PipelineNames(bus.settings.prefix)
    js = bus.js
    try:
        await js.add_stream(
            StreamConfig(
                name=names.log_stream,
                subjects=[f"{names.prefix}.log.>"],
                retention=RetentionPolicy.LIMITS,
                max_age=7 * DAY,
                max_bytes=bus.settings.pipeline_log_bytes,
                max_msg_size=LOG_MAX_MSG,
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
            )
        )
    except BadRequestError:
        await js.stream_info(names.log_stream)

    async def bucket(name: str, history: int = 1) -> KeyValue:
        try:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, history=history, storage=StorageType.FILE)
            )
        except BadRequestError:
            return await js.key_value(name)

    async def objects() -> ObjectStore:
        try:
            return await js.create_object_store(
                names.artifacts,
                config=ObjectStoreConfig(storage=StorageType.FILE, ttl=ARTIFACTS_TTL),
            )
        except BadRequestError:
            return await js.object_store(names.artifacts)

    runs, specs, jobs, locks, active, store = await asyncio.gather(
        bucket(names.runs),
        bucket(names.specs),
        bucket(names.jobs),
        bucket(names.locks),
        bucket(names.active),
        objects(),
    )
    return PipelineStore(
        names=names,
        runs=Bucket(runs, RunRecord),
        specs=Bucket(specs, StoredPipeline),
        jobs=Bucket(jobs, JobAssignment),
        locks=locks,
        active=active,
        artifacts=store,
    )
