"""Converters and runners, one module per target; see :mod:`u2zoo.converters.base`.

Importing this package imports every sibling module, each of which registers its row in
``TARGETS``: adding a target is adding one file. A target shipped outside u2zoo is a module
named under the ``u2zoo.targets`` entry-point group; it is imported here the same way, and one
that fails to import is reported by ``u2zoo doctor`` (``PLUGIN_FAILURES``), not fatal.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

from u2zoo.converters.base import TARGETS, ModelSource, Runner, TargetSpec, register
from u2zoo.errors import ConfigError, did_you_mean, tool_failure

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "options"):
        importlib.import_module(f"{__name__}.{_info.name}")

PLUGIN_FAILURES: dict[str, str] = {}  # entry-point name → why its module did not load
for _entry in importlib.metadata.entry_points(group="u2zoo.targets"):
    try:
        _entry.load()  # the module registers its target on import
    except Exception as _exc:  # noqa: BLE001 - a broken plugin must not break u2zoo
        PLUGIN_FAILURES[_entry.name] = f"{_entry.value}: {tool_failure(_exc)}"


def get_target(name: str) -> TargetSpec:
    if name not in TARGETS:
        raise ConfigError(f"unknown target {name!r}{did_you_mean(name, TARGETS)}")
    return TARGETS[name]


__all__ = ["PLUGIN_FAILURES", "TARGETS", "ModelSource", "Runner", "TargetSpec", "get_target", "register"]
