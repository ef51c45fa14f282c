"""Annotation storage: versions never overwritten, atomic writes, reconciliation after a crash."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_restart_removes_orphaned_temporary_files_but_never_one_of_a_write_in_flight(tmp_path):
    """A restarted writer rebuilds the index and removes the temporary files of interrupted writes: at once in an
    annotator folder whose lock is free (no write can be in flight there), including a version mark's; where another
    process holds the lock (a save in flight) and elsewhere (a session manifest being written), only those untouched
    for STALE_TMP_SECONDS (10 minutes), here a day-old one, go."""
    import os
    import time

    from colabel.files import file_lock

    root = tmp_path / "annotations"
    store = AnnotationStore(root)
    free = (tmp_path / save(store).geojson_file).parent
    busy = (tmp_path / save(store, annotator="a-2").geojson_file).parent
    session = root / "sessions" / "s-1"
    orphans = [free / ".v000002.geojson.deadbeef.tmp", free / ".v000002-0badc0de.tif.cafe.tmp",
               session / "version_marks" / "img-1" / ".a-1.json.beef.tmp"]
    in_flight = [busy / ".v000002-0123abcd.tif.f00d.tmp", session / ".session.json.f00d.tmp"]
    day_old = [busy / ".v000001-0badc0de.tif.dead.tmp", session / ".session.json.dead.tmp"]
    for path in orphans + in_flight + day_old:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{partial")
    for path in day_old:
        os.utime(path, (time.time() - 86400,) * 2)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from colabel.files import file_lock
        with file_lock(Path({str(busy / '.lock')!r})):
            print("writing", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "writing"
        reopened = AnnotationStore(root)
    finally:
        holder.kill()
        holder.wait(10)
    assert reopened.versions("s-1", "img-1", "a-1") == [1] and reopened.versions("s-1", "img-1", "a-2") == [1]
    assert sorted(root.rglob(".*.tmp")) == sorted(in_flight)
    with file_lock(free / ".lock"):  # the lock taken for the clean-up was let go
        pass
    AnnotationStore(root)  # the lock is free now: the save that was in flight is an orphan
    assert sorted(root.rglob(".*.tmp")) == [session / ".session.json.f00d.tmp"]


def _snapshot(folder):
    """Relative path -> (bytes, mtime in ns) of every file under ``folder``, and every folder (None)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_read_only_store_creates_changes_and_deletes_nothing(tmp_path):
    """What readers (colabel report, a local pull) open: the versions and records are read, a save is refused, and
    nothing under the folder is created, changed or deleted, not even a stale temporary file."""
    import os
    import time

    from colabel.errors import AccessDeniedError

    root = tmp_path / "annotations"
    first = save(AnnotationStore(root), 2)
    folder = (tmp_path / first.geojson_file).parent
    (folder / ".v000002.geojson.0123.tmp").write_text("{in flight")
    (folder / ".v000009.tif.4567.tmp").write_text("left by a crash long ago")
    os.utime(folder / ".v000009.tif.4567.tmp", (time.time() - 86400,) * 2)
    before = _snapshot(tmp_path)
    reader = AnnotationStore(root, read_only=True)
    assert reader.versions("s-1", "img-1", "a-1") == [1]
    assert reader.label_path("s-1", "img-1", "a-1") == tmp_path / first.label_file
    assert reader.latest_save("s-1", "img-1", "a-1")["label_file"] == (tmp_path / first.label_file).name
    with pytest.raises(AccessDeniedError, match="read-only"):
        save(reader)
    assert _snapshot(tmp_path) == before

    empty = tmp_path / "elsewhere" / "annotations"
    assert AnnotationStore(empty, read_only=True).counts("s-1") == {} and not (tmp_path / "elsewhere").exists()


