"""Training: folder pairing, augmentation determinism, losses, the trainer, distillation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from u2zoo.errors import ConfigError
from u2zoo.training.data import Augment, FolderDataset
from u2zoo.training.losses import CompositeLoss, deep_bce, dice, edge, parse_loss_spec
from u2zoo.training.trainer import TrainConfig, enable_gradient_checkpointing, fit
from u2zoo.zoo.archs import build_arch
from u2zoo.zoo.contract import SALIENCY

from conftest import REAL_WEIGHTS, assert_one_line_error, needs_shared, run_cli


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
        image[top : top + 40, left : left + 40] = rng.integers(180, 255, (40, 40, 3), dtype=np.uint8)
        mask[top : top + 40, left : left + 40] = 255
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


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("focal=1", "unknown loss 'focal'"),
        ("bce=x", "must be a number"),
        ("dice=-1", "must be ≥ 0"),
        (" , ", "empty loss spec"),
    ],
)
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
    code, out, err = run_cli(
        capsys,
        "train",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--images",
        images,
        "--masks",
        masks,
        "--size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    assert "trained 1 epoch(s)" in out
    code, out, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tmp_path / "run" / "best.pth",
        "--target",
        "onnx",
        "--height",
        "64",
        "--width",
        "64",
        "--out",
        tmp_path / "a",
    )
    assert code == 0, err


def test_training_bad_input(capsys, tmp_path, pairs):
    images, masks = pairs
    base = [
        "train",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--images",
        images,
        "--masks",
        masks,
        "--out",
        tmp_path / "o",
    ]
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
    code, _, err = run_cli(
        capsys,
        "distill",
        "--teacher",
        "u2netp",
        "--weights",
        REAL_WEIGHTS,
        "--student",
        "u2net_portrait",
        "--images",
        images,
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "different pre/post-processing contracts")


@needs_shared
def test_distillation_moves_the_student_towards_the_teacher(capsys, tmp_path, pairs):
    images, _ = pairs
    val = tmp_path / "val"  # mirror images: held out (the same files would be refused as validation)
    val.mkdir()
    for path in images.iterdir():
        Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(val / f"v_{path.name}")
    code, out, err = run_cli(
        capsys,
        "distill",
        "--teacher",
        "u2netp",
        "--weights",
        REAL_WEIGHTS,
        "--student",
        "u2net-tiny",
        "--images",
        images,
        "--val-images",
        val,
        "--size",
        "64",
        "--epochs",
        "4",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--out",
        tmp_path / "d",
    )
    assert code == 0, err
    history = json.loads((tmp_path / "d" / "history.json").read_text())
    assert history[-1]["val_mae"] < history[0]["val_mae"]
    state = torch.load(tmp_path / "d" / "last.pt", weights_only=True)
    assert state["teacher"]["name"] == "u2netp" and state["contract"] == SALIENCY.to_dict()


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_torchrun_ddp_on_cpu_splits_the_data_and_rank0_writes(tmp_path, pairs):
    """Multi-process training is torchrun + DDP (gloo on CPU), not a home-made launcher."""
    import shutil
    import subprocess
    import sys

    images, masks = pairs
    torchrun = shutil.which("torchrun", path=str(__import__("pathlib").Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not beside this Python")
    result = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "-m",
            "u2zoo",
            "-q",
            "train",
            "--model",
            "u2net-tiny",
            "--random-weights",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--size",
            "64",
            "--epochs",
            "1",
            "--batch-size",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
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


# ---------------------------------------------------------------------------------------------
# issue 14: bad input, teacher-map cache, CPU speed options, the long run, the ship ratchet


def test_masks_without_images_are_named(pairs):
    images, masks = pairs
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(masks / "orphan.png")
    with pytest.raises(ConfigError, match=r"masks without an image: orphan\.png \(1 in "):
        FolderDataset(images, SALIENCY, masks_dir=masks)


def test_resized_masks_are_named_and_corrupt_images_skipped_named_counted(pairs):
    images, masks = pairs
    (images / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(masks / "broken.png")
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64))
    assert len(data) == 4 and [name for name, _ in data.skipped] == ["broken.jpg"]
    assert data.resized_names == ["s0.png"] and data.resized_masks == 1
    summary = data.summary()
    assert "1 skipped, unreadable: broken.jpg" in summary and "resized to their image (bilinear): s0.png" in summary


def test_cli_reports_a_skipped_image_and_refuses_val_images_from_the_training_set(capsys, tmp_path, pairs):
    import shutil

    images, masks = pairs
    (images / "broken.jpg").write_bytes(b"not an image")
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(masks / "broken.png")
    base = [
        "train",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--images",
        images,
        "--masks",
        masks,
        "--size",
        "64",
        "--epochs",
        "1",
        "--batch-size",
        "2",
    ]
    code, out, err = run_cli(capsys, *base, "--out", tmp_path / "o")
    assert code == 0, err
    assert "skipped 1 unreadable training image(s): broken.jpg" in out
    state = torch.load(tmp_path / "o" / "last.pt", weights_only=True)
    assert state["skipped"] == ["broken.jpg"] and state["resized_masks"] == ["s0.png"]
    # the same folder as validation: refused, by name
    code, _, err = run_cli(capsys, *base, "--val-images", images, "--val-masks", masks, "--out", tmp_path / "v")
    assert_one_line_error(code, err, r"4 validation image\(s\) are also in the training set .*refused")
    # a renamed copy is caught by its bytes
    val_images, val_masks = tmp_path / "vi", tmp_path / "vm"
    val_images.mkdir()
    val_masks.mkdir()
    shutil.copy(images / "s2.jpg", val_images / "renamed.jpg")
    shutil.copy(masks / "s2.png", val_masks / "renamed.png")
    code, _, err = run_cli(capsys, *base, "--val-images", val_images, "--val-masks", val_masks, "--out", tmp_path / "w")
    assert_one_line_error(code, err, r"1 validation image\(s\) are also in the training set \(e\.g\. renamed\.jpg\)")


class _CountingTeacher:
    """A stand-in teacher: the map is the image's mean brightness per pixel; counts images seen."""

    def __init__(self):
        self.images = 0

    def __call__(self, inputs):
        self.images += len(inputs)
        return 1 / (1 + np.exp(-inputs.mean(1)))


