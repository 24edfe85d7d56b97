"""Folder pipeline, batching, outputs (cut-out, composites), CRF and matting, on real runtimes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from u2zoo.converters import get_target
from u2zoo.errors import ConfigError, ImageError, ImageTooLarge
from u2zoo.tasks.engine import AUTO_BATCH_CAP, Segmenter, activation_bytes_per_image, auto_batch_size
from u2zoo.tasks.folder import process_files
from u2zoo.tasks.outputs import OutputOptions, composite, parse_colour, render
from u2zoo.tasks.refine import CrfOptions, MattingOptions, alpha_matting, dense_crf, trimap
from u2zoo.zoo.images import decode_image, load_rgb
from u2zoo.zoo.reference import sample_images

from conftest import TEST_DATA, assert_one_line_error, needs_shared, png_header_bytes, run_cli


@pytest.fixture
def tree(tmp_path):
    """Real photos (shrunk) in nested folders, beside the inputs a real folder holds by mistake."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sample_images()[:3]):
        with Image.open(src) as img:
            img.convert("RGB").resize((96 + 8 * i, 64 + 4 * i)).save(root / ("sub" if i == 2 else ".") / f"p{i}.png")
    (root / "notes.txt").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "huge.png").write_bytes(png_header_bytes(20000, 20000))
    return root


