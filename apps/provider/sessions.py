"""Annotation sessions: manifests, share tokens, annotators and image assignment.

A session is a manifest ``annotations/sessions/<session_id>/session.json`` (classes with colours, mode,
annotators per image, created, state, token ids and hashes, annotators, assignments), rewritten atomically
on every change. A share token is a random secret; the manifest stores only its SHA-256, so a copied
manifest opens nothing. The secrets themselves are kept for the provider alone in
``annotations/.colabel-secrets.json`` (mode 0600), so that ``colabel serve`` prints the same share URL
after a restart.
"""

from __future__ import annotations

import copy
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from colabel.errors import AccessDeniedError, InvalidInputError, NotFoundError, SessionClosedError, shown

from .models import Annotator, LabelClass, SessionInfo, TokenInfo
from .storage import (
    atomic_write_json,
    check_id,
    make_dirs,
    read_only_refusal,
    remove_stale_temporary_files,
    utc_now,
)

MAX_DISPLAY_NAME = 64

#: The most annotators one session takes (every join is written to the session's manifest).
MAX_ANNOTATORS = 1000


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def clean_display_name(value: object) -> str:
    """A display name: a printable string of 1..64 characters, surrounding spaces removed."""
    if not isinstance(value, str):
        raise InvalidInputError(f"display name must be a string, got {type(value).__name__}")
    name = value.strip()
    if not name or len(name) > MAX_DISPLAY_NAME or not name.isprintable():
        raise InvalidInputError(f"display name must be 1 to {MAX_DISPLAY_NAME} printable characters")
    return name



MAX_CLASSES = 1000
"""Most label classes a session has: what the HALS classifier tells apart (its ``MAX_CLASSES``), and far below the
65535 values of a pulled set's uint16 semantic masks (65535 marks an object without a class)."""

class _Session:
    """In-memory state of one session, mirrored by its manifest."""

    def __init__(self, info: SessionInfo, token_hashes: dict[str, str], annotators: dict[str, Annotator],
                 assignments: dict[str, list[str]], key_hashes: dict[str, str] | None = None,
                 assigned_at: dict[str, dict[str, float]] | None = None,
                 joined_via: dict[str, str] | None = None) -> None:
        self.info = info
        self.token_hashes = token_hashes
        self.annotators = annotators
        self.assignments = assignments
        self.assigned_at = assigned_at or {}  # image id -> annotator id -> Unix time (s) of the assignment
        self.key_hashes = key_hashes or {}  # annotator id -> SHA-256 of the annotator's key
        self.by_key = {h: a for a, h in self.key_hashes.items()}
        self.joined_via = joined_via or {}  # annotator id -> id of the share token they joined with

    def copy(self) -> "_Session":
        """A deep copy to change: the store publishes it only once its manifest is written."""
        return copy.deepcopy(self)

    def manifest(self) -> dict:
        return {
            "format": "colabel.session/1",
            "session": self.info.model_dump(mode="json"),
            "token_hashes": self.token_hashes,
            "annotators": {k: a.model_dump(mode="json") for k, a in self.annotators.items()},
            "assignments": self.assignments,
            "assigned_at": self.assigned_at,
            "annotator_key_hashes": self.key_hashes,
            "joined_via": self.joined_via,
        }

    @classmethod
    def from_manifest(cls, data: dict) -> "_Session":
        return cls(
            SessionInfo.model_validate(data["session"]),
            dict(data.get("token_hashes", {})),
            {k: Annotator.model_validate(v) for k, v in data.get("annotators", {}).items()},
            {k: list(v) for k, v in data.get("assignments", {}).items()},
            dict(data.get("annotator_key_hashes", {})),
            {k: dict(v) for k, v in data.get("assigned_at", {}).items()},
            dict(data.get("joined_via", {})),
        )


def _end_leases(session: _Session, annotator_ids: set[str]) -> None:
    """End the leases of these annotators' assigned images (the assignment stays: an image they saved still counts
    as theirs, through its saved versions)."""
    for since in session.assigned_at.values():
        for annotator_id in annotator_ids & set(since):
            since[annotator_id] = 0.0  # assigned at the epoch: long expired