def test_saves_in_another_process_never_fail_while_stores_are_opened_on_the_folder(tmp_path):
    """A real writer process saves in a loop while this one opens stores on the same folder again and again, read-only
    (as colabel report and a local pull do) and as writers (another tool, a restarting provider): no save fails,
    because nobody deletes a temporary file a write in flight still needs."""
    import time

    root = tmp_path / "annotations"
    AnnotationStore(root)
    child = textwrap.dedent(f"""
        import time
        import numpy as np
        from pathlib import Path
        from colabel.apps.provider.storage import AnnotationStore
        store = AnnotationStore(Path({str(root)!r}))
        labels = np.zeros((256, 256), np.uint16)
        labels[10:200, 10:200] = 1
        fc = {{"type": "FeatureCollection", "features": [{{"type": "Feature", "id": str(i), "geometry": None,
                                                          "properties": {{"note": "x" * 200}}}} for i in range(300)]}}
        ok, errors = 0, []
        print("saving", flush=True)
        end = time.monotonic() + 4
        while time.monotonic() < end:
            try:
                store.save(fc, labels, session_id="s-1", image_id="img-1", image_name="x.png", annotator_id="a-1",
                           display_name="Ann")
                ok += 1
            except Exception as exc:
                errors.append(f"{{type(exc).__name__}}: {{exc}}")
        print("ok", ok, "failed", len(errors), *errors[:1], flush=True)
    """)
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "saving"
        opened, deadline = 0, time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            AnnotationStore(root, read_only=True)
            AnnotationStore(root)
            opened += 2
            time.sleep(0.001)
        printed = process.communicate(timeout=60)[0].strip()
    finally:
        process.kill()
    ok, failed = int(printed.split()[1]), int(printed.split()[3])
    assert opened > 10 and ok > 5 and failed == 0, printed


def test_version_numbers_are_never_given_out_again_after_versions_are_deleted(tmp_path):
    """Versions are deleted by hand (the annotator's folder, or the image's); the next save, in the running store or
    after a restart, continues after the highest number ever given out (the version mark outside those folders),
    so a version number never names two different saves."""
    import shutil

    root = tmp_path / "annotations"
    store = AnnotationStore(root)
    assert [save(store).version for _ in range(2)] == [1, 2]
    annotator_dir = (tmp_path / store.load("s-1", "img-1", "a-1")["colabel"]["geojson_file"]).parent
    shutil.rmtree(annotator_dir)
    assert save(store, 3).version == 3  # the same store
    shutil.rmtree(annotator_dir)
    restarted = AnnotationStore(root)
    assert restarted.versions("s-1", "img-1", "a-1") == []
    assert save(restarted, 4).version == 4
    shutil.rmtree(annotator_dir.parent)  # every annotator's labels of the image
    again = AnnotationStore(root)
    record = save(again, 5)
    assert record.version == 5 and again.versions("s-1", "img-1", "a-1") == [5]
    assert again.latest_save("s-1", "img-1", "a-1") == {
        "version": 5, "saved_at": record.saved_at, "label_file": (tmp_path / record.label_file).name}
    assert again.record("s-1", "img-1", "a-1") == again.load("s-1", "img-1", "a-1")["colabel"]
    assert save(again, 1, annotator="a-2").version == 1  # marks are per image and annotator


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


