"""Training: folder pairing, augmentation determinism, losses, the trainer, distillation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REAL_WEIGHTS, assert_one_line_error, needs_shared, run_cli
from u2zoo.errors import ConfigError
from u2zoo.training.data import Augment, FolderDataset
from u2zoo.training.losses import CompositeLoss, deep_bce, dice, edge, parse_loss_spec
from u2zoo.training.trainer import TrainConfig, enable_gradient_checkpointing, fit
from u2zoo.zoo.archs import build_arch
from u2zoo.zoo.contract import SALIENCY


@pytest.fixture
def pairs(tmp_path):
    """Four images with a bright square on a dark ground, masks of the square; one mask at
    another size than its image."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.integers(0, 60, (80, 96, 3), dtype=np.uint8)
        mask = np.zeros((80, 96), np.uint8)
        top, left = 10 + 5 * i, 20 + 4 * i
        image[top:top + 40, left:left + 40] = rng.integers(180, 255, (40, 40, 3), dtype=np.uint8)
        mask[top:top + 40, left:left + 40] = 255
        Image.fromarray(image).save(images / f"s{i}.jpg")
        out = Image.fromarray(mask)
        (out.resize((48, 40), Image.Resampling.NEAREST) if i == 0 else out).save(masks / f"s{i}.png")
    return images, masks


def test_unpaired_folders_name_the_first_images(tmp_path, pairs):
    images, masks = pairs
    (masks / "s1.png").rename(masks / "other.png")
    with pytest.raises(ConfigError, match=r"1 of 4 image\(s\) have no mask .*s1\.jpg.*masks without an image: other"):
        FolderDataset(images, SALIENCY, masks_dir=masks)


def test_masks_are_resized_and_binarised_or_kept_soft(pairs):
    images, masks = pairs
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64))
    assert data.resized_masks == 1 and len(data) == 4
    sample = data[0]
    assert sample["image"].shape == (3, 64, 64) and sample["mask"].shape == (1, 64, 64)
    assert set(np.unique(sample["mask"])) <= {0.0, 1.0} and 0.1 < sample["mask"].mean() < 0.4
    soft = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64), soft_masks=True)[0]["mask"]
    assert ((soft > 0) & (soft < 1)).any()  # bilinear edges kept


def test_augmentation_is_reproducible_per_seed_epoch_and_index(pairs):
    images, masks = pairs
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64), augment=Augment(), seed=7)
    first = data[2]
    assert np.array_equal(first["image"], data[2]["image"]) and np.array_equal(first["mask"], data[2]["mask"])
    data.set_epoch(1)
    assert not np.array_equal(first["image"], data[2]["image"])
    again = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64), augment=Augment(), seed=7)
    assert np.array_equal(first["image"], again[2]["image"])


def test_deep_bce_is_the_official_sum_and_safe_on_saturated_probabilities():
    torch.manual_seed(0)
    maps = [torch.rand(2, 1, 8, 8) for _ in range(7)]
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    official = sum(torch.nn.functional.binary_cross_entropy(m, target) for m in maps)
    assert torch.allclose(deep_bce(maps, target), official, atol=1e-5)
    saturated = [target.clone() for _ in range(7)]  # probabilities of exactly 0 and 1
    saturated[0] = 1 - target
    value = deep_bce(saturated, target)
    assert torch.isfinite(value) and 13 < float(value) < 14  # clamped at 1e-6: −log(1e-6) ≈ 13.8


def test_dice_and_edge_are_zero_for_a_perfect_map_and_soft_targets_work():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    assert float(dice([target], target)) < 0.02 and float(edge([target], target)) < 1e-6
    assert float(edge([torch.zeros_like(target)], target)) > 0.1
    teacher = [torch.full((1, 1, 16, 16), 0.3)] * 7  # a teacher's soft maps, one per output
    assert torch.isfinite(deep_bce([torch.full((1, 1, 16, 16), 0.3)] * 7, teacher))


@pytest.mark.parametrize("spec, pattern", [("focal=1", "unknown loss 'focal'"), ("bce=x", "must be a number"),
                                           ("dice=-1", "must be ≥ 0"), (" , ", "empty loss spec")])
