"""One settings object, read from `CORRAL_*` environment variables and flags, handed down."""

from __future__ import annotations

import re
import socket
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_URL = "nats://127.0.0.1:4222"


def default_node_id() -> str:
    host = socket.gethostname().split(".")[0].lower()
    host = re.sub(r"[^a-z0-9-]", "-", host).strip("-")
    return host or "local"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    nats_url: str | None = Field(
        default=None, description="an existing NATS; when unset, `corral up` starts one"
    )
    prefix: str = Field(default="corral", pattern=r"^[a-z][a-z0-9_]{0,31}$")
    data_dir: Path = Path(".corral")
    nats_server_bin: Path | None = None
    nats_port: int = Field(default=4222, ge=0, le=65535)
    node_id: str = Field(default_factory=default_node_id)
    command_timeout: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(
        default=30.0,
        gt=0,
        description="a process retries its first connection to NATS this long, then stops; "
        "once connected it reconnects for ever",
    )
    heartbeat_interval: float = Field(default=1.0, gt=0)
    node_grace: float = Field(default=3.0, gt=0)
    resync_interval: float = Field(default=10.0, gt=0)
    duplicate_window: float = Field(default=120.0, gt=0)
    source: str = "corral"
    metrics_interval: float = Field(
        default=2.0, gt=0, description="agents publish every replica's cpu and memory this often"
    )
    autoscale_poll_interval: float = Field(
        default=5.0, gt=0, description="the autoscaler reads pulled sources this often"
    )
    prometheus_url: str | None = Field(
        default=None, description="the Prometheus server autoscale queries go to by default"
    )
    docker: str = Field(
        default="auto",
        pattern=r"^(auto|on|off)$",
        description="containers on a real node: auto (when an engine answers), on, or off",
    )
    gateway_host: str = Field(
        default="127.0.0.1", min_length=1, description="the HTTP gateway listens on this address"
    )
    gateway_port: int = Field(
        default=8080, ge=0, le=65535, description="the HTTP gateway's port; 0 picks a free one"
    )
    gateway_max_body: int = Field(
        default=1024 * 1024, gt=0, description="the largest request body the gateway reads"
    )
    gateway_rate_limit: float = Field(
        default=50.0, ge=0, description="requests per second for each API token or webhook; 0: off"
    )
    gateway_rate_burst: int = Field(
        default=100, ge=1, description="how many requests a token may send at once"
    )
    sched_batch_window: float = Field(
        default=0.002, ge=0, le=1, description="the scheduler gathers requests this long"
    )
    sched_shard_above: int = Field(
        default=200_000,
        ge=1,
        description="a batch of more replicas than this is sharded over Ray tasks",
    )
    sched_shard_placements_above: int = Field(
        default=2_000,
        ge=0,
        description="and only when it needs more separate placements than this (a group of "
        "same-shape new services counts once)",
    )
    sched_shards: int = Field(
        default=0, ge=0, le=1024, description="Ray shards per batch; 0: one per Ray CPU"
    )
    rebalance_shard_above: int = Field(
        default=200_000,
        ge=1,
        description="`corral rebalance` shards its search over Ray tasks (by service) when the "
        "services it looks at hold more replicas than this",
    )
    pipeline_log_bytes: int = Field(
        default=1024**3,
        ge=1024**2,
        description="bytes the pipeline job log stream keeps (oldest dropped first); JetStream "
        "reserves them on disk when the stream is created",
    )

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, value: str) -> str:
        if not re.match(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$", value):
            raise ValueError("node id must be lowercase letters, digits, '-' or '_'")
        return value

    def resolved_url(self) -> str:
        """CORRAL_NATS_URL, else the URL a running `corral up` wrote, else the default."""
        if self.nats_url:
            return self.nats_url
        url_file = self.data_dir / "nats.url"
        if url_file.exists():
            text = url_file.read_text().strip()
            if text:
                return text
        return DEFAULT_URL