class CountingPredictor:
    """Wraps a runner to record the batch sizes the engine really sends."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []
        self.fixed_batch, self.fixed_size, self.last_latency_s = inner.fixed_batch, inner.fixed_size, 0.0

    def predict(self, batch):
        self.batches.append(len(batch))
        return self.inner.predict(batch)


def test_folder_reports_bad_files_keeps_structure_and_resumes(tree, tmp_path, tiny_dynamic_onnx):
    art = tiny_dynamic_onnx
    with get_target(art.target).runner(art) as runner:
        seg = Segmenter(runner, art.contract)
        report = process_files(seg, [tree], tmp_path / "out", OutputOptions(kinds=("mask", "cutout")), progress=False)
        assert report.processed == 3 and len(report.written) == 6
        assert sorted(p.name for p, _ in report.failed) == ["broken.jpg", "empty.png", "huge.png"]
        reasons = dict((p.name, r) for p, r in report.failed)
        assert "0 bytes" in reasons["empty.png"] and "400 MP" in reasons["huge.png"]
        assert [p.name for p in report.not_images] == ["notes.txt"]
        mask = Image.open(tmp_path / "out" / "sub" / "p2.png")
        assert mask.mode == "L" and mask.size == (112, 72)
        cut = np.asarray(Image.open(tmp_path / "out" / "sub" / "p2_cutout.png"))
        assert cut.shape == (72, 112, 4) and np.array_equal(cut[..., 3], np.asarray(mask))

        again = process_files(
            seg, [tree], tmp_path / "out", OutputOptions(kinds=("mask", "cutout")), resume=True, progress=False
        )
        assert again.processed == 0 and len(again.resumed) == 3
        (tmp_path / "out" / "p0_cutout.png").unlink()  # as if interrupted between the two files
        third = process_files(
            seg, [tree], tmp_path / "out", OutputOptions(kinds=("mask", "cutout")), resume=True, progress=False
        )
        assert third.processed == 1 and len(third.resumed) == 2
        assert not list((tmp_path / "out").rglob("*.tmp"))


def test_batch_8_really_batches_and_matches_batch_1(tmp_path, tiny_dynamic_onnx):
    art = tiny_dynamic_onnx
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(11):
        src = sample_images()[i % 4]
        with Image.open(src) as img:
            img.convert("RGB").resize((80 + i, 60)).save(photos / f"{i:02d}.png")
    with get_target(art.target).runner(art) as runner:
        counting = CountingPredictor(runner)
        process_files(Segmenter(counting, art.contract, 1), [photos], tmp_path / "b1", progress=False)
        assert counting.batches == [1] * 11
        counting.batches.clear()
        report = process_files(Segmenter(counting, art.contract, 8), [photos], tmp_path / "b8", progress=False)
        assert counting.batches == [8, 3] and report.processed == 11
    for i in range(11):
        a = np.asarray(Image.open(tmp_path / "b1" / f"{i:02d}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / "b8" / f"{i:02d}.png"), np.int16)
        assert np.abs(a - b).max() <= 1


def test_batch_is_refused_where_the_artifact_cannot_batch(capsys, tmp_path, tiny_weights, tree):
    code, _, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2net-tiny",
        "--weights",
        tiny_weights,
        "--target",
        "onnx",
        "--out",
        tmp_path / "static",
    )
    assert code == 0, err
    code, _, err = run_cli(
        capsys,
        "predict",
        "--artifact",
        tmp_path / "static" / "u2net-tiny_onnx_fp32.onnx",
        tree,
        "--batch",
        "8",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "static batch of 1; --batch 8 needs a dynamic-batch artifact")
    code, _, err = run_cli(
        capsys, "predict", "--model", "u2net-tiny", "--random-weights", tree, "--batch", "lots", "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, "--batch takes a number or auto")


def test_batch_auto_follows_free_memory(tiny_dynamic_onnx):
    art = tiny_dynamic_onnx
    per_image = activation_bytes_per_image("u2net-tiny", (320, 320))
    # the bound scales with the area: 4× the pixels, 4× the bytes (±1% for pooled rounding)
    assert activation_bytes_per_image("u2net-tiny", (640, 640)) == pytest.approx(4 * per_image, rel=0.01)
    with get_target(art.target).runner(art) as runner:
        assert auto_batch_size(runner, art.contract, "u2net-tiny", available=10 * per_image).batch_size == 5
        assert auto_batch_size(runner, art.contract, "u2net-tiny", available=per_image).batch_size == 1
        assert auto_batch_size(runner, art.contract, "u2net-tiny", available=10**15).batch_size == AUTO_BATCH_CAP


def test_predict_cli_batch_auto_composite_and_throughput_line(capsys, tmp_path, tiny_dynamic_onnx, tree):
    code, out, err = run_cli(
        capsys,
        "predict",
        "--artifact",
        tiny_dynamic_onnx.path,
        tree,
        "--batch",
        "auto",
        "--outputs",
        "composite",
        "--bg-colour",
        "#00ff00",
        "--out",
        tmp_path / "o",
    )
    assert code == 1  # the three unreadable files
    assert "--batch auto:" in out and "images/s end to end" in out and "3 input(s) failed" in out
    assert "skipped 1 non-image file(s) in the folders: notes.txt" in err
    assert "huge.png" in err and "over the limit" in err
    comp = Image.open(tmp_path / "o" / "p0_composite.png")
    assert comp.mode == "RGB" and comp.size == (96, 64)


def test_max_pixels_option_and_decoding_limits(tmp_path, monkeypatch):
    # Pillow's own guard as a fresh process has it: the first huge image must meet our limit,
    # not Pillow's decompression-bomb error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)
    with pytest.raises(ImageTooLarge, match="400 MP, over the limit"):
        decode_image(png_header_bytes(20000, 20000))
    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200), "white").save(path)
    assert load_rgb(path).shape == (200, 300, 3)
    with pytest.raises(ImageError, match="60000 px|0 MP, over the limit of 0.05 MP"):
        load_rgb(path, max_pixels=50_000)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageError, match="400 MP, over the limit"):
        decode_image(png_header_bytes(20000, 20000))


def test_outputs_cutout_and_composites():
    rng = np.random.default_rng(0)
    image = rng.random((20, 30, 3)).astype(np.float32)
    alpha = np.zeros((20, 30), np.float32)
    alpha[5:15, 10:20] = 1.0
    out = render(image, alpha, OutputOptions(kinds=("mask", "cutout", "composite"), background_colour=(0, 255, 0)))
    comp = np.asarray(out.images["composite"])
    assert (comp[0, 0] == [0, 255, 0]).all() and np.abs(comp[10, 15] / 255.0 - image[10, 15]).max() < 0.003
    assert np.array_equal(np.asarray(out.images["cutout"])[..., 3], np.asarray(out.images["mask"]))
    background = np.zeros((10, 60, 3), np.float32)
    background[:, 30:] = 1.0  # left half black, right half white: cover-scaled, then centre-cropped
    blended = composite(image, np.zeros_like(alpha), OutputOptions(kinds=("composite",), background_image=background))
    assert blended.shape == (20, 30, 3) and blended[:, :14].max() == 0 and blended[:, 16:].min() == 1
    assert parse_colour("#FF8000") == (255, 128, 0) == parse_colour("255,128,0")
    for bad in ("#12", "300,0,0", "purple-ish"):
        with pytest.raises(ConfigError, match="cannot read colour"):
            parse_colour(bad)
    with pytest.raises(ConfigError, match="composite needs"):
        OutputOptions(kinds=("composite",))
    with pytest.raises(ConfigError, match="unknown output"):
        OutputOptions(kinds=("alpha",))


def _square_scene(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A red square on blue, and its true mask."""
    truth = np.zeros((size, size), np.float32)
    truth[16:48, 16:48] = 1.0
    image = np.zeros((size, size, 3), np.float32)
    image[..., 0], image[..., 2] = truth, 1 - truth
    return image, truth


