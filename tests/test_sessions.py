"""Sessions: hashed share tokens, revocation that survives a restart, and the assignment rules."""

from __future__ import annotations

import json

import pytest

from colabel.apps.provider.sessions import SessionStore
from colabel.errors import AccessDeniedError, InvalidInputError, NotFoundError, SessionClosedError

pytestmark = pytest.mark.unit

CLASSES = [{"name": "tumour", "color": "#FF0000"}]


def test_manifest_holds_only_the_hash_of_a_share_token(tmp_path):
    store = SessionStore(tmp_path)
    info, secret = store.create(name="s", classes=CLASSES)
    manifest = (tmp_path / "sessions" / info.session_id / "session.json").read_text()
    assert secret not in manifest
    data = json.loads(manifest)
    assert data["session"]["classes"] == [{"name": "tumour", "color": "#ff0000"}]
    assert data["session"]["mode"] == "segmentation" and data["session"]["annotators_per_image"] == 1
    assert data["session"]["created"] and data["session"]["state"] == "open"
    assert store.authorize(secret).session_id == info.session_id


def test_tokens_and_revocations_survive_a_restart(tmp_path):
    store = SessionStore(tmp_path)
    info, secret = store.create(name="s", classes=CLASSES)
    token, second = store.issue_token(info.session_id, label="two")
    store.revoke_token(info.session_id, token.token_id)
    reopened = SessionStore(tmp_path)
    assert reopened.authorize(secret).session_id == info.session_id
    with pytest.raises(AccessDeniedError, match="invalid or revoked"):
        reopened.authorize(second)
    assert reopened.secret(info.session_id, token.token_id) is None
    assert reopened.secret(info.session_id, info.tokens[0].token_id) == secret


def test_closed_session_is_read_only(tmp_path):
    store = SessionStore(tmp_path)
    info, secret = store.create(name="s", classes=CLASSES)
    store.set_state(info.session_id, "closed")
    assert store.authorize(secret).state == "closed"
    with pytest.raises(SessionClosedError):
        store.authorize(secret, write=True)


def test_an_annotator_is_identified_by_their_key_not_their_public_id(tmp_path):
    store = SessionStore(tmp_path)
    info, _ = store.create(name="s", classes=CLASSES)
    ada, key = store.join(info.session_id, "Ada")
    assert store.identify(info.session_id, key).annotator_id == ada.annotator_id
    with pytest.raises(AccessDeniedError, match="unknown annotator key"):
        store.identify(info.session_id, ada.annotator_id)
    manifest = (tmp_path / "sessions" / info.session_id / "session.json").read_text()
    assert key not in manifest
    assert SessionStore(tmp_path).identify(info.session_id, key).display_name == "Ada"  # survives a restart


def test_unreadable_manifest_is_reported_and_left_alone(tmp_path):
    folder = tmp_path / "sessions" / "s-broken"
    folder.mkdir(parents=True)
    (folder / "session.json").write_text("{not json")
    store = SessionStore(tmp_path)
    assert "s-broken" in store.load_errors
    assert (folder / "session.json").read_text() == "{not json"


def test_assignment_prefers_unannotated_images_then_folder_order(tmp_path):
    store = SessionStore(tmp_path)
    info, _ = store.create(name="s", classes=CLASSES, annotators_per_image=2)
    a = store.join(info.session_id, "A")[0].annotator_id
    b = store.join(info.session_id, "B")[0].annotator_id
    c = store.join(info.session_id, "C")[0].annotator_id
    images = ["i1", "i2", "i3"]
    saved = {"i1": {"someone": 1}}  # i1 already has one annotator
    assert store.assign_next(info.session_id, a, image_ids=images, saved=saved) == "i2"
    assert store.assign_next(info.session_id, a, image_ids=images, saved=saved) == "i2"  # kept until saved
    assert store.assign_next(info.session_id, b, image_ids=images, saved=saved) == "i3"
    assert store.assign_next(info.session_id, c, image_ids=images, saved=saved) == "i1"
    saved["i2"] = {a: 1}
    assert store.assign_next(info.session_id, a, image_ids=images, saved=saved) == "i3"  # i3 has B only
    saved["i3"] = {a: 1, b: 1}
    saved["i1"][c] = 1
    d = store.join(info.session_id, "D")[0].annotator_id
    assert store.assign_next(info.session_id, d, image_ids=images, saved=saved) == "i2"  # i2 had A only
    e = store.join(info.session_id, "E")[0].annotator_id
    assert store.assign_next(info.session_id, e, image_ids=images, saved=saved) is None  # all have 2