def test_teacher_maps_are_computed_once_and_cached_on_disk(tmp_path, pairs):
    from u2zoo.training.teacher_cache import TeacherCache

    images, masks = pairs
    teacher = _CountingTeacher()
    cache = TeacherCache(tmp_path / "cache", "ab" * 32, (48, 48), teacher, SALIENCY)
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64), augment=Augment(), seed=0)
    data.attach_teacher(cache)
    assert cache.computed == 4 and teacher.images == 4
    sample = data[1]
    assert sample["teacher"].shape == (1, 64, 64) and 0 <= sample["teacher"].min() <= sample["teacher"].max() <= 1
    config = TrainConfig(out=str(tmp_path / "run"), epochs=2, batch_size=2, teacher_weight=0.5)
    history = fit(build_arch("u2net-tiny"), "u2net-tiny", data, None, config, lambda b: b["mask"], progress=False)
    assert teacher.images == 4  # the second epoch (and the first) read the maps, never the teacher
    assert history[1]["terms"]["teacher"] > 0
    # a new run over the same images reads every map from disk
    again = TeacherCache(tmp_path / "cache", "ab" * 32, (48, 48), teacher, SALIENCY)
    FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64)).attach_teacher(again)
    assert again.computed == 0 and again.hits == 4 and teacher.images == 4
    # another resolution, another teacher, or a changed image: computed anew
    other = TeacherCache(tmp_path / "cache", "ab" * 32, (32, 32), teacher, SALIENCY)
    FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64)).attach_teacher(other)
    assert other.computed == 4
    Image.fromarray(np.full((80, 96, 3), 200, np.uint8)).save(images / "s3.jpg")
    changed = TeacherCache(tmp_path / "cache", "ab" * 32, (48, 48), teacher, SALIENCY)
    FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64)).attach_teacher(changed)
    assert changed.computed == 1 and changed.hits == 3


