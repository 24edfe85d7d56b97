"""``u2zoo convert``: weights → artifact, proven in its real runtime before it counts.

Every target goes through the same steps: resolve the weights, let the target's converter
write into a private staging folder, open the result with the target's runner, compare it
with the PyTorch reference on real photos, record the parity in the manifest, and only then
move the files into the output folder. A failed step leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.artifact import Artifact
from u2zoo.converters import ModelSource, get_target
from u2zoo.converters.base import network_size_for
from u2zoo.converters.options import judged_precision, stem_suffix
from u2zoo.errors import BackendUnavailable, ConfigError, ParityError
from u2zoo.files import ensure_writable_dir
from u2zoo.quantization.auto_fp import AUTO_PRECISIONS, DEFAULT_BUDGET, Attempt, check_options
from u2zoo.quantization.auto_fp import applies as auto_fp_applies
from u2zoo.quiet import third_party_quiet
from u2zoo.runtime.compare import Parity, Tolerance, compare
from u2zoo.runtime.gates import convert_tolerance
from u2zoo.runtime.pipeline import network_size, preprocess_files, run_batched
from u2zoo.staging import staging_folder
from u2zoo.zoo.archs import count_params
from u2zoo.zoo.reference import TorchPredictor, sample_images
from u2zoo.zoo.weights import load_model

# A deliberately odd shape: dynamic artifacts must also run on it (batch 2, 97×131).
ODD_SHAPE = (2, 3, 97, 131)


def measure_parity(runner, reference: TorchPredictor, images: list[Path], tolerance: Tolerance) -> Parity:
    """Compare ``runner`` with the torch ``reference`` on the same preprocessed ``images``."""
    contract = runner.artifact.contract
    inputs = preprocess_files(images, contract, network_size(runner, contract))
    return compare(run_batched(reference, inputs), run_batched(runner, inputs), tolerance)


def measure_odd_shape_parity(runner, reference: TorchPredictor, tolerance: Tolerance) -> Parity:
    """Dynamic artifacts must hold on a shape nobody exports with: batch 2 of 97×131 (at the
    artifact's own height and width when only its batch is dynamic)."""
    shape = ODD_SHAPE if runner.fixed_size is None else (ODD_SHAPE[0], 3, *runner.fixed_size)
    odd = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return compare(reference.predict(odd), runner.predict(odd), tolerance)


def artifact_stem(arch: str, target: str, opts: Any) -> str:
    """File stem that tells artifacts of one model apart: u2netp_tflite_int8_nhwc, …_fp16_pal4."""
    return f"{arch}_{target}_{getattr(opts, 'precision', 'fp32')}{stem_suffix(opts)}"


def convert_model(
    model: str,
    target: str,
    out_dir: str | Path,
    *,
    weights: str | None = None,
    weights_sha256: str | None = None,
    random_weights: bool = False,
    contract_variant: str | None = None,
    parity_images: list[Path] | None = None,
    tolerance: Tolerance | None = None,
    progress: bool = True,
    auto_fp: bool = True,
    fp_budget: float | None = None,
    **options: Any,
) -> Artifact:
    """Convert ``model`` for ``target`` into ``out_dir`` and prove it; return the artifact.

    ``options`` are the target's typed options (e.g. ``precision="fp16", dynamic=True``); one
    the target does not have raises ``ConfigError`` rather than being ignored. A target that
    builds from ONNX (TensorRT) gets its ONNX as an artifact of its own first, proven in ONNX
    Runtime and published beside it; where the target cannot finish on this host, its handoff
    (e.g. a trtexec script) is written and the conversion fails with the reason.

    INT8 (``int8``, ``dynamic-int8``) that misses its gate keeps the most sensitive layer groups
    in float until it passes, within ``fp_budget`` of the MACs (``u2zoo.quantization.auto_fp``);
    ``auto_fp=False`` turns that off.
    """
    spec = get_target(target)
    opts = spec.make_options(**options)
    budget = check_options(auto_fp, fp_budget)
    if (fp_budget is not None or not auto_fp) and getattr(opts, "precision", "fp32") not in AUTO_PRECISIONS:
        raise ConfigError(
            f"--no-auto-fp and --fp-budget only apply to --int8 and --dynamic-int8 "
            f"(this is {getattr(opts, 'precision', 'fp32')})"
        )
    (get_target("onnx") if spec.source == "onnx" else spec).ensure_available()
    out_dir = ensure_writable_dir(Path(out_dir))
    torch_model, weights_info, contract = load_model(
        model,
        weights,
        weights_sha256,
        random_weights,
        deploy=True,
        progress=progress,
        contract_variant=contract_variant,
    )
    source = ModelSource(torch_model, weights_info, contract, weights_info.arch, count_params(torch_model))
    images = parity_images or sample_images()
    parent = None
    if spec.source == "onnx":
        parent = _onnx_input(spec, opts, source, out_dir, images, auto_fp, budget)
        reason = spec.unavailable_reason()
        if reason:
            handoff = f"; {spec.handoff(parent, opts, out_dir)}" if spec.handoff else ""
            raise BackendUnavailable(f"cannot build the {target} artifact here: {reason}{handoff}")
    return _convert_and_prove(spec, opts, source, out_dir, images, tolerance, parent, auto_fp, budget)


def _onnx_input(
    spec, opts: Any, source: ModelSource, out_dir: Path, images: list[Path], auto_fp: bool, budget: float
) -> Artifact:
    """The ONNX an onnx-source target builds from: the user's file (``opts.onnx``), proven
    against the model in ONNX Runtime, or a new ONNX artifact made for it."""
    onnx_spec = get_target("onnx")
    given = getattr(opts, "onnx", None)
    if not given:
        onnx_opts = onnx_spec.make_options(**spec.onnx_options(opts))
        return _convert_and_prove(onnx_spec, onnx_opts, source, out_dir, images, None, None, auto_fp, budget)
    from u2zoo.converters.onnx import adopt_onnx

    artifact = adopt_onnx(Path(given), source)
    tolerance = convert_tolerance(source.arch, onnx_spec.name, artifact.precision)
    with onnx_spec.runner(artifact) as runner:
        parity = measure_parity(runner, TorchPredictor(source.model), images, tolerance)
    artifact.manifest["parity"] = parity.to_dict() | {"status": "ok" if parity else "failed"}
    if not parity:
        raise ParityError(
            f"{given} does not reproduce {source.arch} with these weights in ONNX Runtime: {parity.summary()}"
        )
    return artifact


def _convert_and_prove(
    spec,
    opts: Any,
    source: ModelSource,
    out_dir: Path,
    images: list[Path],
    tolerance: Tolerance | None,
    parent: Artifact | None = None,
    auto_fp: bool = True,
    fp_budget: float = DEFAULT_BUDGET,
) -> Artifact:
    """Convert into a staging folder, measure parity in the real runtime, then publish.

    INT8 that misses its gate goes through the automatic float fallback
    (``u2zoo.quantization.auto_fp``) unless ``auto_fp`` is off or groups were chosen by hand.
    """
    precision = getattr(opts, "precision", "fp32")
    tolerance = tolerance or convert_tolerance(source.arch, spec.name, judged_precision(opts))
    if getattr(opts, "calib", None) and precision in AUTO_PRECISIONS:
        _warn_calibration_overlap(opts, source, images)

    with staging_folder(out_dir) as staging:
        why_not = auto_fp_applies(spec.name, opts) if auto_fp else "turned off (--no-auto-fp)"
        not_runnable = spec.runtime_unavailable_reason()
        if why_not is None and not_runnable:
            why_not = f"parity cannot be measured here ({not_runnable})"
        started = time.perf_counter()
        screened = _screened_out(spec, opts, source, images, tolerance) if why_not is None else None
        if screened is not None:  # all-INT8 clearly fails: straight to the fallback, nothing built
            first, failures = None, [screened["screened"]]
            first_try = Attempt((), 0.0, False, screened, seconds=time.perf_counter() - started)
        else:
            first, failures = _attempt(spec, opts, source, staging / "step0", images, tolerance, parent)
            first_try = _all_int8(first, time.perf_counter() - started)
        if failures and why_not is None:
            artifact = _float_fallback(spec, opts, source, staging, images, tolerance, parent, fp_budget, first_try)
        elif failures:
            raise ParityError(
                f"{spec.name} {precision} artifact rejected: {'; '.join(failures)}"
                + (_FALLBACK_HINT if precision in AUTO_PRECISIONS else "")
            )
        else:
            artifact = first
            if precision in AUTO_PRECISIONS:
                artifact.manifest["auto_fp"] = (
                    {"status": "off", "reason": why_not}
                    if why_not
                    else {"status": "passed", "steps": [first_try.to_dict()], "kept_in_float": [], "float_macs": 0.0}
                )
        return _publish(artifact, artifact.path.parent, out_dir)


_FALLBACK_HINT = (
    "; the automatic float fallback did not run (it runs unless --no-auto-fp or hand-picked "
    "--keep-fp/--keep-fp-groups): see `u2zoo sensitivity`"
)


def _attempt(
    spec, opts: Any, source: ModelSource, where: Path, images: list[Path], tolerance: Tolerance, parent: Artifact | None
) -> tuple[Artifact, list[str]]:
    """One conversion into ``where`` and its parity in the real runtime; returns the failures."""
    with third_party_quiet():
        return _attempt_quietly(spec, opts, source, where, images, tolerance, parent)


def _attempt_quietly(
    spec, opts: Any, source: ModelSource, where: Path, images: list[Path], tolerance: Tolerance, parent: Artifact | None
) -> tuple[Artifact, list[str]]:
    where.mkdir(parents=True)
    stem = artifact_stem(source.arch, spec.name, opts)
    artifact = (
        spec.convert(source, opts, where, stem) if parent is None else spec.convert(source, opts, where, stem, parent)
    )
    not_runnable = spec.runtime_unavailable_reason()
    if not_runnable:
        # Built and validated by the converter (see manifest "validation"), but its runtime
        # is not on this host: say so in the manifest instead of claiming parity.
        artifact.manifest["parity"] = {"status": "not_run", "reason": not_runnable}
        return artifact, []
    reference = TorchPredictor(source.model)
    with spec.runner(artifact) as runner:
        parity = measure_parity(runner, reference, images, tolerance)
        record = parity.to_dict() | {"images": [p.name for p in images]}
        failures = [] if parity else [parity.summary()]
        if getattr(opts, "dynamic", False):
            # noise at an odd shape: its errors are held to the photos' limits, but an IoU of
            # noise maps means nothing, and int8 ranges come from photos (no limits: it must run)
            precision = getattr(opts, "precision", "fp32")
            odd_tolerance = (
                Tolerance() if precision.startswith("int8") else Tolerance(tolerance.max_abs, tolerance.mean_abs)
            )
            odd = measure_odd_shape_parity(runner, reference, odd_tolerance)
            record["odd_shape"] = odd.to_dict()
            failures += [] if odd else [odd.summary()]
    artifact.manifest["parity"] = record | {"status": "ok" if not failures else "failed"}
    return artifact, failures


SCREEN_MARGIN = 0.03  # IoU@0.5 below the gate at which a stand-in's miss is trusted


def _screened_out(
    spec, opts: Any, source: ModelSource, images: list[Path], tolerance: Tolerance
) -> dict[str, Any] | None:
    """The parity record of a float-fallback candidate whose stand-in (``spec.screen``: its
    quantized numerics before the target's slow last step) misses an IoU gate by more than
    ``SCREEN_MARGIN``; that candidate is then not built. None: build it and measure it in the
    real runtime, as every candidate that might pass is, and every artifact written."""
    verdict = _screen(spec, opts, source, images, tolerance)
    return verdict[1] if verdict is not None and verdict[0] == "out" else None


def _screen(
    spec, opts: Any, source: ModelSource, images: list[Path], tolerance: Tolerance
) -> tuple[str, dict[str, Any]] | None:
    """Judge a candidate on its stand-in: ``("out", record)`` when it misses the IoU gate by more
    than ``SCREEN_MARGIN``, ``("pass", record)`` when it meets the gate itself, None when there is
    no stand-in or it misses narrowly (only the runtime can tell then)."""
    if spec.screen is None or tolerance.iou50_min is None or getattr(opts, "precision", "") != "int8":
        return None
    with third_party_quiet():
        stand_in = spec.screen(source, opts)
    inputs = preprocess_files(images, source.contract, network_size_for(opts, source))
    parity = compare(run_batched(TorchPredictor(source.model), inputs), run_batched(stand_in, inputs), tolerance)
    record = parity.to_dict() | {"images": [p.name for p in images]}
    if parity:
        return "pass", record | {
            "screened": f"not built: {stand_in.what} met the gate (IoU@0.5 {parity.iou50:.4f}); "
            "built only if no candidate with fewer MACs in float passes in the "
            "runtime"
        }
    if parity.iou50 >= tolerance.iou50_min - SCREEN_MARGIN:
        return None
    return "out", record | {
        "status": "failed",
        "screened": f"not built: {stand_in.what} reached IoU@0.5 {parity.iou50:.4f}, "
        f"more than {SCREEN_MARGIN} below the gate ({tolerance.describe()})",
    }


def _all_int8(first: Artifact, seconds: float) -> Attempt:
    parity = first.manifest["parity"]
    return Attempt((), 0.0, parity["status"] == "ok", parity, seconds=seconds)


def _float_fallback(
    spec,
    opts: Any,
    source: ModelSource,
    staging: Path,
    images: list[Path],
    tolerance: Tolerance,
    parent: Artifact | None,
    budget: float,
    first: Attempt,
) -> Artifact:
    """All-INT8 missed the gate: put ranked groups back in float until it passes (auto_fp)."""
    import dataclasses

    from u2zoo.quantization.auto_fp import children_ranking_for, failure_message, group_macs, ranking_for, search
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.runtime.timing import measure_latency

    size = network_size_for(opts, source)
    calib = calibration_set(opts.calib, source.contract, opts.calib_size, size, warn=False)
    export_graph = _ranking_graph_exporter(spec.name, opts, source, size)
    ranking, ranking_record = ranking_for(source, calib, size, export_graph)
    macs, total = group_macs(source.model)
    counter = iter(range(1, 10_000))

    def attempt(groups: tuple[str, ...], share: float) -> Attempt:
        started = time.perf_counter()
        try:
            verdict = _screen(spec, dataclasses.replace(opts, keep_fp_groups=groups), source, images, tolerance)
            if verdict is not None:  # judged on the stand-in: out, or provisional until proven
                kind, record = verdict
                return Attempt(
                    groups,
                    share,
                    kind == "pass",
                    record,
                    seconds=time.perf_counter() - started,
                    provisional=kind == "pass",
                )
            return build(groups, share, started)
        except ConfigError as exc:  # e.g. a group this backend cannot name: not a candidate here
            return Attempt(groups, share, False, {"error": str(exc)}, seconds=time.perf_counter() - started)

    def build(groups: tuple[str, ...], share: float, started: float) -> Attempt:
        candidate = dataclasses.replace(opts, keep_fp_groups=groups)
        artifact, failures = _attempt(
            spec, candidate, source, staging / f"step{next(counter)}", images, tolerance, parent
        )
        return Attempt(
            groups,
            share,
            not failures,
            artifact.manifest["parity"],
            None if failures else artifact,
            seconds=time.perf_counter() - started,
        )

    def prove(provisional: Attempt) -> Attempt:
        """Build a candidate that passed on its stand-in; its record keeps the stand-in's IoU."""
        built = build(provisional.keep_fp_groups, provisional.float_macs, time.perf_counter())
        built.parity["stand_in_iou50"] = provisional.parity.get("iou50")
        built.seconds = (built.seconds or 0.0) + (provisional.seconds or 0.0)
        return built

    photo = preprocess_files(images[:1], source.contract, size)

    def latency(artifact: Artifact) -> float:
        with spec.runner(artifact) as runner:  # the runner loads quietly itself
            return measure_latency(runner, photo, runs=10, warmup=2).p50_ms

    result = search(
        spec.name,
        ranking,
        ranking_record,
        macs,
        total,
        budget,
        attempt,
        first,
        latency,
        children=lambda group: children_ranking_for(source, calib, size, group, export_graph),
        prove=prove,
    )
    precision = getattr(opts, "precision", "int8")
    if result.chosen is None:
        raise ParityError(failure_message(spec.name, precision, result, budget, tolerance.describe(), source.arch))
    artifact = result.chosen.artifact
    artifact.manifest["auto_fp"] = result.record(budget)
    return artifact


def _ranking_graph_exporter(target: str, opts: Any, source: ModelSource, size: tuple[int, int]):
    """What writes the ranking's ONNX graph (``auto_fp.ExportGraph``). For an ONNX Runtime INT8
    conversion it exports with that conversion's own options, so the ranking reuses the ranges its
    all-INT8 attempt cached; other targets get a static graph at the network size. The ranking
    calibrates with min/max, so only a min/max conversion's ranges can serve."""
    from u2zoo.converters.onnx import INPUT_NAME, OnnxOptions, export_onnx

    if target == "onnx" and getattr(opts, "calib_method", "minmax") == "minmax":
        graph = OnnxOptions(
            dynamic=opts.dynamic,
            opset=opts.opset,
            batch=opts.batch,
            height=opts.height,
            width=opts.width,
            exporter=opts.exporter,
            simplify=opts.simplify,
        )
    else:
        graph = OnnxOptions(batch=1, height=size[0], width=size[1])

    def export_graph(path: Path) -> str:
        export_onnx(source.model, path, graph, *size)
        return INPUT_NAME

    return export_graph


def _warn_calibration_overlap(opts: Any, source: ModelSource, images: list[Path]) -> None:
    """Parity measured on calibration images flatters INT8: say so (it is not an error)."""
    from u2zoo.quantization.calibration import calibration_set

    calib_path = Path(opts.calib)
    if calib_path.suffix == ".npz":
        return
    calib = calibration_set(calib_path, source.contract, opts.calib_size, network_size_for(opts, source), warn=False)
    shared = calib.overlap(images)
    if shared:
        print(
            f"u2zoo: warning: {len(shared)} of the {len(images)} parity image(s) are also calibration images "
            f"({', '.join(p.name for p in shared[:3])}{', …' if len(shared) > 3 else ''}): parity on them is "
            "optimistic; pass --parity-images with other photos",
            file=sys.stderr,
        )


def _publish(artifact: Artifact, staging: Path, out_dir: Path) -> Artifact:
    """Move the artifact's files (a file or a folder such as an .mlpackage) out of staging."""
    for entry in artifact.manifest["files"]:
        target = out_dir / entry["name"]
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / entry["name"], target)
    artifact.path = out_dir / artifact.path.name
    artifact.save()
    return artifact
