"""The README's Python API example, run as it stands there."""

import re
import shutil
from pathlib import Path

import numpy as np
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
    assert Path(tmp_path / "mask.png").stat().st_size > 0
