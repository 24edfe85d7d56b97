"""``u2zoo publish``: turn a ``bench`` output folder into a release folder.

Only proven files go in: cells whose status is ``ok``, and ``unavailable`` cells that left a
validated artifact (a Core ML package that runs on macOS only, the TensorRT-ready ONNX with its
``trtexec`` script), marked as such. Every artifact is re-hashed against its manifest and its
bench row before it is copied. The release is built in a hidden sibling folder and renamed into
place, so a failed publish leaves nothing half-written; publishing the same bench folder twice
gives the same files and checksums, except the one ``published`` field of ``index.json``
(which ``SOURCE_DATE_EPOCH`` fixes too).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from u2zoo.artifact import Artifact, atomic_write_text, open_artifact
from u2zoo.benchmarks.results import load_results
from u2zoo.errors import ArtifactError, ConfigError
from u2zoo.files import check_replaceable, file_digest, folder_built_in_place
from u2zoo.release.card import render_card
from u2zoo.release.index import INDEX_SCHEMA, INDEX_SCHEMA_VERSION, check_index
from u2zoo.runtime.precisions import CALIBRATED_PRECISIONS

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: the same bytes on every publish
_PARITY_KEYS = ("max_abs", "mean_abs", "iou50", "delta_mae", "delta_max_f", "boundary_mae", "reference")
_SPEED_KEYS = ("latency_ms_p50", "latency_ms_p90", "fps", "throughput", "threads", "e2e_ms_p50", "peak_rss_mb")


@dataclass(frozen=True)
class Release:
    folder: Path
    index: dict[str, Any]
    files: list[str]  # relative paths, sorted, as SHA256SUMS lists them
    notes: tuple[str, ...] = ()


def published_at() -> str:
    """Now, or ``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) when it is set."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            moment = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
        except ValueError:
            raise ConfigError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, not {epoch!r}") from None
    else:
        moment = _dt.datetime.now(_dt.timezone.utc)
    return moment.isoformat(timespec="seconds")


def _folder_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", label)


def publishable_rows(bench_dir: Path) -> list[dict[str, Any]]:
    """The bench rows a release may hold (the last one per model/target/precision); refused
    when no cell is ``ok``."""
    results = bench_dir / "results.jsonl"
    if not results.is_file():
        raise ConfigError(f"{bench_dir} is not a u2zoo bench output folder: no results.jsonl in it")
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    for row in load_results([results]):
        latest[(row["model"], row["target"], row["precision"])] = row
    rows = list(latest.values())
    if not any(r["status"] == "ok" for r in rows):
        statuses = ", ".join(f"{r['target']}/{r['precision']}: {r['status']}" for r in rows)
        raise ConfigError(f"nothing to publish: no cell of {results} is ok ({statuses})")
    return [r for r in rows if r["status"] == "ok" or (r["status"] == "unavailable" and r.get("artifact"))]


def _bench_artifact(bench_dir: Path, row: dict[str, Any]) -> Artifact:
    """The row's artifact, re-hashed against its manifest and against the hash the bench recorded."""
    path = bench_dir / "artifacts" / row["model"].replace("/", "_") / row["artifact"]["file"]
    artifact = open_artifact(path)  # refuses a file whose sha256 differs from its manifest, naming it
    if artifact.sha256 != row["artifact"]["sha256"]:
        raise ArtifactError(
            f"{path}: sha256 {artifact.sha256[:12]}… is not the {row['artifact']['sha256'][:12]}… its bench row "
            "measured: the file changed after the bench; run the bench again"
        )
    return artifact


def _zip_folder(folder: Path, dest: Path) -> None:
    """A zip of ``folder`` (as its own top-level name) with fixed times and modes: same bytes each time."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(f"{folder.name}/{file.relative_to(folder).as_posix()}", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, file.read_bytes())


def _copy_artifact(artifact: Artifact, dest_dir: Path) -> tuple[list[Path], dict[str, Any] | None]:
    """Copy the artifact's files and manifest into ``dest_dir``; a folder (an .mlpackage) is
    zipped, as apps and hubs expect one file. Returns the written files and the packaging note."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    written, packaging = [], None
    for entry in artifact.manifest["files"]:
        source = artifact.path.parent / entry["name"]
        if source.is_dir():
            target = dest_dir / f"{entry['name']}.zip"
            _zip_folder(source, target)
            packaging = {"format": "zip", "unpacks_to": entry["name"], "sha256_unpacked": entry["sha256"]}
        else:
            target = dest_dir / entry["name"]
            shutil.copyfile(source, target)
        written.append(target)
    manifest = dest_dir / artifact.manifest_path.name
    shutil.copyfile(artifact.manifest_path, manifest)
    written.append(manifest)
    return written, packaging


