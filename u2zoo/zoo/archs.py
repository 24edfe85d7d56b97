"""U²-Net architectures: U2NET (full), U2NETP, U2NET-lite and a tiny test network.

All four share one topology (six encoder stages, five decoder stages, six side outputs
fused by a 1×1 conv); they differ only in per-stage channel widths and in the conv unit.
Key names equal the official ones for U2NET and U2NETP.

Outputs: in *training mode* (``deploy=False``, the official behaviour) ``forward`` returns
the seven sigmoid maps ``(d0, d1, …, d6)``; in *deploy mode* it returns only the fused
map ``d0`` of shape (N, 1, H, W). Exported artifacts always use deploy mode, so users never
meet the "7 outputs, which one?" problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from u2zoo.errors import ConfigError, did_you_mean
from u2zoo.zoo.layers import DSREBNCONV, REBNCONV, RSU4, RSU4F, RSU5, RSU6, RSU7, ConvFactory, upsample_like

# (in, mid, out) channels per stage, in the order
# stage1..stage6, stage5d, stage4d, stage3d, stage2d, stage1d.
StageWidths = tuple[tuple[int, int, int], ...]

U2NET_WIDTHS: StageWidths = (
    (3, 32, 64),
    (64, 32, 128),
    (128, 64, 256),
    (256, 128, 512),
    (512, 256, 512),
    (512, 256, 512),
    (1024, 256, 512),
    (1024, 128, 256),
    (512, 64, 128),
    (256, 32, 64),
    (128, 16, 64),
)
U2NETP_WIDTHS: StageWidths = (
    (3, 16, 64),
    (64, 16, 64),
    (64, 16, 64),
    (64, 16, 64),
    (64, 16, 64),
    (64, 16, 64),
    (128, 16, 64),
    (128, 16, 64),
    (128, 16, 64),
    (128, 16, 64),
    (128, 16, 64),
)
# U2NET-lite: depthwise-separable convs, parameters where compute is cheap. Run time is set by
# the full- and half-resolution stages (stage1/2, stage1d/2d), parameters by the 1/8–1/32
# stages. So the deep stages keep U2NET's widths (stage5d narrowed 512→448) and the shallow
# ones are narrower than U2NETP's. Measured on a 2-core Xeon, OpenVINO f32 at 320×320:
# 71 ms vs U2NETP's 152 ms; U2NET's widths with depthwise-separable convs gave 122 ms.
# 4,722,568 parameters, 3.9 GMACs (U2NETP: 1.13M, 19.8 GMACs).
U2NET_LITE_WIDTHS: StageWidths = (
    (3, 8, 16),
    (16, 16, 32),
    (32, 32, 128),
    (128, 128, 512),
    (512, 256, 512),
    (512, 256, 512),
    (1024, 256, 448),
    (960, 128, 256),
    (384, 64, 128),
    (160, 32, 64),
    (80, 16, 16),
)
# A few thousand parameters: for fast unit tests of every code path, not for accuracy.
TINY_WIDTHS: StageWidths = (
    (3, 4, 8),
    (8, 4, 8),
    (8, 4, 8),
    (8, 4, 8),
    (8, 4, 8),
    (8, 4, 8),
    (16, 4, 8),
    (16, 4, 8),
    (16, 4, 8),
    (16, 4, 8),
    (16, 4, 8),
)

_ENCODER_BLOCKS = (RSU7, RSU6, RSU5, RSU4, RSU4F, RSU4F)
_DECODER_BLOCKS = (RSU4F, RSU4, RSU5, RSU6, RSU7)


class U2NetBase(nn.Module):
    """The shared U²-Net topology; subclasses only choose widths and the conv unit."""

    def __init__(
        self, widths: StageWidths, in_ch: int = 3, out_ch: int = 1, conv: ConvFactory = REBNCONV, deploy: bool = False
    ):
        super().__init__()
        if widths[0][0] != in_ch:
            widths = ((in_ch, *widths[0][1:]), *widths[1:])
        self.deploy = deploy
        for i, (block, (cin, mid, cout)) in enumerate(zip(_ENCODER_BLOCKS, widths[:6]), start=1):
            setattr(self, f"stage{i}", block(cin, mid, cout, conv=conv))
            if i < 6:
                setattr(self, f"pool{i}{i + 1}", nn.MaxPool2d(2, stride=2, ceil_mode=True))
        for i, block, (cin, mid, cout) in zip(range(5, 0, -1), _DECODER_BLOCKS, widths[6:]):
            setattr(self, f"stage{i}d", block(cin, mid, cout, conv=conv))
        side_channels = [widths[10][2], widths[9][2], widths[8][2], widths[7][2], widths[6][2], widths[5][2]]
        for i, ch in enumerate(side_channels, start=1):
            setattr(self, f"side{i}", nn.Conv2d(ch, out_ch, 3, padding=1))
        self.outconv = nn.Conv2d(6 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        enc = []
        hx = x
        for i in range(1, 7):
            hx = getattr(self, f"stage{i}")(hx)
            enc.append(hx)
            if i < 6:
                hx = getattr(self, f"pool{i}{i + 1}")(hx)
        # decoder: hx starts as stage6's output
        dec = {6: hx}
        for i in range(5, 0, -1):
            up = upsample_like(hx, enc[i - 1])
            hx = getattr(self, f"stage{i}d")(torch.cat((up, enc[i - 1]), 1))
            dec[i] = hx
        d1 = self.side1(dec[1])
        sides = [d1] + [upsample_like(getattr(self, f"side{i}")(dec[i]), d1) for i in range(2, 7)]
        d0 = self.outconv(torch.cat(sides, 1))
        if self.deploy:
            return torch.sigmoid(d0)
        return tuple(torch.sigmoid(d) for d in [d0, *sides])


class U2NET(U2NetBase):
    """Full U²-Net (≈44.0M parameters), official layout."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, deploy: bool = False):
        super().__init__(U2NET_WIDTHS, in_ch, out_ch, REBNCONV, deploy)