def test_cli_train_with_a_teacher_caches_its_maps(capsys, tmp_path, pairs, tiny_weights):
    images, masks = pairs
    argv = [
        "train",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--images",
        images,
        "--masks",
        masks,
        "--size",
        "64",
        "--epochs",
        "2",
        "--batch-size",
        "2",
        "--teacher",
        "u2net-tiny",
        "--teacher-weights",
        tiny_weights,
        "--teacher-size",
        "64",
        "--teacher-cache",
        tmp_path / "maps",
        "--channels-last",
    ]
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "a")
    assert code == 0, err
    first = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert first["teacher"]["maps_computed"] == 4 and first["teacher"]["maps_cached"] == 0
    assert first["history"][-1]["terms"]["teacher"] > 0 and first["history"][-1]["samples_per_s"] > 0
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "b")
    assert code == 0, err
    second = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert second["teacher"]["maps_computed"] == 0 and second["teacher"]["maps_cached"] == 4
    code, _, err = run_cli(
        capsys,
        "train",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--images",
        images,
        "--masks",
        masks,
        "--teacher-weights",
        tiny_weights,
        "--out",
        tmp_path / "c",
    )
    assert_one_line_error(code, err, "--teacher-weights, --teacher-weight, .* need --teacher")


def test_init_bundled_needs_shipped_weights_and_excludes_weights(capsys, tmp_path, pairs, tiny_weights):
    images, masks = pairs
    base = ["train", "--images", images, "--masks", masks, "--out", tmp_path / "o", "--init", "bundled"]
    code, _, err = run_cli(capsys, *base, "--model", "u2net-tiny")
    assert_one_line_error(code, err, "--init bundled: 'u2net-tiny' has no weights shipped in the package")
    code, _, err = run_cli(capsys, *base, "--model", "u2net-lite", "--weights", tiny_weights)
    assert_one_line_error(code, err, "--init bundled starts from the package's weights")


@pytest.mark.parametrize(
    "flags, usable",
    [
        ("fpu avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu avx2 amx_bf16 amx_tile", True),
        ("fpu sse4_2 avx2 fma", False),
    ],
)
def test_bf16_is_used_only_with_native_support(tmp_path, flags, usable):
    from u2zoo.training.cpu import bf16_support, resolve_bf16

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    assert bf16_support(cpuinfo)[0] is usable
    assert resolve_bf16("auto", "cpu", cpuinfo)[0] is usable
    assert resolve_bf16("off", "cpu", cpuinfo)[0] is False
    if usable:
        assert resolve_bf16("on", "cpu", cpuinfo)[0] is True
    else:
        with pytest.raises(ConfigError, match="--bf16 on: this CPU has no native bf16"):
            resolve_bf16("on", "cpu", cpuinfo)


def test_fit_records_the_host_and_throughput_with_channels_last_and_bf16(tmp_path, pairs):
    from u2zoo.training.cpu import bf16_support

    images, masks = pairs
    data = FolderDataset(images, SALIENCY, masks_dir=masks, size=(64, 64), augment=Augment())
    config = TrainConfig(out=str(tmp_path / "r"), epochs=1, batch_size=2, channels_last=True, bf16="auto")
    history = fit(build_arch("u2net-tiny"), "u2net-tiny", data, data, config, lambda b: b["mask"], progress=False)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["host"]["bf16_autocast"] is bf16_support()[0] and run["host"]["bf16_reason"]
    assert history[0]["samples"] == 4 and history[0]["samples_per_s"] > 0 and np.isfinite(history[0]["train_loss"])
    assert torch.load(tmp_path / "r" / "last.pt", weights_only=True)["host"] == run["host"]
    best = torch.load(tmp_path / "r" / "best.pth", weights_only=True)
    assert all(v.is_contiguous() for v in best.values())  # channels_last does not leak into the weights


# ------------------------------------------------------------------ teacher-initialised students


