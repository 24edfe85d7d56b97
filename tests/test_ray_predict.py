"""``u2zoo predict --engine ray``: the same outputs as the local engine, from a pool of Ray actors.

The default tests share one local Ray instance (2 CPUs) started in this process; the engine
joins it as it would any cluster this process is connected to. The slow test runs the command
in a subprocess that starts its own local Ray, kills one of its actors mid-job and checks that
nothing was lost or written twice.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from u2zoo.zoo.reference import sample_images

from conftest import SHARED, assert_one_line_error, run_cli

ray = pytest.importorskip("ray")

DUTS_TRAIN = SHARED / "data" / "duts-tr" / "train" / "images"
ACTOR_TITLE = "MapWorker(MapBatches(SegmentWriter))"  # the process title Ray gives our actors


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance with 2 CPUs for the module's default tests."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Small real photos in nested folders, with the things real folders hold: a non-image, a
    hidden file, an unreadable image and two inputs whose outputs would share a name."""
    root = tmp_path_factory.mktemp("ray_in")
    (root / "sub").mkdir()
    for i, src in enumerate(sample_images()[:4]):
        with Image.open(src) as img:
            img = img.convert("RGB").resize((80 + 12 * i, 60 + 6 * i))
        img.save(root / ("sub" if i >= 2 else ".") / f"p{i}.{'jpg' if i == 1 else 'png'}")
    with Image.open(root / "p0.png") as img:
        img.save(root / "p1.png")  # p1.jpg and p1.png: outputs keep their extension
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"not even read")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def outputs(folder: Path) -> dict[str, np.ndarray]:
    return {
        p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def assert_same_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same file names, and every output within 1 grey level of the local engine's."""
    assert sorted(got) == sorted(want)
    for name, image in want.items():
        assert got[name].shape == image.shape, name
        diff = np.abs(got[name].astype(np.int16) - image.astype(np.int16)).max()
        assert diff <= 1, f"{name}: {diff} grey levels off"


@pytest.fixture(scope="module")
def local_outputs(tmp_path_factory, photos, tiny_dynamic_onnx) -> tuple[Path, str]:
    """What ``u2zoo predict`` (the local engine) makes of ``photos``: masks and cut-outs."""
    from u2zoo.cli import main

    out = tmp_path_factory.mktemp("local_out")
    code = main(["-q", "predict", "--artifact", str(tiny_dynamic_onnx.path), str(photos), "--out", str(out),
                 "--cutout"])  # fmt: skip
    assert code == 1  # broken.jpg
    return out


def test_ray_engine_writes_what_the_local_engine_writes(
    ray_cluster, capsys, tmp_path, photos, local_outputs, tiny_dynamic_onnx
):
    out = tmp_path / "ray_out"
    art = tiny_dynamic_onnx.path
    code, stdout, err = run_cli(
        capsys, "predict", "--engine", "ray", "--artifact", art, photos, "--out", out, "--cutout", "--num-actors", "2"
    )
    assert code == 1, err  # one unreadable input, as with the local engine
    assert "wrote 10 file(s)" in stdout and "5 image(s)" in stdout and "1 input(s) failed" in stdout, stdout
    assert "2 Ray actor(s) × 1 CPU, 1 thread(s) each" in stdout and "(the Ray cluster already connected;" in stdout
    assert "u2zoo: skipped" in err and "broken.jpg" in err
    assert "skipped 1 non-image file(s) in the folders: notes.txt" in err
    assert "p1_jpg.png" in err  # the name clash is noted, as by the local engine
    got = outputs(out)
    assert "p1_jpg.png" in got and "p1_png_cutout.png" in got and "sub/p3.png" in got
    assert_same_outputs(got, outputs(local_outputs))
    assert not [p for p in out.rglob(".*")]  # no temp file left


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_resume_skips_what_exists_and_redoes_only_the_rest(ray_cluster, capsys, tmp_path, photos, tiny_dynamic_onnx):
    out = tmp_path / "out"
    args = ["predict", "--engine", "ray", "--artifact", tiny_dynamic_onnx.path, photos, "--out", out]
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 1 and "wrote 5 file(s)" in stdout
    kept = out / "p0.png"
    before = kept.stat().st_mtime_ns
    (out / "sub" / "p3.png").unlink()  # as if the job had stopped before it
    code, stdout, _ = run_cli(capsys, *args, "--resume")
    assert code == 1, stdout  # broken.jpg has no output, so it is tried again and fails again
    assert "wrote 1 file(s)" in stdout and "4 already done (--resume)" in stdout, stdout
    assert kept.stat().st_mtime_ns == before and (out / "sub" / "p3.png").is_file()


def test_resume_with_everything_done_starts_no_ray(capsys, tmp_path, tiny_dynamic_onnx, monkeypatch):
    photo = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "white").save(photo)
    (tmp_path / "out").mkdir()
    Image.new("L", (40, 30)).save(tmp_path / "out" / "a.png")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called with nothing to do"))
    args = ["predict", "--engine", "ray", "--artifact", tiny_dynamic_onnx.path, photo, "--out", tmp_path / "out"]
    code, stdout, _ = run_cli(capsys, *args, "--resume")
    assert code == 0 and "wrote 0 file(s)" in stdout and "1 already done (--resume)" in stdout, stdout


