"""The byte budget shared by the SAM embedding, nucleus result and HALS feature caches."""

from __future__ import annotations

import os
import time

import pytest

from colabel.cache_folder import CacheFolder, check_budget
from colabel.errors import InvalidInputError


def _entries(folder, sizes: dict[str, int]) -> None:
    old = time.time() - 3600
    for i, (key, size) in enumerate(sizes.items()):
        path = folder.path(key)
        path.write_bytes(b"x" * size)
        os.utime(path, (old + i, old + i))  # a, b, c ... used in this order


def test_pruning_deletes_the_oldest_entries_until_the_budget_fits(tmp_path):
    folder = CacheFolder(tmp_path, ".npy", 250)
    _entries(folder, {"a": 100, "b": 100, "c": 100, "d": 100})
    folder.touch(folder.path("a"))  # used now
    gone = []
    assert folder.prune(keep="d", on_gone=gone.append) == 2
    assert gone == ["b", "c"] and sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "d.npy"]
    assert folder.total_bytes() == 200 and folder.prune() == 0


def test_pruning_never_deletes_an_entry_being_computed_nor_other_files(tmp_path):
    folder = CacheFolder(tmp_path, ".npy", 1)
    _entries(folder, {"a": 100, "b": 100})
    for name in ("notes.txt", "models", ".a.123.tmp", "a.npz"):
        (tmp_path / name).write_bytes(b"y" * 500)
    (tmp_path / "ghost.lock").touch()  # a failed computation's lock: no entry
    with folder.key_lock("a"):  # another thread computes "a" again
        assert folder.prune() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a.123.tmp", "a.lock", "a.npy", "a.npz", "models",
                                                           "notes.txt"]
    assert folder.prune() == 1 and not folder.path("a").exists() and not folder.lock_path("a").exists()


@pytest.mark.parametrize("budget", [None, 1 << 20])
def test_pruning_removes_temporary_files_that_killed_writers_left(tmp_path, budget):
    """Temporary files not modified for STALE_TEMPORARY_S (a writer killed mid-write) go, bounded or not; a write in
    progress (recently modified) and files that are not temporary stay."""
    from colabel.cache_folder import STALE_TEMPORARY_S

    folder = CacheFolder(tmp_path, ".npz", budget)
    _entries(folder, {"a": 100})
    stale = time.time() - STALE_TEMPORARY_S - 60
    for name in (".a.k3j2x9ab.npz.part", ".b.0f1e2d3c.tmp"):  # SAM's, and the nucleus and feature stores'
        (tmp_path / name).write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (stale, stale))
    (tmp_path / ".c.1a2b3c4d.npz.part").write_bytes(b"x")  # being written now
    (tmp_path / "notes.part").write_bytes(b"x")  # not hidden: not a writer's temporary file
    assert folder.prune() == 0  # entries deleted: none
    assert sorted(p.name for p in tmp_path.iterdir()) == [".c.1a2b3c4d.npz.part", "a.npz", "notes.part"]
    with folder.key_lock("c"):  # the owner, holding the key's lock, removes what a killed writer of that key left
        assert folder.remove_partial("c") == 1
    assert not (tmp_path / ".c.1a2b3c4d.npz.part").exists()


@pytest.mark.parametrize("budget", [None, 0])
def test_an_unbounded_folder_keeps_everything(tmp_path, budget):
    folder = CacheFolder(tmp_path, ".npz", budget)
    _entries(folder, {"a": 100, "b": 100})
    assert folder.max_bytes is None and folder.prune() == 0 and folder.total_bytes() == 200


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
def test_a_budget_that_is_not_a_byte_count_is_refused_naming_it(bad):
    with pytest.raises(InvalidInputError, match="feature_disk_bytes must be a non-negative int"):
        check_budget("feature_disk_bytes", bad)
