"""The ``u2zoo`` command line. Every expected failure is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from u2zoo.errors import ConfigError, U2ZooError, one_line
from u2zoo.tasks.cli_args import add_contract_arg, add_weights_args, open_predictor

def _add_auto_fp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-auto-fp", dest="auto_fp", action="store_false",
                   help="int8: no automatic float fallback when the gate fails (it is on by default)")
    p.add_argument("--fp-budget", type=float,
                   help="int8: the fallback keeps at most this share of the MACs in float (default 0.25)")


# precision flags of `convert`; each one is also the precision's name in manifests and bench
_PRECISION_FLAGS = ("fp16", "int8", "int8-qat", "dynamic-int8", "int8-weights")


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user actually set: a target that lacks one must say so."""
    options: dict[str, Any] = {}
    chosen = [flag for flag in _PRECISION_FLAGS if getattr(args, flag.replace("-", "_"))]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join('--' + f for f in chosen)} exclude each other")
    if chosen:
        options["precision"] = chosen[0]
    for name in ("dynamic", "opset", "batch", "height", "width", "exporter", "calib", "calib_size",
                 "calib_method", "keep_fp", "accuracy_control", "max_drop", "bias_correction", "int8_scheme", "nhwc",
                 "palettize", "image_input", "deployment_target", "device", "min_batch", "opt_batch", "max_batch",
                 "workspace_mb", "timing_cache", "onnx", "compile_mode", "qat_epochs", "qat_lr"):
        value = getattr(args, name)
        if value is not None and value is not False:  # 0 is a value the target must judge
            options[name] = value
    if args.keep_fp_groups:
        options["keep_fp_groups"] = tuple(_csv(args.keep_fp_groups))
    return options


def _auto_fp_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only what the user set, so that convert can refuse them for a non-INT8 precision."""
    kwargs: dict[str, Any] = {} if args.auto_fp else {"auto_fp": False}
    if args.fp_budget is not None:
        kwargs["fp_budget"] = args.fp_budget
    return kwargs


def _print_auto_fp(record: dict[str, Any] | None) -> None:
    if not record or record.get("status") == "off":
        return
    for step in record["steps"]:
        groups = ", ".join(step["keep_fp_groups"]) or "none (all INT8)"
        speed = f", p50 {step['p50_ms']:.1f} ms" if "p50_ms" in step else ""
        parity = step["parity"]
        iou = f"IoU@0.5 {parity['iou50']:.4f}" if parity.get("iou50") is not None else "not converted"
        verdict = "passed" if step["passed"] else "failed"
        if "screened" in step:
            verdict += " (screened, not built)"
        print(f"int8 float fallback: float [{groups}] ({step['float_macs']:.1%} of MACs): {iou}{speed} — {verdict}")
    if record["kept_in_float"] is not None:
        print(f"int8 float fallback: kept [{', '.join(record['kept_in_float']) or 'nothing'}] in float "
              f"({record['float_macs']:.1%} of MACs)")


def cmd_convert(args: argparse.Namespace) -> int:
    from u2zoo.convert import convert_model
    from u2zoo.zoo.images import list_images

    images = list_images([args.parity_images]) if args.parity_images else None
    if args.parity_images and not images:
        raise U2ZooError(f"no images in {args.parity_images}")
    artifact = convert_model(args.model, args.target, args.out, weights=args.weights,
                             weights_sha256=args.weights_sha256, random_weights=args.random_weights,
                             contract_variant=args.contract, parity_images=images, progress=not args.quiet,
                             **_auto_fp_kwargs(args), **_target_options(args))
    parity = artifact.manifest["parity"]
    _print_auto_fp(artifact.manifest.get("auto_fp"))
    print(f"wrote {artifact.path} ({artifact.manifest['files'][0]['size'] / 1e6:.2f} MB) and {artifact.manifest_path.name}")
    for line in artifact.manifest.get("validation", {}).get("summary", {}).items():
        print(f"validated: {line[0]}: {line[1]}")
    if parity.get("status") == "not_run":
        print(f"parity vs torch: NOT RUN — {parity['reason']} (run `u2zoo bench` there to measure it)")
        return 0
    print(f"parity vs torch on {parity['num_images']} image(s): max abs {parity['max_abs']:.3g}, "
          f"mean abs {parity['mean_abs']:.3g}, IoU@0.5 {parity['iou50']:.4f} — ok")
    if "odd_shape" in parity:
        odd = parity["odd_shape"]
        print(f"dynamic shape check {odd['shape']}: max abs {odd['max_abs']:.3g} — ok")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Masks, cut-outs and composites of files and folders, through any model or artifact."""
    from u2zoo.converters.base import ensure_writable_dir
    from u2zoo.tasks.cli_args import open_segmenter, output_options
    from u2zoo.tasks.folder import process_files
    from u2zoo.zoo.images import shown

    out = ensure_writable_dir(Path(args.out))
    options = output_options(args)
    with open_segmenter(args, args.batch) as segmenter:
        report = process_files(segmenter, args.inputs, out, options, resume=args.resume,
                               max_pixels=args.max_pixels, progress=not args.quiet)
    for path, reason in report.failed:
        print(f"u2zoo: skipped {shown(path)}: {reason}", file=sys.stderr)
    for path, note in report.notes:
        print(f"u2zoo: note: {shown(path)}: {note}", file=sys.stderr)
    if report.not_images:
        names = ", ".join(shown(p.name) for p in report.not_images[:5])
        names += ", …" if len(report.not_images) > 5 else ""
        print(f"u2zoo: skipped {len(report.not_images)} non-image file(s) in the folders: {names}", file=sys.stderr)
    resumed = f", {len(report.resumed)} already done (--resume)" if args.resume else ""
    print(f"wrote {len(report.written)} file(s) to {shown(out)}; {report.processed} image(s) in {report.seconds:.2f} s "
          f"= {report.images_per_s:.2f} images/s end to end at batch {segmenter.batch_size} (engine calls "
          f"{segmenter.engine_seconds:.2f} s); {len(report.failed)} input(s) failed{resumed}")
    return 1 if report.failed else 0


