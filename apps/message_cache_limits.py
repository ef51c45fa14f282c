"""Bounds on hypha-rpc's message cache of a connection: what an anonymous caller can make a colabel process hold.

hypha-rpc sends a large call in chunks: the caller creates an entry in the receiver's message cache
(``<client>:built-in``'s ``message_cache.create``, a *public* service of every connection), appends chunks, then
has it processed. As shipped, the cache takes any number of entries of any size from anyone, and keeps an entry
that is never processed for as long as the process lives: an anonymous client could make the provider hold
hundreds of MB and leave. :func:`bound_message_cache` re-registers that built-in service with the same functions
behind bounds on the messages of callers from other workspaces than the connection's own (annotators, trainers,
anyone). A caller is one client (``workspace/client_id`` as the Hypha server puts it in each call's context):

* the bytes of one message (``max_message_bytes``);
* the bytes and the number of messages one caller may have being received at once (``max_caller_bytes``,
  default 64 MiB or one message's bound if larger; ``max_caller_messages``, default 16), so that one client
  cannot take the room of all others;
* the bytes of all such messages being received, in two pools of their own: callers that made a successful call
  with a live session token (:attr:`BoundedMessageCache.is_member`, which the provider's services set) share
  ``max_member_total_bytes`` (default: as much as the other pool), every other caller shares ``max_total_bytes``
  (256 MiB): anonymous clients filling theirs do not refuse an annotator's save;
* the time an entry may go without a chunk (``idle_s``, 30 s) and its age (``max_age_s``, 5 min): older ones are
  dropped whenever any message is created or a chunk arrives; the entries of a client are dropped once Hypha
  reports its disconnection (it reports the clients of the connection's own workspace only: the others' entries
  go by the idle bound).

A caller reaches its own entries only: a key held by another caller is "not found" to it. Messages from the
connection's own workspace (its model services' answers: label images, embeddings) are not bounded. A refused
chunk drops its whole message, and the caller gets a one-line :class:`~colabel.errors.PayloadTooLargeError`
(every refusal is one line, with no frame of colabel or hypha-rpc and no path).
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from colabel.errors import PayloadTooLargeError, shown

logger = logging.getLogger(__name__)

#: Default bound of the bytes of all messages being received at once from callers without a live session token.
DEFAULT_MAX_TOTAL_BYTES = 256 << 20
#: Default bound of the bytes one caller may have being received at once (raised to one message's bound if lower).
DEFAULT_MAX_CALLER_BYTES = 64 << 20
#: Default bound of the messages one caller may have being received at once.
DEFAULT_MAX_CALLER_MESSAGES = 16
#: Default time in seconds an entry may go without a chunk before it is dropped.
DEFAULT_IDLE_S = 30.0
#: Default age in seconds after which a message never processed is dropped.
DEFAULT_MAX_AGE_S = 300.0
#: What a chunk costs at least, so that empty chunks are not free.
MIN_CHUNK_BYTES = 64

#: The file name a remote caller's traceback shows for the provider's frames (these functions', and the RPC
#: adapters' of :mod:`colabel.apps.provider.rpc`), never where the provider is installed.
FRAME_NAME = "<colabel provider>"

ANONYMOUS, MEMBER = "anonymous", "member"


class MessageCacheError(Exception):
    """A message-cache call refused for another reason than size (unknown key, key of another caller...)."""


@dataclass
class _Entry:
    caller: str
    pool: str | None  # ANONYMOUS or MEMBER; None: a trusted caller's entry, not bounded
    nbytes: int
    started: float
    touched: float


def _first_line(exc: BaseException) -> str:
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    text = (text.strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _one_line(fn: Callable) -> Callable:
    """``fn`` as a coroutine function whose errors reach the caller as one line: hypha-rpc cuts its own frame
    from a coroutine's traceback, this one is named :data:`FRAME_NAME`, and the error is raised anew."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PayloadTooLargeError as exc:
            raise PayloadTooLargeError(_first_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - hypha-rpc's KeyError, AssertionError, ...
            raise MessageCacheError(_first_line(exc)) from None

    wrapper.__code__ = wrapper.__code__.replace(co_filename=FRAME_NAME)
    return wrapper


class BoundedMessageCache:
    """The ``message_cache`` functions of a hypha-rpc ``RPC`` with bounds (sizes in bytes, times in seconds).

    ``rpc``: the connection's ``RPC`` object (``server.rpc``); the entries stay in its own store, where its
    ``process`` reads them. ``trusted_workspaces``: callers whose messages are not bounded (the caller's
    workspace is the one the server puts in each call's context). ``is_member``: tells whether a caller
    (``workspace/client_id``) holds a live session token; its messages then count in the members' pool.
    """

    def __init__(self, rpc: Any, *, max_message_bytes: int, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                 max_age_s: float = DEFAULT_MAX_AGE_S, max_caller_bytes: int | None = None,
                 max_caller_messages: int = DEFAULT_MAX_CALLER_MESSAGES, idle_s: float = DEFAULT_IDLE_S,
                 max_member_total_bytes: int | None = None, is_member: Callable[[str], bool] | None = None,
                 trusted_workspaces: frozenset[str] = frozenset(), clock=time.monotonic) -> None:
        self.rpc = rpc
        self.trusted_workspaces = frozenset(trusted_workspaces)
        self.max_message_bytes = int(max_message_bytes)
        self.max_total_bytes = int(max_total_bytes)
        self.max_member_total_bytes = int(max_total_bytes if max_member_total_bytes is None
                                          else max_member_total_bytes)
        self.max_caller_bytes = int(max(DEFAULT_MAX_CALLER_BYTES, self.max_message_bytes)
                                    if max_caller_bytes is None else max_caller_bytes)
        self.max_caller_messages = int(max_caller_messages)
        self.idle_s = float(idle_s)
        self.max_age_s = float(max_age_s)
        self.is_member = is_member
        self.clock = clock
        self.entries: dict[str, _Entry] = {}  # every entry made here, trusted callers' too
        self._idle: OrderedDict[str, None] = OrderedDict()  # bounded entries, least recently fed first
        self._age: OrderedDict[str, None] = OrderedDict()  # bounded entries, oldest first
        self.pool_bytes = {ANONYMOUS: 0, MEMBER: 0}
        self.caller_bytes: dict[str, int] = {}
        self.caller_messages: dict[str, int] = {}
        self._original = {name: getattr(rpc, f"_{name}_message")
                          for name in ("create", "append", "set", "process", "remove")}

    # -- what is held ---------------------------------------------------------------------------------
    @property
    def sizes(self) -> dict[str, int]:
        """Bytes received so far per bounded message key."""
        return {key: e.nbytes for key, e in self.entries.items() if e.pool is not None}

    @property
    def total_bytes(self) -> int:
        return sum(self.pool_bytes.values())

    def functions(self) -> dict[str, Callable]:
        """The five functions to register as ``message_cache``: coroutines whose refusals are one line."""
        return {name: _one_line(getattr(self, name)) for name in ("create", "append", "set", "process", "remove")}

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _forget(self, key: str) -> None:
        entry = self.entries.pop(key, None)
        if entry is None or entry.pool is None:
            return
        self._idle.pop(key, None)
        self._age.pop(key, None)
        self.pool_bytes[entry.pool] -= entry.nbytes
        for counts, n in ((self.caller_bytes, entry.nbytes), (self.caller_messages, 1)):
            left = counts.get(entry.caller, 0) - n
            if left > 0:
                counts[entry.caller] = left
            else:
                counts.pop(entry.caller, None)

    def _drop(self, key: str) -> None:
        self._forget(key)
        self.rpc._object_store.get("message_cache", {}).pop(key, None)

    def _expire(self, now: float) -> None:
        """Drop the bounded entries without a chunk for ``idle_s`` or older than ``max_age_s`` (amortised O(1))."""
        for order, stamp, bound, why in ((self._idle, "touched", self.idle_s, "without a chunk for"),
                                         (self._age, "started", self.max_age_s, "not completed within")):
            while order:
                key = next(iter(order))
                entry = self.entries[key]
                if now - getattr(entry, stamp) <= bound:
                    break
                logger.warning("dropped a message of %s %s %.0f s (%d bytes)", entry.caller, why, bound,
                               entry.nbytes)
                self._drop(key)

    def client_disconnected(self, event: Any) -> None:
        """Drop the entries of a client that Hypha reports gone (hypha-rpc's ``remote_client_disconnected``)."""
        client = (event or {}).get("client_id") if isinstance(event, dict) else None
        for key in [k for k, e in self.entries.items() if e.caller == client]:
            self._drop(key)

    def _caller(self, context: Any) -> str:
        return str((context or {}).get("from") or "?")

    def _trusted(self, context: Any) -> bool:
        return (context or {}).get("ws") in self.trusted_workspaces

    def _member(self, caller: str) -> bool:
        if self.is_member is None:
            return False
        try:
            return bool(self.is_member(caller))
        except Exception:  # noqa: BLE001 - never let the check refuse a message
            logger.exception("cannot tell whether %s holds a session token", caller)
            return False

    def _own(self, key: str, context: Any) -> _Entry | None:
        """The entry ``key`` when it is the caller's (None when no entry was made here); another caller's entry
        is not found."""
        entry = self.entries.get(key)
        if entry is not None and entry.caller != self._caller(context):
            raise MessageCacheError(f"Message with key {shown(key)} does not exists.")
        return entry

    def _charge(self, key: str, entry: _Entry, data: Any) -> None:
        if not isinstance(data, bytes):
            self._drop(key)
            raise MessageCacheError("a chunk must be bytes")
        size = max(len(data), MIN_CHUNK_BYTES)
        caller, pool = entry.caller, entry.pool
        limit = self.max_member_total_bytes if pool == MEMBER else self.max_total_bytes
        if entry.nbytes + size > self.max_message_bytes:
            self._drop(key)
            raise PayloadTooLargeError(f"a message of more than {self.max_message_bytes} bytes is refused")
        if self.caller_bytes.get(caller, 0) + size > self.max_caller_bytes:
            self._drop(key)
            raise PayloadTooLargeError(f"more than {self.max_caller_bytes} bytes of large messages at once from one "
                                       "client are refused; wait for your other calls to finish")
        if self.pool_bytes[pool] + size > limit:
            self._drop(key)
            raise PayloadTooLargeError(f"too many large messages at once (more than {limit} bytes being received); "
                                       f"try again shortly")
        entry.nbytes += size
        self.caller_bytes[caller] = self.caller_bytes.get(caller, 0) + size
        self.pool_bytes[pool] += size

    def _fed(self, key: str, entry: _Entry, now: float) -> None:
        if entry.pool is not None:
            entry.touched = now
            self._idle.move_to_end(key)

    # -- the message_cache functions ------------------------------------------------------------------
    def create(self, key: str, heartbeat: bool = False, overwrite: bool = False, context=None):
        now = self.clock()
        self._expire(now)
        caller = self._caller(context)
        existing = self._own(key, context)
        trusted = self._trusted(context)
        if not trusted and existing is None and self.caller_messages.get(caller, 0) >= self.max_caller_messages:
            raise PayloadTooLargeError(f"more than {self.max_caller_messages} large messages at once from one client "
                                       "are refused; wait for your other calls to finish")
        result = self._original["create"](key, heartbeat, overwrite, context=context)
        self._forget(key)  # an overwritten entry is no longer counted
        pool = None if trusted else MEMBER if self._member(caller) else ANONYMOUS
        self.entries[key] = _Entry(caller, pool, 0, now, now)
        if pool is not None:
            self._idle[key] = self._age[key] = None
            self.caller_messages[caller] = self.caller_messages.get(caller, 0) + 1
        return result

    def _feed(self, name: str, key: str, data: Any, args: tuple, context: Any):
        now = self.clock()
        entry = self._own(key, context)
        if entry is not None:
            self._fed(key, entry, now)
        self._expire(now)
        if entry is not None and entry.pool is not None:
            if key not in self.entries:  # dropped just now: too old
                raise MessageCacheError(f"Message with key {shown(key)} was dropped: not completed within "
                                        f"{self.max_age_s:.0f} s")
            self._charge(key, entry, data)
        return self._original[name](key, *args, context=context)

    def append(self, key: str, data: bytes, heartbeat: bool = False, context=None):
        return self._feed("append", key, data, (data, heartbeat), context)

    def set(self, key: str, index: int, data: bytes, heartbeat: bool = False, context=None):
        return self._feed("set", key, data, (index, data, heartbeat), context)

    def process(self, key: str, heartbeat: bool = False, context=None):
        self._own(key, context)
        try:
            return self._original["process"](key, heartbeat, context=context)
        finally:
            self._drop(key)  # processed (hypha-rpc removed it) or failed: held no longer

    def remove(self, key: str, context=None):
        self._own(key, context)
        try:
            return self._original["remove"](key, context=context)
        finally:
            self._forget(key)


def installed_cache(server: Any) -> BoundedMessageCache | None:
    """The :class:`BoundedMessageCache` that :func:`bound_message_cache` put on the connection ``server``, if any
    (found through the ``built-in`` service it registered)."""
    rpc = getattr(server, "rpc", None)
    try:
        create = rpc._services["built-in"]["message_cache"]["create"]
    except (AttributeError, KeyError, TypeError):
        return None
    owner = getattr(getattr(create, "__wrapped__", None), "__self__", None)
    return owner if isinstance(owner, BoundedMessageCache) else None


def bound_message_cache(server: Any, *, max_message_bytes: int, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                        max_age_s: float = DEFAULT_MAX_AGE_S, **limits: Any) -> BoundedMessageCache | None:
    """Put the bounds of :class:`BoundedMessageCache` on the connection ``server`` (a hypha-rpc server object) for
    callers from other workspaces than its own: its public ``built-in`` service is registered again, the same but
    for ``message_cache``. ``limits``: the other keyword arguments of :class:`BoundedMessageCache`
    (``max_caller_bytes``, ``max_caller_messages``, ``idle_s``, ``max_member_total_bytes``, ``is_member``).
    Returns the bounded cache, or None (with a warning) when this hypha-rpc has no such service (nothing changed)."""
    rpc = getattr(server, "rpc", None)
    service = getattr(rpc, "_services", {}).get("built-in") if rpc is not None else None
    if service is None or "message_cache" not in service or not all(
            hasattr(rpc, f"_{n}_message") for n in ("create", "append", "set", "process", "remove")):
        logger.warning("this hypha-rpc has no message cache to bound; large messages are not limited")
        return None
    own = getattr(getattr(server, "config", None), "workspace", None)
    cache = BoundedMessageCache(rpc, max_message_bytes=max_message_bytes, max_total_bytes=max_total_bytes,
                                max_age_s=max_age_s, trusted_workspaces=frozenset({own} - {None}), **limits)
    api = {key: service[key] for key in service.keys() if key != "message_cache"}
    api["config"] = dict(service["config"])
    api["message_cache"] = cache.functions()
    rpc.add_service(api, overwrite=True)
    if hasattr(rpc, "on"):  # the clients Hypha reports gone (those of the connection's own workspace)
        rpc.on("remote_client_disconnected", cache.client_disconnected)
    return cache
