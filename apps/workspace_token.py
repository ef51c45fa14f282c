"""``colabel token``: a token scoped to one workspace of a Hypha server, for a data provider.

The operator of a shared server (the Helm chart's) holds its admin token (the root token). A provider must not:
a token that the server's own ``generate_token`` derives from it keeps the admin role, and Hypha gives that
role every workspace as admin (``ws:*#a``), whatever workspace the token names. So this command signs the
token itself, with the server's token-signing key (``HYPHA_JWT_SECRET``), for a new ordinary user
(``colabel-provider-<random>``, no role) with read-write permission in that one workspace; the admin token is
used to create the workspace (persistent) when it does not exist, to read the claims the server signs its
tokens with, and to check that the server accepts the new token and gives it that workspace and no admin role.

The token is printed alone on stdout (``TOKEN=$(colabel token ...)``); a line on stderr says what it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import re
import secrets
import sys

# lowercase letters and digits in hyphen-separated words, at least two (Hypha's rule for workspaces that a
# user other than root makes; `public`, `ws-anonymous` and the anonymous users' workspaces are not for this)
WORKSPACE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)+$")
RESERVED = ("ws-anonymous",)
RESERVED_PREFIXES = ("ws-user-anonymouz-",)
MAX_DAYS = 3650

# loggers of hypha-rpc that report a failed connection on their own, besides the exception this command says
_RPC_LOGGERS = ("websocket-client", "RPC", "hypha_rpc", "hypha-rpc")


def add_token_parser(commands) -> None:
    token = commands.add_parser(
        "token", help="make a token for one workspace of a Hypha server, for a data provider",
        description="Print a token that reads and writes in one workspace of the Hypha server at --server-url and "
        "nothing else (no admin role, no other workspace), for a data provider: `colabel serve FOLDER "
        "--server-url URL --token TOKEN` (or COLABEL_TOKEN=TOKEN), with --models-url URL --models-token TOKEN "
        "when the workspace is the one the gateway registers the model services in. The workspace is created "
        "(persistent) when it does not exist. Needs the server's admin token (--token, or the environment "
        "variable COLABEL_TOKEN; prefer it, the command line shows in ps) and its token-signing key in the "
        "environment variable HYPHA_JWT_SECRET (the Helm chart's Secret, key jwt-secret): a token that Hypha "
        "derives from the admin token keeps the admin role, which reaches every workspace. The token alone "
        "goes to stdout.")
    token.add_argument("--server-url", required=True, help="the Hypha server, e.g. http://HOST:9527")
    token.add_argument("--workspace", required=True, metavar="NAME",
                       help="the workspace: lowercase letters and digits in words joined by '-', e.g. lab-one or "
                       "ws-user-root (the chart's gateway registers the model services in ws-user-root)")
    token.add_argument("--expires-days", type=float, default=30.0, metavar="N",
                       help=f"days the token is valid (default 30, at most {MAX_DAYS})")
    token.add_argument("--token", default=None,
                       help="the server's admin token (default: the environment variable COLABEL_TOKEN)")
    token.set_defaults(func=cmd_token)


def check_workspace(name: str) -> str:
    from .cli import CliError

    if not WORKSPACE.match(name) or name in RESERVED or name.startswith(RESERVED_PREFIXES):
        raise CliError(f"--workspace {name!r} is not a workspace name for providers: use lowercase letters and "
                       "digits in words joined by '-', such as lab-one")
    return name


def _message(exc: BaseException) -> str:
    """The server's sentence of a hypha-rpc failure, without its remote traceback."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:  # a RemoteException: "...Traceback ... SomeError: sentence" - keep the last line
        text = lines[-1]
    return " ".join(text.split())[:300]


