"""Hardening (issue 16) of what users feed the image pipelines: phone photos stored sideways,
odd file names, blocked or nested output folders, two inputs with one stem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from u2zoo.errors import ConfigError, ImageError
from u2zoo.tasks.folder import unique_stems
from u2zoo.zoo.images import decode_image, load_mask, load_rgb, shown

from conftest import assert_one_line_error, run_cli

STORED = (160, 120)  # (width, height) of the pixels in the file; EXIF turns them a quarter


def sideways_jpeg(path: Path, orientation: int = 6) -> Path:
    """A 160×120 JPEG whose EXIF orientation says: show me 120×160 (what a phone writes)."""
    pixels = np.zeros((STORED[1], STORED[0], 3), np.uint8)
    pixels[:, :40] = (255, 0, 0)  # a red band on the stored left edge: it must end up on top or bottom
    pixels[:, 40:] = np.random.default_rng(orientation).integers(0, 255, (STORED[1], STORED[0] - 40, 3))
    exif = Image.Exif()
    exif[274] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path


def displayed(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def predict(capsys, art, *argv):
    return run_cli(capsys, "predict", "--artifact", art.path, *argv)


# ---------------------------------------------------------------- #9 EXIF orientation


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photo_is_read_upright(tmp_path, orientation):
    photo = sideways_jpeg(tmp_path / "phone.jpg", orientation)
    upright = displayed(photo)
    assert upright.shape == (160, 120, 3)
    image = load_rgb(photo)
    assert image.shape == (160, 120, 3) and np.array_equal(np.rint(image * 255).astype(np.uint8), upright)
    assert np.array_equal(decode_image(photo.read_bytes()), image)  # serve reads the same way
    # a mask that carries the orientation too is turned like its image
    mask = tmp_path / "mask.jpg"
    Image.fromarray(np.full((120, 160), 255, np.uint8)).save(mask, exif=Image.open(photo).getexif())
    plane, resized = load_mask(mask, (160, 120))
    assert plane.shape == (160, 120) and not resized


def test_predict_outputs_line_up_with_the_displayed_photo(capsys, tmp_path, tiny_dynamic_onnx):
    photo = sideways_jpeg(tmp_path / "exif_rot.jpg")
    code, _, err = predict(capsys, tiny_dynamic_onnx, photo, "--outputs", "mask,cutout", "--out", tmp_path / "out")
    assert code == 0, err
    mask = Image.open(tmp_path / "out" / "exif_rot.png")
    cutout = np.asarray(Image.open(tmp_path / "out" / "exif_rot_cutout.png"))
    assert mask.size == (120, 160)
    assert np.array_equal(cutout[..., :3], displayed(photo))


def test_contact_sheet_shows_the_photo_upright(tmp_path):
    from u2zoo.tasks.contact_sheet import GAP, ROW_HEIGHT, write_contact_sheet

    photo = sideways_jpeg(tmp_path / "p.jpg")
    (tmp_path / "masks").mkdir()
    Image.new("L", (120, 160), 128).save(tmp_path / "masks" / "p.png")
    Image.new("RGBA", (120, 160), (0, 0, 0, 128)).save(tmp_path / "masks" / "p_cutout.png")
    sheet = Image.open(write_contact_sheet([photo], tmp_path / "masks", tmp_path / "sheet.png", "t"))
    cell = round(120 * ROW_HEIGHT / 160)  # every cell upright: the photo as wide as its mask
    assert sheet.width == 3 * cell + 4 * GAP


def test_video_display_rotation_is_applied(capsys, tmp_path, tiny_dynamic_onnx):
    av = pytest.importorskip("av")
    source = tmp_path / "phone.mkv"
    with av.open(str(source), "w") as container:
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "bgr0"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display rotation")
        stream.set_display_rotation(90)
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")))
        container.mux(stream.encode())
    code, _, err = run_cli(
        capsys, "video", source, "--out", tmp_path / "mask.mkv", "--artifact", tiny_dynamic_onnx.path
    )
    assert code == 0, err
    with av.open(str(tmp_path / "mask.mkv")) as container:
        frame = next(container.decode(video=0))
        assert (frame.width, frame.height) == (48, 64)


# ---------------------------------------------------------------- #10 control characters in names


def test_names_with_control_characters_are_escaped():
    assert shown("bad\nname.jpg") == "bad\\nname.jpg"
    assert shown(Path("a\tb/\x1b[31mred.png")) == "a\\tb/\\x1b[31mred.png"
    assert shown("caf\udce9.jpg") == "caf\\udce9.jpg"  # an undecodable byte: escaped, so printing it cannot fail
    assert shown("été photo.jpg") == "été photo.jpg"
    with pytest.raises(ImageError) as caught:
        load_rgb(Path("bad\nname.jpg"))
    assert "\n" not in str(caught.value) and "bad\\nname.jpg" in str(caught.value)


def test_predict_messages_about_odd_names_are_one_line_each(capsys, tmp_path, tiny_dynamic_onnx):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad\nname.jpg").write_bytes(b"")
    (folder / "notes\n.txt").write_text("not an image")
    sideways_jpeg(folder / "ok.jpg")
    code, _, err = predict(capsys, tiny_dynamic_onnx, folder, "--out", tmp_path / "out")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0] == (
        f"u2zoo: skipped {folder}/bad\\nname.jpg: image file is empty (0 bytes): {folder}/bad\\nname.jpg"
    )
    assert lines[1] == "u2zoo: skipped 1 non-image file(s) in the folders: notes\\n.txt"


# ---------------------------------------------------------------- #11 an output folder that is a file


def test_blocked_output_subfolder_fails_that_input_only(capsys, tmp_path, tiny_dynamic_onnx):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    sideways_jpeg(tmp_path / "in" / "sub" / "a.jpg")
    sideways_jpeg(tmp_path / "in" / "b.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sub").write_text("a file where a folder must go")
    code, out, err = predict(capsys, tiny_dynamic_onnx, tmp_path / "in", "--out", tmp_path / "out")
    assert code == 1
    assert err.strip() == (
        f"u2zoo: skipped {tmp_path}/in/sub/a.jpg: cannot write {tmp_path}/out/sub/a.png: "
        f"{tmp_path}/out/sub is a file, not a folder"
    )
    assert "wrote 1 file(s)" in out and "1 input(s) failed" in out
    assert (tmp_path / "out" / "b.png").is_file()


# ---------------------------------------------------------------- #12 the output folder inside the input


def test_output_folder_inside_the_input_is_not_walked(capsys, tmp_path, tiny_dynamic_onnx):
    selfin = tmp_path / "selfin"
    selfin.mkdir()
    sideways_jpeg(selfin / "a.jpg")
    for run in range(3):
        code, out, err = predict(capsys, tiny_dynamic_onnx, selfin, "--out", selfin / "masks", "--resume")
        assert code == 0, err
        assert f"{min(run, 1)} already done" in out
    assert sorted(p.relative_to(selfin).as_posix() for p in selfin.rglob("*")) == ["a.jpg", "masks", "masks/a.png"]


def test_output_folder_that_is_the_input_is_refused(capsys, tmp_path, tiny_dynamic_onnx):
    sideways_jpeg(tmp_path / "a.jpg")
    code, _, err = predict(capsys, tiny_dynamic_onnx, tmp_path, "--out", tmp_path)
    assert_one_line_error(code, err, r"is an input folder: its outputs would be taken for inputs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


# ---------------------------------------------------------------- #13 two inputs, one stem


def test_same_stem_keeps_the_extension_for_those_inputs_only(capsys, tmp_path, tiny_dynamic_onnx):
    coll = tmp_path / "coll"
    coll.mkdir()
    sideways_jpeg(coll / "x.jpg")
    Image.new("RGB", (50, 40), "blue").save(coll / "x.png")
    Image.new("RGB", (50, 40), "red").save(coll / "y.png")
    code, out, err = predict(capsys, tiny_dynamic_onnx, coll, "--out", tmp_path / "out", "--outputs", "mask,cutout")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "x_jpg.png",
        "x_jpg_cutout.png",
        "x_png.png",
        "x_png_cutout.png",
        "y.png",
        "y_cutout.png",
    ]
    assert Image.open(tmp_path / "out" / "x_jpg.png").size == (120, 160)
    assert Image.open(tmp_path / "out" / "x_png.png").size == (50, 40)
    assert err.strip().splitlines() == [
        f"u2zoo: note: {coll}/x.jpg: another input has the same name, so its outputs keep the extension: x_jpg.png",
        f"u2zoo: note: {coll}/x.png: another input has the same name, so its outputs keep the extension: x_png.png",
    ]
    assert "wrote 6 file(s)" in out


def test_same_name_in_two_input_folders_is_refused_before_any_work(capsys, tmp_path, tiny_dynamic_onnx):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sideways_jpeg(tmp_path / folder / "x.jpg")
    code, _, err = predict(capsys, tiny_dynamic_onnx, tmp_path / "a", tmp_path / "b", "--out", tmp_path / "out")
    assert_one_line_error(code, err, r"2 inputs would write the same output files: .*a/x\.jpg, .*b/x\.jpg")
    assert not any((tmp_path / "out").iterdir())


def test_unique_stems_also_catches_an_output_suffix_and_case():
    pairs = [
        (Path("in/x.jpg"), Path("x")),
        (Path("in/x_face.jpg"), Path("x_face")),
        (Path("in/Y.jpg"), Path("Y")),
        (Path("in/y.PNG"), Path("y")),
        (Path("in/z.jpg"), Path("z")),
    ]
    renamed, notes = unique_stems(pairs, ["", "_face"])
    assert [stem.as_posix() for _, stem in renamed] == ["x_jpg", "x_face_jpg", "Y_jpg", "y_PNG", "z"]
    assert [path.name for path, _ in notes] == ["x.jpg", "x_face.jpg", "Y.jpg", "y.PNG"]
    assert unique_stems(pairs[4:], [""]) == (pairs[4:], [])
    with pytest.raises(ConfigError, match="2 inputs would write"):
        unique_stems([(Path("a/x.jpg"), Path("x")), (Path("b/x.jpg"), Path("x"))], [""])