def test_file_url_input_gives_the_same_outputs(ray_cluster, capsys, tmp_path, photos, local_outputs, tiny_dynamic_onnx):
    out = tmp_path / "url_out"
    url = photos.resolve().as_uri()  # file:///…, read through fsspec on the actors
    code, stdout, err = run_cli(
        capsys, "predict", "--engine", "ray", "--artifact", tiny_dynamic_onnx.path, url, "--out", out, "--cutout",
        "--batch", "2",
    )  # fmt: skip
    assert code == 1 and "wrote 10 file(s)" in stdout and "at batch 2" in stdout, stdout + err
    assert "broken.jpg" in err
    assert_same_outputs(outputs(out), outputs(local_outputs))


def test_torch_model_with_weights_on_the_actors(ray_cluster, capsys, tmp_path, photos, tiny_checkpoint):
    """--model/--weights instead of an artifact: each actor loads the torch reference itself."""
    model = ["--model", "u2net-tiny", "--weights", tiny_checkpoint]
    code, _, err = run_cli(capsys, "predict", *model, photos, "--out", tmp_path / "local")
    assert code == 1, err
    code, stdout, err = run_cli(
        capsys, "predict", "--engine", "ray", "--num-actors", "1", *model, photos, "--out", tmp_path / "ray"
    )
    assert code == 1 and "wrote 5 file(s)" in stdout and "1 Ray actor(s)" in stdout, stdout + err
    assert_same_outputs(outputs(tmp_path / "ray"), outputs(tmp_path / "local"))


