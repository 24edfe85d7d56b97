"""Verbs that change weights: ``train``, ``distill``, ``prune`` (with recovery)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from u2zoo.cli.common import AddVerb
from u2zoo.cli.task_args import add_weights_args
from u2zoo.errors import ConfigError


def _train_config(args: argparse.Namespace, default_loss: str, **overrides: Any):
    """The training options of the command line; ``overrides`` are what a command fixes itself."""
    from u2zoo.training.trainer import TrainConfig

    given = dict(
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        warmup_epochs=args.warmup_epochs,
        loss=args.loss or default_loss,
        seed=args.seed,
        amp=not args.no_amp,
        grad_checkpoint=args.grad_checkpoint,
        freeze_bn=args.freeze_bn,
        device=args.device,
        workers=args.workers,
        resume=args.resume,
        max_steps_per_epoch=args.max_steps_per_epoch,
        channels_last=args.channels_last,
        bf16=args.bf16,
    )
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
        print(
            f"skipped {len(train_set.skipped)} unreadable training image(s): "
            + ", ".join(name for name, _ in train_set.skipped[:5])
        )
    print(f"wrote {out}/best.pth (weights), last.pt (resumable), history.json, curves.png")


def _teacher_cache(args: argparse.Namespace, contract, bf16: bool, channels_last: bool):
    """The on-disk cache of ``--teacher``'s soft maps (None without a teacher)."""
    from u2zoo.training.teacher_cache import TeacherCache, torch_teacher_runner
    from u2zoo.zoo.weights import cache_dir, load_model

    if not args.teacher:
        return None, None
    teacher, info, teacher_contract = load_model(
        args.teacher, args.teacher_weights, deploy=False, progress=not args.quiet
    )
    if teacher_contract.pre != contract.pre:
        raise ConfigError(
            f"teacher {args.teacher!r} and the student have different pre-processing contracts; "
            "its maps only mean something for inputs prepared its way"
        )
    teacher = teacher.float().eval()
    if channels_last:
        import torch

        teacher = teacher.to(memory_format=torch.channels_last)
    resolution = _size(args.teacher_size) or contract.pre.size
    root = Path(args.teacher_cache) if args.teacher_cache else cache_dir() / "teacher_maps"
    return TeacherCache(
        root, info.sha256 or "random", resolution, torch_teacher_runner(teacher, bf16, channels_last), contract
    ), info


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
            raise ConfigError(
                "--init bundled starts from the package's weights: it excludes --weights and --random-weights"
            )
        if entry is None or not entry.bundled:
            raise ConfigError(f"--init bundled: {arch!r} has no weights shipped in the package")
    elif args.init == "random":
        args.random_weights = True
    model, info, contract = load_model(
        args.model, args.weights, args.weights_sha256, args.random_weights, deploy=False, progress=not args.quiet
    )
    size = _size(args.size)
    train_set = FolderDataset(
        args.images,
        contract,
        masks_dir=args.masks,
        size=size,
        augment=Augment(),
        seed=args.seed,
        soft_masks=args.soft_masks,
    )
    val_set = None
    if args.val_images:
        if not args.val_masks:
            raise ConfigError("--val-images needs --val-masks")
        val_set = FolderDataset(
            args.val_images, contract, masks_dir=args.val_masks, size=size, soft_masks=args.soft_masks
        )
        check_disjoint(train_set.paths, val_set.paths)
    if not args.quiet:
        print(f"train: {train_set.summary()}")
        if val_set is not None:
            print(f"val: {val_set.summary()}")
    extra = {
        "weights": info.to_dict(),
        "contract": contract.to_dict(),
        "init": args.init or "weights",
        "skipped": [name for name, _ in train_set.skipped],
        "resized_masks": train_set.resized_names,
    }
    if args.teacher:
        bf16, _ = resolve_bf16(config.bf16, "cpu")
        cache, teacher_info = _teacher_cache(args, contract, bf16, config.channels_last)
        train_set.attach_teacher(cache)
        extra["teacher"] = {
            "name": args.teacher,
            "weights": teacher_info.to_dict(),
            "resolution": list(cache.resolution),
            "cache": str(cache.folder),
            "maps_computed": cache.computed,
            "maps_cached": cache.hits,
        }
        if not args.quiet:
            print(f"teacher maps: {cache.computed} computed, {cache.hits} read from {cache.folder}")
    history = fit(
        model,
        info.arch,
        train_set,
        val_set,
        config,
        lambda batch: batch["mask"],
        progress=not args.quiet,
        extra_state=extra,
    )
    _report_training(history, args.out, train_set)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    """Train a student on a teacher's soft maps of unlabeled images."""
    from u2zoo.training.distill import distill

    config = _train_config(args, "bce=1,edge=0.5")
    history = distill(
        args.teacher,
        args.student,
        args.images,
        config,
        teacher_weights=args.weights,
        val_images=args.val_images,
        size=_size(args.size),
        student_weights=args.student_weights,
        progress=not args.quiet,
    )
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
    p.add_argument(
        "--freeze-bn",
        action="store_true",
        help="keep BatchNorm statistics fixed (fine-tuning; always on for pruning recovery)",
    )
    p.add_argument("--resume", help="continue from a last.pt of the same architecture")
    p.add_argument("--max-steps-per-epoch", type=int, help="cap steps per epoch (quick runs)")
    p.add_argument("--channels-last", action="store_true", help="NHWC activations (faster convs on CPUs)")
    p.add_argument(
        "--bf16",
        default="auto",
        choices=("auto", "on", "off"),
        help="bf16 autocast on the CPU: auto (default) = only with AMX or AVX512-BF16; loss in float32",
    )


