"""`u2zoo publish` / `fetch --index` / `bench --junit --summary`: a real release from a real bench
of the tiny network, fetched back over a loopback HTTP server and run; its bad inputs."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error
from conftest import run_cli as run

TARGETS = "onnx,tflite,coreml,tensorrt"
# Random tiny weights: int8 gets a looser bar than real weights; TFLite fp32 is held to an
# impossible one, so the bench has a failing cell that must not be published.
GATE = """schema_version: 1
precisions:
  fp32: {max_abs: 5.0e-4}
  int8: {iou50_min: 0.9, delta_mae_max: 0.05}
overrides:
  - target: tflite
    precision: fp32
    limits: {max_abs: 1.0e-12}
"""


def _images(folder: Path, gt: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    gt.mkdir()
    for i in range(4):
        base = rng.integers(0, 255, (1, 1, 3))
        image = np.clip(base + rng.integers(-60, 60, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"p{i}.png")
        mask = np.zeros((48, 64), np.uint8)
        mask[10 + i : 40, 15:50] = 255
        Image.fromarray(mask).save(gt / f"p{i}.png")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, healthy_tiny):
    """One bench run (8 cells: ok, a failed gate, unavailable with and without an artifact),
    with --junit and the GitHub summary file, as CI would run it."""
    from u2zoo.cli import main

    root = tmp_path_factory.mktemp("publish")
    _images(root / "data", root / "gt")
    (root / "gate.yaml").write_text(GATE)
    summary = root / "step_summary.md"
    summary.write_text("earlier step\n")
    argv = ["-q", "bench", "--model", "u2net-tiny", "--weights", healthy_tiny, "--data", root / "data"]
    argv += ["--gt", root / "gt", "--targets", TARGETS, "--precisions", "fp32,int8", "--gate", root / "gate.yaml"]
    argv += ["--runs", "1", "--warmup", "0", "--batches", "1", "--threads", "1", "--out", root / "bench"]
    argv += ["--junit", root / "junit.xml"]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(sys.stderr):
        mp.setenv("GITHUB_STEP_SUMMARY", str(summary))
        code = main([str(a) for a in argv])
    assert code == 1  # the gated failing cell
    return root


@pytest.fixture(scope="module")
def release(bench, tmp_path_factory):
    from u2zoo.release.bundle import publish_bench

    out = tmp_path_factory.mktemp("rel") / "release"
    return publish_bench(bench / "bench", out, version="2")


@contextlib.contextmanager
def serving(folder: Path):
    """``python -m http.server`` on 127.0.0.1, in a thread."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D401 - keep the test output clean
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a client that hangs up early is expected
            pass

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_holds_only_proven_cells_and_sha256sum_accepts_it(release, healthy_tiny):
    entries = {(e["target"], e["precision"]): e for e in release.index["entries"]}
    # tflite fp32 failed its gate and coreml int8 has no artifact: neither is published
    assert set(entries) == {
        ("onnx", "fp32"),
        ("onnx", "int8"),
        ("tflite", "int8"),
        ("coreml", "fp32"),
        ("tensorrt", "fp32"),
        ("tensorrt", "int8"),
    }
    assert {k for k, e in entries.items() if e["status"] == "ok"} == {
        ("onnx", "fp32"),
        ("onnx", "int8"),
        ("tflite", "int8"),
    }
    coreml = entries[("coreml", "fp32")]
    assert coreml["file"].endswith(".mlpackage.zip") and coreml["packaging"]["unpacks_to"].endswith(".mlpackage")
    assert "macOS" in coreml["note"] and coreml["speed"] is None
    trt = entries[("tensorrt", "int8")]
    script = release.folder / "u2net-tiny" / trt["handoff"]["script"]
    assert script.read_text().count("trtexec --onnx=") == 1 and trt["file"].endswith(".onnx")
    ok = entries[("tflite", "int8")]
    assert ok["speed"]["latency_ms_p50"] > 0 and ok["speed"]["machine"]["cores"] >= 1
    data = ok["accuracy"]["data"]
    assert data["count"] == 4 and data["images"].endswith("/data") and data["gt"].endswith("/gt")
    assert 0 <= ok["accuracy"]["mae"] <= 1 and "/tmp/" not in json.dumps(ok)  # no home paths
    assert ok["layout"] == "NCHW" and ok["contract"]["pre"]["size"] == [320, 320]
    assert ok["weights"]["sha256"] == _sha(Path(healthy_tiny)) and ok["weights"]["file"] == Path(healthy_tiny).name
    for entry in release.index["entries"]:  # every listed file is there with its hash
        for item in entry["files"]:
            assert _sha(release.folder / item["path"]) == item["sha256"]
    sums = (release.folder / "SHA256SUMS").read_text().splitlines()
    assert {line.split("  ", 1)[1] for line in sums} == set(release.files)
    assert {"index.json", "README.md", "plots/latency.png"} <= set(release.files)
    if shutil.which("sha256sum"):
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=release.folder, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.count(": OK") == len(sums), check.stdout + check.stderr