def _handoff(row: dict[str, Any], copied: Path, dest_dir: Path) -> dict[str, Any] | None:
    """For a chain target that could not finish here (TensorRT), write its build script beside
    the proven ONNX in the release, as ``u2zoo convert`` does."""
    from u2zoo.converters import TARGETS

    spec = TARGETS.get(row["target"])
    if spec is None or spec.handoff is None:
        return None
    typed = spec.make_options(**row.get("options", {}))
    before = set(dest_dir.iterdir())
    spec.handoff(open_artifact(copied), typed, dest_dir)
    scripts = sorted(p for p in set(dest_dir.iterdir()) - before if p.is_file())
    return {"script": scripts[0].name if scripts else None, "why": row.get("reason")}


def _pick(data: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, Any] | None:
    return {k: data[k] for k in keys if k in data} if data else None


def trained_on_duts(weights: dict[str, Any]) -> bool:
    """The official saliency weights (U2NET, U2NETP and our fp16 copy of U2NETP) were trained
    on DUTS-TR; the registry knows them by sha256 (or, for md5-only entries, by name)."""
    from u2zoo.zoo.weights import REGISTRY, entry_for_sha256

    entry = entry_for_sha256(weights.get("sha256") or "") or REGISTRY.get(weights.get("name") or "")
    return entry is not None and entry.task == "saliency" and entry.arch in ("u2net", "u2netp")


def accuracy_caveat(row: dict[str, Any], data: dict[str, Any]) -> str | None:
    """What a reader must know about where the accuracy was measured: official U²-Net weights
    were trained on DUTS-TR, so a DUTS-TR score is optimistic; INT8 calibrated on the same
    images is optimistic too (the bench's own notes say so)."""
    caveats = []
    if trained_on_duts(row.get("weights") or {}):
        described = f"{data.get('dataset', '')} {data.get('images', '')}".lower()
        caveats.append(
            "these weights were trained on DUTS-TR and these images are DUTS-TR images: the scores are optimistic, "
            "not a validation figure"
            if "duts" in described
            else "these weights were trained on DUTS-TR: a score on DUTS-TR images would be optimistic"
        )
    if row["precision"] in CALIBRATED_PRECISIONS:  # the bench's notes on calibration images
        caveats += [n for n in row.get("notes", []) if "optimistic" in n]
    return "; ".join(caveats) or None


def index_entry(row: dict[str, Any], artifact: Artifact, files: list[Path], release_dir: Path, **extra: Any) -> dict:
    """One ``index.json`` entry: what the file is, its hashes, and how well and how fast it ran."""
    main = files[0]
    host = row.get("host") or {}
    speed = _pick(row.get("speed"), _SPEED_KEYS)
    if speed is not None:
        speed |= {"device": row.get("device"), "machine": _pick(host, ("cpu", "cores", "gpu", "os"))}
    data = (row.get("data") or {}) | extra.pop("dataset")
    accuracy = dict(row["accuracy"]) | {"data": data} if row.get("accuracy") else None
    weights = row.get("weights") or {}
    manifest = artifact.manifest
    return {
        "name": row["model"],
        "version": extra.pop("version"),
        "target": row["target"],
        "precision": row["precision"],
        "status": row["status"],
        "note": row.get("reason"),
        "file": main.relative_to(release_dir).as_posix(),
        "sha256": file_digest(main),
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": [
            {"path": f.relative_to(release_dir).as_posix(), "sha256": file_digest(f), "size": f.stat().st_size}
            for f in files
        ],
        "artifact_sha256": artifact.sha256,
        "arch": manifest["model"].get("arch"),
        "num_params": manifest["model"].get("num_params"),
        "weights": {
            "name": weights.get("name"),
            "file": Path(str(weights.get("source") or "")).name or None,
            "sha256": weights.get("sha256"),
            "arch": weights.get("arch"),
        },
        "layout": artifact.contract.pre.layout,
        "contract": manifest["contract"],
        "io": manifest["io"],
        "options": _no_paths(manifest.get("options") or {}),
        "calibration": _pick(manifest.get("calibration"), ("num_images", "sha256", "files")),
        "parity": _pick(row.get("parity"), _PARITY_KEYS),
        "accuracy": accuracy,
        "accuracy_caveat": accuracy_caveat(row, data) if accuracy else None,
        "speed": speed,
        "gate": _no_paths(row.get("gate") or {}) or None,
        "tools": manifest.get("tools"),
        "bench": {"run_id": row.get("run_id"), "created": row.get("created")},
        **extra,
    }


