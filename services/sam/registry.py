"""SAM model ids, their published weights, and loading of checkpoints.

Model ids
---------
==========================  =====  =====================================================================
id                          arch   weights
==========================  =====  =====================================================================
``sam_vit_b``               vit_b  Meta's ``sam_vit_b_01ec64.pth``
``sam_vit_l``               vit_l  Meta's ``sam_vit_l_0b3195.pth``
``sam_vit_h``               vit_h  Meta's ``sam_vit_h_4b8939.pth``
``sam_vit_b_lm``            vit_b  micro-sam light-microscopy generalist (bioimage.io diplomatic-bug 1.2)
``sam_vit_l_lm``            vit_l  micro-sam light-microscopy generalist (bioimage.io idealistic-rat 1.2)
``sam_vit_b_em_organelles`` vit_b  micro-sam EM organelles (bioimage.io noisy-ox 1.2)
``sam_vit_l_em_organelles`` vit_l  micro-sam EM organelles (bioimage.io humorous-crab 1.2)
``sam_vit_b_histopathology`` vit_b micro-sam / PathoSAM histopathology
==========================  =====  =====================================================================

URLs and xxh128 checksums are those of micro-sam 1.8.14's registry. A ``checkpoints`` mapping overrides
the URL of a known id with a local file (``{"sam_vit_b": "/data/sam_vit_b.pth"}``) or adds an id with
its architecture (``{"my_model": ("vit_b", "/data/my.pt")}``; ``"auto"`` reads it from the weights).

Checkpoint formats
------------------
A plain SAM state dict; micro-sam / torch_em's ``{"model_state": ...}`` (keys may start with ``sam.``);
``{"model": ...}``; and colabel's ``{"colabel_config": {...}, "model_state": ...}`` which also stores the
exact :class:`SamConfig` (used by tests to save and reload tiny models). Without a stored config the
architecture is read from the tensor shapes (:func:`infer_config`), so a mismatching declared
architecture cannot load wrong weights silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from colabel.errors import InvalidInputError, NotFoundError

__all__ = [
    "ARCHITECTURES",
    "SamConfig",
    "ModelSpec",
    "MODELS",
    "sam_config",
    "build_sam",
    "infer_config",
    "resolve",
    "known_model_ids",
    "checkpoint_path",
    "read_checkpoint",
    "load_sam",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

ARCHITECTURES = ("vit_b", "vit_l", "vit_h")


@dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of a SAM (ViT image encoder + prompt encoder + mask decoder).

    The defaults are SAM ViT-B. ``image_size`` is the square encoder input (the long side images are
    resized to); the embedding is ``(prompt_embed_dim, image_size // patch_size, image_size // patch_size)``
    and the low-resolution masks are 4x that grid.
    """

    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise InvalidInputError(
                f"image_size {self.image_size} must be a positive multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise InvalidInputError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise InvalidInputError(
                f"global_attn_indexes {list(self.global_attn_indexes)} must lie in 0..{self.depth - 1}"
            )

    @property
    def embedding_size(self) -> int:
        """Side of the square image embedding grid (64 for the published models)."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SamConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InvalidInputError(f"unknown SAM config keys {sorted(unknown)}; known keys are {sorted(names)}")
        return cls(**dict(d))


_STANDARD = {
    "vit_b": SamConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def sam_config(arch: str | SamConfig = "vit_b", **overrides: Any) -> SamConfig:
    """The :class:`SamConfig` of ``vit_b`` / ``vit_l`` / ``vit_h`` (or a given config) with overrides.

    Overrides that are None are ignored. ``arch="custom"`` starts from ``vit_b``.
    """
    if isinstance(arch, SamConfig):
        base = arch
    elif arch in _STANDARD:
        base = _STANDARD[arch]
    elif arch == "custom":
        base = _STANDARD["vit_b"]
    else:
        raise InvalidInputError(f"unknown SAM architecture {arch!r}; use one of {', '.join(ARCHITECTURES)} or 'custom'")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **overrides) if overrides else base


def build_sam(
    arch: str | SamConfig = "vit_b",
    *,
    image_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    global_attn_indexes: tuple[int, ...] | list[int] | None = None,
    window_size: int | None = None,
    patch_size: int | None = None,
    prompt_embed_dim: int | None = None,
    decoder_mlp_dim: int | None = None,
):
    """Build a randomly initialised SAM from segment_anything's modeling parts, in eval mode on the CPU.

    Parameters
    ----------
    arch : {"vit_b", "vit_l", "vit_h", "custom"} or SamConfig
        The base configuration; keyword arguments override single fields.
    image_size, embed_dim, depth, num_heads, global_attn_indexes, window_size, patch_size,
    prompt_embed_dim, decoder_mlp_dim : optional
        See :class:`SamConfig`.

    Returns
    -------
    sam : segment_anything.modeling.Sam
        With ``sam.colabel_config`` set to the :class:`SamConfig` used.

    Examples
    --------
    A tiny model for tests (~30 ms per 256 x 256 embedding on a CPU):

    >>> sam = build_sam("custom", image_size=256, embed_dim=64, depth=2, num_heads=2,
    ...                 global_attn_indexes=(1,), window_size=8)  # doctest: +SKIP
    """
    from functools import partial

    import torch

    from colabel.services.torchvision_compat import install

    install()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    cfg = sam_config(
        arch,
        image_size=image_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        global_attn_indexes=tuple(global_attn_indexes) if global_attn_indexes is not None else None,
        window_size=window_size,
        patch_size=patch_size,
        prompt_embed_dim=prompt_embed_dim,
        decoder_mlp_dim=decoder_mlp_dim,
    )
    grid = cfg.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg.depth,
            embed_dim=cfg.embed_dim,
            img_size=cfg.image_size,
            mlp_ratio=cfg.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=cfg.num_heads,
            patch_size=cfg.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=cfg.global_attn_indexes,
            window_size=cfg.window_size,
            out_chans=cfg.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(cfg.image_size, cfg.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=cfg.prompt_embed_dim, mlp_dim=cfg.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=cfg.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    sam.colabel_config = cfg
    return sam


def infer_config(state: Mapping[str, Any]) -> SamConfig:
    """Read a :class:`SamConfig` from the tensor shapes of a SAM state dict.

    Raises
    ------
    InvalidInputError
        When the state dict is not a SAM one.
    """
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]  # (embed_dim, 3, p, p)
        pos = state["image_encoder.pos_embed"]  # (1, grid, grid, embed_dim)
        neck = state["image_encoder.neck.0.weight"]  # (prompt_embed_dim, embed_dim, 1, 1)
        lin1 = state["mask_decoder.transformer.layers.0.mlp.lin1.weight"]  # (mlp_dim, prompt_embed_dim)
    except KeyError as exc:
        raise InvalidInputError(f"the checkpoint is not a SAM state dict: it has no {exc.args[0]!r}") from None
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    grid = int(pos.shape[1])
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    rel = [state.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    if any(r is None for r in rel):
        raise InvalidInputError("the checkpoint's image encoder has no relative position tables (not a SAM ViT)")
    head_dim = int(rel[0].shape[1])
    lengths = [int(r.shape[0]) for r in rel]
    global_idx = tuple(i for i, n in enumerate(lengths) if n == 2 * grid - 1)
    windowed = [n for n in lengths if n != 2 * grid - 1]
    window = (windowed[0] + 1) // 2 if windowed else 14
    mlp_ratio = float(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]) / embed_dim
    return SamConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attn_indexes=global_idx,
        window_size=window,
        mlp_ratio=mlp_ratio,
        prompt_embed_dim=int(neck.shape[0]),
        decoder_mlp_dim=int(lin1.shape[0]),
    )


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights come from.

    ``arch`` is ``vit_b`` / ``vit_l`` / ``vit_h``, or ``"auto"`` to read the architecture from the
    checkpoint. Exactly one of ``url`` (download, verified with ``checksum``) and ``local_path`` is set.
    """

    model_id: str
    arch: str
    url: str | None = None
    checksum: str | None = None
    filename: str | None = None
    description: str = ""
    local_path: Path | None = None

    def info(self) -> dict[str, Any]:
        """A JSON-able summary (for ``deployment_status`` and listings)."""
        return {
            "id": self.model_id,
            "architecture": self.arch,
            "url": self.url,
            "checksum": self.checksum,
            "local_path": str(self.local_path) if self.local_path else None,
            "description": self.description,
        }


