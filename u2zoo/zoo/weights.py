"""The weights registry: typed entries, a verified download cache, and safe loading.

Weights can be named three ways wherever a model is asked for: a registry name
(``u2netp``, ``u2netp.fp16_bnfolded``…), a local path, or a URL (``http(s)://`` or
``file://``) together with its sha256. Downloads go to ``$U2ZOO_HOME/weights`` (default
``~/.cache/u2zoo``) under a file lock, into a temp file that is hashed while written and
renamed only once its hash matches. Checkpoints are read with ``torch.load(weights_only=True)``
only, so a pickle carrying code is refused, never run.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from u2zoo.errors import ConfigError, WeightsError, did_you_mean
from u2zoo.files import file_digest
from u2zoo.zoo.archs import ARCHS, U2NetBase, build_arch
from u2zoo.zoo.contract import PORTRAIT, SALIENCY, Contract, with_variant

_OFFICIAL_ORIGIN = "xuebinqin/U-2-Net (Qin et al. 2020), official release"
BUNDLED_DIR = Path(__file__).parent / "bundled"
RANDOM_WEIGHTS_SEED = 0  # --random-weights models are reproducible across calls and runs
_GDRIVE = "https://drive.google.com/uc?export=download&id="


@dataclass(frozen=True)
class WeightsEntry:
    """One checkpoint: where it comes from, how to verify it, and how to use it."""

    name: str
    arch: str
    filename: str
    task: str  # saliency | human-seg | portrait-drawing
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    md5: str | None = None  # only where upstream publishes md5 and no sha256 is known
    file_size: int | None = None  # bytes; None where upstream does not publish it
    num_params: int | None = None
    license: str = "Apache-2.0"
    origin: str = _OFFICIAL_ORIGIN
    contract: Contract = field(default_factory=Contract)
    notes: str = ""
    bundled: bool = False  # shipped inside the package (u2zoo/zoo/bundled/): no download, hash still checked

    def cache_path(self) -> Path:
        if self.bundled:
            return BUNDLED_DIR / self.filename
        return cache_dir() / "weights" / self.filename


REGISTRY: dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            "u2net",
            "u2net",
            "u2net.pth",
            "saliency",
            urls=(_GDRIVE + "1ao1ovG1Qtx4b7EoskHXmi2E9rp5CHLcZ",),
            md5="347c3d51b01528e5c6c071e3cff1cb55",
            num_params=44_009_869,
            contract=SALIENCY,
            notes="md5 as published by the rembg/backgroundremover loaders; Google Drive may answer "
            "with a confirmation page, which the hash check rejects",
        ),
        WeightsEntry(
            "u2netp",
            "u2netp",
            "u2netp.pth",
            "saliency",
            urls=(_GDRIVE + "1rbSTGKAE-MTxBYHd-51l2hMOQPT_7EPy",),
            md5="e4f636406ca4e2af789941e7f139ee2e",
            num_params=1_131_181,
            contract=SALIENCY,
        ),
        WeightsEntry(
            "u2netp.fp16_bnfolded",
            "u2netp",
            "u2netp_fp16_bnfolded.pth",
            "saliency",
            sha256="5eb1b2a6523cfcadcf178307e4bef80ca00026a59c14d019d5eed265baa8547b",
            file_size=4_844_827,
            num_params=1_131_181,
            contract=SALIENCY,
            bundled=True,
            origin="official U2NETP (Qin et al. 2020, Apache-2.0) via rembg's u2netp.onnx: conv weights rounded "
            "to fp16, BatchNorm folded into the convs (BN layers identity)",
            notes="shipped in the package with its licence and attribution (U2NETP_LICENSE.txt, "
            "U2NETP_ATTRIBUTION.md beside it); mean MAE 0.005 against the official u2netp outputs",
        ),
        WeightsEntry(
            "u2net-lite",
            "u2net-lite",
            "u2net_lite_distilled_fp16.pth",
            "saliency",
            sha256="4b6a9d4cd357db475e49cf014424b161e271b45f3b60935369a37c7e8a51b717",
            file_size=9_771_043,
            num_params=4_722_568,
            contract=SALIENCY,
            bundled=True,
            origin="u2zoo: trained on DUTS-TR train/ on 2 CPU cores from the earlier distilled weights: 6,400 samples "
            "(ground truth + the real U2NETP's soft maps), then 12,000, 18,000 and 6,500 more (ground truth only, "
            "BCE + Dice, 320 px, lr 1e-4 cosine), then 9,832 more (BCE + Dice + 0.5 Sobel edge + 0.5 x the teacher's "
            "soft maps, lr 2e-4 cosine), then 7,996 more (the same terms, lr 1e-4 cosine); fp16 state dict, shipped "
            "through the ratchet",
            notes="shipped in the package; recipe, history and val/ scores in u2net_lite_distilled_fp16.json beside "
            "it. Held-out DUTS-TR val/: MAE 0.098, max F 0.866 — short of its ship targets, so not the default",
        ),
        WeightsEntry(
            "u2net_human_seg",
            "u2net",
            "u2net_human_seg.pth",
            "human-seg",
            urls=(_GDRIVE + "1-Yg0cxgrNhHP-016FPdp902BR-kSsA4P",),
            md5="09fb4e49b7f785c9f855baf94916840a",
            num_params=44_009_869,
            contract=SALIENCY,
        ),
        WeightsEntry(
            "u2net_portrait",
            "u2net",
            "u2net_portrait.pth",
            "portrait-drawing",
            urls=(_GDRIVE + "1IG3HdpcRiDoWNookbncQjeaPN28t90yW",),
            num_params=44_009_869,
            contract=PORTRAIT,
            notes="upstream publishes no hash, so it is never downloaded unverified: download it "
            "yourself and pass --weights PATH",
        ),
    )
}

# What `--model ARCH` means when no weights are given. U2NETP's are the shipped ones, so
# `--model u2netp` works offline; the official fp32 file stays reachable with `u2zoo fetch u2netp`
# and `--weights PATH`.
DEFAULT: dict[str, str] = {"u2net": "u2net", "u2netp": "u2netp.fp16_bnfolded", "u2net-lite": "u2net-lite"}


def cache_dir() -> Path:
    """``$U2ZOO_HOME``, else ``$XDG_CACHE_HOME/u2zoo``, else ``~/.cache/u2zoo``."""
    if os.environ.get("U2ZOO_HOME"):
        return Path(os.environ["U2ZOO_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "u2zoo"


def checked_sha256(value: str) -> str:
    """A user-given sha256, lower-cased; refused unless 64 hex digits, before anything is
    created: it also names the cache file of a URL download, so ``../…`` would escape the cache."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        shown = value if len(value) <= 80 else value[:80] + "…"
        raise ConfigError(f"--weights-sha256 must be 64 hex characters (a sha256 digest), got {shown!r}")
    return value.lower()


