"""One calibration source for every backend.

Images from a folder are preprocessed with the model's own contract (the same code as
inference, so calibration statistics match what the artifact will see), stacked, dumped
once to ``.npz`` and identified by a sha256 digest that every INT8 manifest records. Thin
adapters hand the same arrays to ONNX Runtime, NNCF and (later) TFLite and TensorRT.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from u2zoo.errors import ConfigError, U2ZooError
from u2zoo.zoo.contract import Contract, preprocess
from u2zoo.zoo.images import list_images, load_rgb

RECOMMENDED_IMAGES = 32  # below this, activation ranges are noisy: warn, do not refuse


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration inputs (N, 3, H, W) float32 and where they came from."""

    inputs: np.ndarray
    source: str
    files: tuple[str, ...]

    @property
    def digest(self) -> str:
        """sha256 of the exact tensors (shape, dtype and bytes), independent of file paths."""
        h = hashlib.sha256()
        h.update(str((self.inputs.shape, str(self.inputs.dtype))).encode())
        h.update(np.ascontiguousarray(self.inputs).tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records."""
        return {"source": self.source, "num_images": len(self.files), "shape": list(self.inputs.shape),
                "sha256": self.digest, "files": list(self.files)}

    def samples(self) -> Iterator[np.ndarray]:
        """One (1, 3, H, W) batch per image."""
        for i in range(len(self.inputs)):
            yield self.inputs[i:i + 1]

    def ort_reader(self, input_name: str):
        """An ``onnxruntime.quantization.CalibrationDataReader`` over the same batches."""
        from onnxruntime.quantization import CalibrationDataReader

        samples = self.samples

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter(samples())

            def get_next(self):
                batch = next(self._it, None)
                return None if batch is None else {input_name: batch}

            def rewind(self) -> None:
                self._it = iter(samples())

        return Reader()

    def nncf_dataset(self):
        """An ``nncf.Dataset`` over the same batches."""
        import nncf

        return nncf.Dataset(list(self.samples()))

    def litert_data(self, signature: str, input_name: str, channels_last: bool = False) -> dict[str, list[dict]]:
        """ai-edge-quantizer's calibration data: {signature: [{input name: batch}, …]}."""
        batches = (b.transpose(0, 2, 3, 1) if channels_last else b for b in self.samples())
        return {signature: [{input_name: np.ascontiguousarray(b)} for b in batches]}

    def save(self, path: Path) -> Path:
        """Dump once to ``.npz`` (temp file, then rename) so other tools can replay it."""
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, inputs=self.inputs, files=np.asarray(self.files), digest=self.digest)
        tmp.replace(path)
        return path


def calibration_set(folder: str | Path, contract: Contract, size: int | None = None,
                    shape: tuple[int, int] | None = None, warn: bool = True) -> CalibrationSet:
    """Read up to ``size`` images of ``folder`` (sorted) through the contract.

    Zero usable images or a ``size`` larger than the folder holds is an error; unreadable
    files are an error too (a calibration set silently missing images would be wrong).
    """
    folder = Path(folder)
    if folder.suffix == ".npz" and folder.is_file():
        return load_npz(folder)
    if not folder.is_dir():
        raise ConfigError(f"calibration folder not found: {folder}")
    paths = list_images([folder])
    if not paths:
        raise ConfigError(f"calibration folder {folder} holds no images")
    if size is not None:
        if size < 1:
            raise ConfigError("--calib-size must be at least 1")
        if size > len(paths):
            raise ConfigError(f"--calib-size {size} is larger than the {len(paths)} image(s) in {folder}")
        paths = paths[:size]
    arrays = []
    for path in paths:
        try:
            arrays.append(preprocess(load_rgb(path), contract.pre, shape))
        except U2ZooError as exc:
            raise ConfigError(f"calibration image unusable: {exc}") from None
    if warn and len(paths) < RECOMMENDED_IMAGES:
        print(f"u2zoo: warning: {len(paths)} calibration image(s); {RECOMMENDED_IMAGES}+ are recommended "
              "for stable INT8 ranges", file=sys.stderr)
    return CalibrationSet(np.stack(arrays), str(folder), tuple(p.name for p in paths))


def load_npz(path: Path) -> CalibrationSet:
    """Replay a dumped set; its digest must still match its tensors."""
    try:
        with np.load(path, allow_pickle=False) as data:
            calib = CalibrationSet(data["inputs"], str(path), tuple(str(f) for f in data["files"]))
            stored = str(data["digest"])
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"unreadable calibration dump {path}: {exc}") from None
    if calib.digest != stored:
        raise ConfigError(f"calibration dump {path} does not match its digest: modified or corrupt")
    return calib