def test_depthwise_factorisation_is_exact_at_multiplier_9_and_refinement_helps_at_2():
    from u2zoo.training.teacher_init import factorize_from_teacher, refine_pointwise
    from u2zoo.zoo.archs import TINY_WIDTHS, U2NetBase
    from u2zoo.zoo.layers import ds_multiplier_conv

    torch.manual_seed(0)
    teacher = build_arch("u2net-tiny")
    for module in teacher.modules():  # non-trivial BatchNorm statistics, to be folded
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = teacher(x)[0]
    exact = U2NetBase(TINY_WIDTHS, conv=ds_multiplier_conv(9)).eval()
    errors = factorize_from_teacher(teacher, exact)
    assert max(errors.values()) < 1e-5
    with torch.no_grad():
        assert torch.allclose(exact(x)[0], expected, atol=1e-4)
    low = U2NetBase(TINY_WIDTHS, conv=ds_multiplier_conv(2)).eval()
    assert min(factorize_from_teacher(teacher, low).values()) > 0.01
    with torch.no_grad():
        before = float((low(x)[0] - expected).abs().mean())
    refine_pointwise(teacher, low, torch.randn(8, 3, 64, 64))
    with torch.no_grad():
        after = float((low(x)[0] - expected).abs().mean())
    assert after < before


def test_deploy_path_scores_match_the_bench_metrics(tmp_path, pairs):
    from u2zoo.runtime.metrics import SaliencyMetrics
    from u2zoo.training.deploy_eval import load_val, predict_maps, score_maps
    from u2zoo.zoo.contract import postprocess

    images, masks = pairs
    (masks / "s0.png").unlink()
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(masks / "s0.png")
    val = load_val(images, masks, SALIENCY)
    torch.manual_seed(1)
    maps = predict_maps(build_arch("u2net-tiny"), val.inputs)
    ours = score_maps(maps, val, SALIENCY)
    bench = SaliencyMetrics()
    for raw, image, gt in zip(maps, val.images, val.gts):
        bench.add(postprocess(raw, image.shape[:2], SALIENCY.post), gt)
    result = bench.result()
    assert ours["images"] == 4
    assert ours["mae"] == pytest.approx(result.mae) and ours["max_f"] == pytest.approx(result.max_f)
    assert ours["iou50"] == pytest.approx(result.iou50)


# ---------------------------------------------------------------------------------- long run


def _duts_like(root, pairs_dir, val_count=2):
    """train/ and val/ folders of a DUTS-like set from the synthetic pairs (val: new images)."""
    import shutil

    images, masks = pairs_dir
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
    for p in images.iterdir():
        shutil.copy(p, root / "train" / "images" / p.name)
        shutil.copy(masks / f"{p.stem}.png", root / "train" / "masks" / f"{p.stem}.png")
    rng = np.random.default_rng(5)
    for i in range(val_count):
        image = rng.integers(0, 60, (72, 88, 3), dtype=np.uint8)
        mask = np.zeros((72, 88), np.uint8)
        image[20:50, 30:60] = 220
        mask[20:50, 30:60] = 255
        Image.fromarray(image).save(root / "val" / "images" / f"v{i}.jpg")
        Image.fromarray(mask).save(root / "val" / "masks" / f"v{i}.png")
    return root


