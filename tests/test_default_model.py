"""The embedded default: U2NETP ships in the package, the default is a rule over the lite's
ratchet record, the demo writes a contact sheet, and the contract has named variants."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2zoo.errors import ConfigError, WeightsError
from u2zoo.zoo import weights as W
from u2zoo.zoo.contract import (
    DEFAULT_VARIANT,
    SALIENCY,
    SALIENCY_OFFICIAL,
    Contract,
    postprocess,
    preprocess,
    with_variant,
)
from u2zoo.zoo.default_model import choose_default

from conftest import ROOT, TEST_DATA, assert_one_line_error, needs_shared, run_cli

ANTIALIASED = with_variant(SALIENCY, "antialiased")

LITE_SHA = W.REGISTRY["u2net-lite"].sha256


def _record(tmp_path: Path, mae: float, max_f: float, sha: str = LITE_SHA) -> Path:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"sha256": sha, "metrics": {"val": {"mae": mae, "max_f": max_f, "images": 500}}}))
    return path


def test_default_is_the_lite_only_when_its_record_meets_the_ship_targets(tmp_path):
    good = choose_default(_record(tmp_path, 0.041, 0.935))
    assert (
        good.name == "u2net-lite"
        and good.describe() == "default: u2net-lite (u2net-lite val MAE 0.041 ≤ 0.05, max F 0.935 ≥ 0.92)"
    )
    bad = choose_default(_record(tmp_path, 0.239, 0.648))
    assert bad.describe() == "default: u2netp (u2net-lite val MAE 0.239 > 0.05, val max F 0.648 < 0.92)"
    assert choose_default(_record(tmp_path, 0.049, 0.90)).name == "u2netp"  # both targets, not one
    assert choose_default(_record(tmp_path, 0.03, 0.97, sha="0" * 64)).name == "u2netp"  # a stale record


def test_a_missing_or_unreadable_record_falls_back_to_u2netp_and_says_why(tmp_path):
    missing = choose_default(tmp_path / "nope.json")
    assert missing.name == "u2netp" and "ratchet record missing" in missing.reason
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00{not json")
    assert choose_default(garbage).reason == "u2net-lite ratchet record unreadable: garbage.json"
    garbage.write_text(json.dumps({"sha256": LITE_SHA, "metrics": {"val": {"mae": "n/a"}}}))
    assert choose_default(garbage).reason == "u2net-lite ratchet record has no val/ score"


def test_the_shipped_record_decides_today():
    """The record shipped beside the lite's weights is read as it is (no monkeypatching)."""
    choice = choose_default()
    record = json.loads(W.REGISTRY["u2net-lite"].cache_path().with_suffix(".json").read_text())
    val = record.get("metrics", {}).get("val")
    expected = "u2net-lite" if val and val["mae"] <= 0.05 and val["max_f"] >= 0.92 else "u2netp"
    assert choice.name == expected


def test_u2netp_loads_offline_from_the_package_and_is_verified(monkeypatch, tmp_path):
    arch, entry = W.resolve_model_name("u2netp")
    assert (arch, entry.name, entry.bundled) == ("u2netp", "u2netp.fp16_bnfolded", True)
    model, info, contract = W.load_model("u2netp")
    assert info.name == "u2netp.fp16_bnfolded" and info.sha256 == entry.sha256 == W.file_digest(entry.cache_path())
    assert entry.cache_path().stat().st_size == entry.file_size == 4_844_827
    assert sum(p.numel() for p in model.parameters()) == 1_131_181 and contract == SALIENCY
    bundled = entry.cache_path().parent
    assert "Apache License" in (bundled / "U2NETP_LICENSE.txt").read_text()
    attribution = (bundled / "U2NETP_ATTRIBUTION.md").read_text()
    assert "Qin" in attribution and entry.sha256 in attribution and "BatchNorm" in attribution
    # a damaged shipped file: one line that names it and says to reinstall
    changed = bytearray(entry.cache_path().read_bytes())
    changed[-200] ^= 1
    (tmp_path / entry.filename).write_bytes(changed)
    monkeypatch.setattr(W, "BUNDLED_DIR", tmp_path)
    with pytest.raises(WeightsError, match=r"shipped weights file .*u2netp_fp16_bnfolded.pth is damaged .*reinstall"):
        W.load_model("u2netp")
    (tmp_path / entry.filename).unlink()
    with pytest.raises(WeightsError, match="is missing: reinstall"):
        W.load_model("u2netp")


