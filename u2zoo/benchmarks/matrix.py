"""The parity-and-speed matrix: models × targets × precisions, every cell proven or explained.

Per model, the images are read and preprocessed once and the PyTorch reference runs once;
every cell then replays exactly those inputs through its artifact in its real runtime. A
cell ends with a status — ``ok``, ``unavailable``, ``convert_failed``, ``run_failed`` or
``parity_failed`` — and a failing or missing backend never stops the run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from u2zoo.artifact import host_info, tool_versions
from u2zoo.benchmarks.results import MatrixRow
from u2zoo.converters import TARGETS
from u2zoo.converters.options import BenchCell, bench_options
from u2zoo.errors import ConfigError, U2ZooError, did_you_mean, one_line, tool_failure
from u2zoo.gpu import cuda_unavailable_reason
from u2zoo.quantization.auto_fp import AUTO_PRECISIONS
from u2zoo.quantization.auto_fp import applies as auto_fp_applies
from u2zoo.quantization.auto_fp import check_options as check_auto_fp_options
from u2zoo.runtime.compare import Tolerance, iou_at
from u2zoo.runtime.gates import Gates
from u2zoo.runtime.metrics import SaliencyMetrics, boundary_band
from u2zoo.runtime.pipeline import run_batched
from u2zoo.runtime.precisions import CALIBRATED_PRECISIONS, PRECISIONS
from u2zoo.runtime.timing import measure_latency, peak_rss_mb, reset_peak_rss
from u2zoo.zoo.contract import Contract, postprocess, preprocess
from u2zoo.zoo.images import IMAGE_SUFFIXES, list_images, load_mask, load_rgb
from u2zoo.zoo.reference import TorchPredictor
from u2zoo.zoo.weights import load_model

DEVICES = ("cpu", "cuda")

DATASET_CHUNK = 8  # images per engine call when a whole --data folder runs through one model


@dataclass
class BenchConfig:
    models: list[str]
    targets: list[str]
    precisions: list[str]
    data: Path
    out: Path
    gates: Gates
    gt: Path | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    random_weights: bool = False
    contract_variant: str | None = None  # None: the weights' default (README, "Contract variants")
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    runs: int = 20
    warmup: int = 3
    batches: tuple[int, ...] = (1, 4, 8, 16)
    boundary_band: int = 5
    calib: Path | None = None  # int8 calibration images; default: the readable images of `data`
    calib_size: int | None = None
    keep_fp: int = 0  # int8: keep the N most sensitive layer groups in float
    keep_fp_groups: tuple[str, ...] = ()  # int8: these layer groups stay in float too
    auto_fp: bool = True  # int8: the automatic float fallback of `convert` (u2zoo.quantization.auto_fp)
    fp_budget: float | None = None  # its budget, a share of the MACs (default 0.25)
    device: str = "cpu"  # where targets that can run on either device run (GPU-only ones: cuda)

    def validate(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r} (choose from: {', '.join(DEVICES)})")
        for target in self.targets:
            if target not in TARGETS:
                raise ConfigError(f"unknown target {target!r}{did_you_mean(target, TARGETS)}")
        for precision in self.precisions:
            if precision not in PRECISIONS:
                raise ConfigError(f"unknown precision {precision!r}{did_you_mean(precision, PRECISIONS)}")
        if self.runs < 1 or self.warmup < 0 or self.threads < 1 or any(b < 1 for b in self.batches):
            raise ConfigError("--runs and --threads must be ≥ 1, --warmup ≥ 0, batches ≥ 1")
        if not self.data.is_dir():
            raise ConfigError(f"data folder not found: {self.data}")
        if self.gt is not None and not self.gt.is_dir():
            raise ConfigError(f"ground-truth folder not found: {self.gt}")
        if self.calib is not None and not self.calib.is_dir():
            raise ConfigError(f"calibration folder not found: {self.calib}")
        check_auto_fp_options(self.auto_fp, self.fp_budget)


@dataclass
class BenchData:
    """The replayed inputs of one model: images, their preprocessed batch, optional GT masks."""

    paths: list[Path]
    images: list[np.ndarray]
    inputs: np.ndarray  # (N, 3, h, w) float32, the contract applied once
    gts: list[np.ndarray] | None
    notes: list[str]
    contract: Contract
    data_dir: Path | None = None
    gt_dir: Path | None = None

    def describe(self) -> dict[str, Any]:
        """What a row says about its data: the folders (their last three parts, no home paths)
        and the image count, so that an accuracy figure names the set it was measured on."""
        return {
            "images": _short(self.data_dir) if self.data_dir is not None else None,
            "gt": _short(self.gt_dir) if self.gt_dir is not None else None,
            "count": len(self.paths),
        }


def _short(path: Path) -> str:
    return "/".join(path.resolve().parts[-3:])


def _find_gt(gt_dir: Path, stem: str) -> Path | None:
    return next((gt_dir / f"{stem}{s}" for s in sorted(IMAGE_SUFFIXES) if (gt_dir / f"{stem}{s}").is_file()), None)


def load_bench_data(data_dir: Path, gt_dir: Path | None, contract: Contract) -> BenchData:
    """Read every image once (mixed sizes/modes converted; unreadable ones skipped and noted)."""
    paths, images, notes = [], [], []
    for path in list_images([data_dir]):
        try:
            images.append(load_rgb(path))
            paths.append(path)
        except U2ZooError as exc:
            notes.append(f"skipped {path.name}: {exc}")
    if not paths:
        raise ConfigError(f"no readable images in {data_dir}")
    gts = None
    if gt_dir is not None:
        found = {p: _find_gt(gt_dir, p.stem) for p in paths}
        missing = [p.stem for p, g in found.items() if g is None]
        if missing:
            raise ConfigError(
                f"{len(missing)} image(s) have no ground-truth mask in {gt_dir} "
                f"(e.g. {', '.join(missing[:3])}); masks pair with images by file stem"
            )
        gts, resized = [], 0
        for path, image in zip(paths, images):
            mask, was_resized = load_mask(found[path], image.shape[:2])
            gts.append(mask)
            resized += was_resized
        if resized:
            notes.append(f"resized {resized} ground-truth mask(s) to their image's size (nearest)")
    inputs = np.stack([preprocess(img, contract.pre) for img in images])
    return BenchData(paths, images, inputs, gts, notes, contract, data_dir, gt_dir)


def parity_metrics(reference: np.ndarray, candidate: np.ndarray, data: BenchData, band: int) -> dict[str, Any]:
    """Artifact vs torch: raw-map errors, and saliency metrics of both maps at image size."""
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    post = data.contract.post
    ref_maps = [postprocess(r, img.shape[:2], post) for r, img in zip(reference, data.images)]
    cand_maps = [postprocess(c, img.shape[:2], post) for c, img in zip(candidate, data.images)]
    truths = data.gts if data.gts is not None else [(m > 0.5).astype(np.float32) for m in ref_maps]
    ref_scores, cand_scores = SaliencyMetrics(band), SaliencyMetrics(band)
    boundary = []
    for ref_map, cand_map, truth in zip(ref_maps, cand_maps, truths):
        ref_scores.add(ref_map, truth)
        cand_scores.add(cand_map, truth)
        zone = boundary_band(ref_map > 0.5, band)
        boundary.append(float(np.abs(ref_map - cand_map)[zone].mean()) if zone.any() else 0.0)
    ref_result, cand_result = ref_scores.result(), cand_scores.result()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "iou50": float(np.mean([iou_at(r, c) for r, c in zip(ref_maps, cand_maps)])),
        "delta_mae": abs(cand_result.mae - ref_result.mae),
        "delta_max_f": ref_result.max_f - cand_result.max_f,
        "boundary_mae": float(np.mean(boundary)),
        "reference": "torch vs ground truth" if data.gts is not None else "torch (its own map at 0.5 as pseudo-GT)",
        "accuracy_reference": ref_result.to_dict() if data.gts is not None else None,
        "_candidate": cand_result,
    }


def measure_speed(runner, data: BenchData, cfg: BenchConfig, load_s: float) -> dict[str, Any]:
    """Engine latency (batch 1), batch throughput where allowed, end-to-end and peak memory."""
    one = data.inputs[:1]
    latency = measure_latency(runner, one, cfg.runs, cfg.warmup, cfg.threads)
    throughput = {}
    for batch in cfg.batches:
        if runner.fixed_batch not in (None, batch) or batch > (runner.max_batch or batch):
            continue  # a static artifact runs only its batch; a bounded one up to its maximum
        result = measure_latency(runner, np.repeat(one, batch, axis=0), max(3, cfg.runs // 4), 1, cfg.threads)
        throughput[str(batch)] = round(result.fps, 3)
    contract = data.contract
    e2e = []
    for image in data.images[: max(3, min(len(data.images), cfg.runs))]:
        started = time.perf_counter()
        out = run_batched(runner, preprocess(image, contract.pre, runner.fixed_size or contract.pre.size)[None])
        postprocess(out[0], image.shape[:2], contract.post)
        e2e.append((time.perf_counter() - started) * 1000)
    return {
        "threads": cfg.threads,
        "batch": 1,
        "runs": cfg.runs,
        "warmup": cfg.warmup,
        "latency_ms_p50": latency.p50_ms,
        "latency_ms_p90": latency.p90_ms,
        "latency_ms_mean": latency.mean_ms,
        "fps": latency.fps,
        "e2e_ms_p50": float(np.median(e2e)),
        "load_s": load_s,
        "peak_rss_mb": peak_rss_mb(),
        "throughput": throughput,
    }


def target_tools() -> list[str]:
    """The distributions every registered target needs, as a row's ``tools`` names them."""
    names = {"torch"} | {module.replace("_", "-") for spec in TARGETS.values() for module in spec.requires}
    return sorted(names)


