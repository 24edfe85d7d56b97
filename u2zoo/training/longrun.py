"""A long, resumable CPU training run of a saliency student on DUTS-TR (GT masks + teacher maps).

``python -m u2zoo.training.longrun --out DIR ...`` — everything a multi-session run needs:

- a resolution curriculum by samples (``--phases 160:0.5,224:0.3,320:0.2``), ending at the
  contract's 320 (what is learned at one size does not carry to another);
- GT deep supervision (``bce`` over the seven maps) + Dice, and the teacher's soft map of the
  fused output (BCE), the teacher's maps cached on disk per (teacher sha256, image, resolution);
- channels_last and bf16 autocast where the CPU has native bf16 (loss in float32);
- a step-level checkpoint ``last.pt`` every ``--ckpt-minutes`` (model, optimizer, scheduler,
  epoch and position in the epoch, RNG, history) that ``--resume`` continues exactly;
  loadable with ``torch.load(weights_only=True)``;
- periodic deploy-path validation (contract pre-processing at 320×320, fused map, min-max,
  resize back, scored against the GT masks like ``u2zoo bench --gt``) on a fixed subset of
  ``val/``, ``best.pth`` kept by that MAE, and a log line with samples/s and ETA. With
  ``--select ratchet`` (the default) only a checkpoint whose MAE *and* max F both beat the
  start's can become ``best.pth``: what the ship ratchet accepts (a lower MAE bought with a
  lower max F is refused there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from u2zoo.errors import ConfigError, U2ZooError


@dataclass
class RunConfig:
    out: str
    data: str = "/work/shared/data/duts-tr"
    arch: str = "u2net-lite"
    init: str = "bundled"  # bundled | scratch | teacher-svd | PATH (a state dict)
    teacher: str = "u2netp"
    teacher_weights: str | None = None
    teacher_weight: float = 0.5  # BCE of d0 vs the teacher's soft map
    teacher_resolution: int = 320
    loss: str = "bce=1,dice=0.5"
    phases: str = "160:0.5,224:0.3,320:0.2"  # size:fraction of the samples
    samples: int = 60000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02
    seed: int = 0
    bf16: str = "auto"
    channels_last: bool = True
    freeze_bn: bool = False
    ckpt_minutes: float = 5.0
    eval_minutes: float = 10.0
    val_limit: int = 100
    crop_scale: tuple[float, float] = (0.6, 1.0)
    threads: int = 2
    cache: str | None = None  # teacher cache root (default: <out>/../teacher_cache)
    init_refine_images: int = 16  # teacher-svd: calibration images for the pointwise least squares
    init_refine_size: int = 160
    # pre/post resize variant for training inputs and the periodic validation; lite-duts-1 was
    # started with the package default of the time, "antialiased" (ship.py always scores "official")
    contract: str = "antialiased"
    select: str = "ratchet"  # best.pth: "ratchet" (MAE and max F both beat the start) | "mae"

    def phase_list(self) -> list[tuple[int, int]]:
        """[(size, samples)], the last phase absorbing rounding."""
        parts = []
        for item in self.phases.split(","):
            size, _, frac = item.partition(":")
            parts.append((int(size), float(frac)))
        total = sum(f for _, f in parts)
        if total <= 0 or any(s < 32 for s, _ in parts):
            raise ConfigError(f"bad --phases {self.phases!r} (size:fraction,…; sizes ≥ 32)")
        counts = [int(self.samples * f / total) for _, f in parts]
        counts[-1] = self.samples - sum(counts[:-1])
        return [(s, c) for (s, _), c in zip(parts, counts)]


def log(out: Path, message: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {message}"
    print(line, flush=True)
    with open(out / "train.log", "a") as fh:
        fh.write(line + "\n")


# ----------------------------------------------------------------------------------- data


class TrainPairs:
    """DUTS-style train/ pairs decoded once into uint8 memory; corrupt images skipped and named."""

    def __init__(self, images_dir: Path, masks_dir: Path, out: Path | None = None):
        from PIL import Image, ImageOps

        from u2zoo.training.data import pair_masks
        from u2zoo.zoo.images import IMAGE_SUFFIXES

        images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        masks = {image.stem: mask for image, mask in zip(images, pair_masks(images, masks_dir))}
        self.paths, self.images, self.masks, self.skipped, self.resized = [], [], [], [], []
        for path in images:
            try:
                with Image.open(path) as img:  # upright as displayed, like every other reader
                    image = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), np.uint8)
                with Image.open(masks[path.stem]) as img:
                    mask_img = ImageOps.exif_transpose(img).convert("L")
                    if mask_img.size != (image.shape[1], image.shape[0]):
                        self.resized.append(path.stem)
                        mask_img = mask_img.resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
                    mask = np.asarray(mask_img, np.uint8)
            except (OSError, ValueError, SyntaxError) as exc:
                self.skipped.append(f"{path.name} ({type(exc).__name__})")
                continue
            self.paths.append(path)
            self.images.append(image)
            self.masks.append(mask)
        if not self.paths:
            raise ConfigError(f"no readable training pairs in {images_dir}")

    def __len__(self) -> int:
        return len(self.paths)


def make_sample(
    image: np.ndarray,
    mask: np.ndarray,
    teacher_map: np.ndarray | None,
    size: int,
    rng: np.random.Generator,
    crop_scale: tuple[float, float],
    pre,
) -> tuple[np.ndarray, ...]:
    """Random resized crop + flip on image/mask/teacher map, photometric jitter on the image,
    then the contract's pre-processing at size×size."""
    from u2zoo.training.data import Augment, _random_crop_box
    from u2zoo.zoo.contract import preprocess, resize_plane

    aug = Augment(crop_scale=crop_scale)
    h, w = image.shape[:2]
    top, left, ch, cw = _random_crop_box(rng, h, w, aug)
    flip = rng.random() < 0.5
    img = image[top : top + ch, left : left + cw].astype(np.float32) / 255.0
    msk = mask[top : top + ch, left : left + cw].astype(np.float32) / 255.0
    if teacher_map is not None:
        tm = resize_plane(teacher_map, h, w)[top : top + ch, left : left + cw]
    if flip:
        img, msk = img[:, ::-1], msk[:, ::-1]
        if teacher_map is not None:
            tm = tm[:, ::-1]
    img = img * rng.uniform(1 - aug.brightness, 1 + aug.brightness)
    mean = img.mean()
    img = (img - mean) * rng.uniform(1 - aug.contrast, 1 + aug.contrast) + mean
    img = np.clip(img + rng.normal(0.0, aug.noise_sigma, img.shape), 0.0, 1.0).astype(np.float32)
    x = preprocess(img, pre, (size, size))
    m = (resize_plane(np.ascontiguousarray(msk), size, size) >= 0.5).astype(np.float32)[None]
    t = None if teacher_map is None else np.clip(resize_plane(np.ascontiguousarray(tm), size, size), 0, 1)[None]
    return x, m, t


