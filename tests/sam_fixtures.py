"""Shared helpers for the SAM tests: a tiny SAM saved as a real checkpoint, and subprocess workers.

The tiny configuration (image 256, embed 64, depth 2) has random weights: masks are arbitrary, so tests
assert shapes, coordinates, routing, caching and error handling, never segmentation quality.
Workers used with multiprocessing's spawn start method live here so child processes can import them.

Fixtures are defined as ``<name>_fixture`` with ``@pytest.fixture(name="<name>")``: test modules import
``segmenter_fixture`` and pytest registers it as ``segmenter``, so linters do not report every test
argument as a redefinition of an imported name.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

TINY = {"image_size": 256, "embed_dim": 64, "depth": 2, "num_heads": 2, "global_attn_indexes": (1,), "window_size": 8}
TINY_ID = "tiny_sam"


def build_tiny(seed: int = 0):
    """A randomly initialised tiny SAM (deterministic for a seed)."""
    import torch

    from colabel.services.sam.registry import build_sam

    torch.manual_seed(seed)
    return build_sam("custom", **TINY)


@pytest.fixture(name="torch_one_thread", autouse=True)
def torch_one_thread_fixture():
    """Run torch single-threaded in SAM tests (restored after).

    The tiny model gains nothing from two threads, and on a busy 2-CPU machine OpenMP's spinning
    threads slow every small op by milliseconds (load_state_dict took 0.8 s instead of 10 ms).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(name="tiny_sam", scope="session")
def tiny_sam_fixture():
    return build_tiny()


@pytest.fixture(name="tiny_checkpoint", scope="session")
def tiny_checkpoint_fixture(tmp_path_factory, tiny_sam) -> Path:
    """The tiny SAM saved in colabel's layout (``colabel_config`` + ``model_state``)."""
    from colabel.services.sam.registry import save_checkpoint

    return save_checkpoint(tiny_sam, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(name="tiny_checkpoints", scope="session")
def tiny_checkpoints_fixture(tiny_checkpoint) -> dict:
    """A ``checkpoints`` mapping registering the tiny checkpoint under :data:`TINY_ID`."""
    return {TINY_ID: tiny_checkpoint}


@pytest.fixture(name="segmenter")
def segmenter_fixture(tiny_checkpoints, tmp_path):
    """A SamSegmenter on the tiny checkpoint, loaded through the registry, with its own embedding store."""
    from colabel.services.sam.segmenter import SamSegmenter

    return SamSegmenter(TINY_ID, checkpoints=tiny_checkpoints, embedding_dir=tmp_path / "embeddings", device="cpu")


def slow_compute_worker(cache_dir: str, key: str, counter: str, barrier_file: str, out: str) -> None:
    """Child process: wait for the go file, then get_or_compute with a slow compute that logs each call."""
    from colabel.services.sam.embeddings import EmbeddingStore

    store = EmbeddingStore(cache_dir)
    deadline = time.time() + 30
    while not os.path.exists(barrier_file) and time.time() < deadline:
        time.sleep(0.005)

    def compute():
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return {"features": np.arange(12, dtype=np.float32).reshape(3, 4)}

    arrays = store.get_or_compute(key, compute)
    np.save(out, arrays["features"])
    with open(out + ".stats", "w") as f:
        f.write(repr(store.stats()))


def fetch_worker(url: str, cache_dir: str, checksum: str, out: str) -> None:
    """Child process: fetch *url* into *cache_dir* and write the result path (or the error) to *out*."""
    from colabel.services.weights import fetch

    try:
        path = fetch(url, checksum=checksum, cache_dir=cache_dir, progress=False, model="tiny")
        Path(out).write_text(f"ok {path}")
    except Exception as exc:  # noqa: BLE001
        Path(out).write_text(f"error {type(exc).__name__}: {exc}")