def test_address_joins_a_running_cluster(ray_cluster, tmp_path, photos, local_outputs, tiny_dynamic_onnx):
    """A second process joins the module's cluster with --address and its actors run there."""
    out = tmp_path / "joined"
    command = [sys.executable, "-m", "u2zoo", "-q", "predict", "--engine", "ray", "--address", ray_cluster,
               "--artifact", str(tiny_dynamic_onnx.path), str(photos), "--out", str(out), "--cutout"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"({ray_cluster};" in done.stdout and "wrote 10 file(s)" in done.stdout, done.stdout
    assert_same_outputs(outputs(out), outputs(local_outputs))


# ---------------------------------------------------------------------------- bad input


def test_without_the_extra_one_line_names_it(capsys, monkeypatch, tmp_path, photos, tiny_dynamic_onnx):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    code, _, err = run_cli(
        capsys, "predict", "--engine", "ray", "--artifact", tiny_dynamic_onnx.path, photos, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, r"--engine ray needs Ray Data.*pip install 'u2zoo\[ray\]'")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def test_unreachable_address_is_one_line_within_the_timeout(capsys, tmp_path, photos, tiny_dynamic_onnx):
    from u2zoo.tasks.ray_predict import CONNECT_TIMEOUT_S

    started = time.perf_counter()
    code, _, err = run_cli(
        capsys, "predict", "--engine", "ray", "--address", f"127.0.0.1:{closed_port()}",
        "--artifact", tiny_dynamic_onnx.path, photos, "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(code, err, r"cannot reach the Ray cluster at 127\.0\.0\.1:\d+: .*refused")
    assert time.perf_counter() - started < CONNECT_TIMEOUT_S


def test_address_that_never_answers_times_out_in_one_line(monkeypatch, capsys, tmp_path, photos, tiny_dynamic_onnx):
    """A host that drops the connection attempt: the TCP check gives up after its timeout."""
    import u2zoo.tasks.ray_predict as ray_predict

    def silent(address, timeout):
        time.sleep(timeout)
        raise socket.timeout("timed out")

    monkeypatch.setattr(ray_predict, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(ray_predict.socket, "create_connection", silent)
    started = time.perf_counter()
    code, _, err = run_cli(
        capsys, "predict", "--engine", "ray", "--address", "ray://10.1.2.3:10001",
        "--artifact", tiny_dynamic_onnx.path, photos, "--out", tmp_path / "o",
    )  # fmt: skip
    assert_one_line_error(
        code, err, r"cannot reach the Ray cluster at ray://10\.1\.2\.3:10001: no answer within 0\.5 s"
    )
    assert time.perf_counter() - started < 3


def test_a_port_that_is_no_ray_head_fails_after_the_init_timeout(tmp_path, photos, tiny_dynamic_onnx):
    """Something listens (TCP connects) but speaks no Ray: ray.init would retry for minutes."""
    with socket.socket() as server:
        server.bind(("0.0.0.0", 0))
        server.listen(8)
        port = server.getsockname()[1]
        script = (
            "import sys, u2zoo.tasks.ray_predict as r; r.INIT_TIMEOUT_S = 3; from u2zoo.cli import main; "
            "sys.exit(main(sys.argv[1:]))"
        )
        command = [sys.executable, "-c", script, "-q", "predict", "--engine", "ray", "--address", f"127.0.0.1:{port}",
                   "--artifact", str(tiny_dynamic_onnx.path), str(photos), "--out", str(tmp_path / "o")]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30
    assert_one_line_error(done.returncode, done.stderr, r"accepted a connection but no Ray head answered within 3 s")


@pytest.mark.parametrize(
    "url, pattern",
    [
        ("s3://some-bucket/photos", r"s3:// file system needs the s3fs package.*pip install s3fs"),
        ("nosuchfs://x/y", r"fsspec knows no nosuchfs:// file system"),
        ("file:///no/such/folder", r"input not found: file:///no/such/folder"),
    ],
)
def test_url_inputs_fail_in_one_line(capsys, tmp_path, tiny_dynamic_onnx, url, pattern):
    if url.startswith("s3://"):
        try:
            import s3fs  # noqa: F401

            pytest.skip("s3fs is installed here")
        except ImportError:
            pass
    code, _, err = run_cli(
        capsys, "predict", "--engine", "ray", "--artifact", tiny_dynamic_onnx.path, url, "--out", tmp_path / "o"
    )
    assert_one_line_error(code, err, pattern)


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--address", "127.0.0.1:6379"], r"--address is for --engine ray"),
        (["--num-actors", "2", "--actor-cpus", "1"], r"--num-actors, --actor-cpus are for --engine ray"),
        (["--actor-gpus", "1"], r"--actor-gpus is for --engine ray"),
        (["--engine", "ray", "--num-actors", "0"], r"--num-actors must be at least 1, got 0"),
        (["--engine", "ray", "--actor-cpus", "0"], r"--actor-cpus must be a number above 0, got 0"),
        (["--engine", "ray", "--actor-cpus", "nan"], r"--actor-cpus must be a number above 0, got nan"),
        (["--engine", "ray", "--actor-gpus", "-1"], r"--actor-gpus must be a number above 0, got -1"),
        (["--engine", "ray", "--address", "no-port-here"], r"--address takes HOST:PORT, ray://HOST:PORT or auto"),
        (["--engine", "ray", "--out", "s3://bucket/masks"], r"--engine ray writes to a local folder"),
    ],
)
def test_bad_flags_are_one_line(capsys, tmp_path, photos, tiny_dynamic_onnx, flags, pattern):
    args = ["predict", "--artifact", tiny_dynamic_onnx.path, photos]
    if "--out" not in flags:
        args += ["--out", tmp_path / "o"]
    code, stdout, err = run_cli(capsys, *args, *flags)
    assert_one_line_error(code, err, pattern)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_more_actors_than_the_local_cluster_holds_is_refused(ray_cluster, capsys, tmp_path, photos, tiny_dynamic_onnx):
    args = ["predict", "--engine", "ray", "--artifact", tiny_dynamic_onnx.path, photos, "--out", tmp_path / "o"]
    code, _, err = run_cli(capsys, *args, "--num-actors", "3")
    assert_one_line_error(code, err, r"3 actor\(s\) × 1 CPU \(--actor-cpus\) need 3 CPU\(s\); the Ray cluster has 2")
    code, _, err = run_cli(capsys, *args, "--actor-gpus", "1")
    assert_one_line_error(code, err, r"need 1 GPU\(s\); the Ray cluster has 0")


def test_a_bad_artifact_is_one_line_before_ray_starts(capsys, monkeypatch, tmp_path, photos):
    """The driver opens the model first: a bad artifact never reaches the actors."""
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init called for a bad artifact"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    code, _, err = run_cli(capsys, "predict", "--engine", "ray", "--artifact", bad, photos, "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"bad\.onnx")


