"""Packing a job's artifacts and unpacking them into the next job's workspace."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from corral.workers.agent.artifacts import pack, unpack


def test_pack_takes_files_directories_and_globs(tmp_path: Path) -> None:
    (tmp_path / "dist" / "sub").mkdir(parents=True)
    (tmp_path / "dist" / "a.txt").write_text("a")
    (tmp_path / "dist" / "sub" / "b.txt").write_text("b")
    (tmp_path / "report.xml").write_text("<r/>")
    (tmp_path / "other.log").write_text("no")
    data, count = pack(tmp_path, ["dist/", "*.xml", "missing/*"])
    assert count == 3
    target = tmp_path / "next"
    assert unpack(data, target) == 3
    assert (target / "dist" / "sub" / "b.txt").read_text() == "b"
    assert (target / "report.xml").read_text() == "<r/>"
    assert not (target / "other.log").exists()


def test_pack_skips_links_out_of_the_workspace(tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_text("s")
    space = tmp_path / "space"
    space.mkdir()
    (space / "link").symlink_to(outside)
    _, count = pack(space, ["link"])
    assert count == 0


def test_unpack_refuses_paths_that_escape(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        member = tarfile.TarInfo("../escape.txt")
        member.size = 1
        archive.addfile(member, io.BytesIO(b"x"))
    with pytest.raises(tarfile.OutsideDestinationError):
        unpack(buffer.getvalue(), tmp_path / "space")
    assert not (tmp_path / "escape.txt").exists()


def test_nothing_to_unpack(tmp_path: Path) -> None:
    assert unpack(b"", tmp_path) == 0