# ---------------------------------------------------------------------------------- model


def build_student(cfg: RunConfig, out: Path, teacher=None):
    import torch

    from u2zoo.zoo.archs import build_arch
    from u2zoo.zoo.weights import apply_state_dict, load_model, read_state_dict

    if cfg.init == "bundled":
        model, info, _ = load_model(cfg.arch, deploy=False, progress=False)
        return model.float(), {"init": "bundled", "weights": info.to_dict()}
    model = build_arch(cfg.arch)
    if cfg.init == "scratch":
        return model, {"init": "scratch"}
    if cfg.init == "teacher-svd":
        from u2zoo.training.teacher_init import factorize_from_teacher, refine_pointwise
        from u2zoo.zoo.contract import SALIENCY, preprocess
        from u2zoo.zoo.images import list_images, load_rgb

        errors = factorize_from_teacher(teacher, model)
        record = {"init": "teacher-svd", "kernel_rel_error_mean": float(np.mean(list(errors.values())))}
        if cfg.init_refine_images:
            paths = list_images([Path(cfg.data) / "train" / "images"])[: cfg.init_refine_images]
            size = (cfg.init_refine_size, cfg.init_refine_size)
            calib = torch.from_numpy(np.stack([preprocess(load_rgb(p), SALIENCY.pre, size) for p in paths]))
            refined = refine_pointwise(teacher, model, calib)
            record |= {
                "refine_images": len(paths),
                "refine_size": cfg.init_refine_size,
                "refine_rel_error_mean": float(np.mean(list(refined.values()))),
            }
        return model, record
    apply_state_dict(model, {k: v.float() for k, v in read_state_dict(cfg.init).items()}, cfg.arch, cfg.init)
    return model, {"init": cfg.init}


# ---------------------------------------------------------------------------------- run


