"""A pruned checkpoint's channel shapes: read from its ``.arch.json`` and rebuilt into a module.

Loading weights (``zoo.weights``) needs this and pruning (``u2zoo.pruning``) writes it, so it
lives here, below both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from u2zoo.errors import WeightsError


def shapes_path_for(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name.rsplit(".", 1)[0] + ".arch.json")


def read_shapes(path: str | Path) -> dict[str, Any] | None:
    """The ``.arch.json`` beside a weights file, or None when there is none."""
    sidecar = shapes_path_for(path)
    if not sidecar.is_file():
        return None
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"unreadable pruned-shapes file {sidecar}: {exc}") from None
    if data.get("schema") != "u2zoo.pruned" or "arch" not in data or "shapes" not in data:
        raise WeightsError(f"{sidecar} is not a u2zoo pruned-shapes file")
    return data


def rebuild_pruned(arch: str, shapes: dict[str, dict[str, int]], build: Callable[..., Any], **build_kwargs):
    """``build(arch)`` with every conv/BatchNorm resized to ``shapes`` (weights loaded afterwards)."""
    import torch.nn as nn

    model = build(arch, **build_kwargs)
    modules = dict(model.named_modules())
    for name, shape in shapes.items():
        old = modules.get(name)
        if old is None:
            raise WeightsError(f"pruned shapes name {name!r}, which {arch} does not have")
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(
                shape["in"],
                shape["out"],
                old.kernel_size,
                old.stride,
                old.padding,
                old.dilation,
                shape["groups"],
                old.bias is not None,
            )
        elif isinstance(old, nn.BatchNorm2d):
            new = nn.BatchNorm2d(shape["features"])
        else:
            raise WeightsError(f"pruned shapes for {name!r}: not a conv or BatchNorm in {arch}")
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return model.eval()
