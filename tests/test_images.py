import numpy as np
import pytest
from PIL import Image

from u2zoo.errors import ImageError
from u2zoo.zoo.images import list_images, load_rgb


def test_grayscale_rgba_palette_and_16bit_are_converted(tmp_path):
    gray = np.arange(0, 250, dtype=np.uint8).reshape(10, 25)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.dstack([np.full((6, 7, 3), 200, np.uint8), np.zeros((6, 7), np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((5, 5, 3), 90, np.uint8), "RGB").convert("P").save(tmp_path / "pal.png")
    deep = (np.arange(100, dtype=np.uint16) * 600).reshape(10, 10)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # Pillow picks mode I;16

    g = load_rgb(tmp_path / "gray.png")
    assert g.shape == (10, 25, 3) and np.allclose(g[..., 0], gray / 255.0) and np.allclose(g[..., 0], g[..., 2])
    r = load_rgb(tmp_path / "rgba.png")
    assert r.shape == (6, 7, 3) and np.allclose(r, 200 / 255.0)  # alpha dropped, colour kept
    assert load_rgb(tmp_path / "pal.png").shape == (5, 5, 3)
    d = load_rgb(tmp_path / "deep.png")
    assert d.shape == (10, 10, 3) and d.dtype == np.float32
    assert d[9, 9, 0] == pytest.approx(99 * 600 / 65535.0, rel=1e-5)  # full 16-bit precision kept


def test_unreadable_inputs_raise_one_line_image_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    truncated = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for name, pattern in [
        ("empty.jpg", "empty"),
        ("junk.png", "cannot read"),
        ("cut.png", "cannot read"),
        ("missing.png", "not found"),
    ]:
        with pytest.raises(ImageError, match=pattern) as info:
            load_rgb(tmp_path / name)
        assert "\n" not in str(info.value)


def test_list_images_walks_folders_and_skips_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "sub/b.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "b.JPG"]
    with pytest.raises(ImageError, match="not found"):
        list_images([tmp_path / "nope"])
