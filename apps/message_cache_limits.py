"""Bounds on hypha-rpc's message cache of a connection: what an anonymous caller can make a colabel process hold.

hypha-rpc sends a large call in chunks: the caller creates an entry in the receiver's message cache
(``<client>:built-in``'s ``message_cache.create``, a *public* service of every connection), appends chunks, then
has it processed. As shipped, the cache takes any number of entries of any size from anyone, and keeps an entry
that is never processed for as long as the process lives: an anonymous client could make the provider hold
hundreds of MB and leave. :func:`bound_message_cache` re-registers that built-in service with the same functions
behind three bounds on the messages of callers from other workspaces than the connection's own (annotators,
trainers, anyone): the bytes of one message, the bytes of all such messages being received, and the age of an
entry (older ones are dropped when the next message starts). Messages from the connection's own workspace (its
model services' answers: label images, embeddings) are not bounded. A refused chunk drops its whole message,
and the caller gets :class:`~colabel.errors.PayloadTooLargeError`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from colabel.errors import PayloadTooLargeError

logger = logging.getLogger(__name__)

#: Default bound of the bytes of all messages being received at once by one connection (256 MiB).
DEFAULT_MAX_TOTAL_BYTES = 256 << 20
#: Default age in seconds after which a message never processed is dropped (when another one starts).
DEFAULT_MAX_AGE_S = 300.0


class BoundedMessageCache:
    """The ``message_cache`` functions of a hypha-rpc ``RPC`` with bounds (sizes in bytes, age in seconds).

    ``rpc``: the connection's ``RPC`` object (``server.rpc``); the entries stay in its own store, where its
    ``process`` reads them. ``trusted_workspaces``: callers whose messages are not bounded (the caller's
    workspace is the one the server puts in each call's context).
    """

    def __init__(self, rpc: Any, *, max_message_bytes: int, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                 max_age_s: float = DEFAULT_MAX_AGE_S, trusted_workspaces: frozenset[str] = frozenset(),
                 clock=time.monotonic) -> None:
        self.rpc = rpc
        self.trusted_workspaces = frozenset(trusted_workspaces)
        self.max_message_bytes = int(max_message_bytes)
        self.max_total_bytes = int(max_total_bytes)
        self.max_age_s = float(max_age_s)
        self.clock = clock
        self.sizes: dict[str, int] = {}  # bytes received so far per message key
        self.started: dict[str, float] = {}
        self._original = {name: getattr(rpc, f"_{name}_message")
                          for name in ("create", "append", "set", "process", "remove")}

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def _forget(self, key: str) -> None:
        self.sizes.pop(key, None)
        self.started.pop(key, None)

    def _drop(self, key: str) -> None:
        self._forget(key)
        self.rpc._object_store.get("message_cache", {}).pop(key, None)

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, t in self.started.items() if now - t > self.max_age_s]:
            logger.warning("dropped a message never completed within %.0f s (%d bytes)", self.max_age_s,
                           self.sizes.get(key, 0))
            self._drop(key)

    def _charge(self, key: str, data: Any) -> None:
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else 0
        if key not in self.sizes:  # not created here: the original function refuses it
            return
        if self.sizes[key] + size > self.max_message_bytes:
            self._drop(key)
            raise PayloadTooLargeError(f"a message of more than {self.max_message_bytes} bytes is refused")
        if self.total_bytes + size > self.max_total_bytes:
            self._drop(key)
            raise PayloadTooLargeError(f"too many large messages at once (more than {self.max_total_bytes} bytes "
                                       f"being received); try again shortly")
        self.sizes[key] += size

    def create(self, key: str, heartbeat: bool = False, overwrite: bool = False, context=None):
        self._expire()
        result = self._original["create"](key, heartbeat, overwrite, context=context)
        if (context or {}).get("ws") in self.trusted_workspaces:
            self._forget(key)  # an overwritten entry of an untrusted caller is no longer counted
        else:
            self.sizes[key], self.started[key] = 0, self.clock()
        return result

    def append(self, key: str, data: bytes, heartbeat: bool = False, context=None):
        self._charge(key, data)
        return self._original["append"](key, data, heartbeat, context=context)

    def set(self, key: str, index: int, data: bytes, heartbeat: bool = False, context=None):
        self._charge(key, data)
        return self._original["set"](key, index, data, heartbeat, context=context)

    def process(self, key: str, heartbeat: bool = False, context=None):
        try:
            return self._original["process"](key, heartbeat, context=context)
        finally:
            self._forget(key)

    def remove(self, key: str, context=None):
        try:
            return self._original["remove"](key, context=context)
        finally:
            self._forget(key)


def bound_message_cache(server: Any, *, max_message_bytes: int, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
                        max_age_s: float = DEFAULT_MAX_AGE_S) -> BoundedMessageCache | None:
    """Put the bounds of :class:`BoundedMessageCache` on the connection ``server`` (a hypha-rpc server object) for
    callers from other workspaces than its own: its public ``built-in`` service is registered again, the same but
    for ``message_cache``. Returns the bounded cache, or None (with a warning) when this hypha-rpc has no such
    service (nothing changed)."""
    rpc = getattr(server, "rpc", None)
    service = getattr(rpc, "_services", {}).get("built-in") if rpc is not None else None
    if service is None or "message_cache" not in service or not all(
            hasattr(rpc, f"_{n}_message") for n in ("create", "append", "set", "process", "remove")):
        logger.warning("this hypha-rpc has no message cache to bound; large messages are not limited")
        return None
    own = getattr(getattr(server, "config", None), "workspace", None)
    cache = BoundedMessageCache(rpc, max_message_bytes=max_message_bytes, max_total_bytes=max_total_bytes,
                                max_age_s=max_age_s, trusted_workspaces=frozenset({own} - {None}))
    api = {key: service[key] for key in service.keys() if key != "message_cache"}
    api["config"] = dict(service["config"])
    api["message_cache"] = {"create": cache.create, "append": cache.append, "set": cache.set,
                            "process": cache.process, "remove": cache.remove}
    rpc.add_service(api, overwrite=True)
    return cache