def test_crf_pulls_a_blurred_shifted_map_onto_the_image_edges():
    from scipy.ndimage import gaussian_filter, shift

    image, truth = _square_scene()
    prob = np.clip(gaussian_filter(shift(truth, (3, -3), order=0), 3), 0.02, 0.98)
    refined = dense_crf(image, prob, CrfOptions())
    band = gaussian_filter(truth, 4) % 1 > 0.02  # pixels near the true edge
    before, after = np.abs(prob - truth)[band].mean(), np.abs(refined - truth)[band].mean()
    assert refined.shape == prob.shape and 0 <= refined.min() and refined.max() <= 1
    assert after < 0.5 * before, (before, after)


def test_trimap_thresholds_and_matting_recover_a_soft_edge():
    width = 80
    ramp = np.clip((np.arange(width) - 30) / 20, 0, 1).astype(np.float32)  # a 20 px soft edge, like hair
    alpha_true = np.tile(ramp, (40, 1))
    fg, bg = np.array([0.9, 0.7, 0.2]), np.array([0.1, 0.2, 0.8])
    image = (alpha_true[..., None] * fg + (1 - alpha_true[..., None]) * bg).astype(np.float32)
    coarse = (alpha_true > 0.5).astype(np.float32)  # a hard mask, as a segmenter gives

    options = MattingOptions(fg_threshold=240, bg_threshold=10, erode=12)
    tri = trimap(coarse, options)
    assert set(np.unique(tri)) == {0.0, 0.5, 1.0}
    assert (tri[:, :29] == 0).all() and (tri[:, 29:53] == 0.5).all() and (tri[:, 53:] == 1).all()
    result = alpha_matting(image, coarse, options)
    assert result.note is None
    unknown = tri == 0.5
    assert np.abs(result.alpha - alpha_true)[unknown].mean() < 0.25 * np.abs(coarse - alpha_true)[unknown].mean()

    nothing_sure = alpha_matting(image, np.full_like(coarse, 0.5), options)
    assert nothing_sure.note and "no sure foreground" in nothing_sure.note and nothing_sure.alpha is not None
    with pytest.raises(ConfigError, match="thresholds"):
        MattingOptions(fg_threshold=10, bg_threshold=200)


def test_predict_cli_with_crf_and_matting_on_a_real_photo(capsys, tmp_path, tiny_dynamic_onnx):
    photo = tmp_path / "cat.png"
    with Image.open(sample_images()[1]) as img:
        img.convert("RGB").resize((90, 60)).save(photo)
    code, out, err = run_cli(
        capsys,
        "predict",
        "--artifact",
        tiny_dynamic_onnx.path,
        photo,
        "--crf",
        "--alpha-matting",
        "--fg-threshold",
        "200",
        "--bg-threshold",
        "60",
        "--erode",
        "3",
        "--cutout",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "o" / "cat_cutout.png").mode == "RGBA"
    code, _, err = run_cli(
        capsys,
        "predict",
        "--artifact",
        tiny_dynamic_onnx.path,
        photo,
        "--alpha-matting",
        "--fg-threshold",
        "5",
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "matting thresholds need")


