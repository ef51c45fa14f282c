"""Annotation storage: versions never overwritten, atomic writes, reconciliation after a crash."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile

from colabel.apps.provider.storage import AnnotationStore, atomic_write, check_id
from colabel.errors import InvalidInputError, NotFoundError

pytestmark = pytest.mark.unit


def fc(n: int) -> dict:
    return {"type": "FeatureCollection", "features": [{"type": "Feature", "id": str(i), "geometry": None,
                                                        "properties": {}} for i in range(n)]}


def save(store, n=1, annotator="a-1", image="img-1"):
    labels = np.zeros((8, 6), np.uint16)
    labels[:n] = 1
    return store.save(fc(n), labels, session_id="s-1", image_id=image, image_name="x.png",
                      annotator_id=annotator, display_name="Ann")


def test_each_save_is_a_new_version_and_older_versions_stay_readable(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    records = [save(store, n) for n in (1, 2, 3)]
    assert [r.version for r in records] == [1, 2, 3]
    for n, r in zip((1, 2, 3), records, strict=False):
        assert len(store.load("s-1", "img-1", "a-1", r.version)["features"]) == n
        assert tifffile.imread(tmp_path / r.label_file).sum() == 6 * n
    assert store.load("s-1", "img-1", "a-1")["colabel"]["version"] == 3


def test_annotators_have_separate_version_histories(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    save(store, 1, "a-1")
    save(store, 2, "a-2")
    save(store, 3, "a-1")
    assert store.versions("s-1", "img-1", "a-1") == [1, 2]
    assert store.versions("s-1", "img-1", "a-2") == [1]
    assert store.counts("s-1") == {"img-1": {"a-1": 2, "a-2": 1}}


def test_a_version_taken_by_another_process_is_never_overwritten(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    first = save(store)
    folder = (tmp_path / first.geojson_file).parent
    (folder / "v000002.geojson").write_text('{"written": "elsewhere"}')
    second = save(store)
    assert second.version == 3
    assert json.loads((folder / "v000002.geojson").read_text()) == {"written": "elsewhere"}


def test_label_files_have_unique_names_and_the_record_names_its_own(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    first = save(store)
    folder = (tmp_path / first.label_file).parent
    (folder / "v000002.tif").write_bytes(b"a stray file from elsewhere")
    second = save(store, 4)
    assert second.version == 2 and second.label_file != first.label_file
    assert tifffile.imread(tmp_path / second.label_file).sum() == 24
    assert store.label_path("s-1", "img-1", "a-1") == tmp_path / second.label_file
    assert (folder / "v000002.tif").read_bytes() == b"a stray file from elsewhere"


def test_restart_rebuilds_the_index_and_removes_temporary_files(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    r = save(store)
    folder = (tmp_path / r.geojson_file).parent
    (folder / ".v000002.geojson.deadbeef.tmp").write_text("{partial")
    reopened = AnnotationStore(tmp_path / "annotations")
    assert reopened.versions("s-1", "img-1", "a-1") == [1]
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("bad", ["../x", "/etc", ".", "", "a/b", "a.b", None, 3, "x" * 65])
def test_ids_that_could_escape_the_folder_are_refused(tmp_path, bad):
    store = AnnotationStore(tmp_path / "annotations")
    with pytest.raises(InvalidInputError, match="not a valid id"):
        check_id(bad, "image id")
    with pytest.raises(InvalidInputError):
        save(store, image=bad)
    assert not list((tmp_path / "annotations").rglob("*.geojson"))


def test_unknown_versions_and_annotators_are_not_found(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    save(store)
    with pytest.raises(NotFoundError, match="version 7 does not exist"):
        store.load("s-1", "img-1", "a-1", 7)
    with pytest.raises(NotFoundError, match="no annotation"):
        store.load("s-1", "img-1", "a-9")


def test_exclusive_atomic_write_never_clobbers(tmp_path):
    target = tmp_path / "f.json"
    atomic_write(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_process_killed_mid_write_leaves_the_previous_content(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write(target, b"previous version")
    child = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from colabel import files
        def slow_fsync(fd):
            print("writing", flush=True)
            time.sleep(60)
        files.os.fsync = slow_fsync
        files.atomic_write(Path({str(target)!r}), b"new version " * 100000)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"  # the temporary file is being written
    process.kill()
    process.wait()
    assert target.read_bytes() == b"previous version"
    assert len(list(tmp_path.glob(".manifest.json.*.tmp"))) == 1  # the torn write stayed in its temp file


def test_a_claimed_file_names_its_holder_and_is_free_once_the_holder_is_killed(tmp_path):
    from colabel.files import ClaimedElsewhere, claim_file

    lock = tmp_path / ".provider.lock"
    child = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from colabel.files import claim_file
        with claim_file(Path({str(lock)!r}), "pid 1234, since noon"):
            print("held", flush=True)
            time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        with pytest.raises(ClaimedElsewhere) as held, claim_file(lock, "second"):
            pass
        assert held.value.holder == "pid 1234, since noon"
    finally:
        process.kill()  # SIGKILL: no clean-up code runs; the kernel drops the lock
        process.wait(10)
    with claim_file(lock, "third"):
        assert lock.read_text() == "third\n"
    assert lock.read_text() == ""  # released: no holder named
