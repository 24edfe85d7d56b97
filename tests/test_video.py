"""`u2zoo video`: real videos written with PyAV, decoded back and compared with the segmenter.

The test clips are crops of a real photo moving across the frame: a lossless FFV1 .mkv, so
decoded output frames can be compared level by level, and a lossy H.264 .mp4 at 30000/1001
frames/s, the common case.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli

av = pytest.importorskip("av")

FRAMES = 10
WIDTH, HEIGHT = 96, 64


def write_clip(path: Path, codec: str, pix_fmt: str, rate: Fraction) -> None:
    """FRAMES crops of a real photo, the crop moving 3 px right and 2 px down per frame."""
    from PIL import Image

    from u2zoo.zoo.reference import sample_images

    photo = np.asarray(Image.open(sample_images()[0]).convert("RGB").resize((160, 120)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, pix_fmt
        for t in range(FRAMES):
            crop = np.ascontiguousarray(photo[2 * t : 2 * t + HEIGHT, 3 * t : 3 * t + WIDTH])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")))
        container.mux(stream.encode())


def decode(path: Path, fmt: str) -> tuple[list[np.ndarray], Fraction, tuple[int, int]]:
    """Every frame as a uint8 array in ``fmt``; the stream's frame rate and (width, height)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format=fmt) for frame in container.decode(stream)]
        return frames, stream.average_rate, (stream.codec_context.width, stream.codec_context.height)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    clips = {"lossless": folder / "clip.mkv", "lossy": folder / "lossy.mp4"}
    write_clip(clips["lossless"], "ffv1", "bgr0", Fraction(25))
    write_clip(
        clips["lossy"], "libx264" if "libx264" in av.codecs_available else "mpeg4", "yuv420p", Fraction(30000, 1001)
    )
    return clips


@pytest.fixture(scope="module")
def segmenter(tiny_dynamic_onnx):
    from u2zoo.converters import get_target
    from u2zoo.tasks.engine import Segmenter

    art = tiny_dynamic_onnx
    with get_target(art.target).runner(art) as runner:
        yield Segmenter(runner, art.contract, batch_size=1)


@pytest.fixture(scope="module")
def reference(segmenter, clips) -> dict[str, list[np.ndarray]]:
    """``segmenter.maps([frame])`` of every decoded input frame, as uint8, one frame per call."""
    from u2zoo.zoo.contract import to_uint8

    maps = {}
    for name, path in clips.items():
        frames = [f.astype(np.float32) / 255.0 for f in decode(path, "rgb24")[0]]
        maps[name] = [to_uint8(segmenter.maps([frame])[0]) for frame in frames]
    return maps


def video(capsys, art, *argv) -> tuple[int, str, str]:
    return run_cli(capsys, "video", *argv, "--artifact", art.path)


def test_mask_video_matches_segmenter_frame_by_frame(capsys, tmp_path, tiny_dynamic_onnx, clips, reference):
    out = tmp_path / "mask.mkv"
    code, stdout, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], "--out", out)
    assert code == 0, err
    masks, rate, size = decode(out, "gray")
    _, in_rate, in_size = decode(clips["lossless"], "rgb24")
    assert (len(masks), rate, size) == (FRAMES, in_rate, in_size)
    assert max(max_diff(m, r) for m, r in zip(masks, reference["lossless"])) <= 1
    # the model's maps really differ from frame to frame, so the comparison means something
    assert max_diff(reference["lossless"][0], reference["lossless"][-1]) > 10
    assert f"{FRAMES} frame(s)" in stdout and "frames/s" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.mkv"]


def test_batch_4_gives_the_same_frames(capsys, tmp_path, tiny_dynamic_onnx, clips, reference):
    out = tmp_path / "mask.mkv"
    code, stdout, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], "--out", out, "--batch", "4")
    assert code == 0, err
    assert "at batch 4" in stdout
    masks = decode(out, "gray")[0]
    assert len(masks) == FRAMES  # 10 = 4 + 4 + a last batch of 2
    assert max(max_diff(m, r) for m, r in zip(masks, reference["lossless"])) <= 1