def test_damaged_shipped_weights_are_one_line_on_the_command_line(capsys, monkeypatch, tmp_path):
    (tmp_path / "u2netp_fp16_bnfolded.pth").write_bytes(b"not the weights")
    monkeypatch.setattr(W, "BUNDLED_DIR", tmp_path)
    code, _, err = run_cli(capsys, "predict", "--model", "u2netp", str(tmp_path), "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"u2netp_fp16_bnfolded.pth is damaged or was changed .*reinstall the package")


def test_unknown_model_still_gets_did_you_mean(capsys, tmp_path):
    code, _, err = run_cli(capsys, "demo", "--model", "u2netpp", "--out", tmp_path)
    assert_one_line_error(code, err, "unknown model 'u2netpp'; did you mean 'u2netp'")


def test_demo_runs_the_default_and_writes_a_contact_sheet(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == choose_default().describe() and lines[0].startswith("default: u2netp (")
    assert lines[1] == "weights: u2netp.fp16_bnfolded (shipped in the package)" and "RANDOM" not in out
    assert (
        f"({DEFAULT_VARIANT} contract)" in out
        and f"contact sheet (photo | mask | cut-out): {tmp_path / 'contact_sheet.png'}" in out
    )
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == [
        "astronaut.png",
        "astronaut_cutout.png",
        "chelsea.png",
        "chelsea_cutout.png",
        "coffee.png",
        "coffee_cutout.png",
        "rocket.png",
        "rocket_cutout.png",
    ]
    # the demo's masks are U2NETP's: the same as the torch model through the same contract
    from u2zoo.api import load
    from u2zoo.zoo.images import load_rgb
    from u2zoo.zoo.reference import sample_images

    segmenter = load("u2netp")
    for photo in sample_images():
        ours = np.asarray(Image.open(tmp_path / "masks" / f"{photo.stem}.png"), np.float32) / 255
        reference = segmenter.maps([load_rgb(photo)])[0]
        assert np.abs(ours - reference).mean() < 2 / 255, photo.name
    astronaut = np.asarray(Image.open(tmp_path / "masks" / "astronaut.png"), np.float32) / 255
    assert 0.2 < (astronaut > 0.5).mean() < 0.6 and ((astronaut < 0.1) | (astronaut > 0.9)).mean() > 0.95  # crisp
    with Image.open(tmp_path / "contact_sheet.png") as sheet:
        assert sheet.mode == "RGB" and sheet.height > 4 * 256 and sheet.width > 3 * 256
        pixels = np.asarray(sheet)
    assert pixels.std() > 30  # photos, not a blank page


def test_demo_with_model_says_when_weights_are_random(capsys, tmp_path):
    code, out, err = run_cli(capsys, "demo", "--model", "u2net-tiny", "--out", tmp_path)
    assert code == 0, err
    assert not out.startswith("default:") and "RANDOM weights" in out and "u2zoo fetch u2net-tiny" in out
    assert (tmp_path / "contact_sheet.png").is_file()


def test_predict_without_model_uses_the_default_and_says_so(capsys, tmp_path):
    photo = tmp_path / "in" / "a.png"
    photo.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(photo)
    code, out, err = run_cli(capsys, "predict", photo, "--out", tmp_path / "out")
    assert code == 0, err
    assert out.splitlines()[0] == choose_default().describe() and (tmp_path / "out" / "a.png").is_file()
    code, _, err = run_cli(capsys, "predict", "--artifact", "x.onnx", "--model", "u2netp", photo, "--out", tmp_path)
    assert_one_line_error(code, err, "give one of --model NAME or --artifact FILE, not both")


def test_contract_flag_on_an_artifact_is_refused_not_ignored(capsys, tmp_path, tiny_dynamic_onnx):
    code, _, err = run_cli(
        capsys,
        "predict",
        "--artifact",
        tiny_dynamic_onnx.path,
        "--contract",
        "official",
        tmp_path,
        "--out",
        tmp_path / "o",
    )
    assert_one_line_error(code, err, "--contract is for --model: an artifact carries its own contract")


def test_python_entry_point_uses_the_default(tmp_path):
    import u2zoo

    image = np.zeros((60, 80, 3), np.uint8)
    image[15:45, 20:60] = 255  # a bright square on black
    mask = u2zoo.segment(image)
    assert mask.shape == (60, 80) and mask.dtype == np.float32
    assert mask[25:35, 30:50].mean() > 0.8 and mask[:5].mean() < 0.2
    assert u2zoo.load().contract == SALIENCY and u2zoo.load(contract="antialiased").contract == ANTIALIASED


# --- contract variants ----------------------------------------------------------------------


def test_variants_differ_only_in_their_resizes_and_are_recorded():
    # the default is the variant that scored better on DUTS-TR val/ (README, "Contract variants")
    assert DEFAULT_VARIANT == "official" and SALIENCY == SALIENCY_OFFICIAL
    assert (ANTIALIASED.pre.resize_filter, ANTIALIASED.pre.antialias, ANTIALIASED.post.resize_filter) == (
        "lanczos",
        True,
        "lanczos",
    )
    assert with_variant(ANTIALIASED, "official") == SALIENCY_OFFICIAL == Contract()
    assert ANTIALIASED.to_dict()["variant"] == "antialiased" and ANTIALIASED.pre.size == SALIENCY.pre.size
    legacy = SALIENCY_OFFICIAL.to_dict()
    del legacy["variant"]  # a manifest written before variants existed
    assert Contract.from_dict(legacy) == SALIENCY_OFFICIAL
    with pytest.raises(ConfigError, match="unknown contract variant 'antialias'; did you mean 'antialiased'"):
        with_variant(SALIENCY, "antialias")


def test_antialiased_variant_reproduces_pillows_lanczos_on_8bit_images():
    """Its own reference: what rembg-style code does, Pillow's Lanczos on the uint8 image and mask."""
    from u2zoo.zoo.reference import sample_images

    rng = np.random.default_rng(1)
    photo = np.asarray(Image.open(sample_images()[2]).convert("RGB"))  # coffee, 400×600: a real downscale
    x = preprocess(photo.astype(np.float32) / 255, ANTIALIASED.pre)
    ref = np.asarray(Image.fromarray(photo).resize((320, 320), Image.Resampling.LANCZOS), np.float32) / 255
    ref = ref / ref.max()
    ref = ((ref - np.array(ANTIALIASED.pre.mean)) / np.array(ANTIALIASED.pre.std)).transpose(2, 0, 1)
    # Pillow clamps its 8-bit result between the horizontal and vertical passes; the rest is rounding
    assert np.abs(x - ref).max() < 0.2 and np.abs(x - ref).mean() < 0.008  # 0.008 ≈ half a grey level
    official = preprocess(photo.astype(np.float32) / 255, SALIENCY_OFFICIAL.pre)
    assert np.abs(official - ref).mean() > 5 * np.abs(x - ref).mean()  # the variants really differ
    pred = rng.random((1, 320, 320)).astype(np.float32)
    mask = postprocess(pred, (400, 600), ANTIALIASED.post)
    norm = (pred[0] - pred.min()) / (pred.max() - pred.min())
    ref_mask = np.asarray(Image.fromarray(norm.astype(np.float32), "F").resize((600, 400), Image.Resampling.LANCZOS))
    np.testing.assert_allclose(mask, np.clip(ref_mask, 0, 1), atol=1e-5)


@needs_shared
def test_predict_u2netp_with_no_weights_matches_the_official_outputs(capsys, tmp_path):
    for variant, limit in (("official", 0.004), ("antialiased", 0.01)):
        out = tmp_path / variant
        code, _, err = run_cli(
            capsys, "predict", "--model", "u2netp", "--contract", variant, TEST_DATA / "test_images", "--out", out
        )
        assert code == 0, err
        maes = []
        for image in sorted((TEST_DATA / "test_images").iterdir()):
            ours = np.asarray(Image.open(out / f"{image.stem}.png"), np.float32) / 255
            official = (
                np.asarray(Image.open(TEST_DATA / "u2netp_results" / f"{image.stem}.png").convert("L"), np.float32)
                / 255
            )
            maes.append(np.abs(ours - official).mean())
        assert len(maes) == 18 and np.mean(maes) <= limit, (variant, np.mean(maes))


def test_the_wheel_carries_the_weights_the_licence_and_the_attribution(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("u2zoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in (
        "u2netp_fp16_bnfolded.pth",
        "U2NETP_LICENSE.txt",
        "U2NETP_ATTRIBUTION.md",
        "u2net_lite_distilled_fp16.pth",
        "u2net_lite_distilled_fp16.json",
    ):
        assert f"u2zoo/zoo/bundled/{name}" in names, name
