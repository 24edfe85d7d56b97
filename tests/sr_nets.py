"""Small super-resolution networks in the official key layouts, for the ``--upscale`` tests.

``RRDBNet`` has the parameter names of BasicSR's ``rrdbnet_arch.py`` (Real-ESRGAN's
``RealESRGAN_x4plus.pth`` stores them under ``params_ema``) and ``SRVGGNetCompact`` those of
Real-ESRGAN's ``srvgg_arch.py`` (``realesr-general-x4v3.pth``, under ``params``). They are
written here from the published architectures, independently of spandrel, so a test can check
that spandrel recognises the files and that its model computes what these do.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualDenseBlock(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_grow_ch, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat + num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv3 = nn.Conv2d(num_feat + 2 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv4 = nn.Conv2d(num_feat + 3 * num_grow_ch, num_grow_ch, 3, 1, 1)
        self.conv5 = nn.Conv2d(num_feat + 4 * num_grow_ch, num_feat, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.lrelu(self.conv1(x))
        x2 = self.lrelu(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.lrelu(self.conv3(torch.cat((x, x1, x2), 1)))
        x4 = self.lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)))
        x5 = self.conv5(torch.cat((x, x1, x2, x3, x4), 1))
        return x5 * 0.2 + x


class RRDB(nn.Module):
    def __init__(self, num_feat: int, num_grow_ch: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN's generator at ×4 (BasicSR names: conv_first, body.N.rdbK.convM, conv_body,
    conv_up1, conv_up2, conv_hr, conv_last)."""

    def __init__(self, num_feat: int = 64, num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(3, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[RRDB(num_feat, num_grow_ch) for _ in range(num_block)])
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, 3, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style net: convs with PReLU at low resolution, a pixel
    shuffle, plus the nearest-upsampled input."""

    def __init__(self, num_feat: int = 64, num_conv: int = 16, upscale: int = 4):
        super().__init__()
        self.upscale = upscale
        self.body = nn.ModuleList([nn.Conv2d(3, num_feat, 3, 1, 1), nn.PReLU(num_parameters=num_feat)])
        for _ in range(num_conv):
            self.body.append(nn.Conv2d(num_feat, num_feat, 3, 1, 1))
            self.body.append(nn.PReLU(num_parameters=num_feat))
        self.body.append(nn.Conv2d(num_feat, 3 * upscale * upscale, 3, 1, 1))
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.upscale, mode="nearest")


def tame_output(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights, with the last conv scaled down so the output lies inside (0, 1) and
    varies: a clamped, flat output would make tiled and untiled agree trivially."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_uniform_(module.weight, a=0.2)
            module.weight.data *= 0.5
            nn.init.uniform_(module.bias, -0.05, 0.05)
    if isinstance(net, RRDBNet):  # its features are small: a 0.5 bias and a moderate last layer
        net.conv_last.weight.data *= 2.0
        net.conv_last.bias.data.fill_(0.5)
    else:  # its output adds the upsampled input: the body only perturbs it
        net.body[-1].weight.data *= 0.05
    return net.eval()


def save_official(net: nn.Module, path: Path) -> Path:
    """As the official releases store them: RRDBNet under ``params_ema``, SRVGGNetCompact under ``params``."""
    key = "params_ema" if isinstance(net, RRDBNet) else "params"
    torch.save({key: net.state_dict()}, path)
    return path