def test_long_run_checkpoints_by_step_resumes_and_refuses_bad_input(tmp_path, pairs, tiny_weights):
    from u2zoo.training.longrun import RunConfig, run

    data = _duts_like(tmp_path / "duts", pairs)
    cfg = RunConfig(
        out=str(tmp_path / "run"),
        data=str(data),
        arch="u2net-tiny",
        init="scratch",
        teacher="u2net-tiny",
        teacher_weights=str(tiny_weights),
        teacher_resolution=64,
        phases="64:0.5,96:0.5",
        samples=16,
        batch_size=2,
        warmup_steps=2,
        ckpt_minutes=0,
        eval_minutes=0,
        val_limit=2,
        threads=1,
        cache=str(tmp_path / "cache"),
        bf16="off",
        contract="official",
    )
    run(cfg)
    out = tmp_path / "run"
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["arch"] == "u2net-tiny" and state["step"] == 8 and state["samples"] == 16
    assert state["epoch"] == 3 and state["position"] == 4  # 4 images, 16 samples: the end of epoch 3
    log_text = (out / "train.log").read_text()
    assert "samples/s" not in log_text or "ETA" in log_text
    assert "deploy-path MAE" in log_text and (out / "best.pth").is_file()
    scored = [h for h in state["history"] if "val" in h]
    assert scored[0]["step"] == 0 and scored[-1]["step"] == 8
    # more samples: the run continues from its step, not from zero
    run(RunConfig(**{**cfg.__dict__, "samples": 24}))
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["step"] == 12 and resumed["samples"] == 24 and "resumed" in (out / "train.log").read_text()
    # a checkpoint of another architecture: one line naming both
    with pytest.raises(ConfigError, match="resume checkpoint last.pt is for 'u2net-tiny', not 'u2netp'"):
        run(RunConfig(**{**cfg.__dict__, "arch": "u2netp"}))
    # a validation image that is also a training image: refused
    import shutil

    shutil.copy(data / "train" / "images" / "s1.jpg", data / "val" / "images" / "s1.jpg")
    shutil.copy(data / "train" / "masks" / "s1.png", data / "val" / "masks" / "s1.png")
    with pytest.raises(ConfigError, match=r"1 validation image\(s\) also in the training set \(e\.g\. s1\)"):
        run(RunConfig(**{**cfg.__dict__, "out": str(tmp_path / "other")}))


def test_best_checkpoint_is_what_the_ship_ratchet_would_accept():
    from u2zoo.training.longrun import becomes_best

    start = {"mae": 0.0829, "max_f": 0.8737}
    lower_mae_worse_f = {"mae": 0.0801, "max_f": 0.8657}  # lite-duts-8's last step: the ratchet refuses it
    both_better = {"mae": 0.0824, "max_f": 0.8739}
    assert not becomes_best(lower_mae_worse_f, 0.0829, start, "ratchet")
    assert becomes_best(lower_mae_worse_f, 0.0829, start, "mae")
    assert becomes_best(both_better, 0.0829, start, "ratchet")
    assert not becomes_best(both_better, 0.0820, start, "ratchet")  # not below the best so far


def test_long_run_names_unpaired_files(tmp_path, pairs):
    from u2zoo.training.longrun import TrainPairs

    images, masks = pairs
    (masks / "s2.png").rename(masks / "lonely.png")
    with pytest.raises(
        ConfigError,
        match=r"1 of \d+ image\(s\) have no mask in .* \(e\.g\. s2\.jpg\); "
        r"masks without an image: lonely\.png",
    ):
        TrainPairs(images, masks)


# ---------------------------------------------------------------------------------- the ratchet


def _fake_scores(monkeypatch, by_name):
    import u2zoo.training.ship as ship

    def score(state, arch, val, contract):
        marker = float(state["outconv.bias"].flatten()[0])
        mae, max_f = by_name[round(marker, 1)]
        return {"mae": mae, "max_f": max_f, "iou50": 0.5, "images": len(val)}

    monkeypatch.setattr(ship, "score_state", score)


def _tiny_state(marker: float):
    torch.manual_seed(0)
    state = build_arch("u2net-tiny").state_dict()
    state["outconv.bias"].fill_(marker)
    return state


def test_ship_refuses_worse_weights_with_both_scores(tmp_path, pairs, monkeypatch):
    from u2zoo.training.ship import ship_if_better

    data = _duts_like(tmp_path / "duts", pairs)
    dest, candidate = tmp_path / "bundled.pth", tmp_path / "run" / "best.pth"
    candidate.parent.mkdir()
    torch.save(_tiny_state(0.1), dest)
    torch.save(_tiny_state(0.2), candidate)
    before = dest.read_bytes()
    for new in ((0.30, 0.70), (0.10, 0.60), (0.20, 0.65)):  # worse MAE, worse max F, equal: all refused
        _fake_scores(monkeypatch, {0.1: (0.20, 0.65), 0.2: new})
        with pytest.raises(
            ConfigError,
            match=rf"refused to ship: candidate best.pth: MAE {new[0]:.4f}, max F "
            rf"{new[1]:.4f}; bundled bundled.pth: MAE 0.2000, max F 0.6500",
        ):
            ship_if_better(candidate, dest, data, arch="u2net-tiny")
    assert dest.read_bytes() == before and not dest.with_suffix(".json").exists()