def test_an_image_left_unsaved_past_the_lease_goes_to_another_annotator(tmp_path):
    store = SessionStore(tmp_path, assignment_lease=600)
    info, _ = store.create(name="s", classes=CLASSES, annotators_per_image=1)
    a = store.join(info.session_id, "A")[0].annotator_id
    b = store.join(info.session_id, "B")[0].annotator_id
    t0 = 1_000_000.0
    assert store.assign_next(info.session_id, a, image_ids=["i1"], saved={}, now=t0) == "i1"
    assert store.assign_next(info.session_id, b, image_ids=["i1"], saved={}, now=t0 + 599) is None  # A holds it
    assert store.assign_next(info.session_id, b, image_ids=["i1"], saved={}, now=t0 + 601) == "i1"  # A left
    assert store.assign_next(info.session_id, a, image_ids=["i1"], saved={}, now=t0 + 700) == "i1"  # A returns
    # the lease survives a restart (assignment times are in the manifest); a saved image is never released
    reopened = SessionStore(tmp_path, assignment_lease=600)
    c = reopened.join(info.session_id, "C")[0].annotator_id
    assert reopened.assign_next(info.session_id, c, image_ids=["i1"], saved={"i1": {b: 1}},
                                now=t0 + 1200) is None
    assert reopened.assign_next(info.session_id, c, image_ids=["i1"], saved={}, now=t0 + 1300) == "i1"


def test_unknown_ids_and_bad_arguments_are_refused(tmp_path):
    store = SessionStore(tmp_path)
    with pytest.raises(NotFoundError, match="unknown session id"):
        store.get("s-x")
    with pytest.raises(InvalidInputError, match="at least one label class"):
        store.create(name="s", classes=[])
    with pytest.raises(InvalidInputError, match="unique"):
        store.create(name="s", classes=CLASSES * 2)
    info, _ = store.create(name="s", classes=CLASSES)
    with pytest.raises(NotFoundError, match="no token"):
        store.revoke_token(info.session_id, "t-nope")
    with pytest.raises(NotFoundError, match="unknown annotator id"):
        store.assign_next(info.session_id, "a-nobody", image_ids=["i"], saved={})


def test_a_classification_session_with_fewer_than_two_classes_is_refused_and_not_created(tmp_path):
    from colabel.apps.provider.provider import DataProvider

    provider = DataProvider(tmp_path)
    # its classifier tells 2 to 1000 classes apart: one class could never train, and the session never suggest
    with pytest.raises(InvalidInputError, match="a classification session needs at least 2 classes .*, got 1"):
        provider.create_session(name="one class", classes=CLASSES, mode="classification")
    assert provider.sessions.list() == []
    two = [*CLASSES, {"name": "stroma", "color": "#00ff00"}]
    assert provider.create_session(name="two", classes=two, mode="classification")[0].mode == "classification"
    assert provider.create_session(name="outlines", classes=CLASSES)[0].mode == "segmentation"  # one class is fine


def test_names_and_labels_with_control_characters_are_refused_and_nothing_is_written(tmp_path):
    store = SessionStore(tmp_path)
    for bad in ["x\x1b[31m", "two\nlines", "bell\x07"]:
        with pytest.raises(InvalidInputError, match="session name must be .* printable characters"):
            store.create(name=bad, classes=CLASSES)
    assert store.list() == []
    info, _ = store.create(name="fine", classes=CLASSES)
    with pytest.raises(InvalidInputError, match="token label must be .* printable characters"):
        store.issue_token(info.session_id, label="x\x1b[2J")
    assert len(store.get(info.session_id).tokens) == 1


def test_a_session_takes_a_bounded_number_of_annotators(tmp_path, monkeypatch):
    from colabel.apps.provider import sessions

    monkeypatch.setattr(sessions, "MAX_ANNOTATORS", 3)
    store = SessionStore(tmp_path)
    info, _ = store.create(name="crowd", classes=CLASSES)
    for n in range(3):
        store.join(info.session_id, f"A{n}")
    with pytest.raises(InvalidInputError, match="has 3 annotators, the most one session takes"):
        store.join(info.session_id, "One too many")
    assert len(store.annotators(info.session_id)) == 3
    assert len(SessionStore(tmp_path).annotators(info.session_id)) == 3  # nor was the manifest written


