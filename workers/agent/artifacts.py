"""Blocking helpers (run them in a thread): pack a job's declared artifact paths into a
gzipped tar, and unpack one into a workspace without letting it write outside."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def pack(root: Path, patterns: list[str]) -> tuple[bytes, int]:
    """A tar.gz of every file matching `patterns` (paths, directories or globs relative to
    `root`), and how many files it holds."""
    files: dict[str, Path] = {}
    base = root.resolve()
    for pattern in patterns:
        for match in sorted(root.glob(pattern)):
            candidates = sorted(match.rglob("*")) if match.is_dir() else [match]
            for path in candidates:
                resolved = path.resolve()
                if path.is_file() and resolved.is_relative_to(base):
                    files[path.relative_to(root).as_posix()] = path
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, path in sorted(files.items()):
            archive.add(path, arcname=name, recursive=False)
    return buffer.getvalue(), len(files)


def unpack(data: bytes, root: Path) -> int:
    """Extract a tar.gz into `root` with tarfile's `data` filter (no absolute paths, no
    `..`, no devices, no links out); returns how many members it held."""
    if not data:
        return 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = archive.getmembers()
        archive.extractall(root, filter="data")
    return len(members)
