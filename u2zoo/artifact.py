"""Artifacts and their JSON manifests (``<stem>.u2zoo.json`` beside the binary).

The manifest says exactly what an artifact is: its files with sha256 and size, the parent
it was made from (the provenance chain), the weights and their hash, the pre/post contract,
I/O names/shapes/dtypes, options, tool versions, host, and the parity measured at
conversion. It is never written into the binary. Opening an artifact re-hashes its files
and refuses any that do not match.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from u2zoo.errors import ArtifactError
from u2zoo.zoo.contract import Contract
from u2zoo.zoo.weights import file_digest

SCHEMA = "u2zoo.artifact"
SCHEMA_VERSION = 1


def manifest_path_for(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name.split(".")[0] + ".u2zoo.json")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder, then rename: no half-written files."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file in the same folder, then rename: no half-written files."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tool_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None where absent), without importing them."""
    versions: dict[str, str | None] = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def host_info() -> dict[str, Any]:
    """CPU model, cores, OS and Python: recorded with every artifact and result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = driver = None
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=10, check=True)
            gpu, driver = [part.strip() for part in query.stdout.splitlines()[0].split(",")[:2]]
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            pass
    return {"hostname": platform.node(), "os": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "gpu": gpu,
            "driver": driver, "python": platform.python_version()}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str for dynamic dims ("batch", "height", "width")
    dtype: str
    # Integer I/O (e.g. a full-INT8 TFLite model): real = (q - zero_point) * scale
    quantization: tuple[float, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.quantization:
            data["quantization"] = {"scale": self.quantization[0], "zero_point": self.quantization[1]}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        quant = data.get("quantization")
        return cls(data["name"], tuple(data["shape"]), data["dtype"],
                   (quant["scale"], quant["zero_point"]) if quant else None)


@dataclass
class Artifact:
    """A converted file (or folder) plus its manifest."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")

    @property
    def contract(self) -> Contract:
        return Contract.from_dict(self.manifest["contract"])

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(d) for d in self.manifest["io"]["inputs"]]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_dict(d) for d in self.manifest["io"]["outputs"]]

    @property
    def sha256(self) -> str:
        return self.manifest["files"][0]["sha256"]

    @property
    def manifest_path(self) -> Path:
        return manifest_path_for(self.path)

    def verify(self) -> None:
        """Re-hash every file; refuse a missing, modified or corrupt one."""
        for entry in self.manifest["files"]:
            file = self.path.parent / entry["name"]
            if not (file.is_file() or file.is_dir()):
                raise ArtifactError(f"artifact file missing: {file}")
            actual = entry_digest(file)
            if actual != entry["sha256"]:
                raise ArtifactError(f"{file}: sha256 {actual[:12]}… does not match its manifest "
                                    f"({entry['sha256'][:12]}…): modified or corrupt")

    def save(self) -> None:
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")


def entry_digest(path: Path) -> str:
    """sha256 of a file, or of a folder artifact (an .mlpackage): over its sorted relative
    paths and their contents, so renaming, adding or changing any file inside shows."""
    if not path.is_dir():
        return file_digest(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(file_digest(file).encode() + b"\0")
    return digest.hexdigest()


def entry_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def new_manifest(*, target: str, precision: str, files: list[Path], parent: dict[str, Any] | None,
                 weights: dict[str, Any], contract: Contract, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], options: dict[str, Any], tools: dict[str, Any],
                 arch: str, num_params: int | None = None, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Assemble a manifest; file hashes are taken now, from the files as written."""
    from u2zoo import __version__

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "u2zoo_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": target,
        "precision": precision,
        "files": [{"name": f.name, "sha256": entry_digest(f), "size": entry_size(f)} for f in files],
        "parent": parent,
        "model": {"arch": arch, "num_params": num_params},
        "weights": weights,
        "contract": contract.to_dict(),
        "io": {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]},
        "options": options,
        "tools": tools,
        "host": host_info(),
        "calibration": calibration,
        "parity": None,
    }


def open_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read an artifact's manifest and check every file's sha256 against it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact not found: {path}")
    mpath = manifest_path_for(path)
    if not mpath.is_file():
        raise ArtifactError(f"no manifest beside {path} (expected {mpath.name}); was it made by u2zoo convert?")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"unreadable manifest {mpath}: {exc}") from None
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{mpath}: schema {manifest.get('schema')!r} v{manifest.get('schema_version')} "
                            f"is not {SCHEMA!r} v{SCHEMA_VERSION}")
    artifact = Artifact(path, manifest)
    if verify:
        artifact.verify()
    return artifact
