"""Hypha services of a data provider: a thin adapter over :class:`DataProvider`.

Three services are registered in the provider's workspace:

``<name>-provider`` (protected)
    provider functions; callable only with a token of the provider's workspace.
``<name>-annotate`` (public)
    annotator functions; every one takes a session share token first and can reach only that session.
``<name>-web`` (public, HTTP)
    the browser pages, at ``<server>/<workspace>/apps/<name>-web/``.

Every function runs the provider's blocking work in a thread, returns plain JSON-able objects or numpy
arrays, and turns errors into one clear sentence: the caller's traceback shows only the adapter's own
frame, under a neutral name, never colabel's internals or where the provider is installed. Pixel reads
(``get_image``, ``trainer_image``) run on threads of their own, at most :data:`PIXEL_READS_PER_TOKEN` per token
at once, so that decoding large images never holds up token-only calls; saves run on threads of their own too.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import logging
import mimetypes
import os
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from colabel.errors import ColabelError, StorageError

from ..message_cache_limits import FRAME_NAME, installed_cache
from .assist import ModelAssist
from .hals import HalsAssist
from .models import AnnotatorSession, SessionInfo
from .provider import DataProvider

logger = logging.getLogger(__name__)

WEB_DIST = Path(str(files("colabel"))) / "web_dist"
# onnxruntime-web's runtime (assets/ort/): browsers need these types, which older Pythons do not know
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")


def _public_session(provider: DataProvider, info: SessionInfo) -> AnnotatorSession:
    """What a token holder is told about its session: no tokens, no other sessions."""
    return AnnotatorSession(session_id=info.session_id, name=info.name, mode=info.mode, classes=info.classes,
                            state=info.state, n_images=len(provider.readable_image_ids(info)))


#: Threads that validate, rasterise and write saves, apart from those serving every other call.
SAVE_THREADS = 2
#: Threads that read (decode, downsample, crop) pixels, apart from those serving every other call: more than one
#: token's share, so that one token never holds them all.
PIXEL_THREADS = 3
#: Pixel reads one token (or the provider's own functions) may have in flight at once; the next ones wait their
#: turn without holding a thread.
PIXEL_READS_PER_TOKEN = 2
#: Callers (Hypha client ids) remembered as having made a successful call with a session token: their large
#: messages count in the message cache's pool of token holders (:mod:`colabel.apps.message_cache_limits`).
MAX_KNOWN_CALLERS = 4096



class ServiceError(Exception):
    """What a remote caller sees: the message of a :class:`ColabelError`, or 'internal error'."""


def _unreviewed(image):
    """An :class:`ImageInfo` as a share link's holders see it: without the provider's review comments
    (``returned``), which reach only the annotator they are for (``next_image``'s ``returned``)."""
    image.returned = {}
    return image


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


#: ``errno`` values of a folder that cannot take a write: full, over quota, read-only, failing, not permitted.
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})