def _row(
    run_id: str,
    model: str,
    target: str,
    precision: str,
    weights: dict | None,
    status: str,
    reason: str | None = None,
    device: str = "cpu",
    **measured: Any,
) -> MatrixRow:
    """A cell's row, stamped with this host and its tool versions."""
    tools = {k: v for k, v in tool_versions(*target_tools()).items() if v}
    return MatrixRow(
        run_id, model, target, precision, status, weights, device, reason, host=host_info(), tools=tools, **measured
    )


def dump_calibration(cfg: BenchConfig, model: str, data: BenchData) -> Path:
    """One calibration set per model, dumped once to .npz and replayed by every INT8 cell."""
    from u2zoo.quantization.calibration import CalibrationSet, calibration_set

    if cfg.calib is not None:
        calib = calibration_set(cfg.calib, data.contract, cfg.calib_size)
        shared = calib.overlap(data.paths)
        if shared:
            data.notes.append(
                f"{len(shared)} of the {len(data.paths)} bench image(s) are also calibration images: "
                "INT8 parity and accuracy on them are optimistic"
            )
    else:
        data.notes.append(
            "INT8 calibrated on the bench images themselves (no --calib): its parity and accuracy "
            "are optimistic; pass --calib with other images"
        )
        count = cfg.calib_size or len(data.paths)
        if count > len(data.paths):
            raise ConfigError(f"--calib-size {count} is larger than the {len(data.paths)} readable image(s)")
        calib = CalibrationSet(data.inputs[:count], str(cfg.data), tuple(p.name for p in data.paths[:count]))
    folder = cfg.out / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    return calib.save(folder / f"{model}.npz")


