"""One calibration source for every backend.

Images from a folder are preprocessed with the model's own contract (the same code as
inference, so calibration statistics match what the artifact will see), stacked, dumped
once to ``.npz`` and identified by a sha256 digest that every INT8 manifest records. Thin
adapters hand the same arrays to ONNX Runtime, NNCF and (later) TFLite and TensorRT.
"""

from __future__ import annotations

import functools
import hashlib
import random
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
    sample: dict[str, int] | None = None  # {"seed", "from"} when drawn from a larger folder
    paths: tuple[str, ...] = ()  # resolved paths, to spot overlap with parity images (not recorded)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the exact tensors (shape, dtype and bytes), independent of file paths.
        Computed once: a search asks for it at every step, and 256 inputs are 300+ MB."""
        h = hashlib.sha256()
        h.update(str((self.inputs.shape, str(self.inputs.dtype))).encode())
        h.update(np.ascontiguousarray(self.inputs).tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records."""
        record = {
            "source": self.source,
            "num_images": len(self.files),
            "shape": list(self.inputs.shape),
            "sha256": self.digest,
            "files": list(self.files),
        }
        if self.sample:
            record["sampled"] = {"seed": self.sample["seed"], "from_images": self.sample["from"]}
        return record

    def overlap(self, images: list[Path]) -> list[Path]:
        """Which of ``images`` (e.g. parity images) are also calibration images."""
        mine = set(self.paths)
        return [p for p in images if str(Path(p).resolve()) in mine]

    def samples(self) -> Iterator[np.ndarray]:
        """One (1, 3, H, W) batch per image."""
        for i in range(len(self.inputs)):
            yield self.inputs[i : i + 1]

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
        replay = CalibrationSet(self.inputs, str(path), self.files)  # what load_npz will give
        replay.__dict__["digest"] = self.digest
        _remember(_npz_key(path), replay)
        return path


DEFAULT_CALIB_SIZE = 256  # images sampled from a larger folder (ModelOpt and NNCF use a few hundred)
SAMPLE_SEED = 0  # the sample is fixed, so two runs on one folder calibrate on the same images

# Preprocessed sets of this process, keyed by what determines them: the automatic float
# fallback quantizes the same model several times and must not re-read hundreds of images.
_MEMO: dict[tuple, "CalibrationSet"] = {}


def calibration_set(
    folder: str | Path,
    contract: Contract,
    size: int | None = None,
    shape: tuple[int, int] | None = None,
    warn: bool = True,
) -> CalibrationSet:
    """``size`` images of ``folder`` (default 256) through the contract.

    A folder with more images than that is sampled with a fixed seed (recorded); one with
    fewer gives all it has, with a warning when ``size`` asked for more. Zero usable images
    is an error, and so is an unreadable file (a set silently missing images would be wrong).
    """
    folder = Path(folder)
    if folder.suffix == ".npz" and folder.is_file():
        return load_npz(folder)
    if not folder.is_dir():
        raise ConfigError(f"calibration folder not found: {folder}")
    paths = list_images([folder])
    if not paths:
        raise ConfigError(f"calibration folder {folder} holds no images")
    if size is not None and size < 1:
        raise ConfigError("--calib-size must be at least 1")
    wanted = size or DEFAULT_CALIB_SIZE
    if size is not None and size > len(paths) and warn:
        print(
            f"u2zoo: warning: --calib-size {size} but {folder} holds {len(paths)} image(s): using those",
            file=sys.stderr,
        )
    sampled = len(paths) > wanted
    if sampled:
        paths = sorted(random.Random(SAMPLE_SEED).sample(paths, wanted))
    key = (
        str(folder.resolve()),
        tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in paths),
        contract.pre,
        shape,
    )
    if key not in _MEMO:
        _remember(key, _read_set(folder, paths, contract, shape, sampled))
    if warn and len(paths) < RECOMMENDED_IMAGES:
        print(
            f"u2zoo: warning: {len(paths)} calibration image(s); {RECOMMENDED_IMAGES}+ are recommended "
            "for stable INT8 ranges",
            file=sys.stderr,
        )
    return _MEMO[key]


def _read_set(
    folder: Path, paths: list[Path], contract: Contract, shape: tuple[int, int] | None, sampled: bool
) -> CalibrationSet:
    arrays = []
    for path in paths:
        try:
            arrays.append(preprocess(load_rgb(path), contract.pre, shape))
        except U2ZooError as exc:
            raise ConfigError(f"calibration image unusable: {exc}") from None
    sample = {"seed": SAMPLE_SEED, "from": len(list_images([folder]))} if sampled else None
    return CalibrationSet(
        np.stack(arrays), str(folder), tuple(p.name for p in paths), sample, tuple(str(p.resolve()) for p in paths)
    )


def _remember(key: tuple, calib: CalibrationSet) -> None:
    _MEMO.clear()  # one set at a time: hundreds of 320×320 inputs are 100+ MB
    _MEMO[key] = calib


def _npz_key(path: Path) -> tuple:
    stat = path.stat()
    return ("npz", str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def load_npz(path: Path) -> CalibrationSet:
    """Replay a dumped set; its digest must still match its tensors. Each INT8 step of a bench
    cell replays the same dump, so the set is kept for this process while the file is unchanged
    (decompressing and checking 256 inputs takes 2 s)."""
    key = _npz_key(path)
    if key in _MEMO:
        return _MEMO[key]
    try:
        with np.load(path, allow_pickle=False) as data:
            calib = CalibrationSet(data["inputs"], str(path), tuple(str(f) for f in data["files"]))
            stored = str(data["digest"])
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"unreadable calibration dump {path}: {exc}") from None
    if calib.digest != stored:
        raise ConfigError(f"calibration dump {path} does not match its digest: modified or corrupt")
    _remember(key, calib)
    return calib
