"""Shared fixtures: an isolated weights cache per test, the ../shared data, a tiny artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REAL_WEIGHTS = SHARED / "weights" / "u2netp_fp16_bnfolded.pth"
TEST_DATA = SHARED / "data" / "u2net_test_data"

needs_shared = pytest.mark.skipif(
    not REAL_WEIGHTS.is_file() or not TEST_DATA.is_dir(), reason="../shared weights and test data are not present"
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets an empty U2ZOO_HOME, so the user's real cache never leaks in."""
    home = tmp_path_factory.mktemp("u2zoo_home")
    monkeypatch.setenv("U2ZOO_HOME", str(home))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)  # a suite run in GitHub Actions: bench tests write none
    return home


@pytest.fixture(scope="session")
def tiny_dynamic_onnx(tmp_path_factory):
    """A dynamic-shape ONNX artifact of the tiny architecture (random weights), built once."""
    import torch

    from u2zoo.conversion import convert_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_onnx")
    return convert_model("u2net-tiny", "onnx", out, random_weights=True, dynamic=True, progress=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``u2zoo -q ARGV`` in-process; return (exit code, stdout, stderr)."""
    from u2zoo.cli import main

    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, pattern: str) -> None:
    import re

    assert code != 0
    # our own warnings (e.g. "few calibration images") may precede the error; nothing else may
    lines = [line for line in err.strip().splitlines() if not line.startswith("u2zoo: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("u2zoo: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def tiny_weights(tmp_path) -> Path:
    """A seeded random checkpoint of the tiny architecture."""
    import torch

    from u2zoo.zoo.archs import build_arch

    torch.manual_seed(3)
    path = tmp_path / "tiny.pth"
    torch.save(build_arch("u2net-tiny").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The same seeded tiny checkpoint as ``tiny_weights``, made once per session for the
    module-scoped conversions that are too slow to repeat per test."""
    import torch

    from u2zoo.zoo.archs import build_arch

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("tiny_checkpoint") / "tiny.pth"
    torch.save(build_arch("u2net-tiny").state_dict(), path)
    return path


@pytest.fixture(scope="session")
def healthy_tiny(tmp_path_factory) -> str:
    """Seeded tiny weights whose ReLUs stay alive (BatchNorm bias 0.1): plain random init leaves
    whole layers at zero, which full-INT8 TFLite rightly refuses and which makes INT8 parity
    meaningless."""
    import torch

    from u2zoo.zoo.archs import build_arch

    torch.manual_seed(3)
    model = build_arch("u2net-tiny")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.bias.data.fill_(0.1)
    path = tmp_path_factory.mktemp("healthy") / "healthy_tiny.pth"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory) -> str:
    """Six small varied photos-like images for INT8 calibration of the tiny network."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for i in range(6):
        base = rng.integers(0, 255, (1, 1, 3), dtype=np.uint8)
        image = np.clip(base + rng.integers(-60, 60, (72, 90, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"c{i}.png")
    return str(folder)


def png_header_bytes(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` (a decompression bomb's shape):
    valid signature and IHDR, one empty IDAT, IEND. Readers that check the size before
    decoding refuse it without allocating anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# --- shared by the serve tests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tiny_dynamic_onnx):
    """A Segmenter on the tiny dynamic ONNX artifact, its runtime open for the module."""
    from u2zoo.converters import get_target
    from u2zoo.tasks.engine import Segmenter

    with get_target(tiny_dynamic_onnx.target).runner(tiny_dynamic_onnx) as runner:
        yield Segmenter(runner, tiny_dynamic_onnx.contract)


@pytest.fixture(scope="module")
def photo_png() -> bytes:
    """A real photo (scikit-image's cat), shrunk to 96 px wide to keep requests fast."""
    import io

    from PIL import Image

    from u2zoo.zoo.reference import sample_images

    with Image.open(sample_images()[1]) as img:
        img = img.convert("RGB")
        img.thumbnail((96, 96))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
    return buffer.getvalue()
