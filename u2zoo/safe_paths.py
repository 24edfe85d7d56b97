"""Names read from untrusted files (a manifest's ``files``, an ONNX model's external data) must
name files inside their own folder: an absolute path, ``..`` or a symlink pointing out would
let a tampered artifact make u2zoo read and trust any file on the machine."""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from u2zoo.errors import ArtifactError, U2ZooError


def confined(root: str | Path, relative: object, error: type[U2ZooError] = ArtifactError) -> Path:
    """``root / relative``, or ``error`` unless it stays strictly inside ``root`` once every
    symlink is resolved (the path itself need not exist)."""
    root = Path(root)
    text = relative if isinstance(relative, str) else ""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    if not parts or ".." in parts or PurePosixPath(text).is_absolute() or PureWindowsPath(text).anchor or "\0" in text:
        raise error(f"{relative!r} is not inside {root}: only relative names without '..' are allowed")
    path = root / text
    real_root, real = root.resolve(), path.resolve()
    if real_root not in real.parents:
        raise error(f"{relative!r} is not inside {root}: it resolves to {real}")
    return path
