"""Converters and runners, one module per target; see :mod:`u2zoo.converters.base`.

Importing this package imports every sibling module, each of which registers its row in
``TARGETS``: adding a target is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from u2zoo.converters.base import TARGETS, ModelSource, Runner, TargetSpec, register
from u2zoo.errors import ConfigError, did_you_mean

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}{did_you_mean(name, TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "ModelSource", "Runner", "TargetSpec", "get_target", "register"]
