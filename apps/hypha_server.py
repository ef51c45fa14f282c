"""An embedded Hypha server: a subprocess on loopback, started, awaited and stopped cleanly.

Started with websocket compression off (a 1 MB array took 91 ms with it, 16 ms without, between two
processes here) and message rate limits raised (Hypha's default, 200 messages/s per connection, kicks a busy
worker: large arrays travel as many chunks, each counted).
"""

from __future__ import annotations

import datetime
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from colabel.errors import ColabelError


class HyphaStartError(ColabelError):
    """The embedded Hypha server could not be started."""


def port_is_free(host: str, port: int) -> bool:
    """True when a listening socket can be bound to ``(host, port)`` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Claims of the server's own HS256 tokens; set explicitly in the subprocess so the two sides always agree.
TOKEN_ISSUER = "https://colabel.invalid/"
TOKEN_AUDIENCE = "https://colabel.invalid/api/"
TOKEN_NAMESPACE = "https://colabel.invalid/"


def kept_signing_key(path: Path, *, renew: bool = False) -> str:
    """The key the embedded server signs its tokens with, kept in ``path`` (JSON, mode 0600) across restarts.

    Tokens the server issued (an open annotator page's connection, a manage URL) stay valid when the provider
    restarts: a page reconnects by itself instead of failing with "Signature verification failed". Anyone
    who can read the file can make tokens for the server, as with the share secrets beside it; made on first
    use, 43 characters of ``secrets.token_urlsafe(32)``. ``renew`` replaces it with a new key (``colabel serve
    --new-manage-url``): every token signed before stops working, a leaked manage URL among them.
    """
    import json

    from colabel.files import atomic_write_json

    path = Path(path)
    try:
        key = json.loads(path.read_text()).get("hypha_jwt_secret")
    except (OSError, ValueError, AttributeError):
        key = None
    if renew or not isinstance(key, str) or len(key) < 32:
        key = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"hypha_jwt_secret": key}, mode=0o600)
    return key


class EmbeddedHypha:
    """A Hypha server subprocess.

    Parameters
    ----------
    host, port : where it listens.
    root_token : str, optional
        The server's root token (Hypha's rule: >= 64 characters, or >= 32 without a weak word such as "test",
        "abc" or "123", in any case); a random one of 72 characters is made when omitted.
    msg_rate_limit : int
        Websocket messages per second (and burst) allowed per connection.
    ready_timeout : float
        Seconds to wait for ``/health/readiness`` before giving up and killing the process.
    env : dict, optional
        Extra ``HYPHA_*`` environment variables.
    jwt_secret : str, optional
        The key tokens are signed with (:func:`kept_signing_key` keeps one across restarts); a new random one
        when omitted, which makes every token of an earlier run invalid.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9527, *, root_token: str | None = None,
                 msg_rate_limit: int = 100_000, ready_timeout: float = 60.0, env: dict | None = None,
                 jwt_secret: str | None = None) -> None:
        self.host = host
        self.port = port
        # 64+ characters: Hypha refuses shorter root tokens that contain, in any case, "abc", "123", "test",
        # "root" or another of its weak words, which a random token of 51 characters did in ~1 start of 400
        self.root_token = root_token or f"colabel-{secrets.token_urlsafe(48)}"
        self.msg_rate_limit = msg_rate_limit
        self.ready_timeout = ready_timeout
        self.extra_env = dict(env or {})
        self.jwt_secret = jwt_secret or secrets.token_urlsafe(32)
        self.process: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "EmbeddedHypha":
        """Start the server and wait until it is ready; raises :class:`HyphaStartError` otherwise."""
        if not port_is_free(self.host, self.port):
            raise HyphaStartError(f"port {self.port} on {self.host} is already in use; choose another with --port")
        env = dict(os.environ)
        env.update({
            "HYPHA_HOST": self.host,
            "HYPHA_PORT": str(self.port),
            "HYPHA_ROOT_TOKEN": self.root_token,
            "HYPHA_JWT_SECRET": self.jwt_secret,
            "JWT_SECRET": self.jwt_secret,
            "AUTH0_ISSUER": TOKEN_ISSUER,
            "AUTH0_AUDIENCE": TOKEN_AUDIENCE,
            "AUTH0_NAMESPACE": TOKEN_NAMESPACE,
            "HYPHA_WS_MSG_RATE_LIMIT": str(self.msg_rate_limit),
            "HYPHA_WS_MSG_BURST_LIMIT": str(self.msg_rate_limit),
            "HYPHA_LOGLEVEL": env.get("HYPHA_LOGLEVEL", "WARNING"),
            # the server stops when this process is gone, even killed without its clean-up (see hypha_gate)
            "COLABEL_PARENT_PID": str(os.getpid()),
        })
        env.update(self.extra_env)
        fd, log = tempfile.mkstemp(prefix="colabel-hypha-", suffix=".log")
        self.log_path = Path(log)
        # Hypha behind colabel's gate (no service workers, no HTTP apps of anonymous or other workspaces when
        # COLABEL_WEB_WORKSPACES is set): see colabel.apps.hypha_gate
        cmd = [sys.executable, "-m", "uvicorn", "colabel.apps.hypha_gate:app", "--host", self.host,
               "--port", str(self.port), "--ws-per-message-deflate", "false", "--no-access-log",
               "--log-level", "warning"]
        self.process = subprocess.Popen(cmd, env=env, stdout=fd, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        os.close(fd)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HyphaStartError(f"the Hypha server exited at start-up (code {self.process.returncode}); "
                                      f"its log is {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health/readiness", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop(keep_log=True)
        raise HyphaStartError(f"the Hypha server was not ready within {self.ready_timeout:.0f} s; "
                              f"its log is {self.log_path}")

    def user_token(self, user_id: str, expires_in: int = 30 * 24 * 3600) -> str:
        """A token for an ordinary (non-admin) user ``user_id``, owner of its workspace ``ws-user-<user_id>``.

        ``colabel serve`` connects its provider with one instead of the root token, so the tokens it hands
        out (manage URL) are children of a user with no server-wide role: they reach that workspace only.
        ``expires_in`` is in seconds.
        """
        if not user_id or not user_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"user id {user_id!r} must be letters, digits, '-' or '_'")
        now = datetime.datetime.now(datetime.timezone.utc)
        workspace = f"ws-user-{user_id}"
        payload = {
            "iss": TOKEN_ISSUER, "aud": TOKEN_AUDIENCE, "sub": user_id, "iat": now,
            "exp": now + datetime.timedelta(seconds=expires_in), "gty": "client-credentials",
            "scope": f"ws:{workspace}#a wid:{workspace}",
            f"{TOKEN_NAMESPACE}roles": [], f"{TOKEN_NAMESPACE}email": None,
        }
        from jose import jwt  # python-jose: what the Hypha server itself signs and verifies with

        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    def stop(self, timeout: float = 10.0, *, keep_log: bool = False) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout`` seconds).

        Its log file (:attr:`log_path`) is deleted once a running server has been stopped, unless ``keep_log``;
        the log of a server that exited by itself is kept for diagnosis.
        """
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        if not keep_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "EmbeddedHypha":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
