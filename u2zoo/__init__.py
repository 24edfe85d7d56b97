"""u2zoo: a U²-Net model zoo and deployment-conversion toolchain.

``u2zoo.segment(path)`` and ``u2zoo.load(model)`` (``u2zoo.api``) are the Python entry point;
they are imported on first use so that ``import u2zoo`` stays cheap.
"""

from u2zoo.version import __version__

__all__ = ["__version__", "load", "segment"]


def __getattr__(name: str):
    if name in ("segment", "load"):
        from u2zoo import api

        return getattr(api, name)
    raise AttributeError(f"module 'u2zoo' has no attribute {name!r}")
