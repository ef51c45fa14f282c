"""HoVer-Net: nucleus instance segmentation and classification (Graham et al., Medical Image Analysis 2019).

This module re-implements, in PyTorch, the network of the authors' PyTorch repository (vqdang/hover_net,
``models/hovernet/net_desc.py`` and ``net_utils.py``) with the *same module names*, so that the published
checkpoints load with strict state-dict loading:

* encoder: a pre-activation ResNet-50 -- ``conv0./.weight``, ``conv0.bn.*`` (the 7x7 stem convolution is a
  module literally named ``"/"``), ``d0`` .. ``d3`` residual groups with units ``dN.units.i.conv1``,
  ``conv1/bn``, ``conv2``, ``conv2/bn``, ``conv3``, ``preact/bn`` (units ``i > 0``), ``dN.shortcut`` and
  ``dN.blk_bna.bn``, then ``conv_bot``;
* three decoders ``decoder.{tp,np,hv}`` (``tp`` only when ``nr_types`` is given), each ``u3`` / ``u2``
  (``conva``, a dense block ``dense.units.i.{preact_bna/bn,conv1,conv1/bn,conv2}`` + ``dense.blk_bna.bn``,
  ``convf``), ``u1.conva`` and ``u0.{bn,conv}``;
* the buffer ``upsample2x.unpool_mat``.

Two geometries ("valid" convolutions: the output is the centre of the input):

=========  ===========  ============  ===================  ================
mode       input (px)   output (px)   decoder kernel size  trained on
=========  ===========  ============  ===================  ================
original   270 x 270    80 x 80       5                    CoNSeP, Kumar
fast       256 x 256    164 x 164     3                    PanNuke, MoNuSAC
=========  ===========  ============  ===================  ================

The branches give ``np`` (2 logits: background / nucleus), ``hv`` (horizontal and vertical distances of
each nuclear pixel to its nucleus' centre of mass, in ``[-1, 1]``) and optionally ``tp`` (``nr_types``
logits, type 0 = background). :func:`process_np_hv` turns ``np`` + ``hv`` into instances with the paper's
marker-controlled watershed; :func:`instance_types` takes each instance's type by majority vote.

torch is imported only by the functions and classes that need it (``import colabel.services.nuclei`` stays
light); the post-processing here is numpy/scipy only.

Published checkpoints (:data:`HOVERNET_CHECKPOINTS`) are the TIAToolbox copies of the authors' weights,
whose state dicts use these same names. No checkpoint can be downloaded where this was written, so the
compatibility was checked on names and shapes (the authors' ``net_desc.py`` / ``net_utils.py`` and their
``tf_to_pytorch_variable_mapping.csv``), not on numbers; the post-processing follows the authors'
``__proc_np_hv`` with scipy in place of OpenCV. Their licence is the data sets' (PanNuke, CoNSeP, MoNuSAC, Kumar:
non-commercial, CC BY-NC-SA 4.0 for PanNuke); nothing is downloaded unless a user asks for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from colabel.errors import InvalidInputError, NotFoundError

from .base import NucleusSegmenter, Segmentation, register_backend

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "HOVERNET_CHECKPOINTS",
    "PANNUKE_TYPES",
    "CONSEP_TYPES",
    "MONUSAC_TYPES",
    "CheckpointInfo",
    "build_hovernet",
    "resolve_checkpoint",
    "load_state_dict",
    "load_hovernet",
    "hv_maps_from_labels",
    "process_np_hv",
    "instance_types",
    "predict_maps",
    "HoVerNetSegmenter",
]

#: ``mode -> (input size, output size)`` of one patch.
MODES: dict[str, tuple[int, int]] = {"original": (270, 80), "fast": (256, 164)}

#: PanNuke nucleus types (the authors' ``type_info.json``; 0 = no label / background).
PANNUKE_TYPES = {
    0: "nolabe",
    1: "neoplastic",
    2: "inflammatory",
    3: "connective",
    4: "dead",
    5: "non-neoplastic epithelial",
}
#: CoNSeP nucleus types as trained by the authors (4 classes + background).
CONSEP_TYPES = {0: "background", 1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
#: MoNuSAC nucleus types (4 classes + background).
MONUSAC_TYPES = {0: "background", 1: "epithelial", 2: "lymphocyte", 3: "macrophage", 4: "neutrophil"}


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One published HoVer-Net checkpoint.

    ``mpp`` is the resolution (microns per pixel) the weights were trained at; ``sha256`` is None where
    the publisher gives no checksum (the download is then verified by size and loadability only).
    """

    url: str
    mode: str
    nr_types: int | None
    type_names: dict[int, str] | None
    mpp: float
    dataset: str
    sha256: str | None = None