def test_bad_loss_specs(spec, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_loss_spec(spec)


def test_composite_loss_weighs_and_records_its_terms():
    maps = [torch.rand(1, 1, 8, 8) for _ in range(7)]
    target = (torch.rand(1, 1, 8, 8) > 0.5).float()
    loss = CompositeLoss("bce=1,dice=0.5")
    value = loss(maps, target)
    assert set(loss.last) == {"bce", "dice"}
    assert abs(float(value) - (loss.last["bce"] + 0.5 * loss.last["dice"])) < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    plain = build_arch("u2net-tiny").train()
    checked = build_arch("u2net-tiny").train()
    checked.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(checked) == 11  # 6 encoder + 5 decoder stages
    for model in (plain, checked):
        sum(m.mean() for m in model(x)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checked.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert set(checked.state_dict()) == set(plain.state_dict())


def test_fit_learns_writes_checkpoints_and_resumes(tmp_path, pairs):
    images, masks = pairs
    torch.manual_seed(0)
    model = build_arch("u2net-tiny")
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64), augment=Augment(), seed=0)
    val = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64))
    config = TrainConfig(out=str(tmp_path / "run"), epochs=6, batch_size=2, lr=1e-2, loss="bce=1,dice=0.5")
    history = fit(model, "u2net-tiny", data, val, config, lambda batch: batch["mask"], progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]  # it learns the squares
    assert history[-1]["val_mae"] < history[0]["val_mae"] and history[-1]["lr"] < 1e-4  # cosine to ~0
    run = tmp_path / "run"
    assert json.loads((run / "history.json").read_text()) == history and (run / "curves.png").stat().st_size > 1000
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["arch"] == "u2net-tiny" and state["epoch"] == 5
    # resume: two more epochs continue the count and the history
    config.resume, config.epochs = str(run / "last.pt"), 8
    resumed = fit(build_arch("u2net-tiny"), "u2net-tiny", data, val, config, lambda b: b["mask"], progress=False)
    assert [h["epoch"] for h in resumed] == list(range(1, 9)) and resumed[:6] == history
    # a checkpoint of another architecture is refused
    config.resume = str(run / "last.pt")
    with pytest.raises(ConfigError, match="is for 'u2net-tiny', not 'u2netp'"):
        fit(build_arch("u2netp"), "u2netp", data, val, config, lambda b: b["mask"], progress=False)


def test_trained_weights_convert_like_any_other(capsys, tmp_path, pairs):
    images, masks = pairs
    code, out, err = run_cli(capsys, "train", "--model", "u2net-tiny", "--random-weights", "--images", images,
                             "--masks", masks, "--size", "64", "--epochs", "1", "--batch-size", "2",
                             "--out", tmp_path / "run")
    assert code == 0, err
    assert "trained 1 epoch(s)" in out
    code, out, err = run_cli(capsys, "convert", "--model", "u2net-tiny", "--weights", tmp_path / "run" / "best.pth",
                             "--target", "onnx", "--height", "64", "--width", "64", "--out", tmp_path / "a")
    assert code == 0, err


def test_training_bad_input(capsys, tmp_path, pairs):
    images, masks = pairs
    base = ["train", "--model", "u2net-tiny", "--random-weights", "--images", images, "--masks", masks,
            "--out", tmp_path / "o"]
    code, _, err = run_cli(capsys, *base, "--epochs", "0")
    assert_one_line_error(code, err, "--epochs and --batch-size must be ≥ 1")
    code, _, err = run_cli(capsys, *base, "--size", "8")
    assert_one_line_error(code, err, "--size must be N or H,W with each ≥ 32")
    code, _, err = run_cli(capsys, *base, "--resume", tmp_path / "missing.pt")
    assert_one_line_error(code, err, "resume checkpoint not found")
    code, _, err = run_cli(capsys, *base, "--loss", "focal")
    assert_one_line_error(code, err, "unknown loss 'focal'")


@needs_shared
def test_distillation_refuses_a_teacher_with_another_contract(capsys, tmp_path, pairs):
    images, _ = pairs
    code, _, err = run_cli(capsys, "distill", "--teacher", "u2netp", "--weights", REAL_WEIGHTS, "--student",
                           "u2net_portrait", "--images", images, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "different pre/post-processing contracts")


@needs_shared
def test_distillation_moves_the_student_towards_the_teacher(capsys, tmp_path, pairs):
    images, _ = pairs
    code, out, err = run_cli(capsys, "distill", "--teacher", "u2netp", "--weights", REAL_WEIGHTS, "--student",
                             "u2net-tiny", "--images", images, "--val-images", images, "--size", "64",
                             "--epochs", "4", "--batch-size", "2", "--lr", "1e-2", "--out", tmp_path / "d")
    assert code == 0, err
    history = json.loads((tmp_path / "d" / "history.json").read_text())
    assert history[-1]["val_mae"] < history[0]["val_mae"]
    state = torch.load(tmp_path / "d" / "last.pt", weights_only=True)
    assert state["teacher"]["name"] == "u2netp" and state["contract"] == SALIENCY.to_dict()


def test_torchrun_ddp_on_cpu_splits_the_data_and_rank0_writes(tmp_path, pairs):
    """Multi-process training is torchrun + DDP (gloo on CPU), not a home-made launcher."""
    import shutil
    import subprocess
    import sys

    images, masks = pairs
    torchrun = shutil.which("torchrun", path=str(__import__("pathlib").Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not beside this Python")
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "u2zoo", "-q", "train", "--model", "u2net-tiny",
                             "--random-weights", "--images", str(images), "--masks", str(masks), "--size", "64",
                             "--epochs", "1", "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "ddp")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("trained 1 epoch(s)") == 1  # rank 0 only
    history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert history[0]["steps"] == 2  # 4 images over 2 processes at batch 1


def test_frozen_batchnorm_keeps_its_statistics(tmp_path, pairs):
    images, masks = pairs
    model = build_arch("u2net-tiny")
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    first_conv = model.stage1.rebnconvin.conv_s1.weight.detach().clone()
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64))
    config = TrainConfig(out=str(tmp_path / "f"), epochs=1, batch_size=2, freeze_bn=True)
    fit(model, "u2net-tiny", data, None, config, lambda batch: batch["mask"], progress=False)
    after = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(first_conv, model.stage1.rebnconvin.conv_s1.weight)  # the weights did train
