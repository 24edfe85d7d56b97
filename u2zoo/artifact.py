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
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from u2zoo.errors import ArtifactError, ConfigError
from u2zoo.files import file_digest
from u2zoo.safe_paths import confined
from u2zoo.zoo.contract import Contract

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
            query = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
            gpu, driver = [part.strip() for part in query.stdout.splitlines()[0].split(",")[:2]]
        except (OSError, subprocess.SubprocessError, IndexError, ValueError):
            pass
    return {
        "hostname": platform.node(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "gpu": gpu,
        "driver": driver,
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # str for dynamic dims ("batch", "height", "width"); a runtime may say None
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
        return cls(
            data["name"], tuple(data["shape"]), data["dtype"], (quant["scale"], quant["zero_point"]) if quant else None
        )


# What every reader of a manifest relies on: {key: type}, [item schema] for a non-empty list.
_TENSOR = {"name": str, "shape": list, "dtype": str}
_MANIFEST = {
    "target": str,
    "files": [{"name": str, "sha256": str, "size": int}],
    "contract": dict,
    "model": {"arch": str},
    "io": {"inputs": [_TENSOR], "outputs": [_TENSOR]},
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _json_type(value: Any) -> str:
    kinds = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return kinds.get(type(value), type(value).__name__)


def _check_structure(value: Any, schema: Any, label: str, fail) -> None:
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            fail(f"'{label}' must be an object, not {_json_type(value)}")
        for key, inner in schema.items():
            where = f"{label}.{key}" if label else key
            if key not in value:
                fail(f"'{where}' is missing")
            _check_structure(value[key], inner, where, fail)
    elif isinstance(schema, list):
        if not isinstance(value, list):
            fail(f"'{label}' must be a list, not {_json_type(value)}")
        if not value:
            fail(f"'{label}' is empty")
        for i, item in enumerate(value):
            _check_structure(item, schema[0], f"{label}[{i}]", fail)
    elif not isinstance(value, schema) or isinstance(value, bool):
        wanted = {str: "a string", int: "a whole number", list: "a list", dict: "an object"}[schema]
        fail(f"'{label}' must be {wanted}, not {_json_type(value)}")


def check_manifest(manifest: Any, where: str | Path = "manifest") -> None:
    """Refuse a manifest whose structure is wrong, naming the field: runners, tasks and reports
    all read these fields, and a malformed one would otherwise end in a KeyError traceback."""

    def fail(problem: str):
        raise ArtifactError(f"{where}: malformed manifest: {problem}")

    if not isinstance(manifest, dict):
        fail(f"{_json_type(manifest)}, not a JSON object")
    _check_structure(manifest, _MANIFEST, "", fail)
    for i, entry in enumerate(manifest["files"]):
        if not _SHA256.fullmatch(entry["sha256"]):
            fail(f"'files[{i}].sha256' is not a sha256 (64 lowercase hex digits)")
    for side in ("inputs", "outputs"):
        for i, spec in enumerate(manifest["io"][side]):
            if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in spec["shape"]):
                fail(f"'io.{side}[{i}].shape' must hold whole numbers or dimension names")
            quant = spec.get("quantization")
            if quant is not None and not (
                isinstance(quant, dict)
                and isinstance(quant.get("scale"), (int, float))
                and isinstance(quant.get("zero_point"), int)
            ):
                fail(
                    f"'io.{side}[{i}].quantization' must be an object with a number 'scale' and an integer 'zero_point'"
                )
    for key in ("options", "tools"):
        if not isinstance(manifest.get(key, {}), dict):
            fail(f"'{key}' must be an object, not {_json_type(manifest[key])}")


def _known(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def _show(spec: TensorSpec) -> str:
    return f"{spec.name!r} {spec.dtype} {list(spec.shape) if spec.shape is not None else '(unknown shape)'}"


def _io_matches(claimed: TensorSpec, real: TensorSpec, is_input: bool) -> bool:
    if (claimed.name, claimed.dtype) != (real.name, real.dtype):
        return False
    if real.shape is None:  # the runtime cannot say
        return True
    if len(claimed.shape) != len(real.shape):
        return False
    for want, have in zip(claimed.shape, real.shape):
        if _known(want) and _known(have) and want != have:
            return False
        # an input the manifest calls dynamic gets any size from the pipeline: it must be dynamic
        if is_input and isinstance(want, str) and _known(have):
            return False
    return True


def check_io(artifact: "Artifact", inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Refuse a loaded model whose real I/O (names, dtypes, ranks, static dims) differs from its
    manifest's: everything upstream feeds what the manifest says, and a mismatch would end in
    a runtime's multi-line traceback or, for a layout, in wrong masks."""
    for kind, claimed, real in (("input", artifact.inputs, inputs), ("output", artifact.outputs, outputs)):
        if len(claimed) != len(real):
            raise ArtifactError(
                f"{artifact.path.name}: the model has {len(real)} {kind}(s), its manifest "
                f"lists {len(claimed)}: the manifest does not describe this model"
            )
        for want, have in zip(claimed, real):
            if not _io_matches(want, have, kind == "input"):
                raise ArtifactError(
                    f"{artifact.path.name}: the model has {kind} {_show(have)}, its manifest "
                    f"says {_show(want)}: the manifest does not describe this model"
                )


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
        """Re-hash every file; refuse a missing, modified or corrupt one, and any name (or a
        symlink inside a package folder) that leads outside the artifact's folder: a forged
        manifest must not make us read and trust other files on the machine."""
        root = self.path.parent
        for entry in self.manifest["files"]:
            file = confined(root, entry["name"])
            if file.is_dir():
                for inner in file.rglob("*"):  # lazily: refused before a symlinked folder is walked
                    confined(root, inner.relative_to(root).as_posix())
            if not (file.is_file() or file.is_dir()):
                raise ArtifactError(f"artifact file missing: {file}")
            actual = entry_digest(file)
            if actual != entry["sha256"]:
                raise ArtifactError(
                    f"{file}: sha256 {actual[:12]}… does not match its manifest "
                    f"({entry['sha256'][:12]}…): modified or corrupt"
                )

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


def new_manifest(
    *,
    target: str,
    precision: str,
    files: list[Path],
    parent: dict[str, Any] | None,
    weights: dict[str, Any],
    contract: Contract,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    options: dict[str, Any],
    tools: dict[str, Any],
    arch: str,
    num_params: int | None = None,
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a manifest; file hashes are taken now, from the files as written."""
    from u2zoo.version import __version__

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


def static_size(shape: list[Any] | tuple[Any, ...], layout: str = "NCHW") -> tuple[int, int] | None:
    """(height, width) of an input shape whose spatial dims are fixed numbers, else None."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 4:
        return None
    dims = shape[1:3] if layout == "NHWC" else shape[2:4]
    return tuple(dims) if all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims) else None


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
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath}: malformed manifest: {_json_type(manifest)}, not a JSON object")
    if manifest.get("schema") != SCHEMA or manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{mpath}: schema {manifest.get('schema')!r} v{manifest.get('schema_version')} "
            f"is not {SCHEMA!r} v{SCHEMA_VERSION}"
        )
    check_manifest(manifest, mpath)
    if manifest["files"][0]["name"] != path.name:  # x.onnx and x.fp16.onnx would share x.u2zoo.json
        raise ArtifactError(
            f"{path} is not the file this manifest describes: {mpath.name} is for {manifest['files'][0]['name']!r}"
        )
    try:
        contract = Contract.from_dict(manifest["contract"])  # range-checked once here, for every runner
    except ConfigError as exc:
        raise ArtifactError(f"{mpath}: {exc}") from None
    static = static_size(manifest["io"]["inputs"][0].get("shape"), contract.pre.layout)
    if static and static != tuple(contract.pre.size):
        raise ArtifactError(
            f"{mpath}: contract size {list(contract.pre.size)} disagrees with the model's fixed "
            f"input {list(static)} (height, width): the manifest does not describe this model"
        )
    artifact = Artifact(path, manifest)
    if verify:
        artifact.verify()
    return artifact