def cell_options(cfg: BenchConfig, spec, precision: str, calib: Path | None) -> dict[str, Any]:
    """The target options of one cell: dynamic where the target can be, and what each option's
    ``bench`` hook takes from the run's settings (``converters.options``), so that only options
    the target has are set and none is dropped."""
    cell = BenchCell(
        precision=precision,
        device=cfg.device,
        calib=str(calib) if calib is not None else None,
        largest_batch=max(cfg.batches),
        keep_fp=cfg.keep_fp,
        keep_fp_groups=tuple(cfg.keep_fp_groups),
    )
    options: dict[str, Any] = {"precision": precision}
    if spec.dynamic_shapes and "dynamic" in {f.name for f in dataclasses.fields(spec.options_type)}:
        options["dynamic"] = True
    return options | bench_options(spec.options_type, cell)


def cell_device(cfg: BenchConfig, spec) -> str:
    return "cuda" if spec.gpu_only else cfg.device


def run_cell(
    cfg: BenchConfig,
    run_id: str,
    model: str,
    target: str,
    precision: str,
    data: BenchData,
    reference: np.ndarray,
    weights: dict,
    calib: Path | None = None,
    options: dict[str, Any] | None = None,
) -> MatrixRow:
    """Convert, load, compare and time one cell; every failure becomes the cell's status."""
    from u2zoo.conversion import convert_model

    spec = TARGETS.get(target)
    device = cfg.device if spec is None else cell_device(cfg, spec)

    def row(status: str, reason: str | None = None, **measured: Any) -> MatrixRow:
        return _row(
            run_id,
            model,
            target,
            precision,
            weights,
            status,
            reason,
            device=device,
            notes=list(data.notes),
            data=data.describe(),
            **measured,
        )

    if spec is None:
        return row("unavailable", f"target {target!r} is not implemented in this version of u2zoo")
    if precision not in spec.precisions:
        return row("unavailable", spec.precision_unsupported_reason(precision))
    if device not in spec.devices:
        return row("unavailable", f"{target} runs on {'/'.join(spec.devices)} only, not {device}")
    if options is None:
        options = cell_options(cfg, spec, precision, calib)
    try:
        typed = spec.make_options(**options)
    except ConfigError as exc:  # a combination this target does not offer (e.g. fp16 on CPU)
        return row("unavailable", _one_line(exc), options=options)
    if spec.source == "onnx" and spec.unavailable_reason() and not TARGETS["onnx"].missing_modules():
        return _handoff_cell(cfg, run_id, model, spec, typed, options, data, reference, weights, row)
    missing = spec.missing_modules()
    if missing:
        return row("unavailable", spec.unavailable_reason())
    no_gpu = cuda_unavailable_reason() if device == "cuda" else None
    if no_gpu:
        return row("unavailable", f"{target} on cuda: {no_gpu}", options=options)
    # With the float fallback on, the conversion itself must meet convert's INT8 gate (that is
    # what the search aims at); every other cell converts unjudged and the bench gate decides.
    searching = cfg.auto_fp and precision in AUTO_PRECISIONS and auto_fp_applies(target, typed) is None
    try:
        artifact = convert_model(
            model_name(model),
            target,
            cfg.out / "artifacts" / model.replace("/", "_"),
            weights=cfg.weights,
            weights_sha256=cfg.weights_sha256,
            contract_variant=cfg.contract_variant,
            random_weights=cfg.random_weights,
            parity_images=data.paths[:4],
            tolerance=None if searching else Tolerance(),
            progress=False,
            **({"auto_fp": cfg.auto_fp, "fp_budget": cfg.fp_budget} if precision in AUTO_PRECISIONS else {}),
            **options,
        )
    except Exception as exc:  # noqa: BLE001 - a failing backend must never stop the matrix
        return row("convert_failed", _one_line(exc), options=options)
    files = artifact.manifest["files"]  # e.g. OpenVINO's .xml + .bin: the size is all of them
    art = {"file": files[0]["name"], "size_bytes": sum(f["size"] for f in files), "sha256": files[0]["sha256"]}
    not_runnable = spec.runtime_unavailable_reason()
    if not_runnable:  # built and validated here, but its runtime lives elsewhere (e.g. CoreML on macOS)
        validation = artifact.manifest.get("validation") or {}
        notes = [*data.notes, *(f"{k}: {v}" for k, v in validation.get("summary", {}).items())]
        return _row(
            run_id,
            model,
            target,
            precision,
            weights,
            "unavailable",
            f"{not_runnable}; artifact built and validated, parity and speed not measured",
            device=device,
            notes=notes,
            options=options,
            artifact=art,
        )
    reset_peak_rss()
    try:
        started = time.perf_counter()
        with spec.runner(artifact, threads=cfg.threads) as runner:
            load_s = time.perf_counter() - started
            outputs = run_batched(runner, data.inputs, chunk=DATASET_CHUNK)
            speed = measure_speed(runner, data, cfg, load_s)
    except Exception as exc:  # noqa: BLE001
        return row("run_failed", _one_line(exc), options=options, artifact=art)
    parity = parity_metrics(reference, outputs, data, cfg.boundary_band)
    candidate = parity.pop("_candidate")
    accuracy = candidate.to_dict() if data.gts is not None else None
    failures = cfg.gates.evaluate(model_name(model), target, precision, parity)
    gate = {"passed": not failures, "failures": failures, "source": cfg.gates.source}
    return row(
        "parity_failed" if failures else "ok",
        "; ".join(failures) or None,
        options=options,
        artifact=art,
        parity=parity,
        accuracy=accuracy,
        speed=speed,
        gate=gate,
    )