def test_refusals_echo_at_most_80_characters_of_a_huge_argument(tmp_path):
    """A 5 MB argument gets a one-line refusal, not a 5 MB one (the argument is shown cut, as ids and tokens are)."""
    from colabel.apps.provider.provider import DataProvider
    from colabel.errors import ColabelError
    from conftest import collection, make_image_folder, square

    provider = DataProvider(make_image_folder(tmp_path / "images"))
    session, _ = provider.create_session(name="echo", classes=[{"name": "nucleus", "color": "#ff0000"}])
    image = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    ada, _ = provider.sessions.join(session.session_id, "Ada")
    provider.save_annotation(session, image, ada.annotator_id, collection(square(1, 1, 8)))
    huge = "A" * 5_000_000
    calls = {
        "load, annotator": lambda: provider.store.load(session.session_id, image, huge),
        "load, version": lambda: provider.store.load(session.session_id, image, ada.annotator_id, version=huge),
        "image level": lambda: provider.get_image(image, level=huge, session=session),
        "image region": lambda: provider.get_image(image, region={"x": huge}, session=session),
        "image id": lambda: provider.get_image(huge, session=session),
        "annotations": lambda: provider.get_annotations(session, image, annotator_id=ada.annotator_id, version=huge),
        "session id": lambda: provider.sessions.get(huge),
        "annotators per image": lambda: provider.create_session(name="x", classes=[], annotators_per_image=huge),
        "class of a saved outline": lambda: provider.save_annotation(session, image, ada.annotator_id, collection(
            square(1, 1, 8, huge))),
        "geometry type": lambda: provider.save_annotation(session, image, ada.annotator_id, {
            "type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                        "geometry": {"type": huge, "coordinates": []}}]}),
    }
    for what, call in calls.items():
        with pytest.raises(ColabelError) as refused:
            call()
        assert len(str(refused.value)) < 400 and "AAAA..." in str(refused.value), (what, str(refused.value)[:300])


def based_save(store, n, base):
    labels = np.zeros((8, 6), np.uint16)
    labels[:n] = 1
    return store.save(fc(n), labels, session_id="s-1", image_id="img-1", image_name="x.png", annotator_id="a-1",
                      display_name="Ann", base_version=base)


def test_a_save_drawn_on_an_older_version_is_refused_not_saved_over_the_newer_one(tmp_path):
    from colabel.errors import ConflictError

    store = AnnotationStore(tmp_path / "annotations")
    assert based_save(store, 1, 0).version == 1  # the first save of an image: drawn on nothing
    assert based_save(store, 2, 1).version == 2  # tab A, drawn on v1
    with pytest.raises(ConflictError, match="version 2 of image 'img-1' was saved after version 1"):
        based_save(store, 3, 1)  # tab B, drawn on v1 too: would drop A's change
    with pytest.raises(ConflictError, match="drawn on version 5 .* the latest is 2"):
        based_save(store, 3, 5)
    with pytest.raises(ConflictError, match="saved after version 0"):
        based_save(store, 3, 0)
    assert store.versions("s-1", "img-1", "a-1") == [1, 2] and len(store.load("s-1", "img-1", "a-1")["features"]) == 2
    assert save(store, 3).version == 3  # without a base version the last save wins, as before


def test_a_save_retried_after_its_answer_was_lost_gets_its_own_version_back_not_a_conflict_or_a_copy(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    based_save(store, 1, 0)
    committed = based_save(store, 2, 1)  # committed, but the answer never reached the page (a timeout)
    retried = based_save(store, 2, 1)  # the page sends it again, still drawn on v1
    assert retried == committed and store.versions("s-1", "img-1", "a-1") == [1, 2]


def test_a_version_deleted_by_hand_while_serving_is_not_found_and_the_latest_falls_back(tmp_path):
    store = AnnotationStore(tmp_path / "annotations")
    records = [save(store, n) for n in (1, 2, 3)]
    (tmp_path / records[2].geojson_file).unlink()
    assert store.load("s-1", "img-1", "a-1")["colabel"]["version"] == 2  # the latest that still exists
    assert store.versions("s-1", "img-1", "a-1") == [1, 2]
    (tmp_path / records[1].geojson_file).unlink()
    with pytest.raises(NotFoundError, match="version 2 no longer exists"):
        store.load("s-1", "img-1", "a-1", 2)
    assert store.record("s-1", "img-1", "a-1")["version"] == 1
    assert save(store, 4).version == 4  # never a number given out before


def test_a_write_that_fails_midway_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from colabel import files

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "f.json", b"data")
    assert list(tmp_path.iterdir()) == []


def test_new_folders_are_flushed_into_their_parents(tmp_path, monkeypatch):
    from colabel import files

    flushed = []
    monkeypatch.setattr(files, "fsync_dir", lambda path: flushed.append(path))
    files.make_dirs(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert flushed == [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]  # each new entry, top down
    flushed.clear()
    files.make_dirs(tmp_path / "a" / "b")
    assert flushed == []  # nothing new, nothing to flush


def test_a_first_save_flushes_every_folder_it_creates(tmp_path, monkeypatch):
    from colabel import files

    store = AnnotationStore(tmp_path / "annotations")
    created = []
    real_mkdir = files.os.mkdir
    flushed = []
    real_fsync_dir = files.fsync_dir
    monkeypatch.setattr(files.os, "mkdir", lambda path, *a, **k: (created.append(path), real_mkdir(path, *a, **k)))
    monkeypatch.setattr(files, "fsync_dir", lambda path: (flushed.append(path), real_fsync_dir(path)))
    save(store)
    assert created and all(folder.parent in flushed for folder in created)
    sessions = tmp_path / "annotations" / "sessions"
    assert sessions / "s-1" / "images" / "img-1" / "a-1" in created  # the annotator's folder of the first save


def test_versions_since_the_base_saved_by_the_same_writer_are_its_own_lost_answers_not_a_conflict(tmp_path):
    from colabel.errors import ConflictError

    store = AnnotationStore(tmp_path / "annotations")

    def write(n, base, writer):
        labels = np.zeros((8, 6), np.uint16)
        labels[:n] = 1
        return store.save(fc(n), labels, session_id="s-1", image_id="img-1", image_name="x.png", annotator_id="a-1",
                          display_name="Ann", base_version=base, writer=writer)

    assert write(1, 0, "tab-a").version == 1
    assert write(2, 1, "tab-a").writer == "tab-a"  # committed; the answer never reached tab A
    assert write(3, 1, "tab-a").version == 3  # A drew more and retried on v1: its own v2 is no conflict
    with pytest.raises(ConflictError):
        write(4, 1, "tab-b")  # another tab's drawing on v1 is
    with pytest.raises(ConflictError):
        write(4, 1, None)
    write(4, 3, "tab-b")
    with pytest.raises(ConflictError):
        write(5, 2, "tab-a")  # v4 since is tab B's


def test_a_failed_write_of_a_versions_geojson_leaves_no_label_file(tmp_path, monkeypatch):
    import errno

    import colabel.apps.provider.storage as storage

    real = storage.atomic_write

    def full(path, data, **kwargs):
        if path.suffix == ".geojson":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, **kwargs)

    store = AnnotationStore(tmp_path / "annotations")
    monkeypatch.setattr(storage, "atomic_write", full)
    for _ in range(3):
        with pytest.raises(OSError, match="No space"):
            save(store)
    assert [p.name for p in (tmp_path / "annotations").rglob("*.tif")] == []
    assert store.usage("s-1") == {}  # nothing kept, nothing counted against the session


def deep_properties_fc(n_features: int) -> dict:
    """Features whose properties nest 8 levels (the limit) around 200 measurements each."""
    nested: object = list(range(20))
    for _ in range(6):
        nested = {"level": nested}
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f"f{i}", "geometry": {"type": "Point", "coordinates": [1.5, 2.5]},
         "properties": {"objectType": "detection", "nested": nested,
                        "measurements": {f"m{j}": j + 0.25 for j in range(200)}}} for i in range(n_features)]}


