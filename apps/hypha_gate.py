"""colabel's front for a Hypha server: Hypha's ASGI app behind the refusals that keep the pages it serves safe.

colabel's pages (the session manager, the annotator) are served by the Hypha server itself, at
``<server>/<workspace>/apps/<name>-web/``, and read their token from the URL's fragment. On a plain Hypha server
any client, an anonymous one too, can register an HTTP app of its own on the same origin
(``/<its workspace>/apps/<id>/``, any body, any headers). Such a page shares the origin's storage with colabel's
pages, and it can install a service worker for the whole origin (served with ``Service-Worker-Allowed: /``) that
later answers the navigation to a manage URL and reads its token. This front closes both ways:

* no service worker can be installed on the origin: a request carrying ``Service-Worker: script`` (what browsers
  send when they fetch a worker's script, and only then) is refused, and ``Service-Worker-Allowed`` is removed from
  every response; colabel's pages use no worker;
* anonymous users' workspaces (``ws-anonymous``, ``ws-user-anonymouz-*``) serve nothing over HTTP (colabel
  reaches them over the websocket only), and with ``COLABEL_WEB_WORKSPACES`` (comma-separated workspace ids,
  set by ``colabel serve`` for its embedded server to the provider's workspace) only those workspaces and
  ``public`` (the server's own) serve HTTP apps (``/<workspace>/apps/...``, ``/<workspace>/agent-skills/...``).

An error answer of Hypha's that carries a Python traceback (e.g. a 404 for an unknown service of the public
workspace, which shows the server's install paths) is cut to its last line, the exception itself.

With ``COLABEL_PARENT_PID`` set (by colabel's embedded server), the server stops once that process is gone, even
killed without its clean-up (:func:`watch_parent`).

Run it as Hypha is run, configured by the same environment variables: ``python -m uvicorn
colabel.apps.hypha_gate:app`` (what the embedded server and the image's ``hypha`` role do).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Workspaces of anonymous users in Hypha: the shared one and the per-user prefix.
ANONYMOUS_WORKSPACE = "ws-anonymous"
ANONYMOUS_WORKSPACE_PREFIX = "ws-user-anonymouz-"

#: Path segments after ``/<workspace>/`` under which Hypha serves what a workspace's clients registered.
APP_ROUTES = ("apps", "agent-skills")


def is_anonymous_workspace(workspace: str) -> bool:
    """Whether ``workspace`` belongs to Hypha's anonymous users.

    >>> is_anonymous_workspace("ws-user-anonymouz-brave-cat"), is_anonymous_workspace("ws-user-colabel-demo")
    (True, False)
    """
    return workspace == ANONYMOUS_WORKSPACE or workspace.startswith(ANONYMOUS_WORKSPACE_PREFIX)


def refusal(path: str, headers: Iterable[tuple[bytes, bytes]], web_workspaces: frozenset[str] | None) -> str | None:
    """Why an HTTP request for ``path`` (the URL path, no query) with ``headers`` (ASGI: lower-case names) is
    refused, or None to pass it to Hypha. ``web_workspaces``: the workspaces allowed to serve HTTP apps besides
    ``public`` (None: any workspace but the anonymous ones).

    >>> refusal("/ws-user-a/apps/x/sw.js", [(b"service-worker", b"script")], None)
    'service workers cannot be installed on this server'
    >>> refusal("/ws-user-anonymouz-x/apps/cats/index.html", [], None)
    "workspace 'ws-user-anonymouz-x' of an anonymous user serves nothing over HTTP here"
    >>> refusal("/ws-user-b/apps/page/", [], frozenset({"ws-user-a"}))
    "workspace 'ws-user-b' serves no HTTP apps on this server"
    >>> refusal("/ws-user-a/apps/colabel-web/index.html", [], frozenset({"ws-user-a"})) is None
    True
    """
    if any(name == b"service-worker" for name, _ in headers):
        return "service workers cannot be installed on this server"
    parts = path.lstrip("/").split("/")
    workspace = parts[0]
    if is_anonymous_workspace(workspace):
        return f"workspace {workspace!r} of an anonymous user serves nothing over HTTP here"
    if (web_workspaces is not None and len(parts) > 1 and parts[1] in APP_ROUTES
            and workspace not in web_workspaces and workspace != "public"):
        return f"workspace {workspace!r} serves no HTTP apps on this server"
    return None


def web_workspaces_from_env(value: str | None) -> frozenset[str] | None:
    """``COLABEL_WEB_WORKSPACES`` as a set (None when unset or empty: no allow-list)."""
    names = frozenset(n.strip() for n in (value or "").split(",") if n.strip())
    return names or None


#: Error answers longer than this (bytes) are passed on as they are, unread.
MAX_ERROR_BODY = 1 << 20


def without_traceback(body: bytes) -> bytes | None:
    r"""``body`` of an error answer with any Python traceback in it cut to the traceback's last line (the
    exception), as JSON ``{"success": false, "detail": ...}``; None when there is no traceback in it.

    >>> import json
    >>> trace = "RemoteError:Traceback (most recent call last):\n  File \"/x.py\", line 1\nKeyError: 'no such service'"
    >>> json.loads(without_traceback(json.dumps({"detail": trace}).encode()))
    {'success': False, 'detail': "KeyError: 'no such service'"}
    >>> without_traceback(b'{"detail": "File not found: x"}') is None
    True
    """
    import json

    text = body.decode("utf-8", errors="replace")
    if "Traceback (most recent call last)" not in text:
        return None
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    lines = [line.strip() for line in str(detail).splitlines() if line.strip()]
    return json.dumps({"success": False, "detail": lines[-1] if lines else "error"}).encode()


def _gzip_at_most(accept: bytes) -> bytes:
    """An ``Accept-Encoding`` value without the codings other than gzip and identity.

    >>> _gzip_at_most(b"gzip, deflate, br, zstd"), _gzip_at_most(b"br")
    (b'gzip', b'identity')
    """
    kept = [c.strip() for c in accept.split(b",") if c.strip().split(b";")[0].strip().lower() in (b"gzip", b"identity")]
    return b", ".join(kept) or b"identity"


def _decoded(body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """``body`` as sent before its ``Content-Encoding`` (gzip, which Hypha applies); as it is otherwise."""
    import gzip
    import zlib

    encoding = next((v.lower() for k, v in headers if k.lower() == b"content-encoding"), b"")
    if encoding == b"gzip":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError, zlib.error):
            return b""
    return body if not encoding or encoding == b"identity" else b""


def gate(inner: ASGIApp, web_workspaces: frozenset[str] | None = None) -> ASGIApp:
    """``inner`` (Hypha's app) behind :func:`refusal` for HTTP requests, with ``Service-Worker-Allowed`` removed
    from its responses. Websockets and lifespan events pass unchanged."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        why = refusal(scope.get("path", ""), scope.get("headers", []), web_workspaces)
        if why is not None:
            body = f"Forbidden: {why}\n".encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                    (b"content-length", str(len(body)).encode()),
                                    (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": body})
            return

        held: dict[str, Any] = {}  # an error answer's start and body, until its body is complete
        # answers in gzip at most (the gate reads an error answer's body; Hypha would otherwise use br or zstd)
        scope = {**scope, "headers": [(k, _gzip_at_most(v) if k.lower() == b"accept-encoding" else v)
                                      for k, v in scope.get("headers", [])]}

        async def filtered(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                  if k.lower() != b"service-worker-allowed"]}
                if message.get("status", 200) >= 400:
                    held.update(start=message, body=b"")
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body") and len(held["body"]) <= MAX_ERROR_BODY:
                    return
                start, body = held.pop("start"), held.pop("body")
                cut = None if message.get("more_body") else without_traceback(_decoded(body, start["headers"]))
                if cut is not None:
                    body = cut
                    start = {**start, "headers": [(k, v) for k, v in start["headers"] if k.lower() not in
                                                  (b"content-length", b"content-type", b"content-encoding")]
                             + [(b"content-type", b"application/json"), (b"content-length", str(len(cut)).encode())]}
                await send(start)
                message = {**message, "body": body}
            await send(message)

        await inner(scope, receive, filtered)

    return app


def watch_parent(parent_pid: int, interval: float = 1.0) -> threading.Thread:
    """Stop this process (SIGTERM to itself: uvicorn's clean shutdown) once ``parent_pid`` is no longer its parent.

    The embedded server runs in a session of its own (a Ctrl-C reaches ``colabel serve`` only, which stops it
    cleanly), so nothing else would stop it when ``colabel serve`` dies without its clean-up (SIGKILL, the OOM
    killer, a crash): it would keep the port, and the next ``serve`` would be refused. ``interval`` is in seconds.
    Returns the daemon thread polling ``os.getppid()``.
    """
    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="colabel-parent-watch", daemon=True)
    thread.start()
    return thread


def _hypha_app() -> ASGIApp:
    from hypha.server import app as hypha_app  # configured from the environment, as `uvicorn hypha.server:app`

    parent = os.environ.get("COLABEL_PARENT_PID", "")
    if parent.isdigit():  # set by colabel's embedded server (apps.hypha_server.EmbeddedHypha)
        watch_parent(int(parent))
    return gate(hypha_app, web_workspaces_from_env(os.environ.get("COLABEL_WEB_WORKSPACES")))


def __getattr__(name: str) -> Any:
    """``app``: Hypha's app behind the gate, built on first access (importing this module starts nothing)."""
    if name == "app":
        globals()["app"] = built = _hypha_app()
        return built
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
