"""Turn a trained ``best.pth`` into weights that ship inside the package — only if they are better.

The shipped file is the state dict in float16: half the size, and a distilled student loses
nothing measurable from the rounding. Beside it goes a JSON record: how the weights were
trained (the recipe), the training history, and what was measured. The registry entry pins
the file's sha256, so the package refuses a file that was changed after shipping.

The ratchet (:func:`ship_if_better`, ``python -m u2zoo.training.ship``): the candidate (as it
will ship, i.e. after the float16 rounding) and the currently bundled weights are both scored
on the whole validation split through the deploy path of the *official* contract (the numbers
``u2zoo bench --gt`` gives); the candidate replaces the bundled file only when it has the lower
MAE *and* the higher max F. A worse (or equal) candidate is refused with both scores in one
line. The record beside the weights keeps both scores, the data, the steps/epochs/samples, the
device and the wall time of the run, and the contract. The score is stored as
``"metrics": {"val": {"mae", "max_f", "iou50", "images", "data", "contract", "weights_sha256"}}``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

from u2zoo.artifact import atomic_write_bytes, atomic_write_text
from u2zoo.errors import ConfigError, U2ZooError, WeightsError
from u2zoo.files import file_digest

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "duts-tr"


def ship_weights(
    best: str | Path,
    dest: str | Path,
    recipe: dict[str, Any],
    history: str | Path | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``dest`` (fp16 state dict) and ``dest.json`` (recipe, history, metrics); return the record."""
    import torch

    state = torch.load(best, map_location="cpu", weights_only=True)
    dest = Path(dest)
    atomic_write_bytes(dest, fp16_bytes(state))
    record = {
        "file": dest.name,
        "sha256": file_digest(dest),
        "bytes": dest.stat().st_size,
        "num_params": sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k),
        "recipe": recipe,
        "metrics": metrics or {},
        "history": json.loads(Path(history).read_text()) if history else [],
    }
    atomic_write_text(dest.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    return record


def fp16_bytes(state: dict[str, Any]) -> bytes:
    """The state dict as it ships: floating tensors in float16, saved with torch.save."""
    import torch

    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(half, buffer)
    return buffer.getvalue()


def official_contract():
    """The official pre/post (plain bilinear both ways), whatever the package's default variant is."""
    from u2zoo.zoo import contract as contract_module

    official = getattr(contract_module, "SALIENCY_OFFICIAL", None)
    return official if official is not None else contract_module.Contract()


def _load_state(path: Path) -> dict[str, Any]:
    """A bare state dict, or the ``model`` of a training checkpoint (``last.pt``)."""
    import torch

    if not path.is_file():
        raise WeightsError(f"weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - one line for a corrupt or unsafe file
        raise WeightsError(f"cannot read {path}: {type(exc).__name__}") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(hasattr(v, "is_floating_point") for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    return obj


def score_state(state: dict[str, Any], arch: str, val, contract) -> dict[str, Any]:
    """Deploy-path scores of a state dict, exactly as it ships (float16-rounded, run in float32)."""
    import torch

    from u2zoo.training.deploy_eval import deploy_scores
    from u2zoo.zoo.archs import build_arch
    from u2zoo.zoo.weights import apply_state_dict

    model = build_arch(arch)
    shipped = {k: (v.half().float() if v.is_floating_point() else v) for k, v in state.items()}
    apply_state_dict(model, shipped, arch, "candidate")
    with torch.no_grad():
        return deploy_scores(model.float().eval(), val, contract)


# what the record beside the weights says of the training that made them
TRAINING_KEYS = ("epoch", "step", "samples", "epochs", "steps", "wall_s", "picked", "run_end")


def _run_record(candidate: Path) -> dict[str, Any]:
    """What the run folder of ``candidate`` says about the training (longrun's or the trainer's files)."""
    import torch

    folder = candidate.parent
    record: dict[str, Any] = {"run": str(folder)}
    if (folder / "run.json").is_file():
        run = json.loads((folder / "run.json").read_text())
        record |= {
            "config": run.get("config"),
            "host": run.get("host"),
            "init": run.get("init"),
            "teacher": run.get("teacher"),
            "train_pairs": run.get("train_pairs"),
        }
    last = folder / "last.pt"
    if last.is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - the record is best effort; the weights are what ship
            state = {}
        history = state.get("history", [])
        record |= {k: state[k] for k in ("step", "samples", "epoch") if k in state}
        if "wall_s" in state:
            record["wall_s"] = round(float(state["wall_s"]), 1)
        if "step" not in state and history:  # trainer.fit's per-epoch checkpoint
            record |= {
                "epochs": len(history),
                "steps": sum(h.get("steps", 0) for h in history),
                "wall_s": round(sum(h.get("seconds", 0) for h in history), 1),
            }
        if "host" in state:
            record["host"] = state["host"]
        record["history"] = history
        if candidate.name == "best.pth":
            _describe_best(record, history)
    return record


def _describe_best(record: dict[str, Any], history: list[dict[str, Any]]) -> None:
    """``best.pth`` is the checkpoint with the lowest val MAE in the history, not the run's last
    state: record its own step, samples and wall time, and the run's end apart."""
    scored = [h for h in history if isinstance(h.get("val"), dict) and "mae" in h["val"] and "step" in h]
    if not scored or "step" not in record:
        return
    best = min(scored, key=lambda h: h["val"]["mae"])
    record["run_end"] = {k: record.pop(k) for k in ("epoch", "step", "samples", "wall_s") if k in record}
    record |= {
        "step": best["step"],
        "picked": f"lowest val MAE of the run ({best['val']['mae']:.4f} on {best['val'].get('images', '?')} images)",
    }
    if "samples" in best:
        record["samples"] = best["samples"]
    if "wall_s" in best:
        record["wall_s"] = round(float(best["wall_s"]), 1)


def ship_if_better(
    candidate: str | Path,
    dest: str | Path,
    data: str | Path = DEFAULT_DATA,
    split: str = "val",
    arch: str = "u2net-lite",
    dry_run: bool = False,
    limit: int | None = None,
    log=print,
) -> dict[str, Any]:
    """Score ``candidate`` and the weights at ``dest`` on ``data/split``; replace ``dest`` only if
    the candidate has the lower MAE and the higher max F. Returns the record written (or that
    would be written with ``dry_run``); a candidate that is not better raises ConfigError."""
    from u2zoo.training.deploy_eval import load_val
    from u2zoo.zoo.archs import count_params

    candidate, dest, data = Path(candidate), Path(dest), Path(data)
    images, masks = data / split / "images", data / split / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise ConfigError(f"validation data not found: {images} and {masks}")
    contract = official_contract()
    started = time.time()
    val = load_val(images, masks, contract, limit=limit)
    data_name = f"{data.name} {split}/"
    new_state = {k: v.float() if v.is_floating_point() else v for k, v in _load_state(candidate).items()}
    new = score_state(new_state, arch, val, contract)
    old = score_state(_load_state(dest), arch, val, contract) if dest.is_file() else None
    line = (
        f"candidate {candidate.name}: MAE {new['mae']:.4f}, max F {new['max_f']:.4f}; bundled {dest.name}: "
        + (f"MAE {old['mae']:.4f}, max F {old['max_f']:.4f}" if old else "none")
        + f" ({data_name}, {len(val)} "
        f"images, official contract)"
    )
    if old is not None and not (new["mae"] < old["mae"] and new["max_f"] > old["max_f"]):
        raise ConfigError(f"refused to ship: {line}: the candidate must have the lower MAE and the higher max F")
    log(f"better: {line}")
    payload = fp16_bytes(new_state)
    import hashlib

    sha = hashlib.sha256(payload).hexdigest()

    def entry(scores: dict[str, Any], weights_sha: str | None) -> dict[str, Any]:
        return {
            "mae": scores["mae"],
            "max_f": scores["max_f"],
            "iou50": scores["iou50"],
            "images": scores["images"],
            "data": data_name,
            "contract": "official",
            "weights_sha256": weights_sha,
        }

    counts = {
        s: len([p for p in (data / s / "images").iterdir()]) for s in ("train", "val") if (data / s / "images").is_dir()
    }
    run = _run_record(candidate)
    history = run.pop("history", [])
    record = {
        "file": dest.name,
        "sha256": sha,
        "bytes": len(payload),
        "arch": arch,
        "num_params": count_params(_model(arch)),
        "metrics": {"val": entry(new, sha)},
        "previous": {"val": entry(old, file_digest(dest))} if old else None,
        "data": {"set": data.name, "split": f"{split}/", "train_split": "train/", "counts": counts},
        "training": {k: run.get(k) for k in TRAINING_KEYS if k in run},
        "device": run.get("host"),
        "recipe": {k: run.get(k) for k in ("config", "init", "teacher", "train_pairs")},
        "contract": contract.to_dict(),
        "scored_in_s": round(time.time() - started, 1),
        "shipped": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "history": history,
    }
    if not dry_run:
        atomic_write_bytes(dest, payload)
        atomic_write_text(dest.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
        log(f"shipped {dest} (sha256 {sha}); update the registry entry's sha256 and file_size ({len(payload)})")
    return record


def _model(arch: str):
    from u2zoo.zoo.archs import build_arch

    return build_arch(arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m u2zoo.training.ship",
        description="replace the bundled weights only with better ones (scored on val/)",
    )
    parser.add_argument("candidate", help="best.pth (state dict) or last.pt of a training run")
    parser.add_argument("--arch", default="u2net-lite")
    parser.add_argument("--dest", help="the bundled weights file (default: the package's u2net-lite weights)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder with <split>/images and masks")
    parser.add_argument("--split", default="val")
    parser.add_argument("--dry-run", action="store_true", help="score and compare, write nothing")
    args = parser.parse_args(argv)
    dest = (
        Path(args.dest)
        if args.dest
        else Path(__file__).resolve().parents[1] / "zoo" / "bundled" / "u2net_lite_distilled_fp16.pth"
    )
    try:
        record = ship_if_better(args.candidate, dest, args.data, args.split, args.arch, args.dry_run)
    except U2ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(record["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