def test_fetched_file_runs_with_the_bench_artifacts_masks(release, bench, tmp_path, capsys):
    with serving(release.folder) as url:
        code, out, err = run(
            capsys, "fetch", "--index", f"{url}/index.json", "u2net-tiny", "--target", "tflite", "--precision", "int8"
        )
        assert code == 0, err
        fetched = Path(out.strip())
        # the second fetch is answered from the cache, hash checked again
        assert run(
            capsys, "fetch", "--index", f"{url}/index.json", "u2net-tiny", "--target", "tflite", "--precision", "int8"
        )[1].strip() == str(fetched)
    assert fetched.is_file() and fetched.suffix == ".tflite"
    entry = next(e for e in release.index["entries"] if (e["target"], e["precision"]) == ("tflite", "int8"))
    assert _sha(fetched) == entry["sha256"]
    bench_file = bench / "bench" / "artifacts" / "u2net-tiny" / fetched.name
    masks = {}
    for label, artifact in (("fetched", fetched), ("bench", bench_file)):
        code, _, err = run(capsys, "predict", "--artifact", artifact, bench / "data", "--out", tmp_path / label)
        assert code == 0, err
        masks[label] = {p.name: np.asarray(Image.open(p)) for p in sorted((tmp_path / label).glob("*.png"))}
    assert len(masks["fetched"]) == 4 and masks["fetched"].keys() == masks["bench"].keys()
    for name, mask in masks["fetched"].items():
        assert np.array_equal(mask, masks["bench"][name]), name


def test_fetch_unpacks_a_core_ml_package_and_keeps_the_tensorrt_handoff(release, capsys):
    index = release.folder / "index.json"  # a local path works like a URL
    code, out, err = run(capsys, "fetch", "--index", index, "u2net-tiny", "--target", "coreml", "--precision", "fp32")
    assert code == 0, err
    package = Path(out.strip())
    assert package.is_dir() and package.suffix == ".mlpackage" and (package / "Manifest.json").is_file()
    code, out, err = run(capsys, "fetch", "--index", index, "u2net-tiny", "--target", "tensorrt", "--precision", "int8")
    assert code == 0, err
    onnx = Path(out.strip())
    assert onnx.suffix == ".onnx" and list(onnx.parent.glob("*.trtexec.sh"))


def test_model_card_parses_and_its_metrics_equal_the_index(release):
    from huggingface_hub import ModelCard

    card = ModelCard((release.folder / "README.md").read_text(encoding="utf-8"))
    assert card.data.license == "other" and card.data.pipeline_tag == "image-segmentation"
    assert {"tflite", "coreml", "tensorrt", "onnx", "u2net"} <= set(card.data.tags)
    by_config = {}
    for result in card.data.eval_results:
        by_config.setdefault(result.metric_config, {})[result.metric_type] = result.metric_value
    measured = {
        f"{e['name']}/{e['target']}-{e['precision']}": e["accuracy"] for e in release.index["entries"] if e["accuracy"]
    }
    assert by_config.keys() == measured.keys() and len(measured) >= 5
    for config, metrics in by_config.items():
        assert metrics == {k: measured[config][k] for k in ("mae", "max_f", "s_measure")}, config
    text = card.text
    assert "## How to load" in text and "Interpreter(" in text and "MLModel.compileModel" in text
    assert "trtexec.sh" in text and "| tflite | int8 | ok |" in text