def cmd_time(args: argparse.Namespace) -> int:
    """Engine-call latency of a model (torch) or an artifact on a real sample photo."""
    import numpy as np

    from u2zoo.runtime.timing import measure_latency
    from u2zoo.runtime.pipeline import network_size, preprocess_files
    from u2zoo.zoo.reference import sample_images

    if args.runs < 1:
        raise ConfigError("--runs must be at least 1")
    context, contract = open_predictor(args)
    with context as predictor:
        size = network_size(predictor, contract)
        batch = np.repeat(preprocess_files(sample_images()[:1], contract, size), args.batch, axis=0)
        result = measure_latency(predictor, batch, args.runs, args.warmup, args.threads)
    what = args.artifact or f"{args.model} (torch eager)"
    print(f"{what}: batch {result.batch} at {size[0]}×{size[1]}, threads {args.threads or 'default'}: "
          f"p50 {result.p50_ms:.2f} ms, p90 {result.p90_ms:.2f} ms, mean {result.mean_ms:.2f} ms, "
          f"{result.fps:.1f} img/s ({result.runs} runs after {result.warmup} warm-up)")
    return 0


def _csv(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def cmd_bench(args: argparse.Namespace) -> int:
    """The parity-and-speed matrix; with --gate, failing cells make the exit code non-zero."""
    from u2zoo.benchmarks.gates import load_gates
    from u2zoo.benchmarks.matrix import BenchConfig, run_matrix
    from u2zoo.benchmarks.report import write_results
    from u2zoo.converters.base import ensure_writable_dir

    gates = load_gates(None if args.gate in (None, "default") else args.gate)
    if args.batches is None:  # GPUs are judged at the batches servers use
        args.batches = "1,8,16" if args.device == "cuda" else "1,4,8,16"
    try:
        batches = tuple(int(b) for b in _csv(args.batches))
    except ValueError:
        raise ConfigError(f"--batches must be comma-separated integers, not {args.batches!r}") from None
    cfg = BenchConfig(
        models=_csv(args.model), targets=_csv(args.targets), precisions=_csv(args.precisions),
        data=Path(args.data), gt=Path(args.gt) if args.gt else None, out=Path(args.out), gates=gates,
        weights=args.weights, weights_sha256=args.weights_sha256, random_weights=args.random_weights,
        contract_variant=args.contract, runs=args.runs, warmup=args.warmup, batches=batches, boundary_band=args.boundary_band, device=args.device,
        calib=Path(args.calib) if args.calib else None, calib_size=args.calib_size, keep_fp=args.keep_fp,
        keep_fp_groups=tuple(_csv(args.keep_fp_groups)) if args.keep_fp_groups else (),
        auto_fp=args.auto_fp, fp_budget=args.fp_budget,
        **({"threads": args.threads} if args.threads else {}),
    )
    cfg.validate()
    ensure_writable_dir(cfg.out)

    def progress(row: dict) -> None:
        if not args.quiet:
            print(f"  {row['model']}/{row['target']}/{row['precision']}: {row['status']}"
                  + (f" ({row['reason']})" if row["reason"] else ""), file=sys.stderr)

    rows = run_matrix(cfg, on_row=progress)
    paths = write_results(rows, cfg.out)
    print(paths["markdown"].read_text(encoding="utf-8"))
    for note in sorted({n for row in rows for n in row.get("notes", [])}):
        print(f"note: {note}")
    print(f"results: {', '.join(str(p) for p in paths.values())}")
    failing = [r for r in rows if r["status"] in ("convert_failed", "run_failed", "parity_failed")]
    unavailable = [r for r in rows if r["status"] == "unavailable"]
    if unavailable:
        print(f"{len(unavailable)} cell(s) unavailable on this host (see the reason column)")
    if args.gate is None:
        return 0
    for r in failing:
        print(f"gate failed: {r['model']}/{r['target']}/{r['precision']}: {r['status']}: {r['reason']}", file=sys.stderr)
    if args.fail_on_unavailable:
        for r in unavailable:
            print(f"gate failed: {r['model']}/{r['target']}/{r['precision']}: unavailable: {r['reason']}", file=sys.stderr)
        failing += unavailable
    return 1 if failing else 0


def cmd_report(args: argparse.Namespace) -> int:
    from u2zoo.benchmarks.report import load_results, write_report
    from u2zoo.converters.base import ensure_writable_dir

    rows = load_results([Path(p) for p in args.results])
    paths = write_report(rows, ensure_writable_dir(Path(args.out)))
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Rank layer groups by the output error their INT8 quantization alone causes."""
    import tempfile

    from u2zoo.convert import convert_model
    from u2zoo.quantization.calibration import calibration_set
    from u2zoo.quantization.onnx_int8 import sensitivity

    if args.eval_images < 1:
        raise ConfigError("--eval-images must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = convert_model(args.model, "onnx", tmp, weights=args.weights, weights_sha256=args.weights_sha256,
                                 random_weights=args.random_weights, contract_variant=args.contract, progress=False)
        calib = calibration_set(args.calib, artifact.contract, args.calib_size)
        ranking = sensitivity(artifact.path, calib, artifact.inputs[0].name, calib.inputs[: args.eval_images],
                              args.calib_method or "minmax", args.threads)
    print(f"INT8 sensitivity of {args.model} (one group quantized at a time, ONNX Runtime S8S8 QDQ, "
          f"{len(calib.inputs)} calibration / {min(args.eval_images, len(calib.inputs))} evaluation images)")
    print(f"{'rank':>4}  {'group':<10} {'nodes':>5}  {'mean abs':>10}  {'max abs':>8}")
    for rank, row in enumerate(ranking, start=1):
        print(f"{rank:>4}  {row.group:<10} {row.nodes:>5}  {row.mean_abs:>10.3g}  {row.max_abs:>8.3g}")
    print("keep the top groups in float with: u2zoo convert … --int8 --keep-fp N (or --keep-fp-groups a,b)")
    return 0


def _train_config(args: argparse.Namespace, default_loss: str, **overrides: Any):
    """The training options of the command line; ``overrides`` are what a command fixes itself."""
    from u2zoo.training.trainer import TrainConfig

    given = dict(out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 weight_decay=args.weight_decay, optimizer=args.optimizer, warmup_epochs=args.warmup_epochs,
                 loss=args.loss or default_loss, seed=args.seed, amp=not args.no_amp,
                 grad_checkpoint=args.grad_checkpoint, freeze_bn=args.freeze_bn, device=args.device,
                 workers=args.workers, resume=args.resume, max_steps_per_epoch=args.max_steps_per_epoch,
                 channels_last=args.channels_last, bf16=args.bf16)
    config = TrainConfig(**(given | overrides))
    config.validate()
    return config


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(v) for v in value.replace("x", ",").split(",")]
    except ValueError:
        raise ConfigError(f"--size must be N or H,W, not {value!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 32:
        raise ConfigError(f"--size must be N or H,W with each ≥ 32, not {value!r}")
    return (parts[0], parts[-1])


def _report_training(history: list, out: str, train_set=None) -> None:
    from u2zoo.training.trainer import distributed_context

    if distributed_context()[0] != 0:
        return  # under torchrun only rank 0 writes and reports
    last = history[-1] if history else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"trained {len(history)} epoch(s); last: {shown}")
    if train_set is not None and getattr(train_set, "skipped", None):
        print(f"skipped {len(train_set.skipped)} unreadable training image(s): "
              + ", ".join(name for name, _ in train_set.skipped[:5]))
    print(f"wrote {out}/best.pth (weights), last.pt (resumable), history.json, curves.png")


def _teacher_cache(args: argparse.Namespace, contract, bf16: bool, channels_last: bool):
    """The on-disk cache of ``--teacher``'s soft maps (None without a teacher)."""
    from u2zoo.training.teacher_cache import TeacherCache, torch_teacher_runner
    from u2zoo.zoo.weights import cache_dir, load_model

    if not args.teacher:
        return None, None
    teacher, info, teacher_contract = load_model(args.teacher, args.teacher_weights, deploy=False,
                                                 progress=not args.quiet)
    if teacher_contract.pre != contract.pre:
        raise ConfigError(f"teacher {args.teacher!r} and the student have different pre-processing contracts; "
                          "its maps only mean something for inputs prepared its way")
    teacher = teacher.float().eval()
    if channels_last:
        import torch

        teacher = teacher.to(memory_format=torch.channels_last)
    resolution = _size(args.teacher_size) or contract.pre.size
    root = Path(args.teacher_cache) if args.teacher_cache else cache_dir() / "teacher_maps"
    return TeacherCache(root, info.sha256 or "random", resolution, torch_teacher_runner(teacher, bf16, channels_last),
                        contract), info


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune on image + mask folders (optionally with a teacher's soft maps)."""
    from u2zoo.training.cpu import resolve_bf16
    from u2zoo.training.data import Augment, FolderDataset, check_disjoint
    from u2zoo.training.trainer import fit
    from u2zoo.zoo.weights import load_model

    if not args.teacher and (args.teacher_weights or args.teacher_weight or args.teacher_size or args.teacher_cache):
        raise ConfigError("--teacher-weights, --teacher-weight, --teacher-size and --teacher-cache need --teacher")
    teacher_weight = args.teacher_weight if args.teacher_weight is not None else (0.5 if args.teacher else 0.0)
    config = _train_config(args, "bce=1", teacher_weight=teacher_weight)
    if args.init == "bundled":
        from u2zoo.zoo.weights import resolve_model_name

        arch, entry = resolve_model_name(args.model)
        if args.weights or args.random_weights:
            raise ConfigError("--init bundled starts from the package's weights: it excludes --weights and "
                              "--random-weights")
        if entry is None or not entry.bundled:
            raise ConfigError(f"--init bundled: {arch!r} has no weights shipped in the package")
    elif args.init == "random":
        args.random_weights = True
    model, info, contract = load_model(args.model, args.weights, args.weights_sha256, args.random_weights,
                                       deploy=False, progress=not args.quiet)
    size = _size(args.size)
    train_set = FolderDataset(args.images, contract, masks_dir=args.masks, size=size, augment=Augment(),
                              seed=args.seed, soft_masks=args.soft_masks)
    val_set = None
    if args.val_images:
        if not args.val_masks:
            raise ConfigError("--val-images needs --val-masks")
        val_set = FolderDataset(args.val_images, contract, masks_dir=args.val_masks, size=size,
                                soft_masks=args.soft_masks)
        check_disjoint(train_set.paths, val_set.paths)
    if not args.quiet:
        print(f"train: {train_set.summary()}")
        if val_set is not None:
            print(f"val: {val_set.summary()}")
    extra = {"weights": info.to_dict(), "contract": contract.to_dict(), "init": args.init or "weights",
             "skipped": [name for name, _ in train_set.skipped], "resized_masks": train_set.resized_names}
    if args.teacher:
        bf16, _ = resolve_bf16(config.bf16, "cpu")
        cache, teacher_info = _teacher_cache(args, contract, bf16, config.channels_last)
        train_set.attach_teacher(cache)
        extra["teacher"] = {"name": args.teacher, "weights": teacher_info.to_dict(), "resolution": list(cache.resolution),
                            "cache": str(cache.folder), "maps_computed": cache.computed, "maps_cached": cache.hits}
        if not args.quiet:
            print(f"teacher maps: {cache.computed} computed, {cache.hits} read from {cache.folder}")
    history = fit(model, info.arch, train_set, val_set, config, lambda batch: batch["mask"], progress=not args.quiet,
                  extra_state=extra)
    _report_training(history, args.out, train_set)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Train a student on a teacher's soft maps of unlabeled images."""
    from u2zoo.training.distill import distill

    config = _train_config(args, "bce=1,edge=0.5")
    history = distill(args.teacher, args.student, args.images, config, teacher_weights=args.weights,
                      val_images=args.val_images, size=_size(args.size), student_weights=args.student_weights,
                      progress=not args.quiet)
    _report_training(history, args.out)
    return 0


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (best.pth, last.pt, history.json, curves.png)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=4, help="batch size per process (default 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3, cosine schedule)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    p.add_argument("--optimizer", default="adamw", help="adam or adamw (default)")
    p.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warm-up before the cosine decay")
    p.add_argument("--loss", help="e.g. bce=1,dice=0.5,edge=0.2 (terms: bce, wbce, dice, edge)")
    p.add_argument("--size", help="training size N or H,W (default: the contract's 320)")
    p.add_argument("--seed", type=int, default=0, help="seed of shuffling and augmentation (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute RSU stages in backward (less memory)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep BatchNorm statistics fixed (fine-tuning; always on for pruning recovery)")
    p.add_argument("--resume", help="continue from a last.pt of the same architecture")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convs on CPUs)")
    p.add_argument("--bf16", default="auto", choices=("auto", "on", "off"),
                   help="bf16 autocast on the CPU: auto (default) = only with AMX or AVX512-BF16; loss in float32")


def cmd_prune(args: argparse.Namespace) -> int:
    """Structured channel pruning (torch-pruning), optionally recovered by distillation."""
    from u2zoo.converters.base import ensure_writable_dir
    from u2zoo.pruning.prune import prune_and_recover

    if args.epochs:
        raise ConfigError("prune trains only to recover: use --recover-epochs N, not --epochs")
    config = None
    if args.recover_epochs:  # distillation from the unpruned model, BatchNorm statistics kept
        config = _train_config(args, "bce=1,edge=0.5", out=str(Path(args.out) / "recovery"),
                               epochs=args.recover_epochs, freeze_bn=True)
    record = prune_and_recover(args.model, args.weights, args.ratio, ensure_writable_dir(Path(args.out)),
                               importance=args.importance, round_to=args.round_to, images=args.images,
                               train_config=config, size=_size(args.size), random_weights=args.random_weights,
                               progress=not args.quiet)
    print(f"pruned {args.model} by {args.ratio:.0%} ({record['importance']} importance): "
          f"{record['params_before']:,} → {record['params_after']:,} parameters")
    for key in ("mae_vs_unpruned", "mae_vs_unpruned_after_recovery"):
        if key in record:
            print(f"{key.replace('_', ' ')}: {record[key]:.4f}")
    print(f"wrote {record['weights']} and {record['shapes']} (use them as --weights anywhere)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from u2zoo.zoo.archs import ARCHS, build_arch, count_macs, count_params
    from u2zoo.zoo.weights import DEFAULT, REGISTRY

    print(f"{'architecture':<12} {'params':>12} {'GMACs@320':>10}  description")
    for name, spec in ARCHS.items():
        model = build_arch(name)
        macs = f"{count_macs(model) / 1e9:10.2f}" if not args.no_macs else f"{'-':>10}"
        print(f"{name:<12} {count_params(model):>12,} {macs}  {spec.description}")
    print(f"\n{'weights':<22} {'arch':<10} {'task':<17} {'hash':<22} {'here':<8} license")
    for entry in REGISTRY.values():
        digest = f"sha256:{entry.sha256[:12]}" if entry.sha256 else (f"md5:{entry.md5[:12]}" if entry.md5 else "none published")
        here = "shipped" if entry.bundled else ("cached" if entry.cache_path().is_file() else "-")
        print(f"{entry.name:<22} {entry.arch:<10} {entry.task:<17} {digest:<22} {here:<8} {entry.license}")
    from u2zoo.zoo.default_model import choose_default

    print(f"\n--model u2netp uses {DEFAULT['u2netp']} (shipped); with no --model: {choose_default().describe()}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from u2zoo.zoo.weights import fetch, find_entry

    path = fetch(find_entry(args.name), args.source, progress=not args.quiet)
    print(f"{args.name}: verified and cached at {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    from u2zoo.artifact import tool_versions
    from u2zoo.converters import TARGETS
    from u2zoo.zoo.weights import REGISTRY, cache_dir

    core = tool_versions("torch", "numpy", "pillow", "scikit-image", "tqdm", "filelock")
    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}")
    print("core: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in core.items()))
    from u2zoo.gpu import cuda_device_info, cuda_unavailable_reason

    no_gpu = cuda_unavailable_reason()
    print(f"cuda: {no_gpu}" if no_gpu else "cuda: " + ", ".join(f"{k} {v}" for k, v in cuda_device_info().items()))
    print("\ntargets:")
    for spec in TARGETS.values():
        reason = spec.unavailable_reason()
        versions = tool_versions(*[m.replace("_", "-") for m in spec.requires])
        detail = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        if reason and not spec.missing_modules():
            state = f"convert only (artifacts are validated, not run): {reason}"
        else:
            state = "ok" if reason is None else "unavailable: " + reason
        print(f"  {spec.name:<13} {'/'.join(spec.devices):<8} {state}  [{detail}]")
        if spec.handoff and reason:
            print(f"  {'':<13} {'':<8} without it, `u2zoo convert --target {spec.name}` still writes the proven "
                  "ONNX and the command that finishes the build on the device")
    print("\nfeatures:")
    for feature, package, extra in (("prune", "torch-pruning", "prune"), ("onnx --int8-qat", "torchao", "qat"),
                                    ("report plots", "matplotlib", "report"),
                                    ("portrait (face crop)", "opencv-python-headless", "portrait"),
                                    ("portrait --align", "dlib", "landmarks"),
                                    ("--alpha-matting", "pymatting", "matting"), ("--crf", "pydensecrf2", "crf"),
                                    ("video", "av", "video")):
        version = tool_versions(package)[package]
        state = f"ok [{package} {version}]" if version else f"unavailable: pip install 'u2zoo[{extra}]'"
        print(f"  {feature:<22} {state}")
    from u2zoo.benchmarks.matrix import KNOWN_TARGETS

    print(f"  {'serve':<22} ok [standard library]")
    planned = [t for t in KNOWN_TARGETS if t not in TARGETS]
    if planned:
        print(f"  planned, not in this version: {', '.join(planned)} (bench cells report `unavailable`)")
    shipped = [e.name for e in REGISTRY.values() if e.bundled and e.cache_path().is_file()]
    cached = [e.name for e in REGISTRY.values() if not e.bundled and e.cache_path().is_file()]
    print(f"\nweights shipped in the package: {', '.join(shipped) or 'none (a broken install?)'}")
    print(f"weights cache: {cache_dir() / 'weights'} ({', '.join(cached) or 'empty'})")
    if not cached:
        print("  other weights: `u2zoo fetch u2net` (official U2NET, needs network), or "
              "`u2zoo fetch NAME --from PATH` for a copy you have (`u2zoo models` lists the names)")
    from u2zoo.zoo.default_model import choose_default

    print(choose_default().describe())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default (the best shipped saliency model, or ``--model``) → ONNX → masks,
    cut-outs and one contact sheet of bundled sample photos; offline."""
    from u2zoo.convert import convert_model
    from u2zoo.converters import get_target
    from u2zoo.tasks.contact_sheet import write_contact_sheet
    from u2zoo.tasks.engine import Segmenter
    from u2zoo.tasks.folder import process_files
    from u2zoo.tasks.outputs import OutputOptions
    from u2zoo.zoo.default_model import choose_default
    from u2zoo.zoo.reference import sample_images
    from u2zoo.zoo.weights import cache_dir, cached_entries, resolve_model_name

    out = Path(args.out)
    if args.model is None:
        choice = choose_default()
        print(choice.describe())
        args.model = choice.name
    arch, entry = resolve_model_name(args.model)
    usable = [entry] if entry and entry.cache_path().is_file() else cached_entries(arch)
    if usable:
        model, random_weights = usable[0].name, False
        print(f"weights: {model} ({'shipped in the package' if usable[0].bundled else 'from the cache'})")
    else:
        model, random_weights = arch, True
        print(f"NOTE: no {arch} weights in {cache_dir() / 'weights'}: this demo runs on RANDOM weights, so the "
              f"masks are meaningless. Get real ones with `u2zoo fetch {arch}` (needs network), or run "
              "`u2zoo demo` without --model: its default's weights ship in the package.")
    artifact = convert_model(model, "onnx", out / "artifacts", random_weights=random_weights, dynamic=True,
                             contract_variant=args.contract, progress=not args.quiet)
    parity = artifact.manifest["parity"]
    print(f"ONNX artifact: {artifact.path} ({artifact.contract.variant} contract) — parity vs torch max abs "
          f"{parity['max_abs']:.3g}, IoU@0.5 {parity['iou50']:.4f}")
    photos = sample_images()
    with get_target("onnx").runner(artifact) as runner:
        report = process_files(Segmenter(runner, artifact.contract), photos, out / "masks",
                               OutputOptions(kinds=("mask", "cutout")), progress=not args.quiet)
    print(f"masks and cut-outs of {len(photos)} sample photos: {out / 'masks'} ({len(report.written)} files)")
    if report.failed:
        return 1
    sheet = write_contact_sheet(photos, out / "masks", out / "contact_sheet.png",
                                f"u2zoo demo: {model} ({'random weights' if random_weights else 'real weights'}), "
                                f"ONNX Runtime, {artifact.contract.variant} contract")
    print(f"contact sheet (photo | mask | cut-out): {sheet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from u2zoo.tasks.cli_args import add_model_arguments, add_output_arguments
    from u2zoo.tasks.drawing import add_portrait_arguments, cmd_portrait
    from u2zoo.tasks.serve import add_serve_arguments, cmd_serve
    from u2zoo.tasks.video import add_video_arguments, cmd_video

    parser = argparse.ArgumentParser(prog="u2zoo", description="U²-Net model zoo and deployment converter")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        # also after the verb (`u2zoo predict -q …`); SUPPRESS keeps a -q given before it
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        return p

    p = add("models", cmd_models, "list architectures (params, GMACs measured) and registered weights")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")

    p = add("convert", cmd_convert, "convert a model for a target; the artifact is verified in its runtime")
    p.add_argument("--model", required=True, help="architecture or weights name (see `u2zoo models`)")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--target", required=True, help="onnx, … (see `u2zoo doctor`)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic")
    p.add_argument("--int8", action="store_true", help="int8 weights and activations (calibrated with --calib)")
    p.add_argument("--int8-qat", action="store_true",
                   help="int8 by quantization-aware fine-tuning against the float model (--calib): "
                        "openvino (NNCF) or onnx (pt2e, a symmetric QDQ graph)")
    p.add_argument("--qat-epochs", type=int, help="int8-qat: fine-tuning epochs (default 2)")
    p.add_argument("--qat-lr", type=float, help="int8-qat: Adam learning rate (default 2e-6)")
    p.add_argument("--dynamic-int8", action="store_true",
                   help="tflite: dynamic-range quantization (int8 weights, activations quantized at run time)")
    p.add_argument("--int8-weights", action="store_true",
                   help="coreml/tflite: int8 weight-only compression (float arithmetic)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--nhwc", action="store_true", help="tflite: channels-last input and output (NHWC)")
    p.add_argument("--palettize", type=int, help="coreml: k-means palettize weights to N bits (1, 2, 3, 4, 6, 8)")
    p.add_argument("--image-input", action="store_true",
                   help="coreml: ImageType input (the app passes a 320×320 RGB image; scale/bias are in the model)")
    p.add_argument("--deployment-target", help="coreml: minimum deployment target, e.g. iOS16 (default), macOS13")
    p.add_argument("--opset", type=int, help="ONNX opset (≥ 17)")
    p.add_argument("--batch", type=int, help="static batch size")
    p.add_argument("--height", type=int, help="static input height (default: the contract's)")
    p.add_argument("--width", type=int, help="static input width (default: the contract's)")
    p.add_argument("--exporter", help="ONNX exporter: torchscript (default, fast) or dynamo")
    p.add_argument("--calib", help="int8: folder of calibration images (or a dumped .npz)")
    p.add_argument("--calib-size", type=int, help="int8: N calibration images (default 256; a larger folder is sampled with a fixed seed)")
    p.add_argument("--calib-method", help="int8: minmax (default), entropy or percentile")
    p.add_argument("--keep-fp", type=int, help="int8: keep the N most sensitive layer groups in float")
    p.add_argument("--keep-fp-groups", help="int8: comma-separated layer groups to keep in float")
    _add_auto_fp_args(p)
    p.add_argument("--int8-scheme", help="onnx int8: u8s8-reduce-range (default, fast on AVX2), s8s8, or tensorrt "
                                         "(symmetric Q/DQ that TensorRT builds from)")
    p.add_argument("--device", help="aoti/torch/torch-compile: cpu (default) or cuda")
    p.add_argument("--min-batch", type=int, help="tensorrt: smallest batch of the optimization profile (default 1)")
    p.add_argument("--opt-batch", type=int, help="tensorrt: batch the engine is tuned for (default 8)")
    p.add_argument("--max-batch", type=int, help="tensorrt/aoti: largest batch (default 16)")
    p.add_argument("--workspace-mb", type=int, help="tensorrt: builder workspace limit in MB")
    p.add_argument("--timing-cache", help="tensorrt: timing cache file reused across builds "
                                          "(default: <U2ZOO_HOME>/tensorrt/timing.cache)")
    p.add_argument("--onnx", help="tensorrt: build from this ONNX (fp32, fp16, or Q/DQ int8 made elsewhere)")
    p.add_argument("--compile-mode", help="torch-compile: default, reduce-overhead or max-autotune")
    p.add_argument("--accuracy-control", action="store_true",
                   help="openvino int8: nncf.quantize_with_accuracy_control on the parity metric")
    p.add_argument("--max-drop", type=float, help="openvino int8 accuracy control: allowed drop (default 0.01)")
    p.add_argument("--bias-correction", action="store_true",
                   help="openvino int8: NNCF's fast bias correction (off by default: it worsened U2NETP's parity)")
    p.add_argument("--parity-images", help="folder of photos for the parity check (default: bundled samples)")
    p.add_argument("--out", required=True, help="output folder")

    p = add("predict", cmd_predict, "masks, RGBA cut-outs and composites of image files and folders (recursive)")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    add_model_arguments(p)
    add_output_arguments(p)
    p.add_argument("--resume", action="store_true", help="skip inputs whose outputs all exist (an interrupted run)")
    p.add_argument("--out", required=True, help="output folder")

    p = add("time", cmd_time, "median engine-call latency of a model or artifact (warm-up, then N runs)")
    p.add_argument("--model", help="architecture or weights name (torch reference)")
    p.add_argument("--artifact", help="a converted artifact")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--threads", type=int, help="intra-op threads (default: the runtime's)")
    p.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    p.add_argument("--batch", type=int, default=1, help="batch size (dynamic artifacts)")

    p = add("bench", cmd_bench, "parity-and-speed matrix: models × targets × precisions on your images")
    p.add_argument("--model", required=True, help="comma-separated models, e.g. u2netp,u2net-lite; NAME@PATH adds "
                   "another checkpoint of NAME to the same run, e.g. u2netp,u2netp@u2netp_pruned30.pth")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--targets", default="onnx", help="comma-separated targets (default: onnx)")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32,fp16,int8 (default: fp32)")
    p.add_argument("--data", required=True, help="folder of images (any sizes and modes)")
    p.add_argument("--gt", help="folder of ground-truth masks paired by file stem (adds accuracy columns)")
    p.add_argument("--gate", help="gate YAML ('default' = the shipped gates); failing cells → exit 1")
    p.add_argument("--fail-on-unavailable", action="store_true", help="with --gate: unavailable cells fail too")
    p.add_argument("--threads", type=int, help="threads for every runtime (default: all cores)")
    p.add_argument("--runs", type=int, default=20, help="timed runs per cell (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs (default 3)")
    p.add_argument("--batches", help="batch sizes for throughput (dynamic artifacts; default 1,4,8,16 on CPU, "
                                     "1,8,16 with --device cuda)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: where torch, torch-compile and aoti "
                                                   "cells run (tensorrt always runs on cuda)")
    p.add_argument("--boundary-band", type=int, default=5, help="band width in px for the boundary error")
    p.add_argument("--calib", help="int8 calibration images (default: the readable images of --data)")
    p.add_argument("--calib-size", type=int, help="int8: N calibration images (default 256; a larger folder is sampled with a fixed seed)")
    p.add_argument("--keep-fp", type=int, default=0, help="int8: keep the N most sensitive layer groups in float")
    p.add_argument("--keep-fp-groups", help="int8: comma-separated layer groups to keep in float")
    _add_auto_fp_args(p)
    p.add_argument("--out", required=True, help="output folder (artifacts, results.jsonl/csv/md)")

    p = add("report", cmd_report, "merge results.jsonl files from several machines into tables, plots and HTML")
    p.add_argument("results", nargs="+", help="results.jsonl files")
    p.add_argument("--out", required=True, help="output folder")

    p = add("sensitivity", cmd_sensitivity, "rank layer groups by their INT8 quantization error")
    p.add_argument("--model", required=True, help="architecture or weights name")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--calib", required=True, help="folder of calibration images")
    p.add_argument("--calib-size", type=int, help="N calibration images (default 256; a larger folder is sampled with a fixed seed)")
    p.add_argument("--calib-method", help="minmax (default), entropy or percentile")
    p.add_argument("--eval-images", type=int, default=8, help="images the error is measured on (default 8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads")

    p = add("train", cmd_train, "fine-tune on image + mask folders (masks paired by file stem)")
    p.add_argument("--model", required=True, help="architecture or weights name to start from")
    add_weights_args(p)
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--masks", required=True, help="folder of masks, one per image with the same stem")
    p.add_argument("--val-images", help="folder of validation images")
    p.add_argument("--val-masks", help="folder of validation masks")
    p.add_argument("--soft-masks", action="store_true", help="keep masks soft instead of binarising at 0.5")
    p.add_argument("--init", choices=("bundled", "random"),
                   help="start from the weights shipped in the package (bundled) or random ones")
    p.add_argument("--teacher", help="add a teacher's soft maps to the masks, e.g. u2netp")
    p.add_argument("--teacher-weights", help="teacher weights (path); default: the registry's")
    p.add_argument("--teacher-weight", type=float, help="weight of the teacher term (BCE of d0; default 0.5)")
    p.add_argument("--teacher-size", help="resolution of the teacher's maps, N or H,W (default: the contract's)")
    p.add_argument("--teacher-cache", help="folder of cached teacher maps (default: <U2ZOO_HOME>/teacher_maps)")
    _add_training_args(p)

    p = add("distill", cmd_distill, "train a student on a teacher's soft maps of unlabeled images")
    p.add_argument("--teacher", required=True, help="teacher model or weights name, e.g. u2netp")
    p.add_argument("--weights", help="teacher weights (path); default: the registry's")
    p.add_argument("--student", required=True, help="student architecture, e.g. u2net-lite")
    p.add_argument("--student-weights", help="start the student from these weights")
    p.add_argument("--images", required=True, help="folder of unlabeled training images")
    p.add_argument("--val-images", help="folder of validation images (scored against the teacher)")
    _add_training_args(p)

    p = add("prune", cmd_prune, "structured channel pruning; side heads and the fuse conv stay whole")
    p.add_argument("--model", required=True, help="architecture or weights name")
    add_weights_args(p)
    p.add_argument("--ratio", type=float, required=True, help="fraction of channels to remove, in (0, 0.9]")
    p.add_argument("--round-to", type=int, help="keep channel counts multiples of N (e.g. 8)")
    p.add_argument("--importance", default="magnitude", help="magnitude (default) or taylor (needs --images)")
    p.add_argument("--images", help="images to measure the damage on, rank channels (taylor) and recover")
    p.add_argument("--recover-epochs", type=int, default=0, help="recovery epochs of distillation from the unpruned model")
    _add_training_args(p)
    p.set_defaults(epochs=0)

    p = add("fetch", cmd_fetch, "download (or import with --from) registered weights into the cache, verified")
    p.add_argument("name", help="registered weights name")
    p.add_argument("--from", dest="source", help="a local file or URL to take the weights from")

    p = add("portrait", cmd_portrait, "portrait line drawings: largest face cropped to 512×512, dark lines on white")
    add_portrait_arguments(p)

    p = add("video", cmd_video, "a video file in → mask, cut-out or composite video out (u2zoo[video])")
    add_video_arguments(p)

    p = add("serve", cmd_serve, "HTTP service: POST an image, get a mask or cut-out; one session for all requests")
    add_serve_arguments(p)

    add("doctor", cmd_doctor, "which backends are installed, their versions, and what to install")

    p = add("demo", cmd_demo, "offline demo: the best shipped model → ONNX → masks and a contact sheet of sample photos")
    p.add_argument("--model", help="model or weights name (default: the best shipped saliency model, printed "
                                   "with the reason)")
    add_contract_arg(p)
    p.add_argument("--out", default="u2zoo-demo", help="output folder (default: ./u2zoo-demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "weights_sha256", None):  # before the command creates anything (it names a cache file)
            from u2zoo.zoo.weights import checked_sha256

            checked_sha256(args.weights_sha256)
        return args.func(args)
    except U2ZooError as exc:
        message = one_line(exc)
        print(f"u2zoo: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("u2zoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