def _remote(fn, *, succeeded=None):
    """Run ``fn`` (a coroutine function, or a blocking one in a worker thread) and map its errors to a
    one-sentence :class:`ServiceError`.

    ``succeeded``: called as ``succeeded(context, arguments)`` after a call that raised nothing, where ``context``
    is the call's context (hypha-rpc passes it to services registered with ``require_context``) and
    ``arguments`` the call's bound arguments; the wrapper then takes a ``context`` keyword."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        context = kwargs.pop("context", None) if succeeded is not None else None
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise ServiceError(f"InvalidInputError: {fn.__name__}: {exc}") from None
        try:
            if inspect.iscoroutinefunction(fn):
                result = _plain(await fn(*args, **kwargs))
            else:
                result = _plain(await asyncio.to_thread(fn, *args, **kwargs))
            if succeeded is not None and context:
                succeeded(context, bound.arguments)
            return result
        except ColabelError as exc:
            raise ServiceError(f"{type(exc).__name__}: {exc}") from None
        except ValidationError as exc:
            raise ServiceError(f"InvalidInputError: {exc.errors()[0]['msg']}") from None
        except OSError as exc:
            logger.exception("error of the file system in %s", fn.__name__)
            if exc.errno in _STORAGE_ERRNOS:  # the reason only: no path of the provider's machine
                saved = "; nothing was saved" if fn.__name__ == "save_annotation" else ""
                refused = StorageError(f"the provider's file system refused: {os.strerror(exc.errno)}{saved}")
                raise ServiceError(f"{type(refused).__name__}: {refused}") from None
            raise ServiceError(f"internal error in {fn.__name__}; see the provider's log") from None
        except Exception:  # noqa: BLE001
            logger.exception("internal error in %s", fn.__name__)
            raise ServiceError(f"internal error in {fn.__name__}; see the provider's log") from None

    # hypha-rpc sends the caller the traceback from this frame down: name it, not where colabel is installed
    wrapper.__code__ = wrapper.__code__.replace(co_filename=FRAME_NAME)
    return wrapper


class ProviderServices:
    """Registers a :class:`DataProvider` on a connected Hypha server.

    Parameters
    ----------
    provider : DataProvider
    server : hypha-rpc server connection (``await connect_to_server(...)``)
    name : str
        Prefix of the service ids.
    public_url : str
        Base URL of the Hypha server as annotators reach it; used in share URLs.
    """

    def __init__(self, provider: DataProvider, server, *, name: str, public_url: str,
                 assist: ModelAssist | None = None, hals: HalsAssist | None = None,
                 preannotator=None) -> None:
        self.provider = provider
        self.assist = assist
        self.hals = hals
        self.preannotator = preannotator
        self.server = server
        self.name = name
        self.public_url = public_url.rstrip("/")
        self.workspace = server.config.workspace
        self._save_pool = ThreadPoolExecutor(max_workers=SAVE_THREADS, thread_name_prefix="colabel-save")
        self._save_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pixel_pool = ThreadPoolExecutor(max_workers=PIXEL_THREADS, thread_name_prefix="colabel-pixels")
        self._pixel_slots: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(PIXEL_READS_PER_TOKEN))
        self._callers: OrderedDict[str, str] = OrderedDict()  # client id -> the session token it called with
        cache = installed_cache(server)
        if cache is not None:  # token holders' large messages get a pool of their own in the message cache
            cache.is_member = self.caller_has_live_token

    # -- callers and pixel reads --------------------------------------------------------------------
    def _called_with_token(self, context: dict, arguments: dict) -> None:
        """Remember the client that made a successful annotator call with a session token."""
        caller, token = context.get("from"), arguments.get("token")
        if isinstance(caller, str) and isinstance(token, str):
            self._callers[caller] = token
            self._callers.move_to_end(caller)
            while len(self._callers) > MAX_KNOWN_CALLERS:
                self._callers.popitem(last=False)

    def caller_has_live_token(self, caller: str) -> bool:
        """Whether the client ``caller`` (``workspace/client_id``) made a successful call with a session token
        that is still live (not revoked)."""
        token = self._callers.get(caller)
        if token is None:
            return False
        try:
            self.provider.sessions.token_id(token)
        except ColabelError:
            self._callers.pop(caller, None)
            return False
        return True

    async def _read_pixels(self, slot: str, image_id, *, region, level, session: SessionInfo | None):
        """``DataProvider.get_image`` on the pixel threads, at most :data:`PIXEL_READS_PER_TOKEN` per ``slot``."""
        async with self._pixel_slots[slot]:
            read = functools.partial(self.provider.get_image, image_id, region=region, level=level, session=session)
            return await asyncio.get_running_loop().run_in_executor(self._pixel_pool, read)

    # -- URLs -------------------------------------------------------------------------------------
    @property
    def web_base(self) -> str:
        return f"{self.public_url}/{self.workspace}/apps/{self.name}-web"

    def share_url(self, secret: str) -> str:
        """The annotator page's URL; the token rides in the fragment, which browsers never send to servers."""
        return f"{self.web_base}/annotate.html#token={secret}"

    def trainer_url(self, secret: str) -> str:
        """What ``colabel pull`` takes for a remote provider: the web base with a trainer token."""
        return f"{self.web_base}/#trainer={secret}"

    def manage_url(self, provider_token: str) -> str:
        """The session manager page's URL, carrying a token of the provider's workspace."""
        return f"{self.web_base}/index.html#token={provider_token}"

    @property
    def provider_service_id(self) -> str:
        return f"{self.workspace}/{self.name}-provider"

    @property
    def annotator_service_id(self) -> str:
        return f"{self.workspace}/{self.name}-annotate"

    def _session_with_url(self, info: SessionInfo) -> dict:
        out = info.model_dump(mode="json")
        out["share_url"] = None
        for token in info.tokens:
            secret = self.provider.sessions.secret(info.session_id, token.token_id)
            if secret and token.role == "annotate":
                out["share_url"] = self.share_url(secret)
                break
        return out

    # -- provider functions -----------------------------------------------------------------------
    def provider_functions(self) -> dict:
        p = self.provider
        sessions = p.sessions

        def info():
            """The mounted folder's name, image count and the ids of this provider's services."""
            return {
                "name": self.name,
                "folder": p.folder.name,
                "n_images": len(p.catalog),
                "provider_service": self.provider_service_id,
                "annotator_service": self.annotator_service_id,
            }

        def list_images(session_id=None):
            """Every image with id, name, shape, dtype, channels, levels, status and counts per annotator."""
            return p.list_images(sessions.get(session_id) if session_id is not None else None)

        def image_info(image_id, session_id=None):
            return p.image_info(image_id, sessions.get(session_id) if session_id is not None else None)

        async def get_image(image_id, region=None, level=0):
            return await self._read_pixels("", image_id, region=region, level=level, session=None)

        def create_session(name, classes, mode="segmentation", annotators_per_image=1, image_ids=None):
            info, secret = p.create_session(name=name, classes=classes, mode=mode,
                                            annotators_per_image=annotators_per_image, image_ids=image_ids)
            return {"session": self._session_with_url(info), "token": secret, "share_url": self.share_url(secret)}

        def list_sessions():
            return [self._session_with_url(s) for s in sessions.list()]

        def get_session(session_id):
            return self._session_with_url(sessions.get(session_id))

        def close_session(session_id):
            return self._session_with_url(sessions.set_state(session_id, "closed"))

        def reopen_session(session_id):
            return self._session_with_url(sessions.set_state(session_id, "open"))

        def issue_token(session_id, label="", role="annotate"):
            """A new share link (role "annotate") or a read-only trainer token (role "train")."""
            token, secret = sessions.issue_token(session_id, label=label, role=role)
            url = self.share_url(secret) if role == "annotate" else self.trainer_url(secret)
            return {**token.model_dump(mode="json"), "token": secret, "share_url": url}

        def revoke_token(session_id, token_id):
            return sessions.revoke_token(session_id, token_id)

        def list_annotators(session_id):
            return sessions.annotators(session_id)

        def get_annotations(session_id, image_id, annotator_id=None, version=None):
            return p.get_annotations(sessions.get(session_id), image_id, annotator_id=annotator_id, version=version)

        def list_versions(session_id, image_id, annotator_id):
            return p.list_versions(sessions.get(session_id), image_id, annotator_id)

        def progress(session_id):
            return p.progress(sessions.get(session_id))

        async def return_image(session_id, image_id, annotator_id, comment=""):
            """Return an image an annotator saved to them for changes, saying what to change (``comment``): their
            next image is this one, with the comment; not finished by them until they finish it again."""
            info = sessions.get(session_id)
            annotator = sessions.annotator(info.session_id, annotator_id)  # NotFoundError for one who never joined
            async with self._save_locks[(info.session_id, annotator.annotator_id)]:  # after their save in flight
                return await asyncio.to_thread(p.return_image, info, image_id, annotator.annotator_id, comment)

        async def withdraw_return(session_id, image_id, annotator_id):
            """Take back a return of ``return_image``: the finish it ended, if any, counts again."""
            info = sessions.get(session_id)
            annotator = sessions.annotator(info.session_id, annotator_id)
            async with self._save_locks[(info.session_id, annotator.annotator_id)]:
                return await asyncio.to_thread(p.withdraw_return, info, image_id, annotator.annotator_id)

        functions = [info, list_images, image_info, get_image, create_session, list_sessions, get_session,
                     close_session, reopen_session, issue_token, revoke_token, list_annotators,
                     get_annotations, list_versions, progress, return_image, withdraw_return]
        return {f.__name__: _remote(f) for f in functions}

    # -- annotator functions ----------------------------------------------------------------------
    def annotator_functions(self) -> dict:
        p = self.provider
        sessions = p.sessions

        def _public(info: SessionInfo) -> AnnotatorSession:
            return _public_session(p, info)

        def join(token, display_name):
            """Join the session under a display name; returns the annotator and the key for later calls."""
            info = sessions.authorize(token, write=True)
            annotator, key = sessions.join(info.session_id, display_name, token_id=sessions.token_id(token))
            return {"annotator": annotator, "annotator_key": key, "session": _public(info)}

        def session_info(token):
            return _public(sessions.authorize(token))

        def list_images(token):
            return [_unreviewed(i) for i in p.list_images(sessions.authorize(token))]

        def image_info(token, image_id):
            info = sessions.authorize(token)
            p._check_in_session(info, image_id)
            return _unreviewed(p.image_info(image_id, info))

        async def get_image(token, image_id, region=None, level=0):
            """Pixels (h, w, C) of an image of the session: whole, a region or a level (2 reads of a token at once)."""
            info = sessions.authorize(token)
            return await self._read_pixels(f"token:{sessions.token_id(token)}", image_id, region=region,
                                           level=level, session=info)

        def next_image(token, annotator_key):
            """The annotator's next image; ``returned``: the provider's comment when it returned this one to them."""
            info = sessions.authorize(token, write=True)
            assignment = p.next_image(info, sessions.identify(info.session_id, annotator_key).annotator_id)
            if assignment.image is not None:
                assignment.image = _unreviewed(assignment.image)
            return assignment

        def open_image(token, annotator_key, image_id):
            """The annotator's assignment of an image they are already on (a reloaded page): position, total and
            ``returned``, the provider's comment if the image is returned to them now. Also in a closed session."""
            info = sessions.authorize(token)
            assignment = p.open_image(info, sessions.identify(info.session_id, annotator_key).annotator_id, image_id)
            assignment.image = _unreviewed(assignment.image)
            return assignment

        async def save_annotation(token, annotator_key, image_id, annotation, base_version=None, writer=None):
            """Commit a new version. One annotator's saves run one at a time, on threads of their own (a slow
            save never holds up reads); the token and the session's state are checked again at the commit.
            ``base_version``: the version the drawing was made on (0: none); refused with ConflictError unless it
            is still the latest (another tab saved meanwhile, or saves sent without waiting arrived out of order),
            or every version since was saved with the same ``writer`` id (this client's saves whose answers were
            lost)."""
            info = sessions.authorize(token, write=True)
            annotator = sessions.identify(info.session_id, annotator_key)
            async with self._save_locks[(info.session_id, annotator.annotator_id)]:
                save = functools.partial(p.save_annotation, info, image_id, annotator.annotator_id, annotation,
                                         still_allowed=lambda: sessions.authorize(token, write=True),
                                         base_version=base_version, writer=writer)
                return await asyncio.get_running_loop().run_in_executor(self._save_pool, save)

        async def finish_image(token, annotator_key, image_id):
            """Say the image is finished (what this annotator drew on it is complete), at their latest version:
            ``{image_id, version, at}``. Refused before they saved it. Runs after their saves in flight."""
            info = sessions.authorize(token, write=True)
            annotator = sessions.identify(info.session_id, annotator_key)
            async with self._save_locks[(info.session_id, annotator.annotator_id)]:
                return await asyncio.to_thread(p.finish_image, info, image_id, annotator.annotator_id)

        def get_annotations(token, annotator_key, image_id, version=None):
            info = sessions.authorize(token)
            annotator = sessions.identify(info.session_id, annotator_key)
            return p.get_annotations(info, image_id, annotator_id=annotator.annotator_id, version=version)

        def list_versions(token, annotator_key, image_id):
            info = sessions.authorize(token)
            annotator = sessions.identify(info.session_id, annotator_key)
            return p.list_versions(info, image_id, annotator.annotator_id)

        def progress(token):
            return p.progress(sessions.authorize(token))

        functions = [join, session_info, list_images, image_info, get_image, next_image, open_image,
                     save_annotation, finish_image, get_annotations, list_versions, progress,
                     *self._trainer_functions()]
        if self.assist is not None:
            functions += self._assist_functions()
        if self.hals is not None:
            functions += self._hals_functions()
        if self.preannotator is not None:
            preannotator = self.preannotator

            async def pre_annotation(token, image_id):
                """Outlines proposed by the trained segmenter, to accept or correct (nothing is stored)."""
                return await preannotator.pre_annotation(sessions.authorize(token), image_id)

            functions.append(pre_annotation)
        return {f.__name__: _remote(f, succeeded=self._called_with_token) for f in functions}

    def _trainer_functions(self) -> list:
        """Read-only functions for trainer tokens (role "train"): everything ``colabel pull`` needs."""
        p, sessions = self.provider, self.provider.sessions

        def trainer_session(token):
            """The session (classes, mode, annotators per image), its annotators and, per image, the versions
            saved by each annotator and their latest save: ``{session, annotators, images: [ImageInfo + versions
            + latest], max_image_bytes}`` (:meth:`DataProvider.trainer_images`; the most bytes one
            ``trainer_image`` answer may hold)."""
            info = sessions.authorize(token, role="train")
            images = p.trainer_images(info)
            annotators = {k: v.model_dump(mode="json") for k, v in sessions.annotators(info.session_id).items()}
            return {"session": _public_session(p, info), "annotators": annotators, "images": images,
                    "max_image_bytes": p.config.max_image_bytes}

        async def trainer_image(token, image_id, level=0, region=None):
            """Pixels of a session image (H, W, C) in the file's dtype: whole, or a ``region`` ``{x, y, width,
            height}`` of the level (what ``colabel pull`` reads in strips when the image is larger than one answer
            may be)."""
            info = sessions.authorize(token, role="train")
            return await self._read_pixels(f"token:{sessions.token_id(token)}", image_id, region=region, level=level,
                                           session=info)

        def trainer_annotation(token, image_id, annotator_id, version=None):
            """One stored FeatureCollection (with its ``colabel`` record) of any annotator of the session."""
            return p.get_annotations(sessions.authorize(token, role="train"), image_id, annotator_id=annotator_id,
                                     version=version)

        def trainer_labels(token, image_id, annotator_id, version=None):
            """The instance-label image (H, W) uint16/uint32 saved with a version."""
            import tifffile

            info = sessions.authorize(token, role="train")
            image_id = p._check_in_session(info, image_id)
            return tifffile.imread(p.store.label_path(info.session_id, image_id, annotator_id, version))

        return [trainer_session, trainer_image, trainer_annotation, trainer_labels]

    def _hals_functions(self) -> list:
        """The HALS loop: cells, suggestions, labels (accept/correct), next-patch guidance, live status."""
        hals, sessions = self.hals, self.provider.sessions

        async def cells(token, image_id, region=None):
            """Segmented cells of an image (or region) with their labels."""
            return await hals.cells(sessions.authorize(token), image_id, region)

        async def suggestions(token, annotator_key, image_id, region=None):
            """Class suggestions for unlabelled cells once 10 labels per class exist (recorded as shown)."""
            info = sessions.authorize(token, write=True)
            annotator = sessions.identify(info.session_id, annotator_key)
            return await hals.suggestions(info, annotator.annotator_id, image_id, region)

        async def label_cell(token, annotator_key, image_id, cell_id, class_name, suggested_class=None):
            """Label a cell; accepting or correcting the suggestion shown for it (``suggested_class``, the one
            the annotator saw; else the latest shown) is recorded as such."""
            info = sessions.authorize(token, write=True)
            annotator = sessions.identify(info.session_id, annotator_key)
            return await hals.label(info, annotator.annotator_id, image_id, cell_id, class_name, suggested_class)

        async def next_patch(token, image_id, patch_size=None):
            """The patch to annotate next: the one holding most of the Coreset selection."""
            return await hals.next_patch(sessions.authorize(token), image_id, patch_size)

        async def classifier_status(token):
            """Whether suggestions are on, the model version and its live validation accuracy."""
            return hals.status(sessions.authorize(token))

        return [cells, suggestions, label_cell, next_patch, classifier_status]

    def _assist_functions(self) -> list:
        """AI help, each call checked against the session's token first."""
        assist, sessions = self.assist, self.provider.sessions

        async def sam_prepare(token, image_id, model_id=None):
            """Compute (once, for every annotator) the SAM embedding of an image of the session."""
            return await assist.sam_prepare(sessions.authorize(token), image_id, model_id)

        async def sam_segment(token, image_id, prompt, model_id=None):
            """One object from points (positive 1 / negative 0) and/or a box; GeoJSON features in pixels."""
            return await assist.sam_segment(sessions.authorize(token), image_id, prompt, model_id)

        async def sam_embedding(token, image_id, model_id=None):
            """The embedding in BioImage.IO Colab's form, for decoding clicks in the browser."""
            return await assist.sam_embedding(sessions.authorize(token), image_id, model_id)

        async def sam_decoder(token, model_id=None, quantize=True):
            """The ONNX prompt decoder (bytes) for onnxruntime-web."""
            sessions.authorize(token)
            return await assist.sam_decoder(model_id, quantize)

        async def detect_nuclei(token, image_id, region=None, backend=None):
            """Every nucleus of an image of the session (or of a region)."""
            return await assist.detect_nuclei(sessions.authorize(token), image_id, region, backend)

        return [sam_prepare, sam_segment, sam_embedding, sam_decoder, detect_nuclei]

    # -- web pages --------------------------------------------------------------------------------
    def web_handler(self):
        """An ASGI-like Hypha 'functions' handler serving the built pages of ``colabel/web_dist``."""
        root = WEB_DIST.resolve()

        async def serve(scope):
            path = (scope.get("path") or "/").split("?", 1)[0].lstrip("/") or "index.html"
            target = (root / path).resolve()
            if not target.is_relative_to(root) or not target.is_file():
                if not root.is_dir():
                    body = "colabel's web pages are not built: run `npm --prefix web ci && npm --prefix web run build`"
                else:
                    body = f"not found: {path}"
                return {"status": 404, "headers": {"Content-Type": "text/plain; charset=utf-8"}, "body": body}
            content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            data = await asyncio.to_thread(target.read_bytes)
            if content_type.startswith("text/") or content_type in ("application/javascript", "application/json"):
                return {"status": 200, "headers": {"Content-Type": content_type, "Cache-Control": "no-cache"},
                        "body": data.decode("utf-8")}
            return {"status": 200, "headers": {"Content-Type": content_type}, "body": data}

        return serve

    # -- registration -----------------------------------------------------------------------------
    async def register(self) -> None:
        """Register the three services; hypha-rpc re-registers them after a reconnection."""
        await self.server.register_service({
            "id": f"{self.name}-provider", "name": f"colabel provider {self.name}",
            "description": "Provider functions of a colabel data provider.",
            "config": {"visibility": "protected"}, **self.provider_functions(),
        })
        await self.server.register_service({
            "id": f"{self.name}-annotate", "name": f"colabel annotator {self.name}",
            "description": "Annotator functions of a colabel session; every call needs a share token.",
            # the context tells which client called (see caller_has_live_token); callers never pass it
            "config": {"visibility": "public", "require_context": True}, **self.annotator_functions(),
        })
        handler = self.web_handler()
        await self.server.register_service({
            "id": f"{self.name}-web", "type": "functions", "config": {"visibility": "public"},
            "index": handler, "default": handler,
        })