def _no_paths(values: dict[str, Any]) -> dict[str, Any]:
    """Option values that are paths on the publishing machine keep only their file name: the
    index says which file, not where someone's home folder is."""
    return {k: Path(v).name if isinstance(v, str) and "/" in v else v for k, v in values.items()}


NO_PLOTS = "plots not made: matplotlib is not installed (pip install 'u2zoo[publish]')"


def _plots(rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """The report's two plots beside the card; none without matplotlib (the card and the
    command say so)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return []
    from u2zoo.benchmarks.report_plots import plot_accuracy_vs_fps, plot_latency

    folder.mkdir(exist_ok=True)
    plot_accuracy_vs_fps(rows, folder / "accuracy_vs_fps.png")
    plot_latency(rows, folder / "latency.png")
    return ["plots/accuracy_vs_fps.png", "plots/latency.png"]


def sha256sums(folder: Path) -> tuple[str, list[str]]:
    """``SHA256SUMS`` of every file under ``folder`` (itself excepted), in the format
    ``sha256sum -c`` checks: sorted paths, two spaces."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [f for f in files if f != "SHA256SUMS"]
    return "".join(f"{file_digest(folder / f)}  {f}\n" for f in files), files


def publish_bench(
    bench_dir: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    version: str = "1",
    license_id: str | None = None,
    force: bool = False,
    dataset: str | None = None,
    split: str | None = None,
) -> Release:
    """Build the release folder ``out`` from the bench output ``bench_dir``. ``dataset`` and
    ``split`` name the ground truth's data set where its folder names do not (model-index)."""
    from u2zoo.version import __version__

    bench_dir, out = Path(bench_dir), Path(out)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
        raise ConfigError(f"--version must be letters, digits, '.', '_' or '-', not {version!r}")
    check_replaceable(out, force)  # before the work, not only when the folder is built
    rows = publishable_rows(bench_dir)
    artifacts = [(row, _bench_artifact(bench_dir, row)) for row in rows]  # every hash checked before writing
    with folder_built_in_place(out, force) as staging:
        entries = []
        for row, artifact in sorted(artifacts, key=lambda ra: (ra[0]["model"], ra[0]["target"], ra[0]["precision"])):
            dest = staging / _folder_name(row["model"])
            files, packaging = _copy_artifact(artifact, dest)
            handoff = _handoff(row, files[0], dest) if row["status"] == "unavailable" else None
            if handoff and handoff["script"]:
                files.append(dest / handoff["script"])
            entries.append(
                index_entry(
                    row,
                    artifact,
                    files,
                    staging,
                    version=version,
                    dataset={k: v for k, v in (("dataset", dataset), ("split", split)) if v},
                    packaging=packaging,
                    handoff=handoff,
                )
            )
        models = sorted({e["name"] for e in entries})
        index = {
            "schema": INDEX_SCHEMA,
            "schema_version": INDEX_SCHEMA_VERSION,
            "published": published_at(),
            "release": {"name": name or "-".join(models), "version": version, "u2zoo_version": __version__},
            "source": {"bench_run_ids": sorted({e["bench"]["run_id"] for e in entries if e["bench"]["run_id"]})},
            "entries": entries,
        }
        check_index(index, "the index being written")
        plots = _plots([row for row, _ in artifacts], staging / "plots")
        license_id = license_id or _license_of(entries)
        atomic_write_text(staging / "README.md", render_card(index, license_id, plots))
        atomic_write_text(staging / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
        sums, files = sha256sums(staging)
        atomic_write_text(staging / "SHA256SUMS", sums)
    return Release(out, index, files, () if plots else (NO_PLOTS,))


def _license_of(entries: list[dict[str, Any]]) -> str:
    """The weights' licence from the registry (Hugging Face ids are lower case), else ``other``."""
    from u2zoo.zoo.weights import entry_for_sha256

    known = {entry_for_sha256(e["weights"]["sha256"] or "") for e in entries}
    licences = {k.license.lower() for k in known if k is not None}
    return licences.pop() if len(licences) == 1 and None not in known else "other"
