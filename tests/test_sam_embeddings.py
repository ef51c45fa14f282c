"""EmbeddingStore: compute once (threads and processes), disk reuse, LRU bound, atomic files."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest
from sam_fixtures import (
    TINY_ID,
    segmenter_fixture,  # noqa: F401
    slow_compute_worker,
    tiny_checkpoint_fixture,  # noqa: F401
    tiny_checkpoints_fixture,  # noqa: F401
    tiny_sam_fixture,  # noqa: F401
    torch_one_thread_fixture,  # noqa: F401
)

from colabel.errors import InvalidInputError
from colabel.services.sam.embeddings import EmbeddingStore, embedding_key

pytestmark = pytest.mark.unit


def arrays(value: float = 1.0) -> dict[str, np.ndarray]:
    return {"features": np.full((2, 3), value, np.float32), "sizes": np.array([[4, 5]], np.int64)}


def test_key_depends_on_content_shape_dtype_model_and_extra():
    a = np.arange(12, dtype=np.uint16).reshape(3, 4)
    base = embedding_key(a, "m")
    assert embedding_key(a.copy(), "m") == base  # same content, another object
    assert embedding_key(np.asfortranarray(a), "m") == base  # memory layout does not matter
    assert embedding_key(a.reshape(4, 3), "m") != base
    assert embedding_key(a.astype(np.int32), "m") != base
    assert embedding_key(a, "n") != base
    assert embedding_key(a, "m", extra={"tiles": [(0, 0, 4, 3)]}) != base
    b = a.copy()
    b[0, 0] = 1
    assert embedding_key(b, "m") != base


def test_computed_once_then_memory_then_disk(tmp_path):
    calls = []
    store = EmbeddingStore(tmp_path, max_items=4)
    first = store.get_or_compute("k1", lambda: calls.append(1) or arrays())
    second = store.get_or_compute("k1", lambda: calls.append(1) or arrays(2.0))
    assert calls == [1] and second is first
    assert store.stats() == {"hits_memory": 1, "hits_disk": 0, "computed": 1}
    fresh = EmbeddingStore(tmp_path)  # a new process or instance: read from disk
    again = fresh.get_or_compute("k1", lambda: calls.append(1) or arrays(3.0))
    assert calls == [1]
    np.testing.assert_array_equal(again["features"], first["features"])
    assert fresh.stats() == {"hits_memory": 0, "hits_disk": 1, "computed": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["computed.log", "k1.lock", "k1.npz"]  # no temp files
    assert fresh.computed_total("k1") == 1 and fresh.computed_total() == 1


def test_lru_bound(tmp_path):
    store = EmbeddingStore(tmp_path, max_items=2)
    for key in ("a", "b", "c"):
        store.get_or_compute(key, arrays)
    assert list(store._memory) == ["b", "c"]
    store.get_or_compute("a", arrays)  # from disk, evicts b
    assert list(store._memory) == ["c", "a"]
    assert store.stats()["hits_disk"] == 1
    assert EmbeddingStore(tmp_path / "x", max_items=0).get_or_compute("k", arrays)["features"].shape == (2, 3)


def test_corrupt_file_is_recomputed(tmp_path):
    EmbeddingStore(tmp_path).get_or_compute("k", arrays)
    (tmp_path / "k.npz").write_bytes(b"garbage")
    store = EmbeddingStore(tmp_path)
    out = store.get_or_compute("k", lambda: arrays(5.0))
    assert out["features"][0, 0] == 5.0 and store.stats()["computed"] == 1


def test_failed_compute_leaves_nothing(tmp_path):
    store = EmbeddingStore(tmp_path)

    def boom():
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        store.get_or_compute("k", boom)
    assert not (tmp_path / "k.npz").exists()
    assert store.get_or_compute("k", arrays)["features"].shape == (2, 3)


def test_a_writer_killed_mid_write_leaves_no_part_file_once_the_key_is_computed_again(tmp_path):
    """A replica killed (SIGKILL, OOM) while it writes an embedding leaves its hidden ``.<key>.*.npz.part``, which
    no budget counts: the next computation of that key deletes it under the key's lock."""
    import subprocess
    import sys

    child = (
        "import sys, time\n"
        "import numpy as np\n"
        "from colabel.services.sam.embeddings import EmbeddingStore\n"
        "def stuck(f, **arrays):  # a write that does not end: the process is killed in it\n"
        "    f.write(b'x' * (1 << 20)); f.flush(); print('writing', flush=True); time.sleep(600)\n"
        "np.savez = stuck\n"
        "EmbeddingStore(sys.argv[1]).get_or_compute('k1', lambda: {'features': np.zeros(4)})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.kill()
        process.wait(30)
    assert len(list(tmp_path.glob(".k1.*.npz.part"))) == 1  # what the killed writer left
    (tmp_path / ".k2.abcdefgh.npz.part").write_bytes(b"x")  # another key's: not this computation's to delete
    store = EmbeddingStore(tmp_path, max_disk_bytes=1 << 20)
    assert store.get_or_compute("k1", arrays)["features"].shape == (2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k2.abcdefgh.npz.part", "computed.log", "k1.lock",
                                                          "k1.npz"]


def test_bad_keys_and_results(tmp_path):
    store = EmbeddingStore(tmp_path)
    for key in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(InvalidInputError, match="embedding key"):
            store.get_or_compute(key, arrays)
    with pytest.raises(InvalidInputError, match="non-empty mapping"):
        store.get_or_compute("k", lambda: {})


def test_threads_compute_once(tmp_path):
    store = EmbeddingStore(tmp_path)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return arrays()

    threads = [threading.Thread(target=store.get_or_compute, args=("k", slow)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1]


def test_two_processes_compute_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    cache, counter, go = tmp_path / "cache", tmp_path / "counter.txt", tmp_path / "go"
    outs = [str(tmp_path / f"out{i}.npy") for i in range(2)]
    procs = [ctx.Process(target=slow_compute_worker, args=(str(cache), "shared", str(counter), str(go), o))
             for o in outs]
    for p in procs:
        p.start()
    time.sleep(0.3)  # let both children import and wait at the barrier
    go.write_text("go")
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(counter.read_text().split()) == 1  # one encoder pass across both processes
    results = [np.load(o) for o in outs]
    np.testing.assert_array_equal(results[0], results[1])
    stats = sorted(open(o + ".stats").read() for o in outs)
    assert stats == sorted(["{'hits_memory': 0, 'hits_disk': 0, 'computed': 1}",
                            "{'hits_memory': 0, 'hits_disk': 1, 'computed': 0}"])


def test_segmenter_embeds_same_content_once(segmenter, tmp_path):
    from colabel.services.sam.segmenter import SamSegmenter

    image = np.random.default_rng(0).integers(0, 255, (120, 90), dtype=np.uint8)
    e1 = segmenter.embed(image)
    e2 = segmenter.embed(image.copy())
    assert e1.key == e2.key
    assert segmenter.store.stats() == {"hits_memory": 1, "hits_disk": 0, "computed": 1}
    assert e1.features.shape == (1, 256, 16, 16) and e1.features.dtype == np.float32
    # a second segmenter (think: another replica) sharing the folder reads it from disk
    other = SamSegmenter(TINY_ID, checkpoints=segmenter_checkpoints(segmenter),
                         embedding_dir=segmenter.store.cache_dir, device="cpu")
    e3 = other.embed(image)
    assert other.store.stats() == {"hits_memory": 0, "hits_disk": 1, "computed": 0}
    np.testing.assert_array_equal(e3.features, e1.features)


def segmenter_checkpoints(seg) -> dict:
    return {seg.model_id: seg.spec.local_path}


# -- model recorded in the embedding, byte budget, incremental pass count (review D16, D18) ----------------

def test_an_embedding_made_by_another_model_is_refused_naming_both(tiny_sam, tmp_path):
    from colabel.errors import NotFoundError
    from colabel.services.sam.segmenter import SamSegmenter

    store = EmbeddingStore(tmp_path)
    a = SamSegmenter.from_sam(tiny_sam, model_id="tiny_a", fingerprint="weights-a", store=store)
    b = SamSegmenter.from_sam(tiny_sam, model_id="tiny_b", fingerprint="weights-b", store=store)
    a_new_weights = SamSegmenter.from_sam(tiny_sam, model_id="tiny_a", fingerprint="weights-a2", store=store)
    image = np.random.default_rng(1).integers(0, 255, (64, 80), dtype=np.uint8)
    key = a.embed(image).key
    assert a.load_embedding(key).model_id == "tiny_a"
    with pytest.raises(NotFoundError, match="made by model 'tiny_a', not by model 'tiny_b'"):
        b.load_embedding(key)
    with pytest.raises(NotFoundError, match="made by other weights of model 'tiny_a'"):
        a_new_weights.load_embedding(key)
    with np.load(store.path(key)) as npz:
        assert str(npz["model_id"]) == "tiny_a" and str(npz["fingerprint"]) == "weights-a"


def test_an_embedding_stored_without_its_model_counts_as_missing_and_is_recomputed(segmenter):
    image = np.random.default_rng(2).integers(0, 255, (64, 80), dtype=np.uint8)
    key = segmenter.embed(image).key
    path = segmenter.store.path(key)
    with np.load(path) as npz:  # rewrite it as an older colabel stored it: no model_id, no fingerprint
        old = {k: npz[k] for k in npz.files if k not in ("model_id", "fingerprint")}
    np.savez(path, **old)
    segmenter.store.clear_memory()
    assert segmenter.load_embedding(key) is None  # SamService.segment answers NotFoundError: embed again
    again = segmenter.embed(image)
    assert again.key == key and segmenter.store.computed_total(key) == 2
    assert segmenter.load_embedding(key).model_id == segmenter.model_id


def test_the_memory_lru_is_bounded_by_bytes_as_well_as_entries(tmp_path):
    def entry(mib: int) -> dict[str, np.ndarray]:
        return {"features": np.zeros((mib, 1 << 18), np.float32)}  # mib MiB

    store = EmbeddingStore(tmp_path, max_items=8, max_bytes=3 << 20)
    for key in ("a", "b", "c"):
        store.get_or_compute(key, lambda: entry(1))
    assert list(store._memory) == ["a", "b", "c"] and store.memory_bytes() == 3 << 20
    store.get_or_compute("d", lambda: entry(2))  # 5 MiB > 3 MiB: a and b go
    assert list(store._memory) == ["c", "d"] and store.memory_bytes() == 3 << 20
    store.get_or_compute("big", lambda: entry(4))  # over the whole budget: on disk only
    assert list(store._memory) == ["c", "d"] and (tmp_path / "big.npz").exists()
    assert store.get("big")["features"].shape == (4, 1 << 18)
    store.clear_memory()
    assert store.memory_bytes() == 0
    with pytest.raises(InvalidInputError, match="max_bytes"):
        EmbeddingStore(tmp_path, max_bytes=-1)


def test_encoder_passes_reads_only_what_was_appended_to_the_log(tmp_path):
    store = EmbeddingStore(tmp_path)
    for key in ("k1", "k2", "k1"):
        store._log_computed(key)
    assert store.computed_total() == 3 and store.computed_total("k1") == 2
    log = tmp_path / "computed.log"
    # an in-place edit of lines already counted is not read again (a full re-read would count k3)
    log.write_bytes(log.read_bytes().replace(b"k2", b"k3"))
    store._log_computed("k2")
    assert store.computed_total("k2") == 2 and store.computed_total("k3") == 0 and store.computed_total() == 4
    log.write_text("k9\n")  # a replaced or truncated log is counted from its start
    assert store.computed_total() == 1 and store.computed_total("k9") == 1
    log.unlink()
    assert store.computed_total() == 0


# -- the folder is kept within a byte budget, least recently used first ------------------------------------

def entry_of(kib: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"features": np.full((kib, 256), value, np.float32)}  # kib KiB of arrays, a bit more as .npz


def _age(store: EmbeddingStore, keys: list[str]) -> None:
    """Give *keys* increasing last-use times an hour ago, in order (file times tick only every few ms)."""
    import os

    now = time.time()
    for i, key in enumerate(keys):
        os.utime(store.path(key), (now - 3600 + i, now - 3600 + i))


def test_the_disk_budget_deletes_the_least_recently_used_files_and_keeps_one_just_read(tmp_path):
    one = EmbeddingStore(tmp_path / "x", max_disk_bytes=None)
    one.get_or_compute("x", lambda: entry_of(100))
    size = one.path("x").stat().st_size  # every entry below makes a file of this size
    store = EmbeddingStore(tmp_path / "s", max_items=0, max_disk_bytes=3 * size + size // 2)
    for key in ("a", "b", "c"):
        store.get_or_compute(key, lambda: entry_of(100))
    _age(store, ["a", "b", "c"])  # written in this order, an hour ago
    assert store.get("a") is not None  # read from disk: a is now the most recently used
    store.get_or_compute("d", lambda: entry_of(100))  # 4 files > 3.5: the least recently used, b, goes
    assert sorted(p.name for p in store.cache_dir.glob("*.npz")) == ["a.npz", "c.npz", "d.npz"]
    assert not (store.cache_dir / "b.lock").exists() and (store.cache_dir / "a.lock").exists()
    assert store.disk_bytes() == 3 * size
    # a hit in memory (in any process sharing the folder) counts as a use too
    shared = EmbeddingStore(store.cache_dir, max_items=4, max_disk_bytes=3 * size + size // 2)
    assert shared.get("c") is not None
    _age(store, ["c", "a", "d"])
    assert shared.get("c") is not None and shared.stats()["hits_memory"] == 1
    store.get_or_compute("e", lambda: entry_of(100))
    assert sorted(p.name for p in store.cache_dir.glob("*.npz")) == ["c.npz", "d.npz", "e.npz"]
    # the file just written is kept even when it alone is over the budget; all older ones go
    assert store.get_or_compute("big", lambda: entry_of(400))["features"].shape == (400, 256)
    assert [p.name for p in store.cache_dir.glob("*.npz")] == ["big.npz"]
    assert shared.get("c") is not None and shared.stats()["hits_memory"] == 2  # still in shared's memory
    assert store.get_or_compute("c", lambda: entry_of(100, 7.0))["features"][0, 0] == 7.0  # recomputed
    assert sorted(p.name for p in store.cache_dir.glob("*.npz")) == ["c.npz"]
    assert sorted(p.name for p in store.cache_dir.iterdir()) == ["c.lock", "c.npz", "computed.log"]


def test_a_file_whose_lock_another_holder_has_is_not_deleted(tmp_path):
    import fcntl
    import os

    store = EmbeddingStore(tmp_path, max_items=0, max_disk_bytes=1)  # every older file is over the budget
    store.get_or_compute("old", lambda: entry_of(10))
    store.get_or_compute("busy", lambda: entry_of(10))  # old goes: its lock was free
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["busy.npz"]
    _age(store, ["busy"])
    (tmp_path / "ghost.lock").touch()  # a lock left without its .npz (a failed compute) is removed...
    computing = os.open(tmp_path / "computing.lock", os.O_RDWR | os.O_CREAT)  # ...unless held: being computed
    fcntl.flock(computing, fcntl.LOCK_EX)
    holder = os.open(tmp_path / "busy.lock", os.O_RDWR)  # another process computing or rewriting busy
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        store.get_or_compute("new", lambda: entry_of(10))
        assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["busy.npz", "new.npz"]
        assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["busy.lock", "computing.lock", "new.lock"]
    finally:
        os.close(holder)
        os.close(computing)
    store.get_or_compute("newer", lambda: entry_of(10))  # released: the least recently used files go now
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["newer.npz"]
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["newer.lock"]


def test_a_lock_file_deleted_by_the_pruner_is_not_held_by_two_at_once(tmp_path):
    """A process waiting on ``<key>.lock`` while the pruner deletes it must lock the new file, not the deleted
    one, else it and a newcomer would both compute the key."""
    import fcntl
    import os

    from colabel.cache_folder import CacheFolder

    folder = CacheFolder(tmp_path, ".npz", None)
    path = tmp_path / "k.lock"
    pruner = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(pruner, fcntl.LOCK_EX)
    inside = []

    def wait_for_the_lock():
        with folder.key_lock("k"):
            inside.append(os.fstat(os.open(path, os.O_RDONLY)).st_ino)

    waiting = threading.Thread(target=wait_for_the_lock, daemon=True)
    waiting.start()
    time.sleep(0.2)  # it opened the file and waits for its lock
    path.unlink()  # the pruner deletes the file it holds, then releases it
    newcomer = os.open(path, os.O_RDWR | os.O_CREAT)  # another process locks the new file at the path
    fcntl.flock(newcomer, fcntl.LOCK_EX)
    os.close(pruner)
    waiting.join(0.5)
    assert inside == [] and waiting.is_alive()  # it waits for the newcomer, not holding the deleted file
    os.close(newcomer)
    waiting.join(10)
    assert inside == [os.stat(path).st_ino]  # it held the file at the path, after the newcomer


def test_pruning_tolerates_files_deleted_by_another_process_meanwhile(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path, max_items=0, max_disk_bytes=None)
    for key in ("a", "b", "c"):
        store.get_or_compute(key, lambda: entry_of(10))
    _age(store, ["a", "b", "c"])
    (tmp_path / "ghost.lock").touch()  # left by a failed compute: no .npz
    real_scan = store.disk.scan

    def scan_then_another_replica_prunes():
        found = real_scan()
        for name in ("a.npz", "a.lock", "ghost.lock"):
            (tmp_path / name).unlink()  # after our scan, before our deletions
        return found

    monkeypatch.setattr(store.disk, "scan", scan_then_another_replica_prunes)
    store.max_disk_bytes = 1
    store.get_or_compute("d", lambda: entry_of(10))  # no FileNotFoundError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["computed.log", "d.lock", "d.npz"]


@pytest.mark.parametrize("budget", [None, 0])
def test_an_unbounded_disk_budget_keeps_every_file(tmp_path, budget):
    store = EmbeddingStore(tmp_path, max_items=0, max_disk_bytes=budget)
    for key in "abcdef":
        store.get_or_compute(key, lambda: entry_of(10))
    assert len(list(tmp_path.glob("*.npz"))) == 6 and store.prune() == 0 and store.max_disk_bytes is None
    with pytest.raises(InvalidInputError, match="max_disk_bytes"):
        EmbeddingStore(tmp_path, max_disk_bytes=-1)


def test_the_default_disk_budget_is_20_gib_and_the_model_pool_passes_its_own(tmp_path):
    from colabel.services.sam.colab import ModelPool
    from colabel.services.sam.embeddings import DEFAULT_MAX_DISK_BYTES

    assert EmbeddingStore(tmp_path / "a").max_disk_bytes == DEFAULT_MAX_DISK_BYTES == 20 << 30
    assert ModelPool(embedding_dir=tmp_path / "b").store.max_disk_bytes == 20 << 30
    assert ModelPool(embedding_dir=tmp_path / "c", embedding_disk_bytes=5 << 20).store.max_disk_bytes == 5 << 20
    assert ModelPool(embedding_dir=tmp_path / "d", embedding_disk_bytes=None).store.max_disk_bytes is None
    from colabel.services.sam.service import SamService

    assert SamService(embedding_dir=str(tmp_path / "e")).models.store.max_disk_bytes == 20 << 30
    assert SamService(embedding_dir=str(tmp_path / "f"), embedding_disk_bytes=3 << 20).models.store.max_disk_bytes \
        == 3 << 20