def test_a_version_is_stored_compactly_about_as_large_as_its_features_and_its_record_read_from_the_end(
        tmp_path, monkeypatch):
    """Versions were written indented by one space per level: deep properties made a save hundreds of times larger
    on disk than sent. Now compact JSON, the record on a line of its own at the end, found without parsing the
    features."""
    store = AnnotationStore(tmp_path / "annotations")
    collection = deep_properties_fc(50)
    sent = len(json.dumps(collection["features"], separators=(",", ":")))
    record = store.save(collection, np.zeros((8, 6), np.uint16), session_id="s-1", image_id="img-1",
                        image_name="x.png", annotator_id="a-1", display_name="Ann")
    path = tmp_path / record.geojson_file
    text = path.read_bytes()
    assert len(text) < sent + 1000  # the features as compact as sent, plus the record
    assert text.count(b"\n") == 2 and text.endswith(b"}\n")  # one line of features, one of the record
    assert json.loads(text)["features"] == collection["features"]
    assert store.load("s-1", "img-1", "a-1")["colabel"]["version"] == 1

    def no_parsing(*args, **kwargs):
        raise AssertionError("the record is read from the file's end, without parsing the features")

    monkeypatch.setattr(store, "load", no_parsing)
    assert store.record("s-1", "img-1", "a-1") == {**record.model_dump(mode="json"), "image_name": "x.png"}
    assert store.latest_save("s-1", "img-1", "a-1")["label_file"] == Path(record.label_file).name


