"""Structured channel pruning with torch-pruning, and rebuilding a pruned model from its files.

torch-pruning's dependency graph follows U²-Net's couplings (the residual ``hxin + decoder``
of every RSU block, the decoder concatenations, the side heads reading each decoder stage),
so removing a channel removes it everywhere it flows. The side-output heads and the fuse
conv are never pruned (their single output channel is the map); their *input* channels
shrink with the stages that feed them.

A pruned checkpoint is two files: the state dict (``…pth``) and beside it
``….arch.json`` with the architecture name and every pruned conv/BatchNorm's channel
numbers, so ``u2zoo.zoo.pruned_shapes.rebuild_pruned`` (and therefore every ``--weights`` in the CLI) rebuilds
the same module from name + shapes + state dict, and it converts to every target.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from u2zoo.artifact import atomic_write_text
from u2zoo.errors import BackendUnavailable, ConfigError
from u2zoo.zoo.pruned_shapes import shapes_path_for

IMPORTANCES = ("magnitude", "taylor")
KEPT_WHOLE = ("side1", "side2", "side3", "side4", "side5", "side6", "outconv")


def check_ratio(ratio: float) -> None:
    if not 0 < ratio <= 0.9:
        raise ConfigError(f"pruning ratio must be in (0, 0.9], not {ratio}")


def prune_model(
    model,
    ratio: float,
    *,
    importance: str = "magnitude",
    round_to: int | None = None,
    size: tuple[int, int] = (320, 320),
    calib_batches: list | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place by ``ratio`` of its channels; returns a record of what changed.

    ``taylor`` importance needs ``calib_batches`` (preprocessed image tensors): the loss whose
    gradients rank channels is the BCE of every map against the unpruned model's own fused map
    binarised at 0.5, so no labels are needed.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        raise BackendUnavailable("pruning needs torch-pruning", extra="prune") from None
    import torch

    check_ratio(ratio)
    if importance not in IMPORTANCES:
        raise ConfigError(f"unknown importance {importance!r} (choose from: {', '.join(IMPORTANCES)})")
    if round_to is not None and round_to < 1:
        raise ConfigError("--round-to must be ≥ 1")
    if importance == "taylor" and not calib_batches:
        raise ConfigError("taylor importance needs images (--images DIR) to compute gradients on")
    model.eval()
    was_deploy, model.deploy = model.deploy, False
    before = sum(p.numel() for p in model.parameters())
    example = torch.zeros(1, 3, *size)
    scorer = tp.importance.MagnitudeImportance(p=2) if importance == "magnitude" else tp.importance.TaylorImportance()
    ignored = [getattr(model, name) for name in KEPT_WHOLE if hasattr(model, name)]
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=scorer,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
        output_transform=lambda outputs: sum(o.sum() for o in outputs),
    )
    if importance == "taylor":
        _accumulate_taylor_gradients(model, calib_batches)
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.deploy = was_deploy
    after = sum(p.numel() for p in model.parameters())
    return {
        "ratio": ratio,
        "importance": importance,
        "round_to": round_to,
        "params_before": before,
        "params_after": after,
        "kept_whole": [n for n in KEPT_WHOLE if hasattr(model, n)],
    }


def _accumulate_taylor_gradients(model, batches: list) -> None:
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    for batch in batches:
        with torch.no_grad():
            pseudo = (model(batch)[0] > 0.5).float()
        maps = model(batch)
        sum(F.binary_cross_entropy(m.clamp(1e-6, 1 - 1e-6), pseudo) for m in maps).backward()


def channel_shapes(model) -> dict[str, dict[str, int]]:
    """Every conv's (in, out, groups) and BatchNorm's features, by module path."""
    import torch.nn as nn

    shapes: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            shapes[name] = {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
        elif isinstance(module, nn.BatchNorm2d):
            shapes[name] = {"features": module.num_features}
    return shapes


def save_pruned(model, arch: str, path: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """Write the state dict and its ``.arch.json`` (temp file, then rename, for both)."""
    import os

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    sidecar = shapes_path_for(path)
    atomic_write_text(
        sidecar,
        json.dumps(
            {
                "schema": "u2zoo.pruned",
                "schema_version": 1,
                "arch": arch,
                "pruning": record,
                "shapes": channel_shapes(model),
            },
            indent=1,
        )
        + "\n",
    )
    return path, sidecar


def map_mae(model, reference, inputs) -> float:
    """Mean absolute difference between two models' fused maps on preprocessed ``inputs``."""
    import numpy as np
    import torch

    model.eval(), reference.eval()
    deploy = (model.deploy, reference.deploy)
    model.deploy = reference.deploy = True
    with torch.no_grad():
        errors = [
            float((model(torch.from_numpy(x[None])) - reference(torch.from_numpy(x[None]))).abs().mean())
            for x in inputs
        ]
    model.deploy, reference.deploy = deploy
    return float(np.mean(errors))


def prune_and_recover(
    name: str,
    weights: str | None,
    ratio: float,
    out: Path,
    *,
    importance: str = "magnitude",
    round_to: int | None = None,
    images: str | None = None,
    train_config=None,
    size: tuple[int, int] | None = None,
    random_weights: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Prune, measure the damage against the unpruned model, optionally recover by distillation
    from it (``train_config`` with epochs > 0 and ``images``), and save weights + shapes."""
    import copy

    import torch

    from u2zoo.zoo.weights import load_model

    check_ratio(ratio)
    if train_config is not None and not images:
        raise ConfigError("recovery fine-tuning needs --images DIR (distilled from the unpruned model)")
    model, info, contract = load_model(name, weights, random_weights=random_weights, deploy=False, progress=progress)
    unpruned = copy.deepcopy(model).eval()
    size = size or contract.pre.size
    probe = plain = None
    if images:
        from u2zoo.training.data import FolderDataset

        plain = FolderDataset(images, contract, size=size)  # read once: probe, ranking and validation
        probe = [plain[i]["image"] for i in range(min(8, len(plain)))]
    batches = [torch.from_numpy(x[None]) for x in probe] if probe and importance == "taylor" else None
    record = prune_model(model, ratio, importance=importance, round_to=round_to, size=size, calib_batches=batches)
    if probe:
        record["mae_vs_unpruned"] = map_mae(model, unpruned, probe)
    if train_config is not None:
        from u2zoo.training.data import Augment, FolderDataset
        from u2zoo.training.distill import teacher_targets
        from u2zoo.training.trainer import fit

        train_set = FolderDataset(images, contract, size=size, augment=Augment(), seed=train_config.seed)
        history = fit(model, info.arch, train_set, plain, train_config, teacher_targets(unpruned), progress=progress)
        model.load_state_dict(torch.load(Path(train_config.out) / "best.pth", weights_only=True))
        record["recovery"] = {"epochs": len(history), "loss": train_config.loss, "images": str(images)}
        record["mae_vs_unpruned_after_recovery"] = map_mae(model, unpruned, probe)
    record["source_weights"] = info.to_dict()
    path = out / f"{info.arch}_pruned{int(round(ratio * 100))}.pth"
    save_pruned(model, info.arch, path, record)
    return record | {"weights": str(path), "shapes": str(shapes_path_for(path))}