def cmd_token(args: argparse.Namespace) -> int:
    from .cli import CliError

    admin = args.token if args.token is not None else os.environ.get("COLABEL_TOKEN")
    if not admin:
        raise CliError("colabel token needs the server's admin token: --token, or the environment variable "
                       "COLABEL_TOKEN")
    key = os.environ.get("HYPHA_JWT_SECRET")
    if not key:
        raise CliError("colabel token needs the server's token-signing key in the environment variable "
                       "HYPHA_JWT_SECRET (the Helm chart's Secret, key jwt-secret): a token Hypha derives from the "
                       "admin token would keep the admin role, which reaches every workspace")
    workspace = check_workspace(args.workspace)
    if not 0 < args.expires_days <= MAX_DAYS:
        raise CliError(f"--expires-days {args.expires_days:g}: give days > 0 and <= {MAX_DAYS}")
    if not args.verbose:
        import hypha_rpc  # noqa: F401 - its modules set their loggers' levels when imported: first, then ours

        for name in _RPC_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    token, note = asyncio.run(make_token(args.server_url, admin, workspace, key,
                                         expires_in=int(args.expires_days * 24 * 3600)))
    print(note, file=sys.stderr, flush=True)
    print(token, flush=True)
    return 0


async def make_token(server_url: str, admin_token: str, workspace: str, signing_key: str, *,
                     expires_in: int) -> tuple[str, str]:
    """(token, a line saying what it is): see the module's docstring."""
    from hypha_rpc import connect_to_server
    from jose import jwt  # python-jose: what the Hypha server signs and verifies its tokens with

    from .cli import CliError

    try:
        server = await connect_to_server({"server_url": server_url, "token": admin_token})
    except Exception as exc:  # noqa: BLE001 - unreachable, not a Hypha server, or a refused token
        text = _message(exc)
        if "authenticat" in text.lower() or "token" in text.lower():
            raise CliError(f"the Hypha server at {server_url} refused the admin token: {text}") from None
        raise CliError(f"cannot connect to the Hypha server at {server_url}: {text}") from None
    try:
        user = server.config.get("user") or {}
        if "admin" not in (user.get("roles") or []):
            raise CliError(f"the token is not an admin token of the Hypha server at {server_url} (its user "
                           f"{user.get('id')!r} has no admin role)")
        created = False
        try:
            await server.get_workspace_info(workspace)
        except Exception:  # noqa: BLE001 - no such workspace
            try:
                await server.create_workspace({"id": workspace, "name": workspace, "persistent": True,
                                               "description": "colabel data providers"}, overwrite=False)
                created = True
            except Exception as exc:  # noqa: BLE001
                if "already exists" not in str(exc):
                    raise CliError(f"cannot create the workspace {workspace} on {server_url}: "
                                   f"{_message(exc)}") from None
        # the claims the server signs with (issuer, audience, namespace of its own claims), read from a token it
        # makes, revoked at once
        sample = await server.generate_token({"expires_in": 60})
        claims = jwt.get_unverified_claims(sample)
        with contextlib.suppress(Exception):
            await server.revoke_token(sample)
        namespace = next((k[: -len("roles")] for k in claims if k.endswith("roles")), None)
        if namespace is None or "iss" not in claims or "aud" not in claims:
            raise CliError(f"the Hypha server at {server_url} makes tokens this command does not know "
                           f"(claims {sorted(claims)})")
    finally:
        await server.disconnect()

    now = datetime.datetime.now(datetime.timezone.utc)
    expires = now + datetime.timedelta(seconds=expires_in)
    user_id = f"colabel-provider-{secrets.token_hex(4)}"
    payload = {
        "iss": claims["iss"], "aud": claims["aud"], "sub": user_id, "iat": now, "exp": expires,
        "gty": "client-credentials", "scope": f"ws:{workspace}#rw wid:{workspace}",
        f"{namespace}roles": [], f"{namespace}email": None,
    }
    token = jwt.encode(payload, signing_key, algorithm="HS256")

    # the server's own word: it accepts the token, in that workspace, without the admin role
    try:
        client = await connect_to_server({"server_url": server_url, "token": token})
    except Exception as exc:  # noqa: BLE001
        raise CliError(f"HYPHA_JWT_SECRET is not the token-signing key of the Hypha server at {server_url} (it "
                       f"refused the token: {_message(exc)})") from None
    try:
        config = client.config
        roles = (config.get("user") or {}).get("roles") or []
        if config.get("workspace") != workspace or "admin" in roles:
            raise CliError(f"the Hypha server at {server_url} gave the token workspace {config.get('workspace')!r} "
                           f"and roles {roles}, not read-write in {workspace} only")
    finally:
        await client.disconnect()
    note = (f"{'created the persistent workspace ' + workspace + '; ' if created else ''}token of user {user_id}: "
            f"read-write in workspace {workspace} only, valid until {expires:%Y-%m-%d %H:%M} UTC")
    return token, note
