"""AI help for annotators: the provider's bridge from a session's image to the model services.

An annotator never reaches a model service directly (those are workspace-protected): the annotator
service's AI functions check the share token, read the session's image here, and call the model service
over Hypha, wherever it runs (local Ray Serve replicas, or a cluster via ``--models-url``); when this
process registered the model service itself, its backend is called directly, without the loopback
through the Hypha server.
Pixels travel to the SAM service once per image: afterwards prompts carry only the embedding id, and every
annotator and replica shares the same embedding.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from colabel.errors import ColabelError, InvalidInputError, NotFoundError, shown
from colabel.services.sam.segmenter import check_point_count
from colabel.services.wire import unpack

from .provider import DataProvider

logger = logging.getLogger(__name__)


class ModelServiceUnavailable(ColabelError):
    """A model service that is not running or failed."""


def remote_message(exc: BaseException, *, kind: bool = True) -> str:
    """The one-sentence reason of a remote error: the last line of hypha-rpc's message, without the wrappers
    hypha-rpc and the provider add (``Exception: ``, ``[colabel.apps.provider.rpc.]ServiceError: ``).

    With ``kind`` (default) the error's own name stays in front (``NotFoundError: no image x``, what
    :meth:`ModelAssist.call` maps back to an error); without, every leading exception name, qualified or not,
    is removed too (``no image x``): what a user reads.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    text = re.sub(r"^(?:(?:Exception|(?:[A-Za-z_]\w*\.)*ServiceError): )+", "", text)
    if not kind:
        text = re.sub(r"^(?:(?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception): )+", "", text) or type(exc).__name__
    return text