#: Published checkpoints by name. URLs from TIAToolbox's ``tiatoolbox/data/pretrained_model.yaml``
#: (TissueImageAnalytics/tiatoolbox); the weights are the authors' (vqdang/hover_net), state dicts with
#: the names of this module. No checksum is published for them.
HOVERNET_CHECKPOINTS: dict[str, CheckpointInfo] = {
    "hovernet_pannuke_fast": CheckpointInfo(
        url="https://tiatoolbox.dcs.warwick.ac.uk/models/seg/hovernet_fast-pannuke.pth",
        mode="fast",
        nr_types=6,
        type_names=PANNUKE_TYPES,
        mpp=0.25,
        dataset="PanNuke",
    ),
    "hovernet_monusac_fast": CheckpointInfo(
        url="https://tiatoolbox.dcs.warwick.ac.uk/models/seg/hovernet_fast-monusac.pth",
        mode="fast",
        nr_types=5,
        type_names=MONUSAC_TYPES,
        mpp=0.25,
        dataset="MoNuSAC",
    ),
    "hovernet_consep_original": CheckpointInfo(
        url="https://tiatoolbox.dcs.warwick.ac.uk/models/seg/hovernet_original-consep.pth",
        mode="original",
        nr_types=5,
        type_names=CONSEP_TYPES,
        mpp=0.25,
        dataset="CoNSeP",
    ),
    "hovernet_kumar_original": CheckpointInfo(
        url="https://tiatoolbox.dcs.warwick.ac.uk/models/seg/hovernet_original-kumar.pth",
        mode="original",
        nr_types=None,
        type_names=None,
        mpp=0.25,
        dataset="Kumar",
    ),
}


# --------------------------------------------------------------------------------------------------
# the network (torch imported lazily)
# --------------------------------------------------------------------------------------------------


