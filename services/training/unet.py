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

This file imports only torch, so it can be shipped unchanged as the architecture source of a bioimage.io
model package (``weights.pytorch_state_dict.architecture``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet", "UNetEnsemble"]


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


class UNetEnsemble(nn.Module):
    """``members`` independently trained :class:`UNet` s; the output is their mean *probability* (sigmoid).

    Maps ``(N, in_channels, H, W)`` float32 to ``(N, out_channels, H, W)`` probabilities in ``[0, 1]``.
    This is the module a bioimage.io package describes (state-dict keys ``members.<k>.<unet key>``).

    Examples
    --------
    >>> UNetEnsemble(members=2)(torch.zeros(1, 1, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
    """

    def __init__(self, members: int = 1, in_channels: int = 1, out_channels: int = 2, channels=(16, 32, 64, 128)):
        super().__init__()
        self.members = nn.ModuleList(UNet(in_channels, out_channels, channels) for _ in range(int(members)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.sigmoid(m(x)) for m in self.members]).mean(dim=0)