class ModelAssist:
    """Annotator-facing AI functions over the model services registered on a Hypha server.

    Parameters
    ----------
    provider : DataProvider
    server : hypha-rpc connection that can reach the model services
    service_ids : dict
        Model service name (``"sam"``, ``"nuclei"``) -> full Hypha service id.
    sam_model : str
        The SAM model id annotators' calls use (they may name it or pass None, not choose another).
    nuclei_backend : str, optional
        The nucleus backend annotators' calls use (they may name it or pass None, not choose another). By
        default the nuclei service's own default backend, read once from its ``info()``.
    direct : bool, default True
        Call a model service that this process registered (``colabel serve`` running the models itself) on
        its backend directly, skipping the loopback through the Hypha server; False always goes over Hypha.
    """

    def __init__(self, provider: DataProvider, server: Any, service_ids: dict[str, str], *,
                 sam_model: str = "sam_vit_b_lm", nuclei_backend: str | None = None, direct: bool = True) -> None:
        self.provider = provider
        self.server = server
        self.service_ids = dict(service_ids)
        self.sam_model = sam_model
        self.nuclei_backend = nuclei_backend
        self.direct = bool(direct)
        self._services: dict[str, Any] = {}
        self._embeddings: dict[tuple[str, str], str] = {}  # (image id, model id) -> embedding id
        self._embedding_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._warned: set[tuple[str, str]] = set()  # (service, error kind) already logged on the console

    async def service(self, name: str):
        if name not in self.service_ids:
            raise ModelServiceUnavailable(f"the {name} model service is not running with this provider")
        if name not in self._services:
            try:
                self._services[name] = await self.server.get_service(self.service_ids[name])
            except Exception as exc:  # noqa: BLE001
                raise ModelServiceUnavailable(
                    f"the {name} model service ({self.service_ids[name]}) is unreachable: {remote_message(exc)}"
                ) from None
        return self._services[name]

    def _in_process(self, name: str):
        """The model service's backend when this process registered it (see the gateway), else None."""
        if not self.direct or name not in self.service_ids:
            return None
        from colabel.services.gateway import in_process_backend

        return in_process_backend(self.service_ids[name])

    async def call(self, name: str, method: str, *args):
        """``<name>.<method>(*args)`` on the model service: directly on its backend when this process runs
        it (no loopback through Hypha), else over the Hypha connection. Errors become ``NotFoundError``,
        ``InvalidInputError`` or :class:`ModelServiceUnavailable` with the model's sentence, either way."""
        backend = self._in_process(name)
        try:
            if backend is not None:
                return await backend.call(method, *args)
            service = await self.service(name)
            # outlines come packed as arrays: hypha-rpc's Python client decodes long lists element by element
            return unpack(await service.call_packed(method, *args))
        except ModelServiceUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001
            message = remote_message(exc if backend is None else Exception(f"{type(exc).__name__}: {exc}"))
            kind, _, sentence = message.partition(": ")
            kind = kind.rsplit(".", 1)[-1]  # Ray reports errors as colabel.errors.<Kind>
            if kind == "NotFoundError":
                raise NotFoundError(sentence) from None
            if kind in ("InvalidInputError", "PayloadTooLargeError"):
                raise InvalidInputError(sentence) from None
            if (name, kind) not in self._warned:  # the provider hears of it too, once per service and kind
                self._warned.add((name, kind))
                logger.warning("the %s model service failed (annotators are told so; further failures of this kind "
                               "are not logged): %s.%s: %s", name, name, method, message)
            raise ModelServiceUnavailable(f"{name}.{method} failed: {message}") from None

    async def _pixels(self, session, image_id: str):
        return await asyncio.to_thread(self.provider.get_image, image_id, session=session)

    # -- SAM ------------------------------------------------------------------------------------
    def _sam_model(self, model_id: object) -> str:
        """The provider's SAM model: annotators may name it (or pass None), not choose another (which could make
        the model service fetch and load gigabytes of weights)."""
        if model_id is None or model_id == self.sam_model:
            return self.sam_model
        raise InvalidInputError(f"this provider segments with the SAM model {self.sam_model!r}, "
                                f"not {shown(model_id)}")

    @staticmethod
    def _check_prompt(prompt: object) -> dict:
        """The prompt's form, and at most ``MAX_POINTS`` points (``check_point_count``), checked here before
        anything is sent (the model service checks everything again)."""
        if not isinstance(prompt, dict):
            raise InvalidInputError("prompt must be an object {points, labels, box}")
        unknown = set(prompt) - {"points", "labels", "box"}
        if unknown:
            raise InvalidInputError(f"unknown prompt fields {shown(sorted(map(str, unknown)))}; "
                                    f"use points, labels, box")
        points = prompt.get("points")
        if points is not None and not isinstance(points, (str, bytes, dict)) and hasattr(points, "__len__"):
            check_point_count(len(points))
        return prompt

    async def sam_prepare(self, session, image_id: str, model_id: str | None = None) -> dict:
        """Make sure the image's embedding exists (computed once for everyone); returns its description."""
        model_id = self._sam_model(model_id)
        image_id = self.provider._check_in_session(session, image_id)  # before any lock is made for the id
        key = (image_id, model_id)
        lock = self._embedding_locks.setdefault(key, asyncio.Lock())
        async with lock:
            pixels = await self._pixels(session, image_id)
            description = await self.call("sam", "embed", pixels, model_id)
            self._embeddings[key] = description["embedding_id"]
            return description

    async def sam_segment(self, session, image_id: str, prompt: dict, model_id: str | None = None) -> dict:
        """Segment one object from ``prompt`` ``{points: [[x, y], ...], labels: [1|0, ...], box: [x0, y0, x1, y1]}``.

        Returns ``{features: GeoJSON Features in image pixels, score, tiles_used, bbox}``.
        """
        prompt = self._check_prompt(prompt)
        model_id = self._sam_model(model_id)
        image_id = self.provider._check_in_session(session, image_id)
        embedding_id = self._embeddings.get((image_id, model_id))
        if embedding_id is None:
            embedding_id = (await self.sam_prepare(session, image_id, model_id))["embedding_id"]
        args = (embedding_id, model_id, prompt.get("points"), prompt.get("labels"), prompt.get("box"))
        try:
            return await self.call("sam", "segment", *args)
        except NotFoundError:  # evicted everywhere: send the pixels once more
            embedding_id = (await self.sam_prepare(session, image_id, model_id))["embedding_id"]
            return await self.call("sam", "segment", embedding_id, *args[1:])

    async def sam_embedding(self, session, image_id: str, model_id: str | None = None) -> dict:
        """The image embedding in BioImage.IO Colab's form, for decoding clicks in the browser."""
        model_id = self._sam_model(model_id)
        pixels = await self._pixels(session, image_id)
        return await self.call("sam", "compute_embedding", pixels, model_id)

    async def sam_decoder(self, model_id: str | None = None, quantize: bool = True) -> bytes:
        """The ONNX prompt decoder of a SAM model, for onnxruntime-web."""
        return await self.call("sam", "get_onnx_model", self._sam_model(model_id), quantize)

    # -- nuclei ---------------------------------------------------------------------------------
    async def _nuclei_backend(self, backend: object) -> str | None:
        """The provider's nucleus backend: annotators may name it (or pass None), not choose another (one the
        service was not configured for would run without its weights, or load a model into every replica)."""
        if backend is None:
            return None
        configured = self.nuclei_backend
        if configured is None:
            configured = self.nuclei_backend = (await self.call("nuclei", "info"))["default_backend"]
        if backend == configured:
            return configured
        raise InvalidInputError(f"this provider detects nuclei with the backend {configured!r}, "
                                f"not {shown(backend)}")

    async def detect_nuclei(self, session, image_id: str, region: Any = None, backend: str | None = None) -> dict:
        """Every nucleus of the image (or region): ``count`` and ``nuclei`` (id, bbox, centroid, polygon,
        area, type), full-image pixel coordinates; no label image (polygons are what the browser draws).
        ``backend`` may be None or the provider's backend (see :meth:`_nuclei_backend`)."""
        backend = await self._nuclei_backend(backend)
        pixels = await self._pixels(session, image_id)
        return await self.call("nuclei", "segment", pixels, region, backend, None, False)
