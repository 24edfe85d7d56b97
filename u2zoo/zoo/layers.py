"""Building blocks of U²-Net: REBNCONV and the ReSidual U-blocks RSU7…RSU4F.

Attribute names follow the official implementation (xuebinqin/U-2-Net, ``model/u2net.py``)
exactly, so the official checkpoints load with ``strict=True``. The only deliberate
difference is upsampling: ``F.interpolate(size=…, mode="bilinear", align_corners=False)``
instead of the deprecated ``F.upsample`` (same numbers, no warning).

Every block takes a ``conv`` factory so U2NET-lite can swap each 3×3 conv for a depthwise
separable one without a second copy of the topology.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def upsample_like(src: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``src`` to ``target``'s spatial size (align_corners=False)."""
    return F.interpolate(src, size=target.shape[2:], mode="bilinear", align_corners=False)


class REBNCONV(nn.Module):
    """3×3 (dilated) conv → BatchNorm → ReLU; the official unit, key names ``conv_s1/bn_s1``."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, dirate: int = 1):
        super().__init__()
        self.conv_s1 = nn.Conv2d(in_ch, out_ch, 3, padding=dirate, dilation=dirate)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_s1(x)))


class DSREBNCONV(nn.Module):
    """U2NET-lite unit: depthwise 3×3 (same dilation) → pointwise 1×1 → BatchNorm → ReLU."""

    def __init__(self, in_ch: int = 3, out_ch: int = 3, dirate: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, padding=dirate, dilation=dirate, groups=in_ch, bias=False)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_pw(self.conv_dw(x))))


ConvFactory = Callable[[int, int, int], nn.Module]


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(2, stride=2, ceil_mode=True)


class RSU(nn.Module):
    """ReSidual U-block of height ``depth`` (RSU7 = depth 7 … RSU4 = depth 4).

    Encoder: ``rebnconvin`` then ``rebnconv1..rebnconv{depth-1}`` with max-pooling between
    them, a dilated bottom conv ``rebnconv{depth}``; decoder ``rebnconv{depth-1}d..rebnconv1d``
    on concatenated skips, upsampling back; output is ``decoder + rebnconvin`` (the residual).
    """

    def __init__(self, depth: int, in_ch: int, mid_ch: int, out_ch: int, conv: ConvFactory = REBNCONV):
        super().__init__()
        self.depth = depth
        self.rebnconvin = conv(in_ch, out_ch, 1)
        self.rebnconv1 = conv(out_ch, mid_ch, 1)
        for i in range(1, depth - 1):
            setattr(self, f"pool{i}", _pool())
            setattr(self, f"rebnconv{i + 1}", conv(mid_ch, mid_ch, 1))
        setattr(self, f"rebnconv{depth}", conv(mid_ch, mid_ch, 2))
        for i in range(depth - 1, 1, -1):
            setattr(self, f"rebnconv{i}d", conv(mid_ch * 2, mid_ch, 1))
        self.rebnconv1d = conv(mid_ch * 2, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        encoded = [self.rebnconv1(hxin)]
        for i in range(1, self.depth - 1):
            pooled = getattr(self, f"pool{i}")(encoded[-1])
            encoded.append(getattr(self, f"rebnconv{i + 1}")(pooled))
        hx = getattr(self, f"rebnconv{self.depth}")(encoded[-1])
        for i in range(self.depth - 1, 0, -1):
            hx = getattr(self, f"rebnconv{i}d")(torch.cat((hx, encoded[i - 1]), 1))
            if i > 1:
                hx = upsample_like(hx, encoded[i - 2])
        return hx + hxin


class RSU7(RSU):
    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3, conv: ConvFactory = REBNCONV):
        super().__init__(7, in_ch, mid_ch, out_ch, conv)


class RSU6(RSU):
    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3, conv: ConvFactory = REBNCONV):
        super().__init__(6, in_ch, mid_ch, out_ch, conv)


class RSU5(RSU):
    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3, conv: ConvFactory = REBNCONV):
        super().__init__(5, in_ch, mid_ch, out_ch, conv)


class RSU4(RSU):
    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3, conv: ConvFactory = REBNCONV):
        super().__init__(4, in_ch, mid_ch, out_ch, conv)


class RSU4F(nn.Module):
    """RSU4 with dilations 1, 2, 4, 8 instead of pooling: resolution never changes."""

    def __init__(self, in_ch: int = 3, mid_ch: int = 12, out_ch: int = 3, conv: ConvFactory = REBNCONV):
        super().__init__()
        self.rebnconvin = conv(in_ch, out_ch, 1)
        self.rebnconv1 = conv(out_ch, mid_ch, 1)
        self.rebnconv2 = conv(mid_ch, mid_ch, 2)
        self.rebnconv3 = conv(mid_ch, mid_ch, 4)
        self.rebnconv4 = conv(mid_ch, mid_ch, 8)
        self.rebnconv3d = conv(mid_ch * 2, mid_ch, 4)
        self.rebnconv2d = conv(mid_ch * 2, mid_ch, 2)
        self.rebnconv1d = conv(mid_ch * 2, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hxin = self.rebnconvin(x)
        hx1 = self.rebnconv1(hxin)
        hx2 = self.rebnconv2(hx1)
        hx3 = self.rebnconv3(hx2)
        hx4 = self.rebnconv4(hx3)
        hx3d = self.rebnconv3d(torch.cat((hx4, hx3), 1))
        hx2d = self.rebnconv2d(torch.cat((hx3d, hx2), 1))
        hx1d = self.rebnconv1d(torch.cat((hx2d, hx1), 1))
        return hx1d + hxin


class DSMREBNCONV(nn.Module):
    """U2NET-lite v2 unit: depthwise 3×3 with channel multiplier ``m`` (each input channel gets
    ``m`` kernels, same dilation) → pointwise 1×1 → BatchNorm → ReLU.

    With ``m`` = 9 it can represent any 3×3 conv exactly (per input channel, a rank-9
    factorisation of its (out, 3×3) kernel slice); with ``m`` = 2–3 it is the per-input-channel
    truncated SVD of one, which is how the v2 layout is initialised from U2NETP.
    """

    def __init__(self, in_ch: int = 3, out_ch: int = 3, dirate: int = 1, multiplier: int = 3):
        super().__init__()
        self.conv_dw = nn.Conv2d(
            in_ch, in_ch * multiplier, 3, padding=dirate, dilation=dirate, groups=in_ch, bias=False
        )
        self.conv_pw = nn.Conv2d(in_ch * multiplier, out_ch, 1)
        self.bn_s1 = nn.BatchNorm2d(out_ch)
        self.relu_s1 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu_s1(self.bn_s1(self.conv_pw(self.conv_dw(x))))


def ds_multiplier_conv(multiplier: int) -> ConvFactory:
    """A conv factory of :class:`DSMREBNCONV` with a fixed channel multiplier."""

    def factory(in_ch: int, out_ch: int, dirate: int) -> nn.Module:
        return DSMREBNCONV(in_ch, out_ch, dirate, multiplier)

    return factory


def freeze_batchnorm(model) -> None:
    """BatchNorm layers use and keep their running statistics while the rest trains: with small
    batches, or BN-folded checkpoints whose BN layers are identities, batch statistics would
    otherwise replace what the weights were trained with (training, QAT)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