class SessionStore:
    """All sessions of one mounted folder.

    Parameters
    ----------
    root : Path
        ``FOLDER/annotations``. Existing manifests are loaded at start; a manifest that cannot be parsed
        is reported in ``load_errors`` and skipped, never overwritten.
    assignment_lease : float
        Seconds an image assigned to an annotator who has not saved it stays theirs alone; after that it
        counts as free for others (an annotator who left does not hold it forever). The first annotator
        still gets it back when they return.
    read_only : bool
        Open for reading only (``colabel report``, a local ``colabel pull``): nothing under ``root`` is created,
        changed or deleted, the provider's secrets file is not read (no share URL is reprinted), and every change
        (create, join, assign, tokens, state) is refused with :class:`AccessDeniedError`.

    A writer removes, at start, temporary files of an interrupted write of the secrets untouched for
    :data:`~colabel.apps.provider.storage.STALE_TMP_SECONDS` (a younger one may be another process's write in
    flight).

    Every change is made on a copy of the session, written, and only then published in memory: a change whose
    write fails (full disk, read-only folder) leaves no trace, so memory never holds what a restart would lose
    (a session with a share link that opens nothing, a revocation that comes undone). The one exception is the
    safe direction: a token whose revocation could not be written is refused in memory all the same, and the next
    ``revoke_token`` of it writes the revocation again.
    """

    def __init__(self, root: Path, assignment_lease: float = 3600.0, *, read_only: bool = False) -> None:
        self.root = Path(root)
        self.assignment_lease = assignment_lease
        self.read_only = read_only
        self.sessions_root = self.root / "sessions"
        if not read_only:
            make_dirs(self.sessions_root)
        self.secrets_path = self.root / ".colabel-secrets.json"
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._by_hash: dict[str, tuple[str, str]] = {}  # token hash -> (session id, token id)
        self._unwritten_revocations: set[str] = set()  # token ids refused in memory, revocation not yet written
        self.load_errors: dict[str, str] = {}
        self._secrets: dict[str, str] = {}
        if not read_only:  # an interrupted write of the secrets (not one in flight elsewhere)
            remove_stale_temporary_files(self.root.glob(f".{self.secrets_path.name}.*.tmp"))
        if not read_only and self.secrets_path.exists():
            try:
                self._secrets = json.loads(self.secrets_path.read_text())
            except (OSError, ValueError) as exc:  # share URLs cannot be reprinted; tokens still work
                self.load_errors[self.secrets_path.name] = f"unreadable secrets file: {exc}"
        for manifest in sorted(self.sessions_root.glob("*/session.json")):
            try:
                session = _Session.from_manifest(json.loads(manifest.read_text(encoding="utf-8")))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                self.load_errors[manifest.parent.name] = f"unreadable session manifest: {exc}"
                continue
            self._sessions[session.info.session_id] = session
            for token in session.info.tokens:
                if token.revoked is None and token.token_id in session.token_hashes:
                    self._by_hash[session.token_hashes[token.token_id]] = (session.info.session_id, token.token_id)

    # -- persistence ------------------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if self.read_only:
            raise read_only_refusal(self.root, what)

    def _write(self, session: _Session) -> None:
        self._check_writable("change a session")
        folder = self.sessions_root / session.info.session_id
        make_dirs(folder)
        atomic_write_json(folder / "session.json", session.manifest())

    def _commit(self, session: _Session) -> None:
        """Write a changed copy of a session, then publish it (caller holds ``self._lock``): if the write fails,
        memory is unchanged."""
        self._write(session)
        session_id = session.info.session_id
        old = self._sessions.get(session_id)
        if old is not None:
            for token_hash in old.token_hashes.values():
                self._by_hash.pop(token_hash, None)
        self._sessions[session_id] = session
        for token in session.info.tokens:
            live = token.revoked is None and token.token_id not in self._unwritten_revocations
            if live and token.token_id in session.token_hashes:
                self._by_hash[session.token_hashes[token.token_id]] = (session_id, token.token_id)

    def _write_secrets(self, secrets_: dict[str, str]) -> None:
        """Write the provider's secrets file, then adopt ``secrets_`` in memory."""
        self._check_writable("change the secrets")
        atomic_write_json(self.secrets_path, secrets_, mode=0o600)
        self._secrets = secrets_

    def _get(self, session_id: object) -> _Session:
        if not isinstance(session_id, str) or session_id not in self._sessions:
            raise NotFoundError(f"unknown session id {shown(session_id)}")
        return self._sessions[session_id]

    # -- provider functions -----------------------------------------------------------------------
    def create(
        self,
        *,
        name: str,
        classes: Sequence[LabelClass | dict],
        mode: str = "segmentation",
        annotators_per_image: int = 1,
        image_ids: Sequence[str] | None = None,
    ) -> tuple[SessionInfo, str]:
        """Create a session and its first share token; return the session and the token's secret."""
        self._check_writable("create a session")
        if not isinstance(name, str) or not name.strip() or len(name) > 100 or not name.isprintable():
            raise InvalidInputError("session name must be a non-empty string of at most 100 printable characters")
        parsed = [c if isinstance(c, LabelClass) else LabelClass.model_validate(c) for c in classes]
        if not parsed:
            raise InvalidInputError("a session needs at least one label class")
        if len(parsed) > MAX_CLASSES:
            raise InvalidInputError(f"a session has at most {MAX_CLASSES} label classes, got {len(parsed)}")
        if len({c.name for c in parsed}) != len(parsed):
            raise InvalidInputError("label class names must be unique")
        with self._lock:
            session_id = f"s-{secrets.token_hex(6)}"
            info = SessionInfo(
                session_id=session_id,
                name=name.strip(),
                mode=mode,
                classes=parsed,
                annotators_per_image=annotators_per_image,
                image_ids=list(image_ids) if image_ids is not None else None,
                created=utc_now(),
            )
            session = _Session(info, {}, {}, {})
            _, secret = self._new_token(session, label="first share link")
            return self._sessions[session_id].info.model_copy(deep=True), secret

    def list(self) -> list[SessionInfo]:
        """Every session, oldest first."""
        with self._lock:
            return sorted((s.info.model_copy(deep=True) for s in self._sessions.values()), key=lambda s: s.created)

    def resolve(self, id_or_name: str) -> str:
        """The id of the session ``id_or_name`` names: its id (``s-...``) or its name, when one session alone has it.

        For the command line (``colabel report``, a local ``colabel pull``), where a provider knows its sessions by
        the names shown on the manage page. Raises :class:`NotFoundError` for neither, :class:`InvalidInputError`
        for a name several sessions share; both list the folder's sessions (``id 'name'``) to choose from.
        """
        with self._lock:
            if id_or_name in self._sessions:
                return id_or_name
            named = [s.info.session_id for s in self._sessions.values() if s.info.name == id_or_name]
            if len(named) == 1:
                return named[0]
            listed = self.describe()
            if named:
                raise InvalidInputError(f"{len(named)} sessions are named {shown(id_or_name)}: give its id ({listed})")
            raise NotFoundError(f"no session {shown(id_or_name)} (by id or name); "
                                + (f"the sessions are: {listed}" if listed else "there are no sessions yet"))

    def describe(self) -> str:
        """The sessions as ``s-... 'name'``, oldest first, comma-separated (for messages)."""
        return ", ".join(f"{info.session_id} {info.name!r}" for info in self.list())

    def get(self, session_id: str) -> SessionInfo:
        """One session; :class:`NotFoundError` for an unknown id."""
        with self._lock:
            return self._get(session_id).info.model_copy(deep=True)

    def set_state(self, session_id: str, state: str) -> SessionInfo:
        """Close (``"closed"``: read-only, no joins, assignments or saves) or reopen (``"open"``) a session."""
        self._check_writable("close or reopen a session")
        if state not in ("open", "closed"):
            raise InvalidInputError(f"session state must be 'open' or 'closed', got {shown(state)}")
        with self._lock:
            session = self._get(session_id).copy()
            session.info.state = state
            self._commit(session)
            return session.info.model_copy(deep=True)

    def _new_token(self, session: _Session, *, label: str, role: str = "annotate") -> tuple[TokenInfo, str]:
        """Add a token to ``session`` (a copy, or a new session) and commit it. The secret is written first: a
        secret whose manifest write then fails opens nothing (its hash is in no manifest)."""
        secret = secrets.token_urlsafe(32)
        token = TokenInfo(token_id=f"t-{secrets.token_hex(4)}", role=role, label=label, created=utc_now())
        session.info.tokens.append(token)
        session.token_hashes[token.token_id] = _hash(secret)
        self._write_secrets({**self._secrets, token.token_id: secret})
        self._commit(session)
        return token.model_copy(), secret

    def issue_token(self, session_id: str, *, label: str = "", role: str = "annotate") -> tuple[TokenInfo, str]:
        """A new token for a session (``role`` "annotate": a share link; "train": read-only trainer access)."""
        self._check_writable("issue a token")
        if not isinstance(label, str) or len(label) > 100 or not label.isprintable():
            raise InvalidInputError("token label must be a string of at most 100 printable characters")
        if role not in ("annotate", "train"):
            raise InvalidInputError(f"token role must be 'annotate' or 'train', got {shown(role)}")
        with self._lock:
            return self._new_token(self._get(session_id).copy(), label=label, role=role)

    def revoke_token(self, session_id: str, token_id: str) -> TokenInfo:
        """Revoke a share token: every later call with it is refused, at once and after restarts.

        The images assigned to annotators who joined with it, and not saved by them, are free for others at once
        (their leases end): a link that was passed around, or used to join many times and hold every image, stops
        holding images when it is revoked.

        The token is refused in memory even when writing the revocation fails (the error is raised); calling this
        again writes it. Revoking a revoked token changes nothing (its secret is dropped if still kept).
        """
        self._check_writable("revoke a token")
        with self._lock:
            current = self._get(session_id)
            found = next((t for t in current.info.tokens if t.token_id == token_id), None)
            if found is None:
                raise NotFoundError(f"session {shown(session_id)} has no token {shown(token_id)}")
            if found.revoked is None:
                session = current.copy()
                token = next(t for t in session.info.tokens if t.token_id == token_id)
                token.revoked = utc_now()
                _end_leases(session, {a for a, via in session.joined_via.items() if via == token_id})
                self._unwritten_revocations.add(token_id)  # refused from now on, written or not
                self._by_hash.pop(session.token_hashes.get(token_id, ""), None)
                self._commit(session)
                self._unwritten_revocations.discard(token_id)
                found = token
            if token_id in self._secrets:  # a revoked link's secret is kept nowhere
                self._write_secrets({k: v for k, v in self._secrets.items() if k != token_id})
            return found.model_copy()

    def secret(self, session_id: str, token_id: str) -> str | None:
        """The secret of a live token (for reprinting a share URL), None when revoked or unknown."""
        with self._lock:
            session = self._get(session_id)
            live = token_id not in self._unwritten_revocations
            if live and any(t.token_id == token_id and t.revoked is None for t in session.info.tokens):
                return self._secrets.get(token_id)
            return None

    # -- annotator functions ----------------------------------------------------------------------
    def authorize(self, token: object, *, write: bool = False, role: str = "annotate") -> SessionInfo:
        """The session a token opens for ``role`` ("annotate" or "train").

        Raises :class:`AccessDeniedError` for anything but a live token of that role of an existing session,
        and :class:`SessionClosedError` for a write (``write=True``) to a closed session: a closed session is
        read-only.
        """
        with self._lock:
            found = self._live(token)
            session = self._sessions[found[0]]
            token_role = next((t.role for t in session.info.tokens if t.token_id == found[1]), "annotate")
            if token_role != role:
                raise AccessDeniedError(f"this token is a {token_role} token; it cannot be used to {role}")
            if write and session.info.state != "open":
                raise SessionClosedError(f"session {session.info.name!r} is closed")
            return session.info.model_copy(deep=True)

    def join(self, session_id: str, display_name: object, *, token_id: str | None = None) -> tuple[Annotator, str]:
        """Register an annotator under a display name; returns the annotator and their secret key.

        The id is made here, never chosen by the caller, and is public (progress lists it); the key is what
        an annotator's later calls present, so nobody else holding the share link can act in their name.
        ``token_id``: the share token joined with (:meth:`token_id`), recorded so that revoking it ends the
        leases of the images its annotators hold.
        """
        self._check_writable("register an annotator")
        name = clean_display_name(display_name)
        with self._lock:
            session = self._get(session_id).copy()
            if len(session.annotators) >= MAX_ANNOTATORS:
                raise InvalidInputError(f"session {session.info.name!r} has {len(session.annotators)} annotators, the "
                                        "most one session takes; ask its provider for another session")
            annotator = Annotator(annotator_id=f"a-{secrets.token_hex(5)}", display_name=name, joined=utc_now())
            key = secrets.token_urlsafe(24)
            session.annotators[annotator.annotator_id] = annotator
            session.key_hashes[annotator.annotator_id] = _hash(key)
            session.by_key[_hash(key)] = annotator.annotator_id
            if token_id is not None:
                session.joined_via[annotator.annotator_id] = token_id
            self._commit(session)
            return annotator.model_copy(), key

    def token_id(self, token: object) -> str:
        """The id of a live share token (as :meth:`authorize` finds it); :class:`AccessDeniedError` otherwise."""
        with self._lock:
            return self._live(token)[1]

    def _live(self, token: object) -> tuple[str, str]:
        """``(session id, token id)`` of a live token (caller holds ``self._lock``); AccessDeniedError otherwise."""
        if not isinstance(token, str) or not token or len(token) > 256:
            raise AccessDeniedError("a session token is required")
        found = self._by_hash.get(_hash(token))
        if found is None:
            raise AccessDeniedError("invalid or revoked session token")
        return found

    def identify(self, session_id: str, key: object) -> Annotator:
        """The annotator whose secret key this is, in this session; :class:`AccessDeniedError` otherwise."""
        if not isinstance(key, str) or not key or len(key) > 256:
            raise AccessDeniedError("an annotator key is required (from join)")
        with self._lock:
            session = self._get(session_id)
            annotator_id = session.by_key.get(_hash(key))
            if annotator_id is None:
                raise AccessDeniedError("unknown annotator key in this session; join the session first")
            return session.annotators[annotator_id].model_copy()

    def annotator(self, session_id: str, annotator_id: object) -> Annotator:
        """A joined annotator of a session; :class:`NotFoundError` otherwise."""
        with self._lock:
            session = self._get(session_id)
            if not isinstance(annotator_id, str) or annotator_id not in session.annotators:
                raise NotFoundError(f"unknown annotator id {shown(annotator_id)} in this session")
            return session.annotators[annotator_id].model_copy()

    def revoked_link(self, session_id: str, annotator_id: str) -> str | None:
        """The label of the share link an annotator joined with when it is revoked (they can no longer act through
        it), else None."""
        with self._lock:
            session = self._get(session_id)
            via = session.joined_via.get(annotator_id)
            token = next((t for t in session.info.tokens if t.token_id == via), None)
            return (token.label or token.token_id) if token is not None and token.revoked is not None else None

    def annotators(self, session_id: str) -> dict[str, Annotator]:
        with self._lock:
            return {k: v.model_copy() for k, v in self._get(session_id).annotators.items()}

    def assignments(self, session_id: str) -> dict[str, list[str]]:
        with self._lock:
            return {k: list(v) for k, v in self._get(session_id).assignments.items()}

    def assign_next(self, session_id: str, annotator_id: str, *, image_ids: Sequence[str],
                    saved: dict[str, dict[str, int]], now: float | None = None) -> str | None:
        """Pick the image an annotator should annotate next, record the assignment and return its id.

        ``image_ids`` are the session's readable images in folder order; ``saved`` maps image id to
        {annotator id: versions}. The rules:

        1. an image already assigned to this annotator and not yet saved by them comes first;
        2. otherwise an image this annotator has not had, with fewer than ``annotators_per_image``
           annotators, the least-covered first (unannotated images before partly annotated), then in
           folder order;
        3. None when no such image is left.

        An assignment older than ``assignment_lease`` seconds (at ``now``, Unix time) whose annotator has not
        saved the image no longer counts against ``annotators_per_image``.
        """
        self._check_writable("assign an image")
        check_id(annotator_id, "annotator id")
        now = time.time() if now is None else now
        with self._lock:
            session = self._get(session_id)
            if annotator_id not in session.annotators:
                raise NotFoundError(f"unknown annotator id {shown(annotator_id)} in this session")
            k = session.info.annotators_per_image
            for image_id in image_ids:
                holders = session.assignments.get(image_id, [])
                if annotator_id in holders and not saved.get(image_id, {}).get(annotator_id):
                    return image_id
            best: tuple[int, int, str] | None = None
            for order, image_id in enumerate(image_ids):
                assigned = session.assignments.get(image_id, [])
                if annotator_id in assigned:
                    continue  # had it (and saved it, or rule 1 would have returned it)
                since = session.assigned_at.get(image_id, {})
                holders = {a for a in assigned if now - since.get(a, now) < self.assignment_lease}
                holders |= set(saved.get(image_id, {}))
                if annotator_id in holders or len(holders) >= k:
                    continue
                key = (len(holders), order, image_id)
                if best is None or key < best:
                    best = key
            if best is None:
                return None
            session = session.copy()
            session.assignments.setdefault(best[2], []).append(annotator_id)
            session.assigned_at.setdefault(best[2], {})[annotator_id] = now
            self._commit(session)
            return best[2]