def _handoff_cell(
    cfg: BenchConfig,
    run_id: str,
    model: str,
    spec,
    typed: Any,
    options: dict[str, Any],
    data: BenchData,
    reference: np.ndarray,
    weights: dict,
    row: Callable[..., MatrixRow],
) -> MatrixRow:
    """A chain target that cannot finish here (TensorRT without TensorRT or a GPU): prove the
    ONNX it would build from, in ONNX Runtime, and report that parity under an ``unavailable``
    status — never ``ok``, and never with the ONNX's CPU speed in the target's row."""
    reason = spec.unavailable_reason()
    onnx_options = spec.onnx_options(typed)
    onnx_row = run_cell(
        dataclasses.replace(cfg, device="cpu"),
        run_id,
        model,
        "onnx",
        typed.precision,
        data,
        reference,
        weights,
        options={k: v for k, v in onnx_options.items() if v is not None},
    )
    if onnx_row.status != "ok":
        return row(
            onnx_row.status,
            f"{spec.name}-ready ONNX: {onnx_row.reason}",
            options=options,
            artifact=onnx_row.artifact,
            parity=onnx_row.parity,
            gate=onnx_row.gate,
        )
    return row(
        "unavailable",
        f"{reason}; engine not built. Parity shown is of the {spec.name}-ready ONNX "
        f"({onnx_row.artifact['file']}) in ONNX Runtime on CPU",
        options=options,
        artifact=onnx_row.artifact,
        parity=onnx_row.parity,
        accuracy=onnx_row.accuracy,
        gate=onnx_row.gate,
    )