def test_publishing_twice_gives_the_same_files_but_the_published_field(release, bench, tmp_path, monkeypatch):
    from u2zoo.release.bundle import publish_bench

    again = publish_bench(bench / "bench", tmp_path / "again", version="2")
    first, second = dict(release.index), dict(again.index)
    assert first.pop("published") and second.pop("published")
    assert first == second
    sums = [(release.folder / "SHA256SUMS").read_text(), (again.folder / "SHA256SUMS").read_text()]
    lines = [{line for line in s.splitlines() if not line.endswith("  index.json")} for s in sums]
    assert lines[0] == lines[1], lines[0] ^ lines[1]
    assert len(lines[0]) >= 15
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    fixed = [publish_bench(bench / "bench", tmp_path / f"fixed{i}", version="2") for i in range(2)]
    assert (fixed[0].folder / "SHA256SUMS").read_text() == (fixed[1].folder / "SHA256SUMS").read_text()
    assert fixed[0].index["published"] == "2023-11-14T22:13:20+00:00"


def test_push_to_a_folder_and_refusals(release, tmp_path, capsys, monkeypatch):
    from u2zoo.release.push import push

    dest = tmp_path / "mounted" / "u2net-tiny-v2"
    assert push(release.folder, str(dest)) == str(dest)
    assert (dest / "SHA256SUMS").read_text() == (release.folder / "SHA256SUMS").read_text()
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted(
        release.files + ["SHA256SUMS"]
    )
    # a folder that is not empty, without --force (through the CLI: one line, nothing changed)
    code, _, err = run(capsys, "publish", "--bench", "x", "--out", tmp_path / "o", "--push", dest)
    assert_one_line_error(code, err, "x is not a u2zoo bench output folder")
    from u2zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="is not empty: pass --force"):
        push(release.folder, str(dest))
    (dest / "stale.txt").write_text("old")
    push(release.folder, str(dest), force=True)
    assert not (dest / "stale.txt").exists() and (dest / "index.json").is_file()
    # the hub: no token is one line naming what is missing (checked after the card and files)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(ConfigError, match="no Hugging Face token: set HF_TOKEN"):
        push(release.folder, "hf://someone/u2net-tiny")
    with pytest.raises(ConfigError, match="expected hf://OWNER/REPO"):
        push(release.folder, "hf://not a repo")


def test_hub_push_fails_in_one_line_without_network(release, tmp_path, monkeypatch):
    from u2zoo.errors import ConfigError
    from u2zoo.release.push import push

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ConfigError, match=r"hf://someone/u2net-tiny: the upload failed: ") as caught:
        push(release.folder, "hf://someone/u2net-tiny")
    assert "\n" not in str(caught.value)