def test_cutout_mov_alpha_is_the_mask(capsys, tmp_path, tiny_dynamic_onnx, clips, reference):
    out = tmp_path / "x.mov"
    code, _, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], "--outputs", "mask,cutout", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mov", "x_cutout.mov"]
    masks = decode(out, "gray")[0]
    cutouts, rate, size = decode(tmp_path / "x_cutout.mov", "rgba")
    inputs = decode(clips["lossless"], "rgb24")[0]
    assert (len(cutouts), rate, size) == (FRAMES, Fraction(25), (WIDTH, HEIGHT))
    for cutout, mask, ref, frame in zip(cutouts, masks, reference["lossless"], inputs):
        assert np.array_equal(cutout[..., 3], mask)  # one alpha for every output of a frame
        assert max_diff(cutout[..., 3], ref) <= 1
        assert np.array_equal(cutout[..., :3], frame)  # PNG in .mov is lossless


@pytest.mark.parametrize(
    "argv", [["--outputs", "cutout", "--out", "{tmp}/x.mp4"], ["--cutout", "--format", "mp4", "--out", "{tmp}/out"]]
)
def test_cutout_to_mp4_is_refused(capsys, tmp_path, tiny_dynamic_onnx, clips, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], *argv)
    assert_one_line_error(code, err, r"no alpha.*\.mov")
    assert list(tmp_path.rglob("*")) == []


def test_smoothing_is_an_exponential_moving_average(capsys, tmp_path, tiny_dynamic_onnx, clips, reference):
    out = tmp_path / "smooth.mkv"
    code, _, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], "--smooth", "0.5", "--out", out)
    assert code == 0, err
    smoothed = [m.astype(float) for m in decode(out, "gray")[0]]
    raw = reference["lossless"]
    assert len(smoothed) == FRAMES
    assert max_diff(smoothed[0], raw[0]) <= 1  # the first frame has no past
    for t in range(1, FRAMES):
        assert max_diff(smoothed[t], 0.5 * smoothed[t - 1] + 0.5 * raw[t]) <= 2, t
    assert max(max_diff(s, r) for s, r in zip(smoothed, raw)) > 10  # it did smooth


@pytest.mark.parametrize("amount", ["-0.1", "1", "1.5", "nan"])
def test_smoothing_outside_0_1_is_refused(capsys, tmp_path, tiny_dynamic_onnx, clips, amount):
    code, _, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], "--smooth", amount, "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"--smooth must be in \[0, 1\)")
    assert not (tmp_path / "o").exists()


