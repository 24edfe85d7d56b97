"""Structured pruning (torch-pruning): what is pruned, what stays whole, and that a pruned
checkpoint rebuilds from name + shapes + state dict and converts like any other."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torch_pruning")

from u2zoo.pruning.prune import KEPT_WHOLE, prune_model, save_pruned  # noqa: E402
from u2zoo.zoo.archs import build_arch  # noqa: E402
from u2zoo.zoo.pruned_shapes import shapes_path_for  # noqa: E402
from u2zoo.zoo.weights import load_model  # noqa: E402

from conftest import assert_one_line_error, run_cli  # noqa: E402


def test_pruning_removes_channels_keeps_heads_and_still_runs():
    torch.manual_seed(0)
    model = build_arch("u2net-tiny", deploy=True)
    record = prune_model(model, 0.5, size=(64, 64))
    assert record["params_after"] < 0.6 * record["params_before"] and record["kept_whole"] == list(KEPT_WHOLE)
    assert all(getattr(model, name).out_channels == 1 for name in KEPT_WHOLE)
    assert model.outconv.in_channels == 6  # the fuse conv still reads all six side maps
    assert (
        model.stage1.rebnconvin.conv_s1.out_channels < build_arch("u2net-tiny").stage1.rebnconvin.conv_s1.out_channels
    )
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64, 64)


def test_round_to_keeps_channel_counts_multiples():
    model = build_arch("u2net-tiny")
    prune_model(model, 0.3, size=(64, 64), round_to=4)
    counts = [
        m.out_channels
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d) and not name.startswith(KEPT_WHOLE)
    ]
    assert all(c % 4 == 0 for c in counts)


def test_pruned_checkpoint_rebuilds_and_converts(capsys, tmp_path):
    torch.manual_seed(1)
    model = build_arch("u2net-tiny", deploy=True)
    record = prune_model(model, 0.4, size=(64, 64))
    weights, sidecar = save_pruned(model, "u2net-tiny", tmp_path / "tiny_pruned.pth", record)
    assert sidecar == shapes_path_for(weights) and json.loads(sidecar.read_text())["arch"] == "u2net-tiny"
    rebuilt, info, _ = load_model("u2net-tiny", str(weights))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(rebuilt(x), model(x)) and info.sha256
    code, out, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        weights,
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
    assert "max abs" in out
    with pytest.raises(Exception, match="holds a pruned u2net-tiny, not u2netp"):
        load_model("u2netp", str(weights))


def test_cli_prune_with_taylor_importance_and_recovery(capsys, tmp_path, calib_dir):
    code, out, err = run_cli(
        capsys,
        "prune",
        "--model",
        "u2net-tiny",
        "--random-weights",
        "--ratio",
        "0.3",
        "--importance",
        "taylor",
        "--images",
        calib_dir,
        "--size",
        "64",
        "--recover-epochs",
        "1",
        "--batch-size",
        "2",
        "--out",
        tmp_path / "p",
    )
    assert code == 0, err
    assert "mae vs unpruned after recovery" in out
    shapes = json.loads((tmp_path / "p" / "u2net-tiny_pruned30.arch.json").read_text())
    assert shapes["pruning"]["importance"] == "taylor" and shapes["pruning"]["recovery"]["epochs"] == 1
    assert (tmp_path / "p" / "recovery" / "history.json").is_file()


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (("--ratio", "0"), r"pruning ratio must be in \(0, 0.9\]"),
        (("--ratio", "0.95"), r"pruning ratio must be in \(0, 0.9\]"),
        (("--ratio", "0.3", "--importance", "l1"), "unknown importance 'l1'"),
        (("--ratio", "0.3", "--importance", "taylor"), "taylor importance needs images"),
        (("--ratio", "0.3", "--recover-epochs", "1"), "recovery fine-tuning needs --images"),
        (("--ratio", "0.3", "--epochs", "2"), "use --recover-epochs N, not --epochs"),
    ],
)
def test_bad_pruning_options(capsys, tmp_path, extra, pattern):
    code, _, err = run_cli(
        capsys, "prune", "--model", "u2net-tiny", "--random-weights", *extra, "--out", tmp_path / "p"
    )
    assert_one_line_error(code, err, pattern)
