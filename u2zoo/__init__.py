"""u2zoo: a U²-Net model zoo and deployment-conversion toolchain.

``u2zoo.load``, ``segment``, ``cutout``, ``prepare_mask``, ``upscale``, ``convert`` and ``bench``
(``u2zoo.api``) are the Python entry point; they are imported on first use so that
``import u2zoo`` stays cheap.
"""

from typing import TYPE_CHECKING

from u2zoo.version import __version__

if TYPE_CHECKING:  # type checkers see the real signatures; at run time they load on first use
    from u2zoo.api import bench, convert, cutout, load, load_upscaler, prepare_mask, segment, upscale

__all__ = [
    "__version__",
    "bench",
    "convert",
    "cutout",
    "load",
    "load_upscaler",
    "prepare_mask",
    "segment",
    "upscale",
]
_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str):
    if name in _API:
        from u2zoo import api

        return getattr(api, name)
    raise AttributeError(f"module 'u2zoo' has no attribute {name!r}")