def test_ship_replaces_with_better_weights_and_records_the_run(tmp_path, pairs, monkeypatch):
    from u2zoo.training.ship import ship_if_better

    data = _duts_like(tmp_path / "duts", pairs)
    dest, run_dir = tmp_path / "bundled.pth", tmp_path / "run"
    run_dir.mkdir()
    torch.save(_tiny_state(0.1), dest)
    torch.save(_tiny_state(0.2), run_dir / "best.pth")
    old_sha = __import__("hashlib").sha256(dest.read_bytes()).hexdigest()
    torch.save(
        {
            "arch": "u2net-tiny",
            "model": _tiny_state(0.2),
            "step": 40,
            "samples": 320,
            "epoch": 80,
            "wall_s": 12.5,
            "history": [
                {"step": 20, "samples": 160, "wall_s": 6.04, "val": {"mae": 0.09, "images": 2}},
                {"step": 40, "val": {"mae": 0.1}},
            ],
        },
        run_dir / "last.pt",
    )
    (run_dir / "run.json").write_text(
        json.dumps({"config": {"lr": 1e-3}, "host": {"cpu": "Test CPU"}, "init": {"init": "bundled"}, "train_pairs": 4})
    )
    _fake_scores(monkeypatch, {0.1: (0.20, 0.65), 0.2: (0.05, 0.93)})
    dry = ship_if_better(run_dir / "best.pth", dest, data, arch="u2net-tiny", dry_run=True, log=lambda _: None)
    assert __import__("hashlib").sha256(dest.read_bytes()).hexdigest() == old_sha  # dry run writes nothing
    record = ship_if_better(run_dir / "best.pth", dest, data, arch="u2net-tiny", log=lambda _: None)
    assert record == dry | {"shipped": record["shipped"], "scored_in_s": record["scored_in_s"]}
    sha = __import__("hashlib").sha256(dest.read_bytes()).hexdigest()
    assert record["metrics"] == {
        "val": {
            "mae": 0.05,
            "max_f": 0.93,
            "iou50": 0.5,
            "images": 2,
            "data": "duts val/",
            "contract": "official",
            "weights_sha256": sha,
        }
    }
    assert record["previous"]["val"]["mae"] == 0.20 and record["previous"]["val"]["weights_sha256"] == old_sha
    assert record["data"]["counts"] == {"train": 4, "val": 2} and record["data"]["split"] == "val/"
    # best.pth is the step-20 checkpoint (lowest val MAE), not the run's end
    assert record["training"] == {
        "step": 20,
        "samples": 160,
        "wall_s": 6.0,
        "picked": "lowest val MAE of the run (0.0900 on 2 images)",
        "run_end": {"epoch": 80, "step": 40, "samples": 320, "wall_s": 12.5},
    }
    assert (
        record["device"] == {"cpu": "Test CPU"}
        and record["contract"]["variant"] in ("official", None)
        or "variant" not in record["contract"]
    )
    assert json.loads(dest.with_suffix(".json").read_text())["metrics"] == record["metrics"]
    shipped = torch.load(dest, weights_only=True)
    assert all(v.dtype == torch.float16 for v in shipped.values() if v.is_floating_point())


def test_ship_scores_through_the_deploy_path_for_real(tmp_path, pairs):
    """No fake scores: a real (tiny) model against itself is not better, and says so."""
    from u2zoo.training.ship import ship_if_better

    data = _duts_like(tmp_path / "duts", pairs)
    torch.save(_tiny_state(0.1), tmp_path / "bundled.pth")
    torch.save(_tiny_state(0.1), tmp_path / "best.pth")
    with pytest.raises(
        ConfigError,
        match=r"refused to ship: candidate best.pth: MAE (\d\.\d{4}), max F (\d\.\d{4}); "
        r"bundled bundled.pth: MAE \1, max F \2 \(duts val/, 2 images",
    ):
        ship_if_better(tmp_path / "best.pth", tmp_path / "bundled.pth", data, arch="u2net-tiny")