def test_the_record_of_a_version_written_indented_by_an_earlier_colabel_is_still_read_from_the_end(tmp_path,
                                                                                                  monkeypatch):
    from colabel.apps.provider.storage import _tail_record

    store = AnnotationStore(tmp_path / "annotations")
    record = save(store)
    path = tmp_path / record.geojson_file
    old = json.loads(path.read_text())
    old["features"] = deep_properties_fc(3)["features"]
    path.write_text(json.dumps(old, ensure_ascii=False, indent=1))  # as colabel wrote versions before
    assert _tail_record(path) == old["colabel"]
    monkeypatch.setattr(store, "load", lambda *a, **k: pytest.fail("parsed the whole file"))
    assert store.record("s-1", "img-1", "a-1")["version"] == 1
    assert save(store).version == 2  # a new version beside it is compact, and both are read
    assert _tail_record(tmp_path / store.record("s-1", "img-1", "a-1")["geojson_file"])["version"] == 2


def test_a_version_whose_stored_form_passes_max_bytes_is_refused_and_nothing_is_written(tmp_path):
    from colabel.errors import PayloadTooLargeError

    store = AnnotationStore(tmp_path / "annotations")
    collection = deep_properties_fc(5)
    size = len(json.dumps(collection["features"], ensure_ascii=False, separators=(",", ":")).encode())
    with pytest.raises(PayloadTooLargeError, match=f"would take {size} bytes on disk, more than the limit of "
                                                   f"{size - 1} bytes for one stored version"):
        store.save(collection, np.zeros((8, 6), np.uint16), session_id="s-1", image_id="img-1", image_name="x.png",
                   annotator_id="a-1", display_name="Ann", max_bytes=size - 1)
    assert [p for p in (tmp_path / "annotations").rglob("*") if p.is_file()] == []
    assert store.versions("s-1", "img-1", "a-1") == []
    assert store.save(collection, np.zeros((8, 6), np.uint16), session_id="s-1", image_id="img-1",
                      image_name="x.png", annotator_id="a-1", display_name="Ann", max_bytes=size).version == 1


def _stored(folder: Path, session: str = "s-1") -> int:
    return sum(p.stat().st_size for p in (folder / "sessions" / session).rglob("v*.*"))


def test_a_session_past_max_session_bytes_refuses_saves_and_writes_nothing_nor_gives_out_a_number(tmp_path):
    from colabel.errors import StorageError

    root = tmp_path / "annotations"
    store = AnnotationStore(root)
    save(store, 2, annotator="a-1")
    save(store, 3, annotator="a-2")
    used = _stored(root)
    assert store.usage("s-1") == {a: sum(p.stat().st_size for p in root.rglob(f"images/img-1/{a}/v*.*"))
                                  for a in ("a-1", "a-2")}
    assert sum(store.usage("s-1").values()) == used > 0

    limited = AnnotationStore(root, max_session_bytes=used + 100)  # a restart counts what is on disk
    assert limited.usage("s-1") == store.usage("s-1")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with pytest.raises(StorageError, match=rf"this session's annotations take {used / 1024:.1f} KiB on the "
                                           rf"provider's disk, and this save of [0-9.]+ (bytes|KiB) would pass the "
                                           rf"session's limit of {(used + 100) / 1024:.1f} KiB \(max_session_bytes\); "
                                           "nothing was saved"):
        save(limited, 1, annotator="a-1")  # one annotator's save counts the whole session's bytes
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files
    assert limited.versions("s-1", "img-1", "a-1") == [1] and limited.usage("s-1") == store.usage("s-1")

    other = limited.save(fc(1), np.zeros((8, 6), np.uint16), session_id="s-2", image_id="img-1",
                         image_name="x.png", annotator_id="a-1", display_name="Ann")
    assert other.version == 1  # another session has its own limit

    limited.max_session_bytes = 0  # the provider lifts the limit: the refused save took no version number
    assert save(limited, 1, annotator="a-1").version == 2
    assert sum(limited.usage("s-1").values()) == _stored(root) > used