_EBI = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"
_META = "https://dl.fbaipublicfiles.com/segment_anything"

#: The published models (micro-sam 1.8.14's URLs and xxh128 checksums).
MODELS: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec("sam_vit_b", "vit_b", f"{_META}/sam_vit_b_01ec64.pth",
                  "xxh128:6923c33df3637b6a922d7682bfc9a86b", "sam_vit_b_01ec64.pth",
                  "Segment Anything ViT-B (Meta AI), natural images"),
        ModelSpec("sam_vit_l", "vit_l", f"{_META}/sam_vit_l_0b3195.pth",
                  "xxh128:a82beb3c660661e3dd38d999cc860e9a", "sam_vit_l_0b3195.pth",
                  "Segment Anything ViT-L (Meta AI), natural images"),
        ModelSpec("sam_vit_h", "vit_h", f"{_META}/sam_vit_h_4b8939.pth",
                  "xxh128:97698fac30bd929c2e6d8d8cc15933c2", "sam_vit_h_4b8939.pth",
                  "Segment Anything ViT-H (Meta AI), natural images"),
        ModelSpec("sam_vit_b_lm", "vit_b", f"{_EBI}/diplomatic-bug/1.2/files/vit_b.pt",
                  "xxh128:fe9252a29f3f4ea53c15a06de471e186", "sam_vit_b_lm.pt",
                  "micro-sam ViT-B light-microscopy generalist (cells, nuclei)"),
        ModelSpec("sam_vit_l_lm", "vit_l", f"{_EBI}/idealistic-rat/1.2/files/vit_l.pt",
                  "xxh128:017f20677997d628426dec80a8018f9d", "sam_vit_l_lm.pt",
                  "micro-sam ViT-L light-microscopy generalist (cells, nuclei)"),
        ModelSpec("sam_vit_b_em_organelles", "vit_b", f"{_EBI}/noisy-ox/1.2/files/vit_b.pt",
                  "xxh128:f3bf2ed83d691456bae2c3f9a05fb438", "sam_vit_b_em_organelles.pt",
                  "micro-sam ViT-B electron-microscopy organelles"),
        ModelSpec("sam_vit_l_em_organelles", "vit_l", f"{_EBI}/humorous-crab/1.2/files/vit_l.pt",
                  "xxh128:810b084b6e51acdbf760a993d8619f2d", "sam_vit_l_em_organelles.pt",
                  "micro-sam ViT-L electron-microscopy organelles"),
        ModelSpec("sam_vit_b_histopathology", "vit_b", "https://owncloud.gwdg.de/index.php/s/sBB4H8CTmIoBZsQ/download",
                  "xxh128:ffd1a2cd84570458b257bd95fdd8f974", "sam_vit_b_histopathology.pt",
                  "micro-sam / PathoSAM ViT-B histopathology (H&E nuclei)"),
    )
}

