"""The README's Python API example, run as it stands there, and the API's bad inputs."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    from u2zoo.zoo.reference import sample_images

    photo = sample_images()[0]
    shutil.copy(photo, tmp_path / "photo.jpg")
    (tmp_path / "photos").mkdir()
    shutil.copy(photo, tmp_path / "photos" / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    width, height = Image.open(photo).size
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (height, width) and mask.dtype == np.uint8
    assert mask.min() < 30 and mask.max() > 225  # a real mask: background and object both present
    maps = scope["maps"]
    assert len(maps) == 2 and maps[0].shape == (height, width) and maps[1].shape == (height // 2, width)
    assert np.abs(scope["mask"] - maps[0]).max() < 1e-5  # segment() and load().maps() agree

    cut = Image.open(tmp_path / "cutout.png")
    assert cut.mode == "RGBA" and cut.size == (width, height)
    alpha = np.asarray(cut)[..., 3]
    assert np.abs(alpha.astype(int) - mask.astype(int)).max() <= 1  # the map is the alpha
    on_white = np.asarray(Image.open(tmp_path / "on_white.jpg"), dtype=np.float32)
    background = mask < 5
    assert on_white[background].mean() > 240  # background pixels became white

    assert scope["artifact"].manifest["parity"]["status"] == "ok"
    assert np.abs(scope["onnx_map"] - maps[0]).mean() < 5e-3  # fp16 ONNX Runtime vs the torch map
    row = scope["rows"][0]
    assert row.status == "ok" and row.target == "onnx" and row.parity["iou50"] > 0.98
    assert (tmp_path / "bench" / "results.jsonl").is_file()


def test_bad_api_inputs_are_one_line_errors(tmp_path):
    import u2zoo
    from u2zoo.errors import ArtifactError, ConfigError, U2ZooError

    stray = tmp_path / "model.onnx"
    stray.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="no manifest beside"):
        u2zoo.load(stray)
    with pytest.raises(ConfigError, match="its own weights and contract"):
        u2zoo.load(stray, contract="official")
    with pytest.raises(U2ZooError, match="unknown"):
        u2zoo.load("u2netq")
    with pytest.raises(ConfigError, match="no setting warmups"):
        u2zoo.bench("u2netp", targets=["onnx"], data=tmp_path, out=tmp_path / "b", warmups=2)
    with pytest.raises(ConfigError, match="unknown target 'onxx'"):
        u2zoo.convert("u2netp", "onxx", tmp_path / "c")
    with pytest.raises(ConfigError, match="unknown target 'onxx'"):  # still the function once the module is loaded
        u2zoo.convert("u2netp", "onxx", tmp_path / "c")
