"""`u2zoo portrait`: face crop → portrait network → inverted drawing, on real portrait photos.

No portrait weights exist here: the network is random (the tiny architecture for the pixel
checks, the real U2NET layout once for the CLI's I/O), so these tests pin shapes, crops,
inversion and I/O, not drawing quality.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from u2zoo.tasks.drawing import Blend, draw_files
from u2zoo.tasks.engine import Segmenter
from u2zoo.tasks.portrait import FaceDetector, prepare_portrait
from u2zoo.zoo.archs import build_arch
from u2zoo.zoo.contract import PORTRAIT, SALIENCY, postprocess, preprocess
from u2zoo.zoo.images import load_rgb
from u2zoo.zoo.reference import TorchPredictor

from conftest import TEST_DATA, assert_one_line_error, needs_shared, run_cli

PHOTOS = TEST_DATA / "test_portrait_images" / "your_portrait_im"


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    with Image.open(PHOTOS / "kid1.jpg") as img:
        img.save(folder / "kid1.jpg")
    Image.new("RGB", (200, 120), (128, 128, 128)).save(folder / "flat.png")  # no face anywhere
    return folder


@needs_shared
def test_drawing_is_the_inverted_map_of_the_face_crop(photos, tmp_path):
    import torch

    torch.manual_seed(0)
    predictor = TorchPredictor(build_arch("u2net-tiny", deploy=True))
    report = draw_files(
        Segmenter(predictor, PORTRAIT),
        [photos],
        tmp_path / "out",
        save_crop=True,
        progress=False,
        blend=Blend(sigma=20, alpha=0.5),
    )
    assert report.drawn == 2 and not report.failed
    assert [p.name for p in report.no_face] == ["flat.png"]

    drawing = np.asarray(Image.open(tmp_path / "out" / "kid1.png"), np.float32) / 255
    crop = np.asarray(Image.open(tmp_path / "out" / "kid1_face.png"), np.float32) / 255
    assert drawing.shape == (512, 512) and crop.shape == (512, 512, 3)
    expected_crop = prepare_portrait(load_rgb(photos / "kid1.jpg"), FaceDetector()).image
    assert np.abs(crop - expected_crop).max() <= 1 / 255 + 1e-6
    # the same network under the saliency post-processing gives the negative of the drawing
    raw = predictor.predict(preprocess(expected_crop, PORTRAIT.pre)[None])[0]
    saliency = postprocess(raw, (512, 512), SALIENCY.post)
    assert np.abs(drawing - (1 - saliency)).max() <= 1 / 255 + 1e-6
    assert Image.open(tmp_path / "out" / "flat.png").size == (512, 512)
    # the official composite: half the crop blurred by a 20 px Gaussian (per channel), half the drawing
    from scipy.ndimage import gaussian_filter

    composite = np.asarray(Image.open(tmp_path / "out" / "kid1_composite.png"), np.float32) / 255
    expected = 0.5 * gaussian_filter(expected_crop, (20, 20, 0)) + 0.5 * drawing[..., None]
    assert composite.shape == (512, 512, 3) and np.abs(composite - expected).max() <= 2 / 255


@needs_shared
def test_predict_with_a_portrait_contract_crops_the_face_too(photos):
    import torch

    torch.manual_seed(0)
    seg = Segmenter(TorchPredictor(build_arch("u2net-tiny", deploy=True)), PORTRAIT)
    photo = load_rgb(photos / "kid1.jpg")
    prepared = seg.prepare(photo)
    assert prepared.shape == (512, 512, 3)
    assert np.array_equal(prepared, prepare_portrait(photo, FaceDetector()).image)
    assert Segmenter(seg.predictor, SALIENCY).prepare(photo) is photo


@needs_shared
def test_portrait_cli_on_a_real_photo_with_the_u2net_layout(capsys, photos, tmp_path):
    code, out, err = run_cli(
        capsys,
        "portrait",
        photos / "kid1.jpg",
        "--model",
        "u2net_portrait",
        "--random-weights",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    assert "drew 1 portrait(s) with u2net_portrait" in out and "1 face crop(s)" in out
    drawing = Image.open(tmp_path / "o" / "kid1.png")
    assert drawing.mode == "L" and drawing.size == (512, 512)


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--model", "u2net-tiny", "--random-weights"], "not a portrait-drawing model"),
        (["--model", "u2net_portrait"], "never downloaded unverified: download it yourself and pass --weights"),
        (["--model", "u2net_portrait", "--random-weights", "--align"], "--align needs --landmarks-model"),
        (
            ["--model", "u2net_portrait", "--random-weights", "--align", "--landmarks-model", "/x.dat"],
            r"dlib.*u2zoo\[landmarks\]",
        ),
        (["--model", "u2net_portrait", "--random-weights", "--landmarks-model", "/x.dat"], "is for --align"),
        (["--model", "u2net_portrait", "--random-weights", "--blend", "--blend-alpha", "2"], "--blend-alpha in"),
    ],
)
def test_portrait_cli_refuses_bad_options_in_one_line(capsys, tmp_path, argv, pattern):
    pytest.importorskip("cv2")
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    code, _, err = run_cli(capsys, "portrait", image, *argv, "--out", tmp_path / "o")
    assert_one_line_error(code, err, pattern)
