"""One training loop for fine-tuning on masks and for distillation from a teacher.

Adam/AdamW with a cosine schedule (optional linear warm-up) stepped per batch; AMP on CUDA
(the loss itself is computed in float32: BCE is unsafe under autocast); optional gradient
checkpointing of the RSU stages; resumable checkpoints; a progress bar; validation every epoch
with our saliency metrics; multi-GPU through ``torchrun`` (DDP, one process per GPU, rank 0
writes). Outputs in ``out``:

- ``last.pt``: the whole training state (model, optimizer, scheduler, epoch, history, config),
  loadable with ``torch.load(weights_only=True)``; ``--resume`` continues from it;
- ``best.pth``: the best validation model as a bare state dict, usable as ``--weights``;
- ``history.json`` and ``curves.png``: the per-epoch losses and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from u2zoo.artifact import atomic_write_text
from u2zoo.errors import ConfigError, WeightsError
from u2zoo.training.losses import CompositeLoss
from u2zoo.zoo.layers import freeze_batchnorm

OPTIMIZERS = ("adam", "adamw")


@dataclass
class TrainConfig:
    out: str
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    warmup_epochs: float = 0.0
    loss: str = "bce=1"
    seed: int = 0
    amp: bool = True  # used on CUDA only
    grad_checkpoint: bool = False
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (fine-tuning pretrained or BN-folded weights)
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 0
    resume: str | None = None
    max_steps_per_epoch: int | None = None  # cap for quick runs
    channels_last: bool = False  # NHWC activations: much faster depthwise/1×1 convs on CPUs
    bf16: str = "off"  # auto | on | off: bf16 autocast on CPUs with AMX or AVX512-BF16 (loss in float32)
    teacher_weight: float = 0.0  # BCE of the fused map against the batch's "teacher" soft map

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0 or self.workers < 0:
            raise ConfigError("--epochs and --batch-size must be ≥ 1, --lr > 0, --weight-decay and --workers ≥ 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r} (choose from: {', '.join(OPTIMIZERS)})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"unknown device {self.device!r} (choose from: auto, cpu, cuda)")
        if self.bf16 not in ("auto", "on", "off"):
            raise ConfigError(f"unknown --bf16 {self.bf16!r} (choose from: auto, on, off)")
        if self.teacher_weight < 0:
            raise ConfigError("--teacher-weight must be ≥ 0")
        CompositeLoss(self.loss)  # validates the spec


# ---------------------------------------------------------------------------------------------
# distributed (torchrun) helpers


def distributed_context() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def _init_distributed(world: int, device: str) -> None:
    import torch.distributed as dist

    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")


# ---------------------------------------------------------------------------------------------


def enable_gradient_checkpointing(model) -> int:
    """Recompute each RSU stage in the backward pass instead of storing its activations
    (memory for time); returns how many stages were wrapped. State-dict keys do not change."""
    import functools

    from torch.utils.checkpoint import checkpoint

    wrapped = 0
    for name, module in model.named_children():
        if name.startswith("stage"):
            module.forward = functools.partial(checkpoint, module.forward.__func__.__get__(module), use_reentrant=False)
            wrapped += 1
    return wrapped


def _resolve_device(name: str, local_rank: int) -> str:
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        from u2zoo.gpu import cuda_unavailable_reason

        raise ConfigError(f"--device cuda: {cuda_unavailable_reason()}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        torch.cuda.set_device(local_rank)
    return name


def _atomic_torch_save(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, arch: str) -> dict[str, Any]:
    """A training checkpoint (``last.pt``) of ``arch``; another architecture is an error."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"resume checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or unsafe file, as one line
        raise WeightsError(f"cannot read resume checkpoint {path}: {type(exc).__name__}") from None
    if not isinstance(state, dict) or "model" not in state or "arch" not in state:
        raise WeightsError(f"{path} is not a u2zoo training checkpoint (expected last.pt from `u2zoo train`)")
    if state["arch"] != arch:
        raise ConfigError(f"resume checkpoint {path.name} is for {state['arch']!r}, not {arch!r}")
    return state


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training/validation curves as a PNG (matplotlib's object API, Agg; None without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    epochs = [h["epoch"] for h in history]
    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        left.plot(epochs, [h.get("val_loss") for h in history], marker="o", label="val loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    left.grid(alpha=0.3)
    right.plot(epochs, [h.get("val_mae") for h in history], marker="o", color="C3", label="val MAE")
    right.set_xlabel("epoch")
    right.set_ylabel("MAE vs target")
    right.grid(alpha=0.3)
    twin = right.twinx()
    twin.plot(epochs, [h.get("val_max_f") for h in history], marker="s", color="C2", label="val max F")
    twin.set_ylabel("max F")
    right.legend(loc="upper left")
    twin.legend(loc="upper right")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _scheduler(optimizer, total_steps: int, warmup_steps: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


TargetFn = Callable[[dict[str, Any]], Any]  # batch (on device) → target: a mask or a list of maps


def evaluate(model, loader, target_fn: TargetFn, loss: CompositeLoss, device: str) -> dict[str, float]:
    """Validation loss and saliency metrics of the fused map against the target's fused map."""
    import torch

    from u2zoo.runtime.metrics import SaliencyMetrics

    metrics, losses, errors = SaliencyMetrics(normalize=False), [], []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            maps = [m.float() for m in model(batch["image"])]
            target = target_fn(batch)
            losses.append(float(loss(maps, target)))
            truth = target[0] if isinstance(target, (list, tuple)) else target
            for pred, gt in zip(maps[0].cpu().numpy(), truth.cpu().numpy()):
                errors.append(float(np.abs(pred[0] - gt[0]).mean()))  # vs the target's own (soft) map
                metrics.add(pred[0], (gt[0] >= 0.5).astype(np.float32))
    model.train()
    return {"val_loss": float(np.mean(losses)), "val_mae": float(np.mean(errors)), "val_max_f": metrics.result().max_f}


def fit(
    model,
    arch: str,
    train_set,
    val_set,
    config: TrainConfig,
    target_fn: TargetFn,
    progress: bool = True,
    extra_state: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` (training mode: seven maps) and write checkpoints, history and curves."""
    import torch
    from torch.utils.data import DataLoader, DistributedSampler
    from tqdm import tqdm

    config.validate()
    rank, world, local_rank = distributed_context()
    device = _resolve_device(config.device, local_rank)
    _init_distributed(world, device)
    torch.manual_seed(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    model.deploy = False
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    from u2zoo.training.cpu import host_record, resolve_bf16

    use_bf16, bf16_reason = resolve_bf16(config.bf16, device)
    host = host_record(use_bf16, bf16_reason)
    if config.grad_checkpoint:
        enable_gradient_checkpointing(model)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device == "cuda" else None)
    sampler = DistributedSampler(train_set, seed=config.seed) if world > 1 else None
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        drop_last=len(train_set) > config.batch_size,
        generator=generator,
    )
    val_loader = DataLoader(val_set, batch_size=config.batch_size) if val_set is not None else None
    steps_per_epoch = (
        len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_type = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_type(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch))
    use_amp = config.amp and device == "cuda"
    autocast_dtype = torch.float16 if use_amp else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss = CompositeLoss(config.loss)

    history: list[dict[str, Any]] = []
    start_epoch, best = 0, math.inf
    if rank == 0:
        atomic_write_text(
            out / "run.json",
            json.dumps(
                {
                    "config": dataclasses.asdict(config),
                    "host": host,
                    "train_images": len(train_set),
                    "val_images": len(val_set) if val_set is not None else 0,
                },
                indent=1,
            )
            + "\n",
        )
        if progress:
            print(
                f"training on {device}: {host['cpu']}; bf16 autocast {'on' if use_bf16 else 'off'} ({bf16_reason}); "
                f"channels_last {'on' if config.channels_last else 'off'}",
                flush=True,
            )
    if config.resume:
        state = load_checkpoint(config.resume, arch)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start_epoch = list(state["history"]), int(state["epoch"]) + 1
        best = min((h["val_mae"] for h in history if h.get("val_mae") is not None), default=math.inf)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        for dataset in (train_set,):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        if config.freeze_bn:
            freeze_batchnorm(model)
        running, terms, seen = [], {}, 0
        bar = tqdm(
            loader,
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress or rank != 0,
            leave=False,
        )
        for step, batch in enumerate(bar):
            if step >= steps_per_epoch:
                break
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            target = target_fn(batch)
            images = batch["image"]
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=use_amp or use_bf16):
                maps = net(images)
            maps = [m.float() for m in maps]  # the loss in float32: BCE is unsafe under autocast
            value = loss(maps, target)
            if config.teacher_weight and "teacher" in batch:
                soft = torch.nn.functional.binary_cross_entropy(maps[0].clamp(1e-6, 1 - 1e-6), batch["teacher"])
                value = value + config.teacher_weight * soft
                terms.setdefault("teacher", []).append(float(soft.detach()))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running.append(float(value.detach()))
            seen += len(images)
            for name, term in loss.last.items():
                terms.setdefault(name, []).append(term)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            left = (steps_per_epoch - step - 1) * config.batch_size * world + (
                config.epochs - epoch - 1
            ) * steps_per_epoch * config.batch_size * world
            bar.set_postfix(
                loss=f"{np.mean(running[-20:]):.4f}", sps=f"{rate * world:.1f}", eta=_minutes(left / (rate * world))
            )
        train_seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(running)),
            "terms": {k: float(np.mean(v)) for k, v in terms.items()},
            "lr": float(scheduler.get_last_lr()[0]),
            "steps": len(running),
            "samples": seen * world,
            "samples_per_s": round(seen * world / max(train_seconds, 1e-9), 3),
        }
        if val_loader is not None and rank == 0:
            record |= evaluate(model, val_loader, target_fn, loss, device)
        record["seconds"] = round(time.perf_counter() - started, 1)
        history.append(record)
        if rank == 0:
            _save(model, arch, optimizer, scheduler, epoch, history, config, out, (extra_state or {}) | {"host": host})
            score = record.get("val_mae", record["train_loss"])
            if score <= best:
                best = score
                _atomic_torch_save(
                    {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "best.pth"
                )
            if progress:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
                eta = _minutes(record["seconds"] * (config.epochs - epoch - 1))
                print(f"epoch {epoch + 1}/{config.epochs}: {shown}; ETA {eta}", flush=True)
    return history


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _save(
    model,
    arch: str,
    optimizer,
    scheduler,
    epoch: int,
    history: list[dict[str, Any]],
    config: TrainConfig,
    out: Path,
    extra_state: dict[str, Any] | None,
) -> None:
    state = {
        "arch": arch,
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "history": history,
        "config": dataclasses.asdict(config),
    } | (extra_state or {})
    _atomic_torch_save(state, out / "last.pt")
    atomic_write_text(out / "history.json", json.dumps(history, indent=2) + "\n")
    plot_history(history, out / "curves.png")