def _snapshot(folder):
    """Relative path -> (bytes, mtime in ns) of every file under ``folder``, and every folder (None)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_a_read_only_session_store_reads_sessions_and_refuses_every_change_writing_nothing(tmp_path):
    """What readers (colabel report, a local pull) open beside a running provider: sessions and annotators are read;
    every change is refused before the session is touched; no file is created, changed or deleted (not even a
    temporary file of the provider's secrets, which may be a write in flight)."""
    store = SessionStore(tmp_path)
    info, _ = store.create(name="s", classes=CLASSES)
    ada, _ = store.join(info.session_id, "Ada")
    (tmp_path / "..colabel-secrets.json.0123abcd.tmp").write_text("{in flight")
    (tmp_path / "sessions" / info.session_id / ".session.json.4567.tmp").write_text("{in flight")
    before = _snapshot(tmp_path)
    reader = SessionStore(tmp_path, read_only=True)
    assert reader.get(info.session_id).name == "s" and list(reader.annotators(info.session_id)) == [ada.annotator_id]
    refused = [
        lambda: reader.create(name="t", classes=CLASSES),
        lambda: reader.set_state(info.session_id, "closed"),
        lambda: reader.issue_token(info.session_id, label="x", role="train"),
        lambda: reader.revoke_token(info.session_id, info.tokens[0].token_id),
        lambda: reader.join(info.session_id, "Bob"),
        lambda: reader.assign_next(info.session_id, ada.annotator_id, image_ids=["i1"], saved={}),
    ]
    for change in refused:
        with pytest.raises(AccessDeniedError, match="read-only"):
            change()
    assert reader.get(info.session_id).state == "open" and len(reader.list()) == 1
    assert len(reader.annotators(info.session_id)) == 1 and reader.assignments(info.session_id) == {}
    assert _snapshot(tmp_path) == before

    SessionStore(tmp_path / "not-colabel", read_only=True)
    assert not (tmp_path / "not-colabel").exists()


def test_a_starting_writer_removes_only_stale_temporary_files_of_the_secrets(tmp_path):
    """A day-old temporary file of the secrets is an interrupted write's and goes; a fresh one may be another
    process's write in flight and stays."""
    import os
    import time

    SessionStore(tmp_path).create(name="s", classes=CLASSES)
    stale, fresh = tmp_path / "..colabel-secrets.json.dead.tmp", tmp_path / "..colabel-secrets.json.beef.tmp"
    stale.write_text("{torn")
    fresh.write_text("{in flight")
    os.utime(stale, (time.time() - 86400,) * 2)
    SessionStore(tmp_path)
    assert not stale.exists() and fresh.exists()


def _full_disk_for(monkeypatch, target: str, times: int = 1):
    """The next ``times`` writes of ``target`` ("session.json" or the secrets file) fail as on a full disk."""
    import errno

    import colabel.apps.provider.sessions as sessions_module

    real = sessions_module.atomic_write_json
    left = [times]

    def write(path, obj, **kwargs):
        if path.name == target and left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj, **kwargs)

    monkeypatch.setattr(sessions_module, "atomic_write_json", write)


def test_a_revocation_whose_write_failed_refuses_the_link_and_the_retry_writes_it(tmp_path, monkeypatch):
    store = SessionStore(tmp_path)
    info, secret = store.create(name="s", classes=CLASSES)
    token_id = info.tokens[0].token_id
    _full_disk_for(monkeypatch, "session.json")
    with pytest.raises(OSError, match="No space"):
        store.revoke_token(info.session_id, token_id)
    with pytest.raises(AccessDeniedError, match="invalid or revoked"):
        store.authorize(secret)  # refused at once all the same: the safe direction
    assert store.secret(info.session_id, token_id) is None
    assert SessionStore(tmp_path).authorize(secret)  # not on disk yet: what a restart would find
    revoked = store.revoke_token(info.session_id, token_id)  # the retry writes it
    assert revoked.revoked is not None
    with pytest.raises(AccessDeniedError, match="invalid or revoked"):
        SessionStore(tmp_path).authorize(secret)  # and it holds after a restart
    assert token_id not in json.loads((tmp_path / ".colabel-secrets.json").read_text())