def test_bad_videos_are_reported_and_the_good_one_written(capsys, tmp_path, tiny_dynamic_onnx, clips, reference):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (inputs / "empty.mp4").write_bytes(b"")
    lossless = clips["lossless"].read_bytes()
    (inputs / "cut.mkv").write_bytes(lossless[: len(lossless) // 2])  # its first frames decode
    out = tmp_path / "out"
    argv = [inputs / "bad.mp4", inputs / "empty.mp4", inputs / "cut.mkv", clips["lossy"], "--out", out]
    code, stdout, err = video(capsys, tiny_dynamic_onnx, *argv)
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["lossy.mp4"]  # no temp files, nothing for the bad ones
    prefix = "u2zoo: skipped "
    skipped = dict(line[len(prefix) :].split(": ", 1) for line in err.splitlines() if line.startswith(prefix))
    assert sorted(Path(p).name for p in skipped) == ["bad.mp4", "cut.mkv", "empty.mp4"], err
    assert "empty (0 bytes)" in skipped[str(inputs / "empty.mp4")]
    assert "cannot open video" in skipped[str(inputs / "bad.mp4")]
    assert "truncated" in skipped[str(inputs / "cut.mkv")]
    assert "3 input(s) failed" in stdout

    masks, rate, size = decode(out / "lossy.mp4", "gray")
    assert (len(masks), rate, size) == (FRAMES, Fraction(30000, 1001), (WIDTH, HEIGHT))
    # H.264 is lossy: on average within a few levels of the segmenter's maps
    errors = [np.abs(m.astype(int) - r.astype(int)).mean() for m, r in zip(masks, reference["lossy"])]
    assert max(errors) < 4, errors

    # --resume: the finished video is skipped, the bad ones fail again
    code, stdout, _ = video(capsys, tiny_dynamic_onnx, inputs / "bad.mp4", clips["lossy"], "--out", out, "--resume")
    assert code == 1 and "1 already done (--resume)" in stdout and "wrote 0 video(s)" in stdout


def test_a_failure_mid_video_leaves_no_file(tmp_path, segmenter, clips, monkeypatch):
    """Whatever stops the encoding (here a bug in rendering at frame 5), the temp files go."""
    import u2zoo.tasks.video as video_module
    from u2zoo.tasks.outputs import OutputOptions, render

    calls = []

    def failing_render(*args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return render(*args)

    monkeypatch.setattr(video_module, "render", failing_render)
    targets = {"mask": tmp_path / "m.mkv", "cutout": tmp_path / "c.mov"}
    with pytest.raises(RuntimeError, match="boom"):
        video_module.process_video(segmenter, clips["lossless"], targets, OutputOptions(kinds=("mask", "cutout")))
    assert list(tmp_path.iterdir()) == []


def test_missing_input_is_one_line_error(capsys, tmp_path, tiny_dynamic_onnx, clips):
    code, _, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], tmp_path / "nope.mp4", "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"input not found: .*nope\.mp4")


def test_frames_over_max_pixels_fail_that_video(capsys, tmp_path, tiny_dynamic_onnx, clips):
    out = tmp_path / "o"
    code, _, err = video(capsys, tiny_dynamic_onnx, clips["lossless"], "--out", out, "--max-pixels", "1000")
    assert code == 1
    assert "96×64 = 6,144 pixels per frame" in err and "--max-pixels" in err
    assert list(out.iterdir()) == []


def test_output_names(tmp_path):
    from u2zoo.errors import ConfigError
    from u2zoo.tasks.video import plan_outputs

    a, b = tmp_path / "a.mkv", tmp_path / "sub" / "b.mp4"
    out = tmp_path / "out"
    # a folder: stem + kind suffix; masks and composites default to .mp4, cut-outs to .mov
    assert plan_outputs([a, b], out, ("mask", "cutout")) == [
        (a, {"mask": out / "a.mp4", "cutout": out / "a_cutout.mov"}),
        (b, {"mask": out / "b.mp4", "cutout": out / "b_cutout.mov"}),
    ]
    assert plan_outputs([a], out, ("cutout",), "webm") == [(a, {"cutout": out / "a_cutout.webm"})]
    # one input and a video suffix: that file, with other kinds beside it
    assert plan_outputs([a], tmp_path / "r.mov", ("cutout",)) == [(a, {"cutout": tmp_path / "r.mov"})]
    assert plan_outputs([a], tmp_path / "r.mkv", ("mask", "cutout")) == [
        (a, {"mask": tmp_path / "r.mkv", "cutout": tmp_path / "r_cutout.mkv"})
    ]
    with pytest.raises(ConfigError, match="need --out to be a folder"):
        plan_outputs([a, b], tmp_path / "r.mp4", ("mask",))
    with pytest.raises(ConfigError, match="would both write"):
        plan_outputs([a, tmp_path / "other" / "a.mov"], out, ("mask",))
    with pytest.raises(ConfigError, match="overwrite an input"):
        plan_outputs([a], a, ("mask",))
    with pytest.raises(ConfigError, match="unknown --format"):
        plan_outputs([a], out, ("mask",), "avi")


def test_encoders_by_container():
    from u2zoo.errors import ConfigError
    from u2zoo.tasks.video import encoder_for

    assert encoder_for("mov", "cutout")[:2] == ("png", "rgba")
    assert encoder_for("mkv", "mask")[:2] == ("ffv1", "gray")
    assert encoder_for("mp4", "mask")[1] == "yuv420p"
    assert encoder_for("mp4", "mask")[0] in ("libx264", "mpeg4")
    with pytest.raises(ConfigError, match="no alpha"):
        encoder_for("mp4", "cutout")
    if "libvpx-vp9" in av.codecs_available:
        assert encoder_for("webm", "cutout")[:2] == ("libvpx-vp9", "yuva420p")