class U2NETP(U2NetBase):
    """U²-Net small (≈1.13M parameters), official layout."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, deploy: bool = False):
        super().__init__(U2NETP_WIDTHS, in_ch, out_ch, REBNCONV, deploy)


class U2NETLite(U2NetBase):
    """U²-Net with depthwise-separable convs, narrow shallow stages and wide deep ones (≈4.7M parameters)."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, deploy: bool = False):
        super().__init__(U2NET_LITE_WIDTHS, in_ch, out_ch, DSREBNCONV, deploy)


class U2NETTiny(U2NetBase):
    """Same topology, a few thousand parameters: the fast test architecture."""

    def __init__(self, in_ch: int = 3, out_ch: int = 1, deploy: bool = False):
        super().__init__(TINY_WIDTHS, in_ch, out_ch, REBNCONV, deploy)


@dataclass(frozen=True)
class ArchSpec:
    name: str
    factory: Callable[..., U2NetBase]
    description: str


ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("u2net", U2NET, "full U²-Net, official layout"),
        ArchSpec("u2netp", U2NETP, "U²-Net small, official layout"),
        ArchSpec("u2net-lite", U2NETLite, "depthwise-separable U²-Net"),
        ArchSpec("u2net-tiny", U2NETTiny, "tiny test network (same topology)"),
    )
}


def build_arch(name: str, deploy: bool = False, **kwargs) -> U2NetBase:
    """Instantiate an architecture by name with random weights, in eval mode."""
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture {name!r}{did_you_mean(name, ARCHS)}")
    return ARCHS[name].factory(deploy=deploy, **kwargs).eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, height: int = 320, width: int = 320) -> int:
    """Multiply-accumulates of every conv for one image, counted with forward hooks.

    Convs carry >99% of U²-Net's arithmetic; BN/ReLU/pooling/resizing are not counted.
    """
    total = 0

    def hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() // output.shape[0] * (module.in_channels // module.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width))
    finally:
        for h in handles:
            h.remove()
    return total