def test_an_actor_that_cannot_load_the_model_fails_the_job_with_its_error(ray_cluster, tmp_path, photos):
    """An artifact missing on a worker node: the actor's own error, not Ray's wrappers."""
    from u2zoo.errors import U2ZooError
    from u2zoo.tasks.ray_predict import ModelSpec, predict_on_ray

    spec = ModelSpec(artifact=str(tmp_path / "only-on-the-driver.onnx"))
    with pytest.raises(U2ZooError, match="only-on-the-driver"):
        predict_on_ray(spec, [photos], tmp_path / "o", progress=False, quiet=True)


def test_stale_temps_of_a_killed_writer_are_removed(tmp_path):
    from u2zoo.tasks.folder import temp_path
    from u2zoo.tasks.ray_predict import remove_stale_temps

    target = tmp_path / "a.png"
    leftover = temp_path(target)
    leftover.write_bytes(b"half a png")
    other = tmp_path / ".b.png.123-0123abcd.tmp"  # no target of this job: not ours to remove
    other.write_bytes(b"")
    assert leftover.name.startswith(".a.png.") and leftover.name.endswith(".tmp")
    assert remove_stale_temps([target]) == 1
    assert not leftover.exists() and other.exists()


# ---------------------------------------------------------------------------- a killed actor


def first_images(count: int, folder: Path) -> Path:
    folder.mkdir()
    for path in sorted(DUTS_TRAIN.glob("*.jpg"))[:count]:
        (folder / path.name).symlink_to(path)
    return folder


def actor_pids(root: int) -> list[int]:
    import psutil

    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if ACTOR_TITLE in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not DUTS_TRAIN.is_dir(), reason="../shared DUTS-TR images are not present")
def test_a_killed_actor_loses_and_duplicates_nothing(tmp_path):
    """200 real photos through U2NETP (ONNX, the bundled weights) on a local 2-CPU Ray started by
    the command; one actor is killed (SIGKILL) once 40 masks exist. Ray restarts it and redoes its
    task; every mask exists once, no temp file is left, and all equal the local engine's within
    1 grey level."""
    from u2zoo.conversion import convert_model

    artifact = convert_model("u2netp", "onnx", tmp_path / "artifact", progress=False).path
    photos = first_images(200, tmp_path / "in")
    expected = sorted(f"{p.stem}.png" for p in photos.iterdir())
    assert len(expected) == 200
    local = tmp_path / "local"
    command = [sys.executable, "-m", "u2zoo", "-q", "predict", "--artifact", str(artifact), str(photos), "--out"]
    subprocess.run([*command, str(local)], check=True, capture_output=True, timeout=600)

    out = tmp_path / "ray"
    job = subprocess.Popen([*command, str(out), "--engine", "ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)  # fmt: skip
    killed: list[tuple[int, int]] = []
    restarted: list[int] = []

    def kill_one_actor() -> None:
        deadline = time.monotonic() + 300
        first: set[int] = set()
        while time.monotonic() < deadline and job.poll() is None:
            pids = set(actor_pids(job.pid))
            if not killed:
                done = len(list(out.glob("*.png"))) if out.is_dir() else 0
                if done >= 40 and len(pids) == 2:
                    victim = min(pids)
                    os.kill(victim, signal.SIGKILL)
                    killed.append((victim, done))
                    first = pids
            elif pids - first:  # Ray restarted the actor in a new process
                restarted.extend(pids - first)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_actor)
    killer.start()
    stdout, stderr = job.communicate(timeout=600)
    killer.join()
    assert killed, "no actor was killed: the job ended first"
    assert killed[0][1] < 200, "the kill came after the last mask"
    assert restarted, "Ray did not restart the killed actor"
    assert job.returncode == 0, stderr
    assert "wrote 200 file(s)" in stdout and "200 image(s)" in stdout and "0 input(s) failed" in stdout, stdout
    assert len(stdout.strip().splitlines()) == 1 and not stderr.strip(), stdout + stderr  # -q: the summary alone
    assert sorted(p.name for p in out.iterdir()) == expected  # each once, no temp file
    assert_same_outputs(outputs(out), outputs(local))
    print(f"killed actor {killed[0][0]} when {killed[0][1]} of 200 masks existed, restarted as {restarted}; {stdout}")