def _one_line(exc: BaseException) -> str:
    """A cell's failure: u2zoo's own message as is, a tool's with its exception type."""
    return one_line(exc) if isinstance(exc, U2ZooError) else tool_failure(exc, limit=None)


def model_name(label: str) -> str:
    """The model a row label names: ``u2netp@u2netp_pruned30`` → ``u2netp``."""
    return label.partition("@")[0]


def _model_entry(cfg: BenchConfig, entry: str) -> tuple[str, BenchConfig]:
    """``NAME`` uses --weights; ``NAME@PATH`` compares another checkpoint of NAME in the same
    run (e.g. pruned vs unpruned): its rows are labelled ``NAME@<file stem>``."""
    name, _, path = entry.partition("@")
    if not path:
        return entry, cfg
    if cfg.random_weights:
        raise ConfigError(f"--model {entry} names weights; --random-weights excludes them")
    return f"{name}@{Path(path).stem}", dataclasses.replace(cfg, weights=path, weights_sha256=None)


def run_matrix(cfg: BenchConfig, on_row: Callable[[MatrixRow], None] | None = None) -> list[MatrixRow]:
    """Run every cell of the matrix; ``on_row`` sees each row as soon as it exists."""
    cfg.validate()
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    rows = []
    for entry in cfg.models:
        model, model_cfg = _model_entry(cfg, entry)
        torch_model, info, contract = load_model(
            model_name(model),
            model_cfg.weights,
            model_cfg.weights_sha256,
            cfg.random_weights,
            deploy=True,
            progress=False,
            contract_variant=cfg.contract_variant,
        )
        data = load_bench_data(cfg.data, cfg.gt, contract)
        reference = run_batched(TorchPredictor(torch_model, threads=cfg.threads), data.inputs, chunk=DATASET_CHUNK)
        calib = dump_calibration(cfg, model, data) if set(CALIBRATED_PRECISIONS) & set(cfg.precisions) else None
        for target in cfg.targets:
            for precision in cfg.precisions:
                row = run_cell(model_cfg, run_id, model, target, precision, data, reference, info.to_dict(), calib)
                rows.append(row)
                if on_row:
                    on_row(row)
    return rows