def test_publish_cli_refusals(release, bench, tmp_path, capsys):
    # a bench folder with no ok cell
    none_ok = tmp_path / "none_ok"
    shutil.copytree(bench / "bench", none_ok)
    rows = [json.loads(line) for line in (none_ok / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["status"] = "parity_failed" if row["status"] == "ok" else row["status"]
    (none_ok / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run(capsys, "publish", "--bench", none_ok, "--out", tmp_path / "r1")
    assert_one_line_error(code, err, "nothing to publish: no cell of .* is ok")
    assert not (tmp_path / "r1").exists()
    # an artifact whose sha256 no longer matches its manifest
    tampered = tmp_path / "tampered"
    shutil.copytree(bench / "bench", tampered)
    victim = tampered / "artifacts" / "u2net-tiny" / "u2net-tiny_tflite_int8.tflite"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    code, _, err = run(capsys, "publish", "--bench", tampered, "--out", tmp_path / "r2")
    assert_one_line_error(code, err, r"u2net-tiny_tflite_int8\.tflite: sha256 .* does not match its manifest")
    assert not (tmp_path / "r2").exists() and not list(tmp_path.glob(".r2*"))
    # a release folder that is not empty
    code, _, err = run(capsys, "publish", "--bench", bench / "bench", "--out", release.folder)
    assert_one_line_error(code, err, "is not empty: pass --force")
    code, _, err = run(capsys, "publish", "--out", tmp_path / "r3")
    assert_one_line_error(code, err, "either --bench FOLDER .* or --model NAME")


def test_fetch_refusals(release, tmp_path, capsys, isolated_cache):
    index = release.folder / "index.json"
    code, _, err = run(capsys, "fetch", "--index", index, "u2net-tny", "--target", "tflite", "--precision", "int8")
    assert_one_line_error(
        code, err, r"name 'u2net-tny' is not in the index \(did you mean 'u2net-tiny'\?\); it has: u2net-tiny"
    )
    code, _, err = run(capsys, "fetch", "--index", index, "u2net-tiny", "--target", "tflte", "--precision", "int8")
    assert_one_line_error(code, err, r"did you mean 'tflite'.*it has: coreml, onnx, tensorrt, tflite")
    code, _, err = run(capsys, "fetch", "--index", index, "u2net-tiny", "--target", "coreml", "--precision", "int8")
    assert_one_line_error(code, err, r"precision 'int8' is not in the index for u2net-tiny coreml; it has: fp32")
    code, _, err = run(
        capsys, "fetch", "--index", index, "u2net-tiny", "--target", "onnx", "--precision", "fp32", "--version", "3"
    )
    assert_one_line_error(code, err, r"version '3' .* it has: 2")
    code, _, err = run(capsys, "fetch", "--index", index, "u2net-tiny", "--target", "onnx")
    assert_one_line_error(code, err, "--index needs --target and --precision")
    # an index of an unknown schema version
    future = json.loads(index.read_text())
    future["schema_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(future))
    code, _, err = run(
        capsys, "fetch", "--index", tmp_path / "future.json", "u2net-tiny", "--target", "onnx", "--precision", "fp32"
    )
    assert_one_line_error(code, err, "release index schema version 99 is not one this u2zoo reads")
    # a download whose hash differs from the index: refused, nothing cached
    copy = tmp_path / "served"
    shutil.copytree(release.folder, copy)
    served = copy / "u2net-tiny" / "u2net-tiny_onnx_fp32_dynamic.onnx"
    served.write_bytes(served.read_bytes() + b"tail")
    with serving(copy) as url:
        code, _, err = run(
            capsys, "fetch", "--index", f"{url}/index.json", "u2net-tiny", "--target", "onnx", "--precision", "fp32"
        )
    assert_one_line_error(
        code, err, r"u2net-tiny_onnx_fp32_dynamic\.onnx: .*(hash mismatch|more than the expected).*nothing was cached"
    )
    cached = [p for p in isolated_cache.rglob("*.onnx")]
    assert cached == []
    # index and manifest disagree (a manifest edited after publishing, index updated to match it)
    lying = tmp_path / "lying"
    shutil.copytree(release.folder, lying)
    manifest = lying / "u2net-tiny" / "u2net-tiny_onnx_int8_dynamic.u2zoo.json"
    data = json.loads(manifest.read_text())
    data["files"][0]["sha256"] = "0" * 64
    manifest.write_text(json.dumps(data))
    index_data = json.loads((lying / "index.json").read_text())
    for entry in index_data["entries"]:
        for item in entry["files"]:
            if item["path"].endswith(manifest.name):
                item["sha256"], item["size"] = _sha(manifest), manifest.stat().st_size
    (lying / "index.json").write_text(json.dumps(index_data))
    code, _, err = run(
        capsys, "fetch", "--index", lying / "index.json", "u2net-tiny", "--target", "onnx", "--precision", "int8"
    )
    assert_one_line_error(code, err, r"u2net-tiny_onnx_int8_dynamic\.onnx: sha256 .* does not match its manifest")


def test_junit_has_one_case_per_cell_and_the_summary_is_appended(bench):
    from junitparser import Failure, JUnitXml, Skipped

    xml = JUnitXml.fromfile(str(bench / "junit.xml"))
    cases = {case.name: case for suite in xml for case in suite}
    rows = [json.loads(line) for line in (bench / "bench" / "results.jsonl").read_text().splitlines()]
    assert len(cases) == len(rows) == 8
    assert set(cases) == {f"u2net-tiny/{r['target']}/{r['precision']}" for r in rows}
    failed = cases["u2net-tiny/tflite/fp32"].result
    assert len(failed) == 1 and isinstance(failed[0], Failure)
    assert failed[0].message.startswith("parity_failed: max_abs ") and "> 1e-12" in failed[0].message
    skipped = cases["u2net-tiny/coreml/int8"].result
    assert isinstance(skipped[0], Skipped) and "coreml does not support int8" in skipped[0].message
    assert isinstance(cases["u2net-tiny/tensorrt/fp32"].result[0], Skipped)
    assert cases["u2net-tiny/tflite/int8"].result == [] and cases["u2net-tiny/onnx/int8"].result == []
    summary = (bench / "step_summary.md").read_text()
    assert summary.startswith("earlier step\n### u2zoo bench: ❌ gate failed")
    assert "3 ok, 1 failed, 4 unavailable" in summary and "**u2net-tiny/tflite/fp32**: parity_failed" in summary
    assert summary.count("| u2net-tiny |") == 8


def test_index_resolution_picks_the_newest_version_unless_told():
    from u2zoo.errors import ConfigError
    from u2zoo.release.index import INDEX_SCHEMA, check_index, resolve

    def entry(version):
        return {
            "name": "u2netp",
            "version": version,
            "target": "onnx",
            "precision": "fp32",
            "status": "ok",
            "file": "a.onnx",
            "sha256": "a" * 64,
            "size_bytes": 1,
            "files": [{"path": "a.onnx", "sha256": "a" * 64, "size": 1}],
            "contract": {},
            "weights": {},
        }

    index = check_index({"schema": INDEX_SCHEMA, "schema_version": 1, "entries": [entry("9"), entry("10"), entry("2")]})
    assert resolve(index, "u2netp", "onnx", "fp32")["version"] == "10"
    assert resolve(index, "u2netp", "onnx", "fp32", "2")["version"] == "2"
    with pytest.raises(ConfigError, match=r"version '1' .*it has: 10, 2, 9"):
        resolve(index, "u2netp", "onnx", "fp32", "1")
    escaping = entry("1") | {"files": [{"path": "../x", "sha256": "a" * 64, "size": 1}], "file": "../x"}
    with pytest.raises(ConfigError, match="leaves the release folder"):
        check_index({"schema": INDEX_SCHEMA, "schema_version": 1, "entries": [escaping]})


def test_publish_from_a_model_runs_the_gated_matrix_first(bench, healthy_tiny, tmp_path, capsys):
    out = tmp_path / "from_model"
    code, stdout, err = run(
        capsys,
        "publish",
        "--model",
        "u2net-tiny",
        "--weights",
        healthy_tiny,
        "--targets",
        "onnx",
        "--precisions",
        "fp32",
        "--data",
        bench / "data",
        "--runs",
        "2",
        "--batches",
        "1",
        "--out",
        out,
        "--version",
        "0.3.1",
        "--license",
        "apache-2.0",
    )
    assert code == 0, err
    index = json.loads((out / "index.json").read_text())
    (entry,) = index["entries"]
    assert entry["version"] == "0.3.1" and entry["status"] == "ok" and entry["accuracy"] is None
    assert entry["gate"]["passed"] and entry["gate"]["source"] == "default_gates.yaml"  # the shipped gates
    assert f"{entry['file']}  onnx fp32  ok" in stdout
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "model-index" not in card  # no GT: no metrics
    assert "No ground truth was given" in card


def test_official_weights_carry_the_duts_tr_caveat_and_ours_do_not():
    from u2zoo.release.bundle import accuracy_caveat
    from u2zoo.zoo.weights import REGISTRY

    official = {"weights": {"sha256": REGISTRY["u2netp.fp16_bnfolded"].sha256}, "precision": "fp32", "notes": []}
    on_duts = accuracy_caveat(official, {"dataset": "DUTS-TR", "split": "val", "images": "runs/val100/images"})
    assert on_duts.endswith("the scores are optimistic, not a validation figure")
    assert "would be optimistic" in accuracy_caveat(official, {"images": "shop/photos/2026"})
    lite = {"weights": {"sha256": REGISTRY["u2net-lite"].sha256}, "precision": "fp32", "notes": []}
    assert accuracy_caveat(lite, {"dataset": "DUTS-TR", "images": "duts-tr/val/images"}) is None
    calibrated = lite | {"precision": "int8", "notes": ["INT8 calibrated on the bench images themselves: optimistic"]}
    assert accuracy_caveat(calibrated, {}) == "INT8 calibrated on the bench images themselves: optimistic"


def test_without_matplotlib_the_release_says_it_has_no_plots(bench, tmp_path, monkeypatch):
    import importlib.util

    from u2zoo.release.bundle import NO_PLOTS, publish_bench

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    release = publish_bench(bench / "bench", tmp_path / "no_plots")
    assert release.notes == (NO_PLOTS,) and not (release.folder / "plots").exists()
    assert "Not made: matplotlib was not installed" in (release.folder / "README.md").read_text()