def run(cfg: RunConfig, resume: bool = True) -> None:
    import torch
    import torch.nn.functional as F

    from u2zoo.training.cpu import host_record, resolve_bf16
    from u2zoo.training.deploy_eval import deploy_scores, load_val
    from u2zoo.training.losses import CompositeLoss
    from u2zoo.training.teacher_cache import TeacherCache, image_key, torch_teacher_runner
    from u2zoo.training.trainer import _atomic_torch_save, load_checkpoint
    from u2zoo.zoo.weights import load_model

    torch.set_num_threads(cfg.threads)
    from u2zoo.zoo import contract as contracts

    if hasattr(contracts, "with_variant"):
        SALIENCY = contracts.with_variant(getattr(contracts, "SALIENCY_OFFICIAL", contracts.Contract()), cfg.contract)
    elif cfg.contract == "official":
        SALIENCY = contracts.Contract()
    else:
        raise ConfigError(f"contract variant {cfg.contract!r} is not available in this version")
    if cfg.select not in ("ratchet", "mae"):
        raise ConfigError(f"--select must be 'ratchet' or 'mae', got {cfg.select!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16, bf16_reason = resolve_bf16(cfg.bf16)
    data = Path(cfg.data)
    phases = cfg.phase_list()

    pairs = TrainPairs(data / "train" / "images", data / "train" / "masks")
    val_names = {p.stem for p in (data / "val" / "images").iterdir()}
    overlap = sorted(val_names & {p.stem for p in pairs.paths})
    if overlap:
        raise ConfigError(
            f"{len(overlap)} validation image(s) also in the training set (e.g. {', '.join(overlap[:3])}): "
            "refused, a score on training images is not a validation figure"
        )
    log(
        out,
        f"data: {len(pairs)} train pairs ({len(pairs.skipped)} skipped: {', '.join(pairs.skipped[:5])}; "
        f"{len(pairs.resized)} masks resized to their image, bilinear: {', '.join(pairs.resized[:5])})",
    )
    val = load_val(data / "val" / "images", data / "val" / "masks", SALIENCY, limit=cfg.val_limit)

    teacher_weights = cfg.teacher_weights
    teacher, teacher_info, _ = load_model(cfg.teacher, teacher_weights, deploy=False, progress=False)
    teacher = teacher.float().eval()
    if cfg.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    cache = None
    if cfg.teacher_weight > 0:
        cache = TeacherCache(
            cfg.cache or (out.parent / "teacher_cache"),
            teacher_info.sha256 or "random",
            (cfg.teacher_resolution,) * 2,
            torch_teacher_runner(teacher, bf16, cfg.channels_last),
            SALIENCY,
        )
        keys = [image_key(p) for p in pairs.paths]

    last = out / "last.pt"
    state = load_checkpoint(last, cfg.arch) if (resume and last.is_file()) else None
    if state is not None:
        model, init_record = build_student(dataclasses.replace(cfg, init="scratch"), out)
        init_record = state["init"]
    else:
        model, init_record = build_student(cfg, out, teacher)
    model.float()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.deploy = False
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_total = sum(math.ceil(n / cfg.batch_size) for _, n in phases)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, steps_total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loss_fn = CompositeLoss(cfg.loss)
    history: list[dict[str, Any]] = []
    step, samples_seen, epoch, position, best = 0, 0, 0, 0, math.inf
    wall_before = 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, samples_seen, epoch, position = (int(state[k]) for k in ("step", "samples", "epoch", "position"))
        history, best, wall_before = list(state["history"]), float(state["best_mae"]), float(state["wall_s"])
        torch.set_rng_state(state["torch_rng"])
        log(
            out,
            f"resumed {last} at step {step}/{steps_total}, {samples_seen} samples, epoch {epoch} "
            f"position {position}, best val MAE {best:.4f}",
        )
    else:
        scores = deploy_scores(model, val)
        history.append({"step": 0, "samples": 0, "val": scores, "wall_s": 0.0})
        best = scores["mae"]
        _atomic_torch_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "best.pth")
        log(
            out,
            f"init {json.dumps(init_record)}: deploy-path val[{len(val)}] MAE {scores['mae']:.4f} "
            f"max F {scores['max_f']:.4f} IoU {scores['iou50']:.4f}",
        )
        torch.manual_seed(cfg.seed)
    host = host_record(bf16, bf16_reason)
    (out / "run.json").write_text(
        json.dumps(
            {
                "config": dataclasses.asdict(cfg),
                "host": host,
                "init": init_record,
                "teacher": teacher_info.to_dict(),
                "phases": phases,
                "steps_total": steps_total,
                "train_pairs": len(pairs),
                "skipped": pairs.skipped,
                "val_images": len(val),
            },
            indent=1,
        )
    )
    log(
        out,
        f"contract {cfg.contract}; host: {host['cpu']}, bf16 autocast {bf16} ({bf16_reason}), channels_last {cfg.channels_last}; "
        f"{steps_total} steps of {cfg.batch_size}, phases {phases}",
    )

    def save(reason: str) -> None:
        _atomic_torch_save(
            {
                "arch": cfg.arch,
                "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "samples": samples_seen,
                "epoch": epoch,
                "position": position,
                "history": history,
                "best_mae": best,
                "torch_rng": torch.get_rng_state(),
                "wall_s": wall_before + time.time() - session_start,
                "config": dataclasses.asdict(cfg) | {"crop_scale": list(cfg.crop_scale)},
                "init": init_record,
            },
            last,
        )
        (out / "history.json").write_text(json.dumps(history, indent=1))

    def evaluate() -> None:
        nonlocal best
        scores = deploy_scores(model, val)
        record = {
            "step": step,
            "samples": samples_seen,
            "val": scores,
            "wall_s": wall_before + time.time() - session_start,
        }
        history.append(record)
        mark = ""
        if becomes_best(scores, best, history[0]["val"], cfg.select):
            best = scores["mae"]
            _atomic_torch_save(
                {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "best.pth"
            )
            mark = " (best)"
        log(
            out,
            f"val[{len(val)}] step {step} samples {samples_seen} size {size}: deploy-path MAE {scores['mae']:.4f} "
            f"max F {scores['max_f']:.4f} IoU {scores['iou50']:.4f}{mark}",
        )

    session_start = time.time()
    last_ckpt = last_eval = time.time()
    window_t, window_n = time.time(), 0
    model.train()
    if cfg.freeze_bn:
        from u2zoo.zoo.layers import freeze_batchnorm

        freeze_batchnorm(model)
    size = phases[0][0]
    while step < steps_total:
        # which phase: by samples seen
        boundary, size = 0, phases[-1][0]
        for s, n in phases:
            boundary += n
            if samples_seen < boundary:
                size = s
                break
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(pairs))
        if position >= len(order):
            epoch, position = epoch + 1, 0
            continue
        idx = order[position : position + cfg.batch_size]
        xs, ms, ts = [], [], []
        tmaps = cache.get_many([keys[i] for i in idx], [pairs.images[i] for i in idx]) if cache else [None] * len(idx)
        for i, tmap in zip(idx, tmaps):
            rng = np.random.default_rng([cfg.seed, epoch, int(i)])
            x, m, t = make_sample(pairs.images[i], pairs.masks[i], tmap, size, rng, cfg.crop_scale, SALIENCY.pre)
            xs.append(x), ms.append(m), ts.append(t)
        x = torch.from_numpy(np.stack(xs))
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        mask = torch.from_numpy(np.stack(ms))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            maps = model(x)
        maps = [m.float() for m in maps]
        value = loss_fn(maps, mask)
        if cache is not None:
            soft = torch.from_numpy(np.stack(ts))
            value = value + cfg.teacher_weight * F.binary_cross_entropy(maps[0].clamp(1e-6, 1 - 1e-6), soft)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        position += len(idx)
        samples_seen += len(idx)
        window_n += len(idx)
        if step % 25 == 0:
            rate = window_n / (time.time() - window_t)
            eta = (cfg.samples - samples_seen) / max(rate, 1e-9)
            extra = f", teacher maps computed {cache.computed} cached-hits {cache.hits}" if cache else ""
            log(
                out,
                f"step {step}/{steps_total} epoch {epoch} size {size} loss {float(value.detach()):.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} {rate:.2f} samples/s ETA {eta / 60:.0f} min{extra}",
            )
            window_t, window_n = time.time(), 0
        if time.time() - last_eval > cfg.eval_minutes * 60:
            evaluate()
            model.train()
            if cfg.freeze_bn:
                freeze_batchnorm(model)
            last_eval = time.time()
        if time.time() - last_ckpt > cfg.ckpt_minutes * 60:
            save("periodic")
            last_ckpt = time.time()
            window_t, window_n = time.time(), 0
    evaluate()
    save("end")
    log(
        out,
        f"done: {samples_seen} samples, {step} steps, best val[{len(val)}] MAE {best:.4f}, "
        f"wall {(wall_before + time.time() - session_start) / 60:.1f} min",
    )


def becomes_best(scores: dict[str, float], best_mae: float, start: dict[str, float], select: str) -> bool:
    """Whether a validation result replaces ``best.pth``: a lower MAE than the best so far and,
    under ``select="ratchet"``, a MAE and a max F that both beat the run's start."""
    if scores["mae"] >= best_mae:
        return False
    return select == "mae" or (scores["mae"] < start["mae"] and scores["max_f"] > start["max_f"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m u2zoo.training.longrun", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(RunConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(name, type=lambda v: v.lower() in ("1", "true", "yes", "on"), default=f.default)
        elif f.name == "crop_scale":
            parser.add_argument(name, type=lambda v: tuple(float(x) for x in v.split(",")), default=f.default)
        elif f.name == "out":
            parser.add_argument(name, required=True)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(name, type=kind, default=f.default)
    parser.add_argument("--no-resume", action="store_true")
    args = vars(parser.parse_args(argv))
    fresh = args.pop("no_resume")
    try:
        run(RunConfig(**args), resume=not fresh)
    except U2ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