def cmd_prune(args: argparse.Namespace) -> int:
    """Structured channel pruning (torch-pruning), optionally recovered by distillation."""
    from u2zoo.files import ensure_writable_dir
    from u2zoo.pruning.prune import prune_and_recover

    if args.epochs:
        raise ConfigError("prune trains only to recover: use --recover-epochs N, not --epochs")
    config = None
    if args.recover_epochs:  # distillation from the unpruned model, BatchNorm statistics kept
        config = _train_config(
            args, "bce=1,edge=0.5", out=str(Path(args.out) / "recovery"), epochs=args.recover_epochs, freeze_bn=True
        )
    record = prune_and_recover(
        args.model,
        args.weights,
        args.ratio,
        ensure_writable_dir(Path(args.out)),
        importance=args.importance,
        round_to=args.round_to,
        images=args.images,
        train_config=config,
        size=_size(args.size),
        random_weights=args.random_weights,
        progress=not args.quiet,
    )
    print(
        f"pruned {args.model} by {args.ratio:.0%} ({record['importance']} importance): "
        f"{record['params_before']:,} → {record['params_after']:,} parameters"
    )
    for key in ("mae_vs_unpruned", "mae_vs_unpruned_after_recovery"):
        if key in record:
            print(f"{key.replace('_', ' ')}: {record[key]:.4f}")
    print(f"wrote {record['weights']} and {record['shapes']} (use them as --weights anywhere)")
    return 0


def add_train(add: AddVerb) -> None:
    p = add("train", cmd_train, "fine-tune on image + mask folders (masks paired by file stem)")
    p.add_argument("--model", required=True, help="architecture or weights name to start from")
    add_weights_args(p)
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--masks", required=True, help="folder of masks, one per image with the same stem")
    p.add_argument("--val-images", help="folder of validation images")
    p.add_argument("--val-masks", help="folder of validation masks")
    p.add_argument("--soft-masks", action="store_true", help="keep masks soft instead of binarising at 0.5")
    p.add_argument(
        "--init",
        choices=("bundled", "random"),
        help="start from the weights shipped in the package (bundled) or random ones",
    )
    p.add_argument("--teacher", help="add a teacher's soft maps to the masks, e.g. u2netp")
    p.add_argument("--teacher-weights", help="teacher weights (path); default: the registry's")
    p.add_argument("--teacher-weight", type=float, help="weight of the teacher term (BCE of d0; default 0.5)")
    p.add_argument("--teacher-size", help="resolution of the teacher's maps, N or H,W (default: the contract's)")
    p.add_argument("--teacher-cache", help="folder of cached teacher maps (default: <U2ZOO_HOME>/teacher_maps)")
    _add_training_args(p)


def add_distill(add: AddVerb) -> None:
    p = add("distill", cmd_distill, "train a student on a teacher's soft maps of unlabeled images")
    p.add_argument("--teacher", required=True, help="teacher model or weights name, e.g. u2netp")
    p.add_argument("--weights", help="teacher weights (path); default: the registry's")
    p.add_argument("--student", required=True, help="student architecture, e.g. u2net-lite")
    p.add_argument("--student-weights", help="start the student from these weights")
    p.add_argument("--images", required=True, help="folder of unlabeled training images")
    p.add_argument("--val-images", help="folder of validation images (scored against the teacher)")
    _add_training_args(p)


def add_prune(add: AddVerb) -> None:
    p = add("prune", cmd_prune, "structured channel pruning; side heads and the fuse conv stay whole")
    p.add_argument("--model", required=True, help="architecture or weights name")
    add_weights_args(p)
    p.add_argument("--ratio", type=float, required=True, help="fraction of channels to remove, in (0, 0.9]")
    p.add_argument("--round-to", type=int, help="keep channel counts multiples of N (e.g. 8)")
    p.add_argument("--importance", default="magnitude", help="magnitude (default) or taylor (needs --images)")
    p.add_argument("--images", help="images to measure the damage on, rank channels (taylor) and recover")
    p.add_argument(
        "--recover-epochs", type=int, default=0, help="recovery epochs of distillation from the unpruned model"
    )
    _add_training_args(p)
    p.set_defaults(epochs=0)