def test_a_save_that_would_leave_less_than_min_free_bytes_is_refused_and_writes_nothing(tmp_path):
    import shutil

    from colabel.errors import StorageError

    root = tmp_path / "annotations"
    free = shutil.disk_usage(tmp_path).free
    store = AnnotationStore(root, min_free_bytes=free + 2**40)  # more than this file system will ever have free
    with pytest.raises(StorageError, match=r"the provider's disk has \d+\.\d [KMG]iB free, and saves keep at least "
                                           r"\d+\.\d GiB free \(min_free_bytes\); nothing was saved"):
        save(store)
    assert [p for p in root.rglob("*") if p.is_file()] == [] and store.usage("s-1") == {}
    store.min_free_bytes = 1
    assert save(store).version == 1 and sum(store.usage("s-1").values()) == _stored(root)


def test_a_save_retried_at_the_limit_gets_its_version_back_and_a_stale_one_its_conflict(tmp_path):
    """A save committed right at the session's limit whose answer was lost, sent again, is answered with its version
    (not refused by the limit it no longer adds to); one drawn on an older version still gets its conflict."""
    from colabel.errors import ConflictError

    store = AnnotationStore(tmp_path / "annotations")
    save(store, 2)
    first = based_save(store, 3, 1)
    store.max_session_bytes = _stored(tmp_path / "annotations")  # full: every byte of the limit taken
    assert based_save(store, 3, 1).version == first.version == 2  # the retry: its own version, nothing written
    with pytest.raises(ConflictError, match="was saved after version 1"):
        based_save(store, 4, 1)
    assert store.versions("s-1", "img-1", "a-1") == [1, 2]


def test_a_finish_marks_the_latest_version_survives_a_restart_and_ends_with_that_versions_deletion(tmp_path):
    root = tmp_path / "annotations"
    store = AnnotationStore(root)
    with pytest.raises(NotFoundError, match="has no annotation of image 'img-1' to finish: save it first"):
        store.finish("s-1", "img-1", "a-1")
    save(store, 1)
    save(store, 2)
    mark = store.finish("s-1", "img-1", "a-1")
    assert mark["version"] == 2 and store.finish("s-1", "img-1", "a-1") == mark  # again: nothing changes
    save(store, 3)  # a correction since: the finish stays at version 2 until the next one
    assert store.finished("s-1") == {"img-1": {"a-1": mark}} and store.finished("s-2") == {}
    assert json.loads((root / "sessions" / "s-1" / "finished" / "img-1" / "a-1.json").read_text()) == mark
    assert AnnotationStore(root, read_only=True).finished("s-1") == {"img-1": {"a-1": mark}}  # read from the file
    with pytest.raises(Exception, match="read-only"):
        AnnotationStore(root, read_only=True).finish("s-1", "img-1", "a-1")
    for name in ("../x", "a/b"):
        with pytest.raises(InvalidInputError):
            store.finish("s-1", name, "a-1")

    (root / "sessions" / "s-1" / "images" / "img-1" / "a-1" / "v000002.geojson").unlink()  # deleted by hand
    assert AnnotationStore(root).finished("s-1") == {}  # the version finished is gone: no finish
    assert store.finish("s-1", "img-1", "a-1")["version"] == 3


