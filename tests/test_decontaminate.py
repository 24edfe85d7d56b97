"""Issue 21 part 3: `--decontaminate` removes the old background's colour from soft edges."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import assert_one_line_error
from conftest import run_cli as run


def _synthetic(h: int = 120, w: int = 160):
    """A textured red foreground over a textured lawn, alpha ramping 0 → 1 across the image:
    the true foreground colour of every pixel is known."""
    rng = np.random.default_rng(0)
    fg = np.clip(np.array([0.85, 0.25, 0.15]) + rng.normal(0, 0.03, (h, w, 3)), 0, 1).astype(np.float32)
    bg = np.clip(np.array([0.20, 0.60, 0.15]) + rng.normal(0, 0.05, (h, w, 3)), 0, 1).astype(np.float32)
    alpha = np.clip(np.tile(np.linspace(-0.3, 1.3, w), (h, 1)), 0, 1).astype(np.float32)
    return alpha[..., None] * fg + (1 - alpha[..., None]) * bg, alpha, fg


def test_decontaminated_cutout_halves_the_colour_error_at_soft_alpha():
    from u2zoo.tasks.outputs import OutputOptions, render

    image, alpha, foreground = _synthetic()
    soft = (alpha >= 0.1) & (alpha <= 0.9)
    errors = {}
    for clean in (False, True):
        rendered = render(image, alpha, OutputOptions(kinds=("cutout",), decontaminate=clean))
        rgba = np.asarray(rendered.images["cutout"]).astype(np.float32) / 255
        assert np.abs(rgba[..., 3] - alpha).max() <= 1 / 255 + 1e-6  # the alpha itself is untouched
        errors[clean] = float(np.abs(rgba[..., :3] - foreground)[soft].mean())
    # measured: 0.174 plain, 0.021 decontaminated
    assert errors[True] <= 0.5 * errors[False] and errors[False] > 0.1, errors
    sure = alpha >= 0.999
    cleaned = np.asarray(render(image, alpha, OutputOptions(kinds=("cutout",), decontaminate=True)).images["cutout"])
    assert np.array_equal(cleaned[sure][:, :3], (np.clip(image[sure], 0, 1) * 255 + 0.5).astype(np.uint8))


def test_large_images_are_estimated_small_and_the_correction_scaled_back():
    from u2zoo.tasks.refine import decontaminate

    image, alpha, foreground = _synthetic(120, 160)
    full = decontaminate(image, alpha)
    small = decontaminate(image, alpha, max_side=80)
    soft = (alpha >= 0.1) & (alpha <= 0.9)
    assert small.shape == image.shape and small.dtype == np.float32
    assert np.abs(small - foreground)[soft].mean() < 0.5 * np.abs(image - foreground)[soft].mean()
    assert np.abs(small - full)[soft].mean() < 0.05


def test_composite_and_api_and_cli(tiny_dynamic_onnx, tmp_path, capsys):
    import u2zoo

    photo = tmp_path / "in" / "p.png"
    photo.parent.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)
    rgba = u2zoo.cutout(photo, model=tiny_dynamic_onnx.path, decontaminate=True)
    assert rgba.mode == "RGBA" and rgba.size == (64, 48)
    code, _, err = run(
        capsys,
        "predict",
        "--artifact",
        tiny_dynamic_onnx.path,
        photo.parent,
        "--out",
        tmp_path / "out",
        "--outputs",
        "cutout,composite",
        "--bg-colour",
        "blue",
        "--decontaminate",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "out" / "p_cutout.png").mode == "RGBA"
    assert Image.open(tmp_path / "out" / "p_composite.png").size == (64, 48)


def test_without_pymatting_it_is_one_line(tiny_dynamic_onnx, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pymatting(name, *args, **kwargs):
        if name.startswith("pymatting"):
            raise ImportError("no pymatting")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pymatting)
    code, _, err = run(
        capsys, "predict", "--artifact", tiny_dynamic_onnx.path, tmp_path, "--out", tmp_path / "o", "--decontaminate"
    )
    assert_one_line_error(code, err, r"--decontaminate needs pymatting.*u2zoo\[matting\]")
