"""Initialise a depthwise-separable student from a U2NETP-shaped teacher.

Every teacher unit is ``conv 3×3 → BN → ReLU``. Its BatchNorm is folded into the conv first;
then each input channel ``c`` of the folded kernel ``W[:, c]`` (an ``out × 9`` matrix) is
split by SVD into ``m`` depthwise 3×3 kernels (the top right-singular vectors) and their
pointwise weights (left-singular vectors times singular values). With ``m`` = 9 the result is
exact; with 2–3 it is the best rank-``m`` approximation per input channel. The student's
BatchNorm is set to the identity (eval mode), its side heads and fuse conv are copied.

``refine_pointwise`` then corrects the compounding error with data: layer by layer, in
network order, the pointwise weights are re-solved by least squares so that the student's
pre-activation output, computed from the student's *own* inputs, matches the teacher's on a
few calibration images (a data-aware low-rank fit, no back-propagation).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from u2zoo.errors import ConfigError


def _folded(unit: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a REBNCONV's conv with its BatchNorm (eval statistics) folded in."""
    conv, bn = unit.conv_s1, unit.bn_s1
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return weight * scale[:, None, None, None], (
        bias - bn.running_mean.detach().double()
    ) * scale + bn.bias.detach().double()


def _identity_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # (x − 0) / sqrt(1 − eps + eps) = x exactly


def factor_unit(teacher_unit: nn.Module, student_unit: nn.Module) -> float:
    """Copy one folded 3×3 conv into a depthwise(m) + pointwise unit; returns the relative
    Frobenius error of the factorised kernel."""
    weight, bias = _folded(teacher_unit)
    out_ch, in_ch = weight.shape[:2]
    dw, pw = student_unit.conv_dw, student_unit.conv_pw
    m = dw.out_channels // dw.in_channels
    if dw.in_channels != in_ch or pw.out_channels != out_ch or dw.groups != in_ch:
        raise ConfigError(
            f"student unit ({dw.in_channels}→{pw.out_channels}) does not match the teacher's ({in_ch}→{out_ch})"
        )
    dw_weight = torch.zeros(in_ch * m, 1, 3, 3, dtype=torch.float64)
    pw_weight = torch.zeros(out_ch, in_ch * m, dtype=torch.float64)
    approx = torch.zeros_like(weight)
    for c in range(in_ch):
        matrix = weight[:, c].reshape(out_ch, 9)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        k = min(m, s.numel())
        dw_weight[c * m : c * m + k, 0] = vh[:k].reshape(k, 3, 3)
        pw_weight[:, c * m : c * m + k] = u[:, :k] * s[:k]
        approx[:, c] = (pw_weight[:, c * m : (c + 1) * m] @ dw_weight[c * m : (c + 1) * m, 0].reshape(m, 9)).reshape(
            out_ch, 3, 3
        )
    with torch.no_grad():
        dw.weight.copy_(dw_weight.float())
        pw.weight.copy_(pw_weight.float()[:, :, None, None])
        pw.bias.copy_(bias.float())
    _identity_bn(student_unit.bn_s1)
    return float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight).clamp_min(1e-12))


def paired_units(teacher: nn.Module, student: nn.Module) -> Iterable[tuple[str, nn.Module, nn.Module]]:
    """(name, teacher unit, student unit) of every conv unit, in the order the forward pass runs them."""
    teacher_units = dict((n, m) for n, m in teacher.named_modules() if hasattr(m, "conv_s1"))
    for name, unit in student.named_modules():
        if hasattr(unit, "conv_dw") and hasattr(unit, "conv_pw"):
            if name not in teacher_units:
                raise ConfigError(f"student unit {name} has no teacher counterpart")
            yield name, teacher_units[name], unit


def factorize_from_teacher(teacher: nn.Module, student: nn.Module) -> dict[str, float]:
    """Initialise ``student`` (a DSMREBNCONV U²-Net with the teacher's widths) from ``teacher``.

    Returns the relative kernel error of each unit.
    """
    errors = {name: factor_unit(t, s) for name, t, s in paired_units(teacher, student)}
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for name, param in student.state_dict().items():
            if name.startswith(("side", "outconv")):
                param.copy_(teacher_state[name])
    return errors


def refine_pointwise(
    teacher: nn.Module, student: nn.Module, images: torch.Tensor, ridge: float = 1e-3, max_pixels: int = 30_000
) -> dict[str, float]:
    """Re-fit each student pointwise conv by least squares against the teacher unit's folded
    output (pre-activation), feeding the student its own activations; returns the relative
    error of every unit after the fit.

    One teacher pass records every unit's input; then one student pass fits each unit from a
    forward pre-hook, just before the unit runs, so later units see the corrected outputs.
    """
    teacher_units = {n: m for n, m in teacher.named_modules() if hasattr(m, "conv_s1")}
    student_units = [(n, m) for n, m in student.named_modules() if hasattr(m, "conv_dw")]
    student.eval()
    teacher.eval()
    generator = torch.Generator().manual_seed(0)
    teacher_inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, unit in teacher_units.items():

        def record(_m, inputs, name=name):
            teacher_inputs[name] = inputs[0].detach()

        handles.append(unit.register_forward_pre_hook(record))
    with torch.no_grad():
        teacher(images)
    for h in handles:
        h.remove()
    errors: dict[str, float] = {}

    def fit(name: str, unit: nn.Module, student_input: torch.Tensor) -> None:
        weight, bias = _folded(teacher_units[name])
        target = nn.functional.conv2d(
            teacher_inputs.pop(name),
            weight.float(),
            bias.float(),
            padding=unit.conv_dw.padding,
            dilation=unit.conv_dw.dilation,
        )
        features = unit.conv_dw(student_input)
        f = features.shape[1]
        x = features.permute(0, 2, 3, 1).reshape(-1, f)
        y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1])
        if x.shape[0] > max_pixels:
            pick = torch.randperm(x.shape[0], generator=generator)[:max_pixels]
            x, y = x[pick], y[pick]
        x, y = x.double(), y.double()
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        gram = xa.T @ xa
        gram += ridge * torch.diag(gram).mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        solution = torch.linalg.solve(gram, xa.T @ y)  # (f + 1, out)
        unit.conv_pw.weight.copy_(solution[:f].T.float()[:, :, None, None])
        unit.conv_pw.bias.copy_(solution[f].float())
        errors[name] = float(torch.linalg.norm(xa @ solution - y) / torch.linalg.norm(y).clamp_min(1e-12))

    handles = []
    for name, unit in student_units:

        def refit(module, inputs, name=name):
            fit(name, module, inputs[0].detach())

        handles.append(unit.register_forward_pre_hook(refit))
    try:
        with torch.no_grad():
            student(images)
    finally:
        for h in handles:
            h.remove()
    return errors