@needs_shared
def test_human_segmentation_weights_give_cutouts_and_composites(capsys, tmp_path):
    """u2net_human_seg (the U2NET layout; no trained copy here, so random weights) through the
    same folder pipeline: a real human photo → mask, RGBA cut-out and a composite on a
    background image, all at the photo's size."""
    photo = sorted((TEST_DATA / "test_human_images").iterdir())[0]
    with Image.open(photo) as img:
        small = tmp_path / "person.png"
        img.convert("RGB").resize((120, 90)).save(small)
    code, out, err = run_cli(
        capsys,
        "predict",
        "--model",
        "u2net_human_seg",
        "--random-weights",
        small,
        "--outputs",
        "mask,cutout,composite",
        "--bg-image",
        sample_images()[3],
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    for name, mode in (("person.png", "L"), ("person_cutout.png", "RGBA"), ("person_composite.png", "RGB")):
        result = Image.open(tmp_path / "o" / name)
        assert result.mode == mode and result.size == (120, 90)


@pytest.mark.parametrize(
    "target, options",
    [
        ("openvino", {"dynamic": True}),
        pytest.param("tflite", {}, marks=pytest.mark.slow),
        pytest.param("executorch", {}, marks=pytest.mark.slow),
    ],
)
def test_folder_pipeline_runs_on_other_runtimes_with_their_contract(tmp_path, tiny_weights, target, options):
    """The same folder job through another runtime's runner gives the torch reference's masks
    (a static 320×320 artifact included: the contract's resize happens outside the runtime)."""
    from u2zoo.conversion import convert_model
    from u2zoo.zoo.reference import TorchPredictor
    from u2zoo.zoo.weights import load_model

    art = convert_model("u2net-tiny", target, tmp_path / "art", weights=str(tiny_weights), progress=False, **options)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, src in enumerate(sample_images()[:2]):
        with Image.open(src) as img:
            img.convert("RGB").resize((100 + 20 * i, 70)).save(photos / f"p{i}.png")
    model, _, contract = load_model("u2net-tiny", str(tiny_weights))
    process_files(Segmenter(TorchPredictor(model), contract), [photos], tmp_path / "torch", progress=False)
    with get_target(art.target).runner(art) as runner:
        report = process_files(Segmenter(runner, art.contract), [photos], tmp_path / target, progress=False)
    assert report.processed == 2
    for i in range(2):
        a = np.asarray(Image.open(tmp_path / "torch" / f"p{i}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / target / f"p{i}.png"), np.int16)
        assert a.shape == b.shape == (70, 100 + 20 * i) and np.abs(a - b).max() <= 2


@pytest.mark.parametrize(
    "modules, call, extra",
    [
        (("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"), lambda img, p: dense_crf(img, p), "crf"),
        (("pymatting",), lambda img, p: alpha_matting(img, p), "matting"),
    ],
)
def test_missing_refinement_backend_says_what_to_install(monkeypatch, modules, call, extra):
    from u2zoo.errors import BackendUnavailable

    for name in modules:
        monkeypatch.setitem(__import__("sys").modules, name, None)  # import raises ImportError
    image, truth = _square_scene(16)
    with pytest.raises(BackendUnavailable, match=rf"not installed.*u2zoo\[{extra}\]"):
        call(image, truth)


def test_missing_crf_backend_fails_before_the_model_loads(capsys, monkeypatch, tmp_path):
    for name in ("pydensecrf", "pydensecrf.densecrf", "pydensecrf.utils"):
        monkeypatch.setitem(__import__("sys").modules, name, None)
    code, out, err = run_cli(
        capsys, "predict", "--model", "u2net-tiny", "--random-weights", tmp_path, "--crf", "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, r"pydensecrf2, which is not installed .*u2zoo\[crf\]")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
