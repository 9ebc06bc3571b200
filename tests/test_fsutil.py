"""Atomic writes: the temp-file-and-rename machinery must not change what a plain write would do
to permissions (mkstemp and mkdtemp make 0600 files and 0700 folders)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from rnnlm import fsutil


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    fsutil._umask.cache_clear()
    try:
        yield request.param
    finally:
        os.umask(old)
        fsutil._umask.cache_clear()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_the_modes_the_umask_gives(tmp_path: Path, umask: int) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() makes under this umask: the reference
    (tmp_path / "plain-dir").mkdir()
    fsutil.atomic_write_text(tmp_path / "a.txt", "x")
    fsutil.atomic_write_bytes(tmp_path / "b.bin", b"x")
    fsutil.atomic_write_with(tmp_path / "c.bin", lambda p: Path(p).write_bytes(b"x"))
    for name in ("a.txt", "b.bin", "c.bin"):
        assert mode(tmp_path / name) == mode(plain) == 0o666 & ~umask, name
    with fsutil.staging_dir(tmp_path, "bundle") as tmp:
        fsutil.atomic_write_text(tmp / "f", "x")
        fsutil.replace_dir(tmp, tmp_path / "bundle")
    assert mode(tmp_path / "bundle") == mode(tmp_path / "plain-dir") == 0o777 & ~umask
