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