CheckpointEntry = str | os.PathLike | tuple[str, str | os.PathLike]


def known_model_ids(checkpoints: Mapping[str, CheckpointEntry] | None = None) -> list[str]:
    """Sorted ids of the published models plus those configured in *checkpoints*."""
    return sorted(set(MODELS) | set(checkpoints or ()))


def resolve(model_id: str, *, checkpoints: Mapping[str, CheckpointEntry] | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of *model_id*.

    Parameters
    ----------
    model_id : str
    checkpoints : mapping, optional
        ``{model_id: path}`` overrides a published id's URL with a local file; ``{model_id: (arch, path)}``
        gives the architecture too (required for an unknown id unless the file stores it or ``"auto"``
        is given: a plain path for an unknown id means ``"auto"``).

    Raises
    ------
    NotFoundError
        An id that is neither published nor configured (the message lists the known ids).
    InvalidInputError
        A malformed *checkpoints* entry or an unknown architecture.
    """
    if not isinstance(model_id, str) or not model_id:
        raise InvalidInputError(f"model_id must be a non-empty string, got {model_id!r}")
    entry = (checkpoints or {}).get(model_id)
    if entry is None:
        spec = MODELS.get(model_id)
        if spec is None:
            raise NotFoundError(
                f"unknown SAM model {model_id!r}; known models are {', '.join(known_model_ids(checkpoints))}"
            )
        return spec
    published = MODELS.get(model_id)
    if isinstance(entry, (tuple, list)):
        if len(entry) != 2:
            raise InvalidInputError(f"checkpoints[{model_id!r}] must be a path or (architecture, path), got {entry!r}")
        arch, path = str(entry[0]), entry[1]
    elif isinstance(entry, (str, os.PathLike)):
        arch, path = (published.arch if published else "auto"), entry
    else:
        raise InvalidInputError(f"checkpoints[{model_id!r}] must be a path or (architecture, path), got {entry!r}")
    if arch not in ARCHITECTURES and arch != "auto":
        raise InvalidInputError(
            f"architecture {arch!r} of model {model_id!r} must be one of {', '.join(ARCHITECTURES)} or 'auto'"
        )
    return ModelSpec(
        model_id=model_id,
        arch=arch,
        description=published.description if published else f"local checkpoint {Path(path).name}",
        local_path=Path(path).expanduser(),
    )


def checkpoint_path(spec: ModelSpec, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local checkpoint file of *spec*: the configured file, or the verified download.

    Raises
    ------
    NotFoundError
        A configured local file that does not exist.
    colabel.services.weights.WeightsUnavailableError
        The download failed (offline, HTTP error, checksum mismatch).
    """
    from colabel.services.weights import fetch, require_local

    if spec.local_path is not None:
        return require_local(spec.local_path, model=spec.model_id)
    assert spec.url is not None
    return fetch(spec.url, checksum=spec.checksum, cache_dir=cache_dir, filename=spec.filename,
                 progress=progress, model=spec.model_id)


class _Placeholder:
    """Stands in for a pickled class that cannot be imported (e.g. torch_em trainer objects)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError):
            logger.warning("checkpoint refers to %s.%s, which is not importable; ignoring it", module, name)
            return _Placeholder


_lenient_pickle = types.SimpleNamespace(**{k: getattr(pickle, k) for k in ("load", "loads", "dump", "dumps")})
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.__name__ = "colabel_lenient_pickle"

_SAM_PREFIXES = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_SAM_BUFFERS = ("pixel_mean", "pixel_std")


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = True) -> tuple[dict[str, Any], SamConfig | None]:
    """Read a SAM checkpoint file into ``(state_dict, stored_config_or_None)``.

    Loads with ``torch.load(weights_only=True)`` first. micro-sam checkpoints also pickle training objects;
    for a *trusted* file (checksum-verified download or a file the user configured) they are loaded with
    ``weights_only=False`` and classes that cannot be imported replaced by placeholders.

    Raises
    ------
    InvalidInputError
        Not a readable torch file, or no SAM weights in it.
    """
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError of a corrupt zip, ...
        from colabel.services.weights import load_error_reason

        if not trusted:
            raise InvalidInputError(
                f"checkpoint {path.name} holds more than tensors and is not trusted ({load_error_reason(exc)})"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_lenient_pickle)
        except Exception as exc2:  # noqa: BLE001
            raise InvalidInputError(
                f"checkpoint {path.name} cannot be read by torch.load ({load_error_reason(exc2)})"
            ) from None
    config = None
    state: Any = obj
    if isinstance(obj, Mapping):
        if isinstance(obj.get("colabel_config"), Mapping):
            config = SamConfig.from_dict(obj["colabel_config"])
        for key in ("model_state", "model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"checkpoint {path.name} does not contain a state dict (got {type(state).__name__})")
    cleaned: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            continue
        for prefix in ("module.", "sam."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(_SAM_PREFIXES) or key in _SAM_BUFFERS:
            cleaned[key] = value
    if not any(k.startswith("image_encoder.") for k in cleaned):
        raise InvalidInputError(f"checkpoint {path.name} contains no SAM image encoder weights")
    return cleaned, config


def load_sam(
    model_id: str,
    *,
    checkpoints: Mapping[str, CheckpointEntry] | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = "cpu",
    progress: bool = True,
):
    """Load a SAM by model id: resolve, fetch (or use the local file), build and load the weights.

    Parameters
    ----------
    model_id : str
        A published id (:data:`MODELS`) or one configured in *checkpoints*.
    checkpoints : mapping, optional
        See :func:`resolve`.
    cache_dir : path-like, optional
        Weights cache (see :func:`colabel.services.weights.default_cache_dir`).
    device : str, optional
        ``"cpu"``, ``"cuda"``, ... ; None picks CUDA when available.
    progress : bool, default True
        Download progress bar.

    Returns
    -------
    sam : segment_anything.modeling.Sam
        In eval mode on *device*, ``sam.colabel_config`` set.
    spec : ModelSpec

    Raises
    ------
    NotFoundError, InvalidInputError, colabel.services.weights.WeightsUnavailableError
    """
    import torch

    spec = resolve(model_id, checkpoints=checkpoints)
    path = checkpoint_path(spec, cache_dir=cache_dir, progress=progress)
    state, stored = read_checkpoint(path, trusted=True)
    inferred = infer_config(state)
    if stored is not None:
        config = stored
    elif spec.arch in _STANDARD and sam_config(spec.arch, mlp_ratio=inferred.mlp_ratio) == inferred:
        config = inferred
    else:
        if spec.arch in _STANDARD:
            logger.warning(
                "model %r is declared %s but its weights are a different SAM (embed_dim %d, depth %d); "
                "using the architecture of the weights", model_id, spec.arch, inferred.embed_dim, inferred.depth,
            )
        config = inferred
    sam = build_sam(config)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise InvalidInputError(
            f"the weights in {path.name} do not fit a SAM {config.embed_dim}-dim/{config.depth}-block model: "
            + " ".join(line.strip() for line in first)
        ) from None
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sam.to(device)
    sam.eval()
    return sam, spec


def save_checkpoint(sam, path: str | os.PathLike, *, layout: str = "colabel") -> Path:
    """Save *sam*'s weights in one of the layouts :func:`read_checkpoint` reads (written atomically).

    Parameters
    ----------
    sam : segment_anything.modeling.Sam
    path : path-like
    layout : {"colabel", "plain", "micro_sam", "model"}
        ``colabel``: ``{"colabel_config", "model_state"}``; ``plain``: the state dict itself;
        ``micro_sam``: ``{"model_state": {"sam.<key>": ...}}`` as torch_em's trainer writes;
        ``model``: ``{"model": state}``.
    """
    import tempfile

    import torch

    state = {k: v.detach().cpu() for k, v in sam.state_dict().items()}
    config = getattr(sam, "colabel_config", None) or infer_config(state)
    if layout == "colabel":
        obj: Any = {"colabel_config": config.to_dict(), "model_state": state}
    elif layout == "plain":
        obj = state
    elif layout == "micro_sam":
        obj = {"model_state": {f"sam.{k}": v for k, v in state.items()}, "epoch": 0}
    elif layout == "model":
        obj = {"model": state}
    else:
        raise InvalidInputError(f"layout must be 'colabel', 'plain', 'micro_sam' or 'model', got {layout!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

