"""Losses over U²-Net's seven maps ``d0..d6``, composable by name and weight.

The maps are already sigmoid probabilities, so BCE is computed on probabilities with a clamp
(``binary_cross_entropy`` on values kept in [eps, 1 - eps]), never ``BCEWithLogits`` on a
sigmoid output, which would apply the sigmoid twice.

- ``bce``: the official deep supervision: BCE of each of the seven maps, summed with weight 1.
- ``wbce``: a weighted multi-scale variant: the fused map counts 1, side maps from the finest
  (d1) to the coarsest (d6) count 1.0, 0.8, 0.6, 0.4, 0.3, 0.2 — coarse maps guide less.
- ``dice``: 1 − Dice of the fused map (soft), robust to small foregrounds.
- ``edge``: L1 between the Sobel gradient magnitudes of the fused map and the target, which
  pushes sharp, well-placed boundaries (hair, fingers).

A spec string ``"bce=1,dice=0.5,edge=0.2"`` composes them (:func:`parse_loss_spec`). Targets
may be soft (a teacher's maps in distillation): every term accepts values in [0, 1].
"""

from __future__ import annotations

from typing import Callable, Sequence

from u2zoo.errors import ConfigError

EPS = 1e-6
SIDE_WEIGHTS_WEIGHTED = (1.0, 1.0, 0.8, 0.6, 0.4, 0.3, 0.2)


def _bce(prob, target):
    import torch.nn.functional as F

    return F.binary_cross_entropy(prob.clamp(EPS, 1 - EPS), target)


def _targets(maps: Sequence, target) -> list:
    """One target per map: a single mask for all, or one map per output (a teacher's d0..d6)."""
    return list(target) if isinstance(target, (list, tuple)) else [target] * len(maps)


def deep_bce(maps: Sequence, target, weights: Sequence[float] = (1.0,) * 7):
    targets = _targets(maps, target)
    return sum(w * _bce(m, t) for w, m, t in zip(weights, maps, targets))


def weighted_bce(maps: Sequence, target):
    return deep_bce(maps, target, SIDE_WEIGHTS_WEIGHTED)


def dice(maps: Sequence, target):
    prob, truth = maps[0], _targets(maps, target)[0]
    dims = tuple(range(1, prob.dim()))
    overlap = (prob * truth).sum(dims)
    return (1 - (2 * overlap + 1.0) / (prob.sum(dims) + truth.sum(dims) + 1.0)).mean()


def sobel_magnitude(x):
    import torch
    import torch.nn.functional as F

    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([kx, kx.t()])[:, None]  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
    return torch.sqrt(grad.pow(2).sum(1, keepdim=True) + EPS)


def edge(maps: Sequence, target):
    return (sobel_magnitude(maps[0]) - sobel_magnitude(_targets(maps, target)[0])).abs().mean()


LOSSES: dict[str, Callable] = {"bce": deep_bce, "wbce": weighted_bce, "dice": dice, "edge": edge}


def parse_loss_spec(spec: str) -> dict[str, float]:
    """'bce=1,dice=0.5' → {'bce': 1.0, 'dice': 0.5}; a bare name weighs 1."""
    terms: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, _, weight = part.partition("=")
        if name not in LOSSES:
            raise ConfigError(f"unknown loss {name!r} (choose from: {', '.join(LOSSES)})")
        try:
            terms[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ConfigError(f"loss weight of {name!r} must be a number, not {weight!r}") from None
        if terms[name] < 0:
            raise ConfigError(f"loss weight of {name!r} must be ≥ 0")
    if not terms:
        raise ConfigError("empty loss spec (e.g. bce=1,dice=0.5,edge=0.2)")
    return terms


class CompositeLoss:
    """Σ weight × term(maps, target); ``last`` keeps each term's value for logging."""

    def __init__(self, spec: str | dict[str, float] = "bce=1"):
        self.terms = parse_loss_spec(spec) if isinstance(spec, str) else dict(spec)
        self.last: dict[str, float] = {}

    def __call__(self, maps: Sequence, target):
        total = 0.0
        for name, weight in self.terms.items():
            value = LOSSES[name](maps, target)
            self.last[name] = float(value.detach())
            total = total + weight * value
        return total