def test_a_change_whose_write_failed_leaves_no_trace_in_memory(tmp_path, monkeypatch):
    store = SessionStore(tmp_path)
    info, secret = store.create(name="s", classes=CLASSES)
    _full_disk_for(monkeypatch, "session.json", times=4)
    for change in (lambda: store.create(name="phantom", classes=CLASSES),
                   lambda: store.issue_token(info.session_id, label="two"),
                   lambda: store.join(info.session_id, "Ada"),
                   lambda: store.set_state(info.session_id, "closed")):
        with pytest.raises(OSError, match="No space"):
            change()
    assert [s.name for s in store.list()] == ["s"]  # no phantom session with a share link that opens nothing
    assert len(store.get(info.session_id).tokens) == 1 and store.annotators(info.session_id) == {}
    assert store.get(info.session_id).state == "open" and store.authorize(secret, write=True)
    # the next write of the session (it succeeds) carries none of the failed changes either
    store.join(info.session_id, "Bea")
    reopened = SessionStore(tmp_path)
    assert [s.name for s in reopened.list()] == ["s"] and len(reopened.get(info.session_id).tokens) == 1
    assert [a.display_name for a in reopened.annotators(info.session_id).values()] == ["Bea"]


def test_a_session_is_found_by_its_id_or_its_unique_name_and_a_miss_lists_the_sessions(tmp_path):
    store = SessionStore(tmp_path / "annotations")
    one, _ = store.create(name="round 1", classes=CLASSES)
    two, _ = store.create(name="twin", classes=CLASSES)
    three, _ = store.create(name="twin", classes=CLASSES)
    assert store.resolve(one.session_id) == one.session_id
    assert store.resolve("round 1") == one.session_id
    reader = SessionStore(tmp_path / "annotations", read_only=True)  # what `colabel report` opens
    assert reader.resolve("round 1") == one.session_id
    listed = f"{one.session_id} 'round 1', {two.session_id} 'twin', {three.session_id} 'twin'"
    with pytest.raises(InvalidInputError) as shared:
        reader.resolve("twin")
    assert str(shared.value) == f"2 sessions are named 'twin': give its id ({listed})"
    with pytest.raises(NotFoundError) as missing:
        reader.resolve("s-000000000000")
    assert str(missing.value) == f"no session 's-000000000000' (by id or name); the sessions are: {listed}"
    with pytest.raises(NotFoundError, match="there are no sessions yet"):
        SessionStore(tmp_path / "empty" / "annotations", read_only=True).resolve("round 1")


def test_opening_a_returned_image_in_a_closed_session_says_the_comment_and_writes_nothing(tmp_path):
    from colabel.apps.provider.provider import DataProvider
    from conftest import collection, make_image_folder, square

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="review", classes=CLASSES)
    ada, _ = provider.sessions.join(info.session_id, "Ada")
    image_id = provider.next_image(info, ada.annotator_id).image.image_id
    provider.save_annotation(info, image_id, ada.annotator_id, collection(square(5, 5, 10, CLASSES[0]["name"])))
    provider.return_image(info, image_id, ada.annotator_id, "the cell at the top")
    closed = provider.sessions.set_state(info.session_id, "closed")
    mark = folder / "annotations" / "sessions" / info.session_id / "returned" / image_id / f"{ada.annotator_id}.json"
    before = mark.read_bytes()
    assert provider.open_image(closed, ada.annotator_id, image_id).returned["comment"] == "the cell at the top"
    assert mark.read_bytes() == before  # read-only: not marked seen
    opened = provider.sessions.set_state(info.session_id, "open")
    provider.open_image(opened, ada.annotator_id, image_id)
    assert "seen" in json.loads(mark.read_text())


def test_a_session_of_more_label_classes_than_the_classifier_tells_apart_is_refused(tmp_path):
    store = SessionStore(tmp_path)
    many = [{"name": f"class {i}", "color": "#ff0000"} for i in range(1001)]
    with pytest.raises(InvalidInputError, match="a session has at most 1000 label classes, got 1001"):
        store.create(name="too many", classes=many)
    assert store.list() == []
    assert len(store.create(name="enough", classes=many[:1000])[0].classes) == 1000
