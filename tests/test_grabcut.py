"""Issue 21 part 2: GrabCut mask preparation (`u2zoo masks`, `u2zoo.prepare_mask`) and its bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error
from conftest import run_cli as run


def _disc(h: int = 96, w: int = 128):
    """A textured orange disc on a textured blue ground, and its true mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    truth = ((yy - 48) ** 2 + (xx - 60) ** 2 < 30**2).astype(np.float32)
    fg = np.array([0.9, 0.55, 0.1]) + rng.normal(0, 0.04, (h, w, 3))
    bg = np.array([0.15, 0.3, 0.75]) + rng.normal(0, 0.04, (h, w, 3))
    image = np.clip(np.where(truth[..., None] > 0, fg, bg), 0, 1).astype(np.float32)
    return image, truth


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_repairs_a_map_that_is_wrong_near_the_edge():
    from scipy.ndimage import binary_dilation

    from u2zoo.tasks.grabcut import grabcut

    image, truth = _disc()
    # a map that is sure in the middle, unsure (0.6) on a 6 px band outside the object
    band = binary_dilation(truth > 0, iterations=6) & (truth == 0)
    prob = np.where(truth > 0, 0.99, 0.01).astype(np.float32)
    prob[band] = 0.6
    assert _iou(prob, truth) < 0.8
    assert _iou(grabcut(image, prob), truth) > 0.95


def test_grabcut_from_a_box_and_bad_images():
    from u2zoo.errors import ImageError
    from u2zoo.tasks.grabcut import grabcut

    image, truth = _disc()
    assert _iou(grabcut(image, box=(20, 10, 100, 86)), truth) > 0.9
    with pytest.raises(ImageError, match="blank"):
        grabcut(np.full((20, 20, 3), 0.5, np.float32), np.full((20, 20), 0.7, np.float32))
    with pytest.raises(ImageError, match="at least 2×2"):
        grabcut(np.zeros((1, 1, 3), np.float32), np.ones((1, 1), np.float32))


def test_masks_cli_writes_masks_overlays_and_goes_on_past_a_blank_image(tiny_dynamic_onnx, tmp_path, capsys):
    image, _ = _disc()
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray((image * 255).astype(np.uint8)).save(folder / "disc.png")
    Image.new("RGB", (40, 30), (128, 128, 128)).save(folder / "blank.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"disc.png": [20, 10, 100, 86]}))
    code, out, err = run(
        capsys,
        "masks",
        folder,
        "--out",
        tmp_path / "m",
        "--artifact",
        tiny_dynamic_onnx.path,
        "--refine",
        "grabcut",
        "--boxes",
        boxes,
        "--review",
    )
    assert code == 1 and "blank.png: GrabCut cannot separate anything in a blank" in err
    assert "wrote 1 mask(s)" in out and "1 from boxes" in out and "1 input(s) failed" in out
    mask = np.asarray(Image.open(tmp_path / "m" / "disc.png"))
    assert mask.shape == (96, 128) and set(np.unique(mask)) <= {0, 255}
    assert _iou(mask / 255.0, _disc()[1]) > 0.9
    assert Image.open(tmp_path / "m" / "review" / "disc.jpg").size == (128, 96)
    # without --refine: GrabCut is the default; threshold and none are the map itself
    for refine, values in (("threshold", {0, 255}), ("none", None)):
        code, out, err = run(
            capsys,
            "masks",
            folder / "disc.png",
            "--out",
            tmp_path / refine,
            "--artifact",
            tiny_dynamic_onnx.path,
            "--refine",
            refine,
        )
        assert code == 0, err
        written = np.asarray(Image.open(tmp_path / refine / "disc.png"))
        assert written.shape == (96, 128) and (values is None or set(np.unique(written)) <= values)


def test_boxes_file_refusals(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(folder / "a.png")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"b.png": [0, 0, 5, 5]}))
    code, _, err = run(capsys, "masks", folder, "--out", tmp_path / "m", "--boxes", boxes)
    assert_one_line_error(code, err, r"box for 'b.png', which is not among the inputs")
    boxes.write_text(json.dumps({"a.png": [0, 0, 50, 5]}))
    code, _, err = run(capsys, "masks", folder, "--out", tmp_path / "m", "--boxes", boxes)
    assert_one_line_error(code, err, r"box \[0, 0, 50, 5\] of 'a.png' is not inside the 40×30 image")


def test_prepare_mask_api(tiny_dynamic_onnx):
    import u2zoo

    image, truth = _disc()
    assert _iou(u2zoo.prepare_mask(image, box=(20, 10, 100, 86)), truth) > 0.9
    soft = u2zoo.prepare_mask(image, model=tiny_dynamic_onnx.path)
    refined = u2zoo.prepare_mask(image, model=tiny_dynamic_onnx.path, refine=True)
    assert soft.shape == refined.shape == truth.shape and set(np.unique(refined)) <= {0.0, 1.0}
