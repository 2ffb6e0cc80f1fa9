"""A Docker engine for tests, and an image to run on it without any registry: busybox-static
imported as `corral-test/busybox:latest` (run commands as `/bin/busybox <applet> ...`).
No engine skips the test, unless CORRAL_REQUIRE_DOCKER=1 (CI), where it fails."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from docker.errors import DockerException, ImageNotFound, NotFound

from corral.workers.agent.drivers.docker import docker_client_or_none

BUSYBOX = "corral-test/busybox:latest"
BUSYBOX_BINARY = Path("/bin/busybox")
PT_INTERP = 3


def docker_client() -> docker.DockerClient:
    """A client for the local engine; skips (or fails, under CORRAL_REQUIRE_DOCKER=1)."""
    client = docker_client_or_none()
    if client is None:
        if os.environ.get("CORRAL_REQUIRE_DOCKER") == "1":
            pytest.fail("no Docker engine answers, and CORRAL_REQUIRE_DOCKER=1 requires one")
        pytest.skip("no Docker engine")
    return client


def is_static_elf(data: bytes) -> bool:
    """An ELF executable with no program interpreter (PT_INTERP), so it runs in an empty
    root filesystem."""
    if data[:4] != b"\x7fELF":
        return False
    wide = data[4] == 2
    order = "<" if data[5] == 1 else ">"
    if wide:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "Q", data, 0x20)[0],
            *struct.unpack_from(order + "HH", data, 0x36),
        )
    else:
        phoff, phentsize, phnum = (
            struct.unpack_from(order + "I", data, 0x1C)[0],
            *struct.unpack_from(order + "HH", data, 0x2A),
        )
    for index in range(phnum):
        (kind,) = struct.unpack_from(order + "I", data, phoff + index * phentsize)
        if kind == PT_INTERP:
            return False
    return True


def busybox_tar(binary: Path = BUSYBOX_BINARY) -> bytes:
    """A root filesystem of one static busybox at /bin/busybox, with /bin/sh beside it."""
    if not binary.is_file():
        pytest.fail(f"{binary} is missing; install busybox-static to build the test image")
    data = binary.read_bytes()
    if not is_static_elf(data):
        pytest.fail(f"{binary} is not statically linked; install busybox-static")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for directory in ("bin", "tmp"):
            entry = tarfile.TarInfo(directory)
            entry.type = tarfile.DIRTYPE
            entry.mode = 0o1777 if directory == "tmp" else 0o755
            tar.addfile(entry)
        entry = tarfile.TarInfo("bin/busybox")
        entry.size = len(data)
        entry.mode = 0o755
        tar.addfile(entry, io.BytesIO(data))
        link = tarfile.TarInfo("bin/sh")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        tar.addfile(link)
    return out.getvalue()


def busybox_image(client: docker.DockerClient) -> str:
    """Import the busybox image once; later calls find it and do nothing. An image of that
    name made another way (with an entrypoint, say) is replaced, so that commands run alike
    everywhere."""
    with contextlib.suppress(ImageNotFound):
        config = client.images.get(BUSYBOX).attrs.get("Config") or {}
        if not config.get("Entrypoint") and not config.get("Cmd"):
            return BUSYBOX
    repository, tag = BUSYBOX.rsplit(":", 1)
    client.api.import_image_from_data(busybox_tar(), repository=repository, tag=tag)
    client.images.get(BUSYBOX)
    return BUSYBOX


def remove_node_containers(client: docker.DockerClient, node_id: str) -> list[str]:
    """Force-remove every container labelled for `node_id`; return their names."""
    names: list[str] = []
    found = client.containers.list(
        all=True, filters={"label": f"corral.node={node_id}"}, ignore_removed=True
    )
    for container in found:
        with contextlib.suppress(NotFound):
            container.remove(force=True)
        names.append(container.name or str(container.id))
    return names


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    client = docker_client()
    yield client
    with contextlib.suppress(DockerException):
        client.close()


@pytest.fixture(scope="session")
def busybox(docker_engine: docker.DockerClient) -> str:
    """The tag of the busybox test image, imported if it was not there."""
    return busybox_image(docker_engine)