def _torch_modules():
    """Build the torch classes once, on first use, so importing this module does not import torch."""
    global _MODULES
    if _MODULES is not None:
        return _MODULES
    import torch
    import torch.nn.functional as F
    from torch import nn

    def centre_crop(x, crop):
        top, left = crop[0] // 2, crop[1] // 2
        return x[:, :, top : x.shape[2] - (crop[0] - top), left : x.shape[3] - (crop[1] - left)]

    class TFSamePad(nn.Module):
        """TensorFlow 'same' padding before a valid convolution (square kernels)."""

        def __init__(self, ksize: int, stride: int):
            super().__init__()
            self.ksize, self.stride = ksize, stride

        def forward(self, x):
            rem = x.shape[2] % self.stride
            pad = max(self.ksize - (self.stride if rem == 0 else rem), 0)
            a, b = pad // 2, pad - pad // 2
            return F.pad(x, (a, b, a, b), "constant", 0)

    class ResidualBlock(nn.Module):
        """Pre-activation bottleneck residual group (names as in the authors' ``net_utils.py``)."""

        def __init__(self, in_ch, ksizes, chs, count, stride=1):
            super().__init__()
            self.units = nn.ModuleList()
            unit_in = in_ch
            for i in range(count):
                s = stride if i == 0 else 1
                layers = [
                    ("preact/bn", nn.BatchNorm2d(unit_in, eps=1e-5)),
                    ("preact/relu", nn.ReLU(inplace=True)),
                    ("conv1", nn.Conv2d(unit_in, chs[0], ksizes[0], stride=1, padding=0, bias=False)),
                    ("conv1/bn", nn.BatchNorm2d(chs[0], eps=1e-5)),
                    ("conv1/relu", nn.ReLU(inplace=True)),
                    ("conv2/pad", TFSamePad(ksizes[1], s)),
                    ("conv2", nn.Conv2d(chs[0], chs[1], ksizes[1], stride=s, padding=0, bias=False)),
                    ("conv2/bn", nn.BatchNorm2d(chs[1], eps=1e-5)),
                    ("conv2/relu", nn.ReLU(inplace=True)),
                    ("conv3", nn.Conv2d(chs[1], chs[2], ksizes[2], stride=1, padding=0, bias=False)),
                ]
                # the previous group ends with bn+relu, so the first unit has no pre-activation
                self.units.append(nn.Sequential(OrderedDict(layers if i else layers[2:])))
                unit_in = chs[2]
            needs_projection = in_ch != chs[2] or stride != 1
            self.shortcut = nn.Conv2d(in_ch, chs[2], 1, stride=stride, bias=False) if needs_projection else None
            self.blk_bna = nn.Sequential(
                OrderedDict([("bn", nn.BatchNorm2d(unit_in, eps=1e-5)), ("relu", nn.ReLU(inplace=True))])
            )

        def forward(self, x):
            shortcut = x if self.shortcut is None else self.shortcut(x)
            for unit in self.units:
                x = unit(x) + shortcut
                shortcut = x
            return self.blk_bna(x)

    class DenseBlock(nn.Module):
        """Dense block of 'valid' convolutions; earlier features are centre-cropped before concatenation."""

        def __init__(self, in_ch, ksizes, chs, count, split=1):
            super().__init__()
            self.units = nn.ModuleList()
            unit_in = in_ch
            for _ in range(count):
                self.units.append(
                    nn.Sequential(
                        OrderedDict(
                            [
                                ("preact_bna/bn", nn.BatchNorm2d(unit_in, eps=1e-5)),
                                ("preact_bna/relu", nn.ReLU(inplace=True)),
                                ("conv1", nn.Conv2d(unit_in, chs[0], ksizes[0], stride=1, padding=0, bias=False)),
                                ("conv1/bn", nn.BatchNorm2d(chs[0], eps=1e-5)),
                                ("conv1/relu", nn.ReLU(inplace=True)),
                                (
                                    "conv2",
                                    nn.Conv2d(chs[0], chs[1], ksizes[1], groups=split, stride=1, padding=0, bias=False),
                                ),
                            ]
                        )
                    )
                )
                unit_in += chs[1]
            self.blk_bna = nn.Sequential(
                OrderedDict([("bn", nn.BatchNorm2d(unit_in, eps=1e-5)), ("relu", nn.ReLU(inplace=True))])
            )

        def forward(self, x):
            for unit in self.units:
                new = unit(x)
                x = torch.cat([centre_crop(x, (x.shape[2] - new.shape[2], x.shape[3] - new.shape[3])), new], dim=1)
            return self.blk_bna(x)

    class UpSample2x(nn.Module):
        """Nearest-neighbour 2x upsampling (TensorPack's FixedUnpooling); keeps the authors' buffer."""

        def __init__(self):
            super().__init__()
            self.register_buffer("unpool_mat", torch.ones((2, 2), dtype=torch.float32))

        def forward(self, x):
            return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    def decoder_branch(out_ch: int, ksize: int):
        u3 = nn.Sequential(
            OrderedDict(
                [
                    ("conva", nn.Conv2d(1024, 256, ksize, stride=1, padding=0, bias=False)),
                    ("dense", DenseBlock(256, [1, ksize], [128, 32], 8, split=4)),
                    ("convf", nn.Conv2d(512, 512, 1, stride=1, padding=0, bias=False)),
                ]
            )
        )
        u2 = nn.Sequential(
            OrderedDict(
                [
                    ("conva", nn.Conv2d(512, 128, ksize, stride=1, padding=0, bias=False)),
                    ("dense", DenseBlock(128, [1, ksize], [128, 32], 4, split=4)),
                    ("convf", nn.Conv2d(256, 256, 1, stride=1, padding=0, bias=False)),
                ]
            )
        )
        u1 = nn.Sequential(
            OrderedDict(
                [
                    ("conva/pad", TFSamePad(ksize, 1)),
                    ("conva", nn.Conv2d(256, 64, ksize, stride=1, padding=0, bias=False)),
                ]
            )
        )
        u0 = nn.Sequential(
            OrderedDict(
                [
                    ("bn", nn.BatchNorm2d(64, eps=1e-5)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("conv", nn.Conv2d(64, out_ch, 1, stride=1, padding=0, bias=True)),
                ]
            )
        )
        return nn.Sequential(OrderedDict([("u3", u3), ("u2", u2), ("u1", u1), ("u0", u0)]))

    class HoVerNet(nn.Module):
        """HoVer-Net with the authors' module names.

        ``forward(x)`` takes ``(N, C, H, W)`` float RGB in ``0..255`` (``H = W`` = the mode's input size)
        and returns an ordered dict of raw outputs ``{"tp"?, "np", "hv"}``, each ``(N, ch, h, w)`` with
        ``h = w`` = the mode's output size: ``np`` and ``tp`` are logits, ``hv`` is the regressed map
        (channel 0 horizontal, 1 vertical).
        """

        def __init__(self, input_ch: int = 3, nr_types: int | None = None, mode: str = "original"):
            super().__init__()
            if mode not in MODES:
                raise InvalidInputError(f"HoVer-Net mode must be one of {sorted(MODES)}, got {mode!r}")
            self.mode = mode
            self.nr_types = nr_types
            stem = [
                ("/", nn.Conv2d(input_ch, 64, 7, stride=1, padding=0, bias=False)),
                ("bn", nn.BatchNorm2d(64, eps=1e-5)),
                ("relu", nn.ReLU(inplace=True)),
            ]
            if mode == "fast":
                stem = [("pad", TFSamePad(7, 1))] + stem
            self.conv0 = nn.Sequential(OrderedDict(stem))
            self.d0 = ResidualBlock(64, [1, 3, 1], [64, 64, 256], 3, stride=1)
            self.d1 = ResidualBlock(256, [1, 3, 1], [128, 128, 512], 4, stride=2)
            self.d2 = ResidualBlock(512, [1, 3, 1], [256, 256, 1024], 6, stride=2)
            self.d3 = ResidualBlock(1024, [1, 3, 1], [512, 512, 2048], 3, stride=2)
            self.conv_bot = nn.Conv2d(2048, 1024, 1, stride=1, padding=0, bias=False)
            ksize = 5 if mode == "original" else 3
            branches = [("np", decoder_branch(2, ksize)), ("hv", decoder_branch(2, ksize))]
            if nr_types is not None:
                branches = [("tp", decoder_branch(int(nr_types), ksize))] + branches
            self.decoder = nn.ModuleDict(OrderedDict(branches))
            self.upsample2x = UpSample2x()
            for m in self.modules():  # the authors' initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def forward(self, imgs):
            imgs = imgs / 255.0
            d0 = self.d0(self.conv0(imgs))
            d1 = self.d1(d0)
            d2 = self.d2(d1)
            d3 = self.conv_bot(self.d3(d2))
            if self.mode == "original":
                d0, d1 = centre_crop(d0, (184, 184)), centre_crop(d1, (72, 72))
            else:
                d0, d1 = centre_crop(d0, (92, 92)), centre_crop(d1, (36, 36))
            out = OrderedDict()
            for name, branch in self.decoder.items():
                u3 = branch[0](self.upsample2x(d3) + d2)
                u2 = branch[1](self.upsample2x(u3) + d1)
                u1 = branch[2](self.upsample2x(u2) + d0)
                out[name] = branch[3](u1)
            return out

    _MODULES = {"HoVerNet": HoVerNet}
    return _MODULES


_MODULES: dict | None = None


def build_hovernet(*, mode: str = "fast", nr_types: int | None = None, input_ch: int = 3, seed: int | None = None):
    """A randomly initialised HoVer-Net (``torch.nn.Module``) in eval mode.

    Parameters
    ----------
    mode : {"fast", "original"}
        Patch geometry, see :data:`MODES`.
    nr_types : int, optional
        Number of type logits (6 for PanNuke, 5 for CoNSeP / MoNuSAC, including background); None builds
        no ``tp`` branch.
    input_ch : int, default 3
    seed : int, optional
        Seed of torch's generator for the initialisation (reproducible random weights for tests).

    Examples
    --------
    >>> net = build_hovernet(mode="fast", nr_types=6)  # doctest: +SKIP
    >>> sorted(net.decoder.keys())  # doctest: +SKIP
    ['hv', 'np', 'tp']
    """
    import torch

    if nr_types is not None and (not isinstance(nr_types, int) or isinstance(nr_types, bool) or nr_types < 2):
        raise InvalidInputError(f"nr_types must be an integer >= 2 or None, got {nr_types!r}")
    if seed is None:
        net = _torch_modules()["HoVerNet"](input_ch=input_ch, nr_types=nr_types, mode=mode)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _torch_modules()["HoVerNet"](input_ch=input_ch, nr_types=nr_types, mode=mode)
    return net.eval()


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def _is_url(text: str) -> bool:
    """True for an ``http://`` or ``https://`` URL (downloaded into the weights cache)."""
    return re.match(r"^https?://", text, flags=re.IGNORECASE) is not None


def resolve_checkpoint(
    path_or_url: str | os.PathLike,
    *,
    checksum: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model: str | None = None,
) -> Path:
    """Local path of a checkpoint: a file as is, an http(s) URL downloaded once into a cache.

    URLs go through :func:`colabel.services.weights.fetch` (checksum, cache folder, progress bar, atomic
    rename), imported here so that local files need nothing else.

    Parameters
    ----------
    path_or_url : str or path-like
        A local file, or an ``http://`` / ``https://`` URL.
    checksum : str, optional
        ``"sha256:<hex>"`` of the download, verified by ``fetch``; None trusts the cached copy.
    cache_dir : path-like, optional
        Download folder; ``fetch``'s default cache folder when omitted.
    progress : bool, default True
        Show a download progress bar.
    model : str, optional
        Name used in download error messages.

    Returns
    -------
    path : Path

    Raises
    ------
    NotFoundError
        If a local path does not exist.
    colabel.services.weights.WeightsUnavailableError
        If a download fails (no network, HTTP error, checksum mismatch).
    """
    text = os.fspath(path_or_url)
    if _is_url(text):
        from colabel.services.weights import fetch

        return Path(fetch(text, checksum=checksum, cache_dir=cache_dir, progress=progress, model=model))
    path = Path(text).expanduser()
    if not path.is_file():
        raise NotFoundError(f"checkpoint file {text!r} does not exist")
    return path


# older PyTorch exports of the authors' TensorFlow weights ("Pytorch-Original" column of their
# tf_to_pytorch_variable_mapping.csv) spell a few names differently; they are renamed on load
_ALIASES = [
    (re.compile(r"^conv0\.conv\."), "conv0./."),
    (re.compile(r"(^d\d\.units\.\d+\.)conv(\d)_bn\."), r"\1conv\2/bn."),
    (re.compile(r"(^d\d\.units\.\d+\.)preact_bn\."), r"\1preact/bn."),
    (re.compile(r"(\.dense\.units\.\d+\.)conv1_bn\."), r"\1conv1/bn."),
    (re.compile(r"(\.dense\.units\.\d+\.)preact_bn\."), r"\1preact_bna/bn."),
]


def _canonical_key(key: str) -> str:
    for pattern, repl in _ALIASES:
        key = pattern.sub(repl, key)
    return key


def _extract_state_dict(obj: Any) -> dict:
    """The tensor mapping inside a checkpoint object (``{"desc": sd}``, ``{"state_dict": sd}`` or ``sd``)."""
    if isinstance(obj, Mapping):
        for key in ("desc", "state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidInputError("checkpoint holds no state dict (expected {'desc': state_dict} or a state dict)")
    out = {}
    for key, value in obj.items():
        key = str(key)
        if key.startswith("module."):  # saved from DataParallel
            key = key[len("module.") :]
        out[_canonical_key(key)] = value
    return out


def _infer_architecture(state: Mapping) -> tuple[str, int | None]:
    """``(mode, nr_types)`` read from a state dict's decoder shapes."""
    weight = state.get("decoder.np.u3.conva.weight")
    if weight is None:
        raise InvalidInputError("checkpoint is not a HoVer-Net state dict (no 'decoder.np.u3.conva.weight')")
    mode = "original" if int(weight.shape[-1]) == 5 else "fast"
    tp = state.get("decoder.tp.u0.conv.weight")
    return mode, (None if tp is None else int(tp.shape[0]))


def _short_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict(model, state: Mapping) -> None:
    """Load a HoVer-Net state dict strictly, with one clear error on any mismatch.

    Keys are first normalised (``module.`` prefix removed, legacy aliases renamed). BatchNorm's
    ``num_batches_tracked`` counters and the constant ``upsample2x.unpool_mat`` buffer, which some exports
    lack, are taken from the model; every other parameter and buffer must be present with its shape, and
    no key may be left over.

    Raises
    ------
    InvalidInputError
        Listing missing keys, unexpected keys and shape mismatches.
    """
    state = _extract_state_dict(state)
    own = model.state_dict()
    optional = {k for k in own if k.endswith("num_batches_tracked") or k == "upsample2x.unpool_mat"}
    missing = sorted(k for k in own if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_short_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_short_list(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({_short_list(mismatched)})")
        raise InvalidInputError(
            f"checkpoint does not fit HoVer-Net mode={model.mode!r} nr_types={model.nr_types}: " + "; ".join(parts)
        )
    full = {k: (state[k] if k in state else own[k]) for k in own}
    model.load_state_dict(full, strict=True)


def load_hovernet(
    checkpoint: str | os.PathLike,
    *,
    mode: str | None = None,
    nr_types: int | None | str = "auto",
    cache_dir: str | os.PathLike | None = None,
    checksum: str | None = None,
    progress: bool = True,
):
    """A HoVer-Net with weights from a published name, a local file or a URL, in eval mode on the CPU.

    Parameters
    ----------
    checkpoint : str or path-like
        A key of :data:`HOVERNET_CHECKPOINTS` (e.g. ``"hovernet_pannuke_fast"``), an http(s) URL, or a
        local ``.tar`` / ``.pth`` file holding ``{"desc": state_dict}`` (the authors' format) or a state
        dict, possibly saved from ``DataParallel`` (``module.`` prefix).
    mode : {"fast", "original"}, optional
        Read from the weights (decoder kernel size) when omitted.
    nr_types : int or None or "auto"
        ``"auto"`` reads it from the weights.
    cache_dir, checksum, progress
        Passed to :func:`resolve_checkpoint` for URLs (``checksum`` as ``"sha256:<hex>"``).

    Returns
    -------
    model : torch.nn.Module

    Raises
    ------
    colabel.services.weights.WeightsUnavailableError
        The download failed, or the downloaded file cannot be read by ``torch.load``: it is then deleted
        from the cache (the message names it) and downloaded again by the next load.
    InvalidInputError
        A local file that cannot be read as tensors, or that is not a HoVer-Net state dict.
    """
    import torch

    name = os.fspath(checkpoint)
    label = None
    if name in HOVERNET_CHECKPOINTS:
        info = HOVERNET_CHECKPOINTS[name]
        label, name = name, info.url
        checksum = checksum or (f"sha256:{info.sha256}" if info.sha256 else None)
    path = resolve_checkpoint(name, checksum=checksum, cache_dir=cache_dir, progress=progress, model=label)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for corrupt files
        from colabel.services.weights import discard_unreadable, load_error_reason

        reason = load_error_reason(exc)
        if _is_url(name):  # a download in the cache (an error page, say): delete it so the next load fetches again
            raise discard_unreadable(path, url=name, model=label or "hovernet", reason=reason) from None
        raise InvalidInputError(f"checkpoint {path.name!r} cannot be read as tensors ({reason})") from None
    state = _extract_state_dict(obj)
    inferred_mode, inferred_types = _infer_architecture(state)
    model = build_hovernet(mode=mode or inferred_mode, nr_types=inferred_types if nr_types == "auto" else nr_types)
    load_state_dict(model, state)
    return model


# --------------------------------------------------------------------------------------------------
# targets and post-processing (numpy / scipy)
# --------------------------------------------------------------------------------------------------


def hv_maps_from_labels(labels: np.ndarray) -> np.ndarray:
    """HoVer-Net's horizontal/vertical target maps of an instance-label image.

    For every instance, the column (``h``) and row (``v``) offsets of its pixels from its centre of mass
    (rounded to a pixel) are scaled separately on each side to ``[-1, 0]`` and ``[0, 1]``, as in the
    authors' ``gen_instance_hv_map``. Background is 0.

    Parameters
    ----------
    labels : ndarray (H, W) of int

    Returns
    -------
    hv : ndarray (H, W, 2), float32
        Channel 0 horizontal, channel 1 vertical.
    """
    labels = np.asarray(labels)
    hv = np.zeros(labels.shape + (2,), dtype=np.float32)
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == index
        rows, cols = np.nonzero(mask)
        com_r, com_c = int(rows.mean() + 0.5), int(cols.mean() + 0.5)
        for channel, offsets in ((0, (cols - com_c).astype(np.float32)), (1, (rows - com_r).astype(np.float32))):
            neg, pos = offsets < 0, offsets > 0
            if neg.any():
                offsets[neg] /= -offsets[neg].min()
            if pos.any():
                offsets[pos] /= offsets[pos].max()
            hv[box][..., channel][mask] = offsets
    return hv


def _sobel_kernels(ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's separable Sobel kernels: (derivative, smoothing) for an odd ``ksize >= 3``."""
    smooth = np.array([1.0])
    for _ in range(ksize - 1):
        smooth = np.convolve(smooth, [1.0, 1.0])
    deriv = np.array([1.0])
    for _ in range(ksize - 3):
        deriv = np.convolve(deriv, [1.0, 1.0])
    deriv = np.convolve(deriv, [-1.0, 0.0, 1.0])
    return deriv, smooth


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return np.zeros_like(x, dtype=np.float32) if hi <= lo else ((x - lo) / (hi - lo)).astype(np.float32)


# OpenCV's 5x5 elliptic structuring element, used by the authors to open the markers
_ELLIPSE5 = np.array([[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool)


def _remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    if labels.max() == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    labels = labels.copy()
    labels[small[labels]] = 0
    return labels


def process_np_hv(
    np_prob: np.ndarray,
    hv: np.ndarray,
    *,
    threshold: float = 0.5,
    scale: float = 1.0,
    marker_threshold: float = 0.4,
) -> np.ndarray:
    """HoVer-Net's marker-controlled watershed: nucleus probability + hv maps -> instance labels.

    Follows the authors' ``__proc_np_hv``: the foreground is ``np_prob >= threshold`` without objects
    under 10 px; the hv maps are min-max normalised and differentiated with a 21 x 21 Sobel filter (size
    and minimum object size scale with *scale*, the resolution relative to 0.25 um/px); the energy
    ``max(1 - |sobel_h|, 1 - |sobel_v|)`` (after min-max normalisation) is high on boundaries between
    nuclei; markers are foreground pixels whose energy is below *marker_threshold*, hole-filled and opened
    with a 5 x 5 ellipse; the watershed floods ``-(1 - energy)`` (smoothed 3 x 3) from the markers within
    the foreground.

    Parameters
    ----------
    np_prob : ndarray (H, W), float
        Probability that a pixel is nuclear.
    hv : ndarray (H, W, 2), float
        Horizontal (channel 0) and vertical (channel 1) maps.
    threshold : float, default 0.5
    scale : float, default 1.0
    marker_threshold : float, default 0.4

    Returns
    -------
    labels : ndarray (H, W), int32
        0 = background; ids are not necessarily contiguous.
    """
    from skimage.segmentation import watershed

    np_prob = np.asarray(np_prob, dtype=np.float32)
    hv = np.asarray(hv, dtype=np.float32)
    if hv.shape != np_prob.shape + (2,):
        raise InvalidInputError(f"hv must have shape {np_prob.shape + (2,)}, got {hv.shape}")
    blob, _ = ndi.label(np_prob >= threshold)
    blob = (_remove_small(blob, max(1, math.ceil(10 * scale**2))) > 0).astype(np.float32)
    if not blob.any():
        return np.zeros(np_prob.shape, dtype=np.int32)

    ksize = int(20 * scale) + 1
    ksize += 1 - ksize % 2
    deriv, smooth = _sobel_kernels(max(ksize, 3))
    h_dir, v_dir = _minmax(hv[..., 0]), _minmax(hv[..., 1])
    # cv2.Sobel(dx=1): derivative along columns, smoothing along rows; reflect-101 border = scipy 'mirror'
    h_dir, v_dir = h_dir.astype(np.float64), v_dir.astype(np.float64)
    sobel_h = ndi.correlate1d(ndi.correlate1d(h_dir, deriv, axis=1, mode="mirror"), smooth, axis=0, mode="mirror")
    sobel_v = ndi.correlate1d(ndi.correlate1d(v_dir, deriv, axis=0, mode="mirror"), smooth, axis=1, mode="mirror")
    sobel_h = 1.0 - _minmax(sobel_h)
    sobel_v = 1.0 - _minmax(sobel_v)

    energy = np.maximum(sobel_h, sobel_v) - (1.0 - blob)
    energy[energy < 0] = 0
    dist = (1.0 - energy) * blob
    kernel = np.array([0.25, 0.5, 0.25])  # cv2.GaussianBlur((3, 3), sigma 0)
    dist = -ndi.correlate1d(ndi.correlate1d(dist, kernel, axis=0, mode="mirror"), kernel, axis=1, mode="mirror")

    marker = np.clip(blob - (energy >= marker_threshold), 0, None).astype(bool)
    marker = ndi.binary_fill_holes(marker)
    padded = np.pad(marker, 2, mode="edge")  # cv2's opening leaves the image border alone
    marker = ndi.binary_opening(padded, structure=_ELLIPSE5)[2:-2, 2:-2]
    marker, _ = ndi.label(marker)
    marker = _remove_small(marker, max(1, math.ceil(10 * scale**2)))
    return watershed(dist, markers=marker, mask=blob.astype(bool)).astype(np.int32)


def instance_types(labels: np.ndarray, type_map: np.ndarray) -> dict[int, tuple[int, float]]:
    """Per-instance type by majority vote of the pixel types, as the authors do.

    The most frequent type among an instance's pixels wins; when that is 0 (background) and another type
    occurs, the most frequent non-zero type is taken. The probability is the winner's share of the
    instance's pixels.

    Parameters
    ----------
    labels : ndarray (H, W) of int
    type_map : ndarray (H, W) of int
        Per-pixel arg-max type (0 = background).

    Returns
    -------
    types : dict
        ``{label: (type, probability)}`` for every non-zero label.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    type_map = np.asarray(type_map).astype(np.int64, copy=False)
    fg = labels > 0
    if not fg.any():
        return {}
    n_types = int(type_map.max()) + 1
    counts = np.bincount(labels[fg] * n_types + type_map[fg], minlength=(int(labels.max()) + 1) * n_types)
    counts = counts.reshape(-1, n_types)
    out = {}
    for label in np.nonzero(counts.sum(1))[0]:
        row = counts[label]
        best = int(np.argmax(row))
        if best == 0 and row[1:].any():
            best = 1 + int(np.argmax(row[1:]))
        out[int(label)] = (best, float(row[best] / row.sum()))
    return out


# --------------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------------


def predict_maps(model, image: np.ndarray, *, batch_size: int = 4, device: str = "cpu") -> dict[str, np.ndarray]:
    """Run HoVer-Net over a whole image with its valid-padding patch geometry.

    The image is padded by ``(input - output) / 2`` pixels (reflection) on the top and left and enough on
    the bottom and right; patches of the mode's input size are taken with a step equal to the output
    size, so the outputs tile the image exactly.

    Parameters
    ----------
    model : torch.nn.Module
        A HoVer-Net from :func:`build_hovernet` or :func:`load_hovernet`.
    image : ndarray (H, W, 3), uint8
        RGB.
    batch_size : int, default 4
    device : str, default "cpu"

    Returns
    -------
    maps : dict
        ``np`` (H, W) float32 nucleus probability, ``hv`` (H, W, 2) float32 and, with a type branch,
        ``tp`` (H, W, nr_types) float32 type probabilities.
    """
    import torch

    size_in, size_out = MODES[model.mode]
    height, width = image.shape[:2]
    margin = (size_in - size_out) // 2
    n_rows, n_cols = math.ceil(height / size_out), math.ceil(width / size_out)
    pad_b = n_rows * size_out + size_in - size_out - margin - height
    pad_r = n_cols * size_out + size_in - size_out - margin - width
    padded = np.pad(image, ((margin, pad_b), (margin, pad_r), (0, 0)), mode="reflect")
    corners = [(i * size_out, j * size_out) for i in range(n_rows) for j in range(n_cols)]
    channels = {"np": 1, "hv": 2}
    if "tp" in model.decoder:
        channels["tp"] = model.nr_types
    full = {k: np.zeros((n_rows * size_out, n_cols * size_out, c), dtype=np.float32) for k, c in channels.items()}
    model = model.to(device).eval()
    with torch.inference_mode():
        for start in range(0, len(corners), batch_size):
            batch = corners[start : start + batch_size]
            patches = np.stack([padded[r : r + size_in, c : c + size_in] for r, c in batch])
            x = torch.from_numpy(patches).to(device=device, dtype=torch.float32).permute(0, 3, 1, 2).contiguous()
            out = model(x)
            pieces = {
                "np": torch.softmax(out["np"], dim=1)[:, 1:],
                "hv": out["hv"],
            }
            if "tp" in out:
                pieces["tp"] = torch.softmax(out["tp"], dim=1)
            for key, value in pieces.items():
                value = value.permute(0, 2, 3, 1).float().cpu().numpy()
                for k, (r, c) in enumerate(batch):
                    full[key][r : r + size_out, c : c + size_out] = value[k]
    maps = {k: v[:height, :width] for k, v in full.items()}
    maps["np"] = maps["np"][..., 0]
    return maps


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    """RGB uint8 for the network: grey is repeated, alpha dropped, other dtypes rescaled once per image."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] != 3:
        raise InvalidInputError(f"HoVer-Net needs a grey or RGB image, got {image.shape[2]} channels")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    x = image.astype(np.float32)
    if image.dtype.kind == "f" and float(x.min()) >= 0 and float(x.max()) <= 1:
        return np.round(x * 255).astype(np.uint8)
    lo, hi = np.percentile(x[:: max(1, x.shape[0] // 512), :: max(1, x.shape[1] // 512)], [0.5, 99.5])
    return np.round(np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


class HoVerNetSegmenter(NucleusSegmenter):
    """HoVer-Net as a :class:`~colabel.services.nuclei.base.NucleusSegmenter` (name ``"hovernet"``).

    Parameters
    ----------
    checkpoint : str or path-like, optional
        A published name (:data:`HOVERNET_CHECKPOINTS`), a URL or a local file; see :func:`load_hovernet`.
        Without it (and without *model*) the network has **random weights** -- only useful for tests.
    model : torch.nn.Module, optional
        An already built HoVer-Net (takes precedence over *checkpoint*).
    mode : {"fast", "original"}, default "fast"
        Used for random weights; read from the checkpoint otherwise.
    nr_types : int, optional
        Used for random weights; read from the checkpoint otherwise.
    type_names : dict, optional
        ``{type: name}``; the published checkpoints bring their own.
    model_mpp : float, default 0.25
        Resolution the weights expect. When ``segment(..., mpp=m)`` is given a different ``m`` (more than
        10 % off), the image is resized to ``model_mpp`` for the network and the labels resized back.
    batch_size : int, default 4
    device : str, default "cpu"
    seed : int, optional
        Seed of the random weights.
    """

    name = "hovernet"
    needs_weights = True

    def __init__(
        self,
        *,
        checkpoint: str | os.PathLike | None = None,
        model=None,
        mode: str = "fast",
        nr_types: int | None = None,
        type_names: dict[int, str] | None = None,
        model_mpp: float = 0.25,
        batch_size: int = 4,
        device: str = "cpu",
        seed: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        published = HOVERNET_CHECKPOINTS.get(self.checkpoint or "")
        if model is not None:
            self.model = model.eval()
            weights = f"model:{id(model)}"
        elif self.checkpoint is not None:
            self.model = load_hovernet(self.checkpoint, cache_dir=cache_dir)
            weights = self.checkpoint
        else:
            self.model = build_hovernet(mode=mode, nr_types=nr_types, seed=seed)
            weights = f"random:{seed}" if seed is not None else f"random:{id(self.model)}"
            log.warning("HoVer-Net has random weights (no checkpoint given): its output is meaningless")
        if published is not None:
            type_names = type_names or published.type_names
            model_mpp = published.mpp
        nr = self.model.nr_types
        if type_names is None and nr is not None:
            type_names = {0: "background"} | {t: f"type {t}" for t in range(1, nr)}
        self.type_names = None if nr is None else {int(k): str(v) for k, v in type_names.items()}
        if not (isinstance(model_mpp, (int, float)) and model_mpp > 0):
            raise InvalidInputError(f"model_mpp must be a positive number, got {model_mpp!r}")
        self.model_mpp = float(model_mpp)
        self.batch_size = int(batch_size)
        self.device = device
        self._weights = weights

    def options(self) -> dict:
        return {
            "weights": self._weights,
            "mode": self.model.mode,
            "nr_types": self.model.nr_types,
            "model_mpp": self.model_mpp,
        }

    def info(self) -> dict:
        size_in, size_out = MODES[self.model.mode]
        return {
            "name": self.name,
            "description": "HoVer-Net (Graham et al. 2019): np/hv/tp branches + marker-controlled watershed",
            "options": self.options(),
            "patch_input": size_in,
            "patch_output": size_out,
            "type_names": self.type_names,
            "needs_weights": self.needs_weights,
            "random_weights": self._weights.startswith("random:"),
        }

    def prepare(self, image: np.ndarray, *, mpp: float | None = None) -> tuple[np.ndarray, dict]:
        rgb = _to_uint8_rgb(image)
        scale = 1.0 if mpp is None else float(mpp) / self.model_mpp
        if abs(scale - 1.0) <= 0.1:
            scale = 1.0
        return rgb, {"scale": scale}

    def segment_prepared(self, image: np.ndarray, *, context: dict) -> Segmentation:
        from skimage.transform import resize

        scale = context.get("scale", 1.0)
        height, width = image.shape[:2]
        net_input = image
        if scale != 1.0:
            shape = (max(1, round(height * scale)), max(1, round(width * scale)))
            net_input = np.round(resize(image, shape + (3,), order=1, preserve_range=True, anti_aliasing=scale < 1))
            net_input = net_input.astype(np.uint8)
        maps = predict_maps(self.model, net_input, batch_size=self.batch_size, device=self.device)
        labels = process_np_hv(maps["np"], maps["hv"])
        type_map = None if "tp" not in maps else np.argmax(maps["tp"], axis=-1)
        if scale != 1.0:
            labels = resize(labels, (height, width), order=0, preserve_range=True, anti_aliasing=False).astype(np.int32)
            if type_map is not None:
                type_map = resize(type_map, (height, width), order=0, preserve_range=True, anti_aliasing=False)
        labels = labels.astype(np.uint32)
        if type_map is None:
            return Segmentation(labels)
        types = np.zeros(labels.shape, dtype=np.int32)
        probs = np.zeros(labels.shape, dtype=np.float32)
        votes = instance_types(labels, type_map.astype(np.int64))
        if votes:
            lut_t = np.zeros(int(labels.max()) + 1, dtype=np.int32)
            lut_p = np.zeros(int(labels.max()) + 1, dtype=np.float32)
            for label, (kind, prob) in votes.items():
                lut_t[label], lut_p[label] = kind, prob
            types, probs = lut_t[labels], lut_p[labels]
        return Segmentation(labels, types, probs)


register_backend("hovernet", HoVerNetSegmenter)