def test_a_return_ends_the_finish_until_the_annotator_finishes_again_and_the_later_mark_wins_after_a_crash(tmp_path):
    root = tmp_path / "annotations"
    store = AnnotationStore(root)
    with pytest.raises(NotFoundError, match="has no annotation of image 'img-1' to return"):
        store.return_image("s-1", "img-1", "a-1", "draw it")
    save(store, 1)
    store.finish("s-1", "img-1", "a-1")
    with pytest.raises(InvalidInputError, match="comment must be text of at most 2000 characters"):
        store.return_image("s-1", "img-1", "a-1", "x" * 2001)
    assert store.finished("s-1") != {} and store.returned("s-1") == {}  # a refused return changes nothing
    back = store.return_image("s-1", "img-1", "a-1", "  the nucleus at the top is missing ")
    assert back["comment"] == "the nucleus at the top is missing" and back["version"] == 1
    assert store.returned("s-1") == {"img-1": {"a-1": back}} and store.finished("s-1") == {}
    assert not (root / "sessions" / "s-1" / "finished" / "img-1" / "a-1.json").exists()
    assert AnnotationStore(root, read_only=True).returned("s-1") == {"img-1": {"a-1": back}}  # read from the file

    save(store, 2)
    store.return_seen("s-1", "img-1", "a-1")  # given back by next_image
    again = store.finish("s-1", "img-1", "a-1")  # the answer to the return
    assert again["version"] == 2 and store.returned("s-1") == {} and store.finished("s-1") == {"img-1": {"a-1": again}}
    assert not (root / "sessions" / "s-1" / "returned" / "img-1" / "a-1.json").exists()

    # a crash between writing one mark and deleting the other leaves both files: the later one counts
    (root / "sessions" / "s-1" / "returned" / "img-1").mkdir(parents=True, exist_ok=True)
    (root / "sessions" / "s-1" / "returned" / "img-1" / "a-1.json").write_text(json.dumps(
        {"version": 2, "comment": "older", "at": "2000-01-01T00:00:00.000000+00:00"}))
    restarted = AnnotationStore(root)
    assert restarted.finished("s-1") == {"img-1": {"a-1": again}} and restarted.returned("s-1") == {}


def test_a_return_the_annotator_was_not_given_yet_survives_their_finish_and_a_withdrawal_restores_the_finish(
        tmp_path):
    """The provider returns an image while the annotator's page is still on it: their Next (a finish) must not end a
    return they never saw. A withdrawn return gives back the finish it ended, also after a restart."""
    root = tmp_path / "annotations"
    store = AnnotationStore(root)
    save(store, 1)
    finished = store.finish("s-1", "img-1", "a-1")
    store.return_image("s-1", "img-1", "a-1", "split the pair")
    assert store.finish("s-1", "img-1", "a-1") == {"version": 1, "at": None, "returned": "split the pair"}
    assert store.finished("s-1") == {} and store.returned("s-1")["img-1"]["a-1"]["comment"] == "split the pair"
    store.return_seen("s-1", "img-1", "a-1")  # next_image gives it back
    answered = AnnotationStore(root).finish("s-1", "img-1", "a-1")  # seen, also after a restart: answered
    assert answered["answered"] == "split the pair" and answered["at"] is not None

    store = AnnotationStore(root)
    store.return_image("s-1", "img-1", "a-1", "by mistake")
    store.return_image("s-1", "img-1", "a-1", "by mistake, twice")  # a second return keeps the finish ended first
    assert store.finished("s-1") == {}
    withdrawn = AnnotationStore(root).withdraw_return("s-1", "img-1", "a-1")  # the ended finish is in the file
    assert withdrawn["comment"] == "by mistake, twice" and "ended_finish" not in withdrawn
    restarted = AnnotationStore(root)
    assert restarted.returned("s-1") == {} and restarted.finished("s-1")["img-1"]["a-1"]["version"] == 1
    with pytest.raises(NotFoundError, match="image 'img-1' is not returned to annotator 'a-1'"):
        restarted.withdraw_return("s-1", "img-1", "a-1")
    assert finished["version"] == 1