def _check_hashes(path: Path, sha256: str | None, md5: str | None, what: str) -> str:
    """Verify every known hash of ``path``; return its sha256."""
    actual_sha = file_digest(path, "sha256")
    if sha256 and actual_sha != sha256.lower():
        raise WeightsError(f"hash mismatch for {what}: expected sha256 {sha256}, got {actual_sha}")
    if md5 and (actual_md5 := file_digest(path, "md5")) != md5.lower():
        raise WeightsError(f"hash mismatch for {what}: expected md5 {md5}, got {actual_md5}")
    return actual_sha


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    size: int | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` under a lock; verified before the rename, never after.

    A download with no known hash is refused: unverified bytes are never used. With a known
    ``size`` it stops as soon as the server announces or sends more, instead of filling the
    disk only to fail the hash check.
    """
    if not (sha256 or md5):
        raise WeightsError(f"refusing to download {url} without a known hash (give its sha256)")
    if sha256:
        sha256 = checked_sha256(sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(dest) + ".lock"):
        if dest.exists():
            try:
                _check_hashes(dest, sha256, md5, str(dest))
                return dest
            except WeightsError:
                pass  # a stale or damaged cache entry: fetch it again
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                if size and total and total > size:
                    raise WeightsError(
                        f"download failed: {url}: the server announces {total:,} bytes, more than the expected {size:,}"
                    )
                from tqdm import tqdm

                with tqdm(
                    total=total or size, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
                ) as bar:
                    written = 0
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        written += len(chunk)
                        if size and written > size:
                            raise WeightsError(
                                f"download failed: {url}: more than the expected {size:,} bytes were sent; stopped"
                            )
                        out.write(chunk)
                        bar.update(len(chunk))
            _check_hashes(Path(tmp_name), sha256, md5, url)
            os.replace(tmp_name, dest)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise WeightsError(f"download failed: {url}: {getattr(exc, 'reason', exc)}") from None
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
    return dest


def find_entry(name: str) -> WeightsEntry:
    if name not in REGISTRY:
        raise ConfigError(f"unknown weights {name!r}{did_you_mean(name, REGISTRY)}")
    return REGISTRY[name]


def entry_for_sha256(sha256: str) -> WeightsEntry | None:
    return next((e for e in REGISTRY.values() if e.sha256 == sha256), None)


def fetch(entry: WeightsEntry, source: str | None = None, progress: bool = True) -> Path:
    """Put a verified copy of ``entry`` in the cache, from its URLs or from ``source``."""
    dest = entry.cache_path()
    if entry.bundled:
        if source is not None:
            raise WeightsError(f"{entry.name} ships inside the package ({dest}); there is nothing to fetch")
        return _verified_bundled(entry)
    if source is None and dest.exists():
        _check_hashes(dest, entry.sha256, entry.md5, str(dest))
        return dest
    if not (entry.sha256 or entry.md5):
        raise WeightsError(f"{entry.name}: {entry.notes or 'no published hash'}")
    if source is not None and "://" not in source:
        src = Path(source)
        if not src.is_file():
            raise WeightsError(f"weights file not found: {src}")
        _check_hashes(src, entry.sha256, entry.md5, str(src))
        source = src.resolve().as_uri()
    urls = (source,) if source else entry.urls
    if not urls:
        raise WeightsError(f"{entry.name} is not in the cache ({dest}) and has no public URL: {entry.notes}")
    errors = []
    for url in urls:
        try:
            return download(url, dest, entry.sha256, entry.md5, progress, size=entry.file_size)
        except WeightsError as exc:
            errors.append(str(exc))
    raise WeightsError(errors[-1] if len(errors) == 1 else "; ".join(errors))


def _verified_bundled(entry: WeightsEntry) -> Path:
    """A file shipped in the package, checked against its pinned hash before every use."""
    path = entry.cache_path()
    reinstall = "reinstall the package (pip install --force-reinstall u2zoo)"
    if not path.is_file():
        raise WeightsError(f"the shipped weights file {path} is missing: {reinstall}")
    actual = file_digest(path)
    if actual != entry.sha256:
        raise WeightsError(
            f"the shipped weights file {path} is damaged or was changed (sha256 {actual[:16]}…, "
            f"expected {entry.sha256[:16]}…): {reinstall}"
        )
    return path


@dataclass(frozen=True)
class WeightsInfo:
    """What the manifest records about the weights a model was built from."""

    name: str | None  # registry name, when known
    source: str  # path or URL as given, or "random"
    sha256: str | None
    arch: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "arch": self.arch}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (weights_only) and map every failure to one clear line."""
    path = Path(path)
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return checked_tensors(path, obj)


def read_checkpoint(path: str | Path) -> Any:
    """Whatever the checkpoint holds (tensors in dicts and lists), loaded with
    ``weights_only=True``: a pickle carrying code is refused, named, and never run."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on legacy/protocol-4 pickles: our one line says it
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        code = named.group(1) if named else _pickled_global(path)
        if code:
            raise WeightsError(
                f"{path}: refused: the checkpoint holds pickled code or objects ({code}), "
                "not just tensors (loaded with weights_only=True)"
            ) from None
        raise WeightsError(f"{path}: corrupt checkpoint: not a valid torch pickle") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: corrupt or truncated checkpoint: {first}") from None


def checked_tensors(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    """``obj`` if it is a state dict of finite tensors, else a one-line WeightsError."""
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    for name, tensor in obj.items():  # NaN/inf weights load fine and give blank masks: refuse them here
        if tensor.is_floating_point() and not (finite := torch.isfinite(tensor)).all():
            bad = int((~finite).sum())
            raise WeightsError(
                f"{path}: refused: tensor {name!r} holds {bad} non-finite value{'s' * (bad > 1)} "
                "(NaN or inf), so the model's output would be meaningless"
            )
    return obj


def _pickled_global(path: Path) -> str | None:
    """The first non-torch global the checkpoint's pickle would import, read with pickletools
    (nothing runs). torch does not name it when it stops earlier, e.g. at a protocol-4 frame."""
    memo: dict[Any, Any] = {}
    pushed: list[Any] = []  # what each op pushed (strings, else None): STACK_GLOBAL takes the last two
    try:
        with ExitStack() as stack:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                fh = stack.enter_context(archive.open(next(n for n in archive.namelist() if n.endswith("data.pkl"))))
                pickles = 1
            else:  # legacy: pickles of the magic number, protocol, sys info, the object, storage keys
                fh, pickles = stack.enter_context(open(path, "rb")), 5
            for _ in range(pickles):
                for op, arg, _pos in pickletools.genops(fh):
                    if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                        memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif op.name in ("GLOBAL", "STACK_GLOBAL"):
                        parts = arg.split(" ", 1) if op.name == "GLOBAL" else pushed[-2:]
                        name = ".".join(str(p) for p in parts)
                        if not name.startswith(("torch.", "collections.OrderedDict")):
                            return name
                        pushed.append(None)
                    elif op.name not in ("FRAME", "PROTO"):
                        pushed.append(arg if isinstance(arg, str) else None)
    except (ValueError, EOFError, OSError, StopIteration, zipfile.BadZipFile):
        pass  # not a pickle we can read to the end: the caller calls it corrupt
    return None


def apply_state_dict(model: U2NetBase, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatching keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [
        f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or reshaped:
        parts = [
            f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
            for label, items in (("missing", missing), ("unexpected", unexpected), ("of other shape", reshaped))
            if items
        ]
        raise WeightsError(f"{source} does not fit architecture {arch!r}: keys " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def resolve_model_name(name: str) -> tuple[str, WeightsEntry | None]:
    """``--model`` takes an architecture or a weights entry name → (arch, entry or None).

    An architecture name means its DEFAULT weights (for ``u2netp``: the shipped ones, not the
    registry entry of the same name, which is the official download for ``u2zoo fetch``).
    """
    if name in ARCHS:
        return name, REGISTRY.get(DEFAULT.get(name, ""))
    if name in REGISTRY:
        entry = REGISTRY[name]
        return entry.arch, entry
    raise ConfigError(f"unknown model {name!r}{did_you_mean(name, [*ARCHS, *REGISTRY])}")


def load_model(
    name: str,
    weights: str | None = None,
    weights_sha256: str | None = None,
    random_weights: bool = False,
    deploy: bool = True,
    progress: bool = True,
    contract_variant: str | None = None,
) -> tuple[U2NetBase, WeightsInfo, Contract]:
    """Build the model ``name`` and load its weights; return it with provenance and contract.

    ``weights`` is a path or URL overriding the registry; ``random_weights`` must be asked for
    explicitly — nothing ever falls back to random weights silently. ``contract_variant``
    (``official``, ``antialiased``) replaces the weights' default resizes.
    """
    model, info, contract = _load_model(name, weights, weights_sha256, random_weights, deploy, progress)
    return model, info, with_variant(contract, contract_variant) if contract_variant else contract


def _load_model(
    name: str, weights: str | None, weights_sha256: str | None, random_weights: bool, deploy: bool, progress: bool
) -> tuple[U2NetBase, WeightsInfo, Contract]:
    arch, entry = resolve_model_name(name)
    contract = entry.contract if entry else SALIENCY
    if random_weights:
        if weights:
            raise ConfigError("--random-weights and --weights exclude each other")
        # Seeded, so that the reference and every artifact of one run (each built from its
        # own load_model call) hold the same "random" weights.
        with torch.random.fork_rng():
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = build_arch(arch, deploy=deploy)
        return model, WeightsInfo(None, "random", None, arch), contract
    if weights_sha256:
        weights_sha256 = checked_sha256(weights_sha256)
    model = build_arch(arch, deploy=deploy)
    if weights and "://" in weights:
        if not weights_sha256:
            raise ConfigError("a weights URL needs its sha256 (--weights-sha256): downloads are verified before use")
        target = cache_dir() / "weights" / f"url-{weights_sha256[:16]}.pth"
        path = download(weights, target, sha256=weights_sha256, progress=progress)
    elif weights:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        if weights_sha256:
            _check_hashes(path, weights_sha256, None, str(path))
    elif entry is None:
        raise WeightsError(
            f"no registered weights for {arch!r}: pass --weights PATH, or --random-weights for an untrained model"
        )
    else:
        path = fetch(entry, progress=progress)
    sha = file_digest(path)
    known = entry_for_sha256(sha)
    if known is None and entry is not None and entry.cache_path() == Path(path):
        known = entry
    model = _pruned_or(model, path, arch, deploy)
    apply_state_dict(model, read_state_dict(path), arch, str(path))
    if known is not None:
        contract = known.contract
    return model, WeightsInfo(known.name if known else None, str(weights or path), sha, arch), contract


def _pruned_or(model: U2NetBase, path: Path, arch: str, deploy: bool) -> U2NetBase:
    """A pruned checkpoint (``.arch.json`` beside it) rebuilds the model with its channel shapes."""
    from u2zoo.zoo.pruned_shapes import read_shapes, rebuild_pruned

    pruned = read_shapes(path)
    if pruned is None:
        return model
    if pruned["arch"] != arch:
        raise WeightsError(f"{path.name} holds a pruned {pruned['arch']}, not {arch}")
    return rebuild_pruned(arch, pruned["shapes"], build_arch, deploy=deploy)


def cached_entries(arch: str) -> list[WeightsEntry]:
    """Registry entries of ``arch`` already present in the cache (verification happens on load)."""
    return [e for e in REGISTRY.values() if e.arch == arch and e.cache_path().is_file()]
