"""Distillation: a student learns a teacher's seven soft maps on unlabeled images.

The teacher (e.g. the real U2NETP) runs in eval mode without gradients on exactly the
augmented batch the student sees; each student map is trained against the teacher's map of
the same depth (BCE on probabilities), plus the edge loss on the fused map by default. The
teacher and the student must share one pre/post-processing contract: the student's
artifacts will be fed what the contract produces, and the teacher's maps only mean something
for inputs prepared its way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from u2zoo.errors import ConfigError
from u2zoo.training.data import Augment, FolderDataset, check_disjoint
from u2zoo.training.trainer import TrainConfig, fit

DEFAULT_DISTILL_LOSS = "bce=1,edge=0.5"


def teacher_targets(teacher) -> Any:
    """batch → the teacher's seven maps for its images (no gradients, eval mode)."""
    import torch

    teacher.eval()
    teacher.deploy = False

    def target(batch: dict[str, Any]) -> list:
        with torch.no_grad():
            return [m.float() for m in teacher(batch["image"])]

    return target


def distill(
    teacher_name: str,
    student_arch: str,
    images: str | Path,
    config: TrainConfig,
    *,
    teacher_weights: str | None = None,
    val_images: str | Path | None = None,
    size: tuple[int, int] | None = None,
    student_weights: str | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``student_arch`` on the teacher's maps of ``images``; returns the history."""
    import torch

    from u2zoo.zoo.archs import build_arch
    from u2zoo.zoo.weights import load_model, resolve_model_name

    teacher, teacher_info, contract = load_model(teacher_name, teacher_weights, deploy=False, progress=progress)
    student_contract = _contract_of(student_arch)
    if student_contract.to_dict() != contract.to_dict():
        raise ConfigError(
            f"teacher {teacher_name!r} and student {student_arch!r} have different pre/post-processing "
            "contracts; distillation needs the same inputs and outputs"
        )
    arch, _ = resolve_model_name(student_arch)
    if student_weights:  # verified, weights_only loading with one-line errors, like every checkpoint
        student, _, _ = load_model(student_arch, student_weights, deploy=False, progress=progress)
    else:
        student = build_arch(arch)
    device = "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    teacher.to(device)
    train_set = FolderDataset(images, contract, size=size, augment=Augment(), seed=config.seed)
    val_set = FolderDataset(val_images, contract, size=size) if val_images else None
    if val_set is not None:
        check_disjoint(train_set.paths, val_set.paths)
    extra = {"teacher": {"name": teacher_name, "weights": teacher_info.to_dict()}, "contract": contract.to_dict()}
    return fit(
        student, arch, train_set, val_set, config, teacher_targets(teacher), progress=progress, extra_state=extra
    )


def _contract_of(name: str):
    from u2zoo.zoo.contract import SALIENCY
    from u2zoo.zoo.weights import resolve_model_name

    _, entry = resolve_model_name(name)
    return entry.contract if entry else SALIENCY
