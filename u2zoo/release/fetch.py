"""``u2zoo fetch --index``: resolve a file from a release's ``index.json`` (a URL or a path),
download or copy it with the files beside it, verify each against the index before it is
cached, and check the artifact against its own manifest. A download whose hash differs leaves
nothing in the cache; a release whose index and manifest disagree is refused, naming the file."""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from u2zoo.artifact import Artifact, open_artifact
from u2zoo.errors import ArtifactError, ConfigError, WeightsError
from u2zoo.release.index import load_index_text, resolve
from u2zoo.safe_paths import confined
from u2zoo.zoo.weights import cache_dir, download

MAX_INDEX_BYTES = 16 << 20  # an index is a few kB per entry; more is not an index


def index_location(where: str) -> tuple[str, str]:
    """(the index's URL, the URL its entries' paths are relative to) for a URL or a local path."""
    if urllib.parse.urlparse(where).scheme in ("http", "https", "file"):
        return where, where.rsplit("/", 1)[0] + "/"
    path = Path(where).expanduser()
    if path.is_dir():
        path = path / "index.json"
    if not path.is_file():
        raise ConfigError(f"release index not found: {path}")
    url = path.resolve().as_uri()
    return url, url.rsplit("/", 1)[0] + "/"


def read_index(where: str) -> tuple[dict[str, Any], str]:
    """The parsed, checked index and the base URL of its files."""
    url, base = index_location(where)
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            data = resp.read(MAX_INDEX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the release index {where}: {getattr(exc, 'reason', exc)}") from None
    if len(data) > MAX_INDEX_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_INDEX_BYTES >> 20} MiB: not a release index")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text: not a release index") from None
    return load_index_text(text, where), base


def _entry_folder(entry: dict[str, Any]) -> Path:
    """Cached per file content: the same file from two indexes is downloaded once."""
    return cache_dir() / "releases" / f"{entry['name']}-{entry['target']}-{entry['precision']}-{entry['sha256'][:16]}"


def _unpack(archive: Path, folder: Path, name: str) -> Path:
    """Unzip a packaged folder (an .mlpackage) once, refusing members that would land outside."""
    target = confined(folder, name)
    if target.exists():
        return target
    scratch = folder / f".{name}.unpacking"
    shutil.rmtree(scratch, ignore_errors=True)
    with zipfile.ZipFile(archive) as zipped:
        for member in zipped.namelist():
            confined(scratch, member)  # no '../' or absolute names
        zipped.extractall(scratch)
    (scratch / name).rename(target)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def fetch_artifact(
    where: str, name: str, target: str, precision: str, version: str | None = None, progress: bool = True
) -> tuple[Artifact, dict[str, Any]]:
    """Resolve, download and verify one release file; returns the opened artifact and its entry."""
    index, base = read_index(where)
    entry = resolve(index, name, target, precision, version)
    folder = _entry_folder(entry)
    for item in entry["files"]:
        dest = confined(folder, item["path"].split("/")[-1])
        url = urllib.parse.urljoin(base, urllib.parse.quote(item["path"]))
        try:
            download(url, dest, sha256=item["sha256"], progress=progress, size=item["size"])
        except WeightsError as exc:
            raise ArtifactError(f"{item['path']}: {exc} (nothing was cached)") from None
    main = folder / entry["file"].split("/")[-1]
    packaging = entry.get("packaging")
    if packaging:
        main = _unpack(main, folder, packaging["unpacks_to"])
    try:
        artifact = open_artifact(main)  # every file against its manifest
    except ArtifactError as exc:
        raise ArtifactError(f"release {where}: {exc}") from None
    if artifact.sha256 != entry.get("artifact_sha256", artifact.sha256) or artifact.target not in (
        entry["target"],
        "onnx",  # a hand-off entry (TensorRT) publishes the ONNX it builds from
    ):
        raise ArtifactError(
            f"release {where}: {entry['file']} is not what its manifest describes "
            f"(index sha256 {str(entry.get('artifact_sha256'))[:12]}…, manifest {artifact.sha256[:12]}…, "
            f"target {artifact.target!r})"
        )
    return artifact, entry
