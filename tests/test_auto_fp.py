"""The automatic float fallback of INT8: its plan, its search, its cache and its messages."""

import json
from pathlib import Path

import numpy as np
import pytest

from u2zoo.errors import ConfigError, ParityError
from u2zoo.quantization import auto_fp
from u2zoo.quantization.auto_fp import Attempt, RankedGroup, check_options, plan_steps, search

from conftest import TEST_DATA, needs_shared, run_cli

RANKING = [
    RankedGroup("stage2d", 0.13, 0.9, ("stage2d/Add", "stage2d/Concat", "stage2d/Resize")),
    RankedGroup("outconv", 0.01, 0.2),
    RankedGroup("stage1", 0.004, 0.1, ("stage1/Add",)),
    RankedGroup("side1", 0.001, 0.05),
]
MACS = {"stage2d": 10, "outconv": 1, "stage1": 60, "stage2": 29, "side1": 2}


def test_options_are_checked():
    assert check_options(True, None) == 0.25 and check_options(True, 1.0) == 1.0
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ConfigError, match=r"--fp-budget must be in \(0, 1\]"):
            check_options(True, bad)
    with pytest.raises(ConfigError, match="which --no-auto-fp turns off: give one"):
        check_options(False, 0.3)
    assert check_options(False, None) == 0.25  # off: the budget is never used


def test_plan_tries_element_wise_ops_before_whole_groups_and_skips_what_the_budget_cannot_hold():
    steps, why = plan_steps(RANKING, MACS, 100, 0.25, fine=True)
    assert [groups for groups, _ in steps] == [
        ("stage2d/Add", "stage2d/Concat", "stage2d/Resize"),
        ("stage2d",),
        ("stage2d", "outconv"),
        ("stage2d", "outconv", "stage1/Add"),
        ("stage2d", "outconv", "stage1/Add", "side1"),
    ]
    assert steps[0][1] == ("stage2d",)  # the whole-group alternative raced against the fine step
    assert steps[3][1] is None  # stage1 as a whole would pass the budget: only its element-wise ops
    assert why == "every group within the budget was tried; stage1 would put more than 25% of the MACs in float"
    coarse, why = plan_steps(RANKING, MACS, 100, 1.0, fine=False)
    assert [groups for groups, _ in coarse] == [
        ("stage2d",),
        ("stage2d", "outconv"),
        ("stage2d", "outconv", "stage1"),
        ("stage2d", "outconv", "stage1", "side1"),
    ]
    assert why == "every group was tried"


def _fake_attempt(passes, log):
    def attempt(groups, share):
        log.append(groups)
        ok = passes(groups)
        return Attempt(groups, share, ok, {"iou50": 0.99 if ok else 0.6, "mean_abs": 0.01}, object() if ok else None)

    return attempt


def test_search_stops_at_the_first_pass_and_keeps_the_faster_alternative():
    log = []
    first = Attempt((), 0.0, False, {"iou50": 0.51, "mean_abs": 0.14})
    both_pass = lambda groups: any(g.startswith("stage2d") for g in groups)  # noqa: E731
    speeds = iter([40.0, 35.0])  # fine step 40 ms, whole group 35 ms: the whole group wins
    result = search("onnx", RANKING, {}, MACS, 100, 0.25, _fake_attempt(both_pass, log), first, lambda a: next(speeds))
    assert log == [("stage2d/Add", "stage2d/Concat", "stage2d/Resize"), ("stage2d",)]
    assert result.chosen.keep_fp_groups == ("stage2d",) and result.chosen.float_macs == pytest.approx(0.10)
    record = result.record(0.25)
    assert [s["p50_ms"] for s in record["steps"][1:]] == [40.0, 35.0] and record["status"] == "passed"
    assert record["steps"][1]["float_macs"] == 0.0  # element-wise ops hold no MACs
    # a backend without ONNX names (tflite, executorch) goes straight to whole groups
    log.clear()
    search("tflite", RANKING, {}, MACS, 100, 0.25, _fake_attempt(both_pass, log), first, lambda a: 1.0)
    assert log == [("stage2d",)]


CHILDREN = [RankedGroup("stage2d/rebnconv1d", 0.05, 0.8), RankedGroup("stage2d/rebnconvin", 0.01, 0.3)]


def test_a_passing_group_is_narrowed_to_its_most_sensitive_sub_modules_when_that_is_faster():
    first = Attempt((), 0.0, False, {"iou50": 0.66, "mean_abs": 0.07})
    macs = MACS | {"stage2d/rebnconv1d": 2, "stage2d/rebnconvin": 3}
    log, asked = [], []
    passes = lambda groups: "stage2d" in groups or "stage2d/rebnconv1d" in groups  # noqa: E731
    speeds = iter([41.0, 35.0])  # the whole group, then the narrowed candidate
    result = search(
        "tflite",
        RANKING,
        {},
        macs,
        100,
        0.25,
        _fake_attempt(passes, log),
        first,
        lambda a: next(speeds),
        children=lambda group: asked.append(group) or CHILDREN,
    )
    assert asked == ["stage2d"] and log == [("stage2d",), ("stage2d/rebnconv1d",)]
    assert result.chosen.keep_fp_groups == ("stage2d/rebnconv1d",) and result.chosen.float_macs == pytest.approx(0.02)
    assert [s.get("p50_ms") for s in result.record(0.25)["steps"][1:]] == [41.0, 35.0]
    # a narrowed candidate that misses the gate leaves the whole group chosen, after two tries
    log.clear()
    only_whole = lambda groups: "stage2d" in groups  # noqa: E731
    result = search(
        "tflite",
        RANKING,
        {},
        macs,
        100,
        0.25,
        _fake_attempt(only_whole, log),
        first,
        lambda a: 1.0,
        children=lambda group: CHILDREN,
    )
    assert log == [("stage2d",), ("stage2d/rebnconv1d",), ("stage2d/rebnconv1d", "stage2d/rebnconvin")]
    assert result.chosen.keep_fp_groups == ("stage2d",)
    # slower narrowed candidates lose the race
    speeds = iter([30.0, 33.0])
    result = search(
        "tflite",
        RANKING,
        {},
        macs,
        100,
        0.25,
        _fake_attempt(passes, []),
        first,
        lambda a: next(speeds),
        children=lambda group: CHILDREN,
    )
    assert result.chosen.keep_fp_groups == ("stage2d",)


def test_every_whole_group_of_the_passing_set_is_narrowed_largest_first():
    """ExecuTorch on U2NETP passed with [stage2d, outconv, stage2] in float: stage2 (last added)
    could not be narrowed, but stage2d (more MACs) could."""
    ranking = [RankedGroup("stage2d", 0.13, 0.9), RankedGroup("outconv", 0.01, 0.2), RankedGroup("stage2", 0.01, 0.2)]
    macs = {"stage2d": 13, "outconv": 1, "stage2": 9, "stage2d/rebnconv1d": 2, "stage2/rebnconvin": 4}
    kids = {
        "stage2d": [RankedGroup("stage2d/rebnconv1d", 0.3, 0.9)],
        "stage2": [RankedGroup("stage2/rebnconvin", 0.01, 0.1)],
        "outconv": [],
    }
    first = Attempt((), 0.0, False, {"iou50": 0.55, "mean_abs": 0.1})

    def passes(groups):  # stage2 is needed whole; stage2d only for its first conv
        return "stage2" in groups and ("stage2d" in groups or "stage2d/rebnconv1d" in groups)

    log, asked = [], []
    speeds = iter([50.0, 40.0])  # the passing set, then stage2d narrowed (stage2 narrowed fails: not timed)
    result = search(
        "executorch",
        ranking,
        {},
        macs,
        100,
        0.25,
        _fake_attempt(passes, log),
        first,
        lambda a: next(speeds),
        children=lambda g: asked.append(g) or kids[g],
    )
    assert asked == ["stage2d", "stage2", "outconv"]  # by MACs: 13, 9, 1
    assert log == [
        ("stage2d",),
        ("stage2d", "outconv"),
        ("stage2d", "outconv", "stage2"),
        ("stage2d/rebnconv1d", "outconv", "stage2"),
        ("stage2d/rebnconv1d", "outconv", "stage2/rebnconvin"),
    ]
    assert result.chosen.keep_fp_groups == ("stage2d/rebnconv1d", "outconv", "stage2")
    assert result.chosen.float_macs == pytest.approx(0.12) and result.chosen.p50_ms == 40.0


def test_a_stand_in_pass_is_built_only_after_its_narrower_alternatives_were_screened():
    """ExecuTorch: a candidate that passes on its stand-in is provisional; the one with fewest
    MACs in float is built first, the others only if the runtime rejects it."""
    first = Attempt((), 0.0, False, {"iou50": 0.82, "mean_abs": 0.04})
    macs = MACS | {"stage2d/rebnconv1d": 2, "stage2d/rebnconvin": 3}
    on_stand_in = lambda groups: "stage2d" in groups or "stage2d/rebnconv1d" in groups  # noqa: E731

    def screened(groups, share):
        ok = on_stand_in(groups)
        return Attempt(groups, share, ok, {"iou50": 0.99 if ok else 0.9, "screened": "stand-in"}, provisional=ok)

    def run(in_runtime):
        built, timed = [], []

        def prove(a):
            built.append(a.keep_fp_groups)
            ok = in_runtime(a.keep_fp_groups)
            return Attempt(
                a.keep_fp_groups, a.float_macs, ok, {"iou50": 0.985 if ok else 0.97}, object() if ok else None
            )

        result = search(
            "executorch",
            RANKING,
            {},
            macs,
            100,
            0.25,
            screened,
            first,
            lambda a: timed.append(a) or 42.0,
            children=lambda group: CHILDREN,
            prove=prove,
        )
        return result, built, timed

    result, built, timed = run(lambda groups: True)
    assert built == [("stage2d/rebnconv1d",)]  # the whole group passed on its stand-in and was never built
    assert result.chosen.keep_fp_groups == ("stage2d/rebnconv1d",) and not result.chosen.provisional
    assert result.chosen.p50_ms == 42.0 and len(timed) == 1
    steps = result.record(0.25)["steps"]
    assert [s["keep_fp_groups"] for s in steps] == [[], ["stage2d"], ["stage2d/rebnconv1d"]]
    assert "screened" in steps[1] and "screened" not in steps[2] and steps[2]["parity"]["iou50"] == 0.985

    # the runtime rejects the narrowed set: the whole group is built next, and wins
    result, built, _ = run(lambda groups: "stage2d" in groups)
    assert built == [("stage2d/rebnconv1d",), ("stage2d",)] and result.chosen.keep_fp_groups == ("stage2d",)
    assert not result.record(0.25)["steps"][2]["passed"]  # the narrowed set's runtime failure is on record

    # the runtime rejects both: the walk goes on to the next step of the plan
    result, built, _ = run(lambda groups: "outconv" in groups)
    assert built[:2] == [("stage2d/rebnconv1d",), ("stage2d",)]
    assert result.chosen.keep_fp_groups[-1] == "outconv" and not result.chosen.provisional


def test_children_ranking_is_cached_apart_from_the_group_ranking(monkeypatch, isolated_cache):
    from types import SimpleNamespace

    from u2zoo.zoo.archs import build_arch

    calls = []
    monkeypatch.setattr(
        auto_fp, "_measure_ranking", lambda *a, only=None, **kw: calls.append(only) or (CHILDREN if only else RANKING)
    )
    source = SimpleNamespace(
        weights=SimpleNamespace(sha256="ab" * 32), arch="u2net-tiny", model=build_arch("u2net-tiny")
    )
    calib = SimpleNamespace(digest="cd" * 32, inputs=np.zeros((3, 3, 8, 8), np.float32))
    auto_fp.ranking_for(source, calib, (8, 8))
    assert auto_fp.children_ranking_for(source, calib, (8, 8), "stage2d") == CHILDREN
    assert auto_fp.children_ranking_for(source, calib, (8, 8), "stage2d") == CHILDREN
    assert calls[0] is None and calls[1][0] == "stage2d/rebnconvin" and len(calls) == 2
    assert all(c.startswith("stage2d/") for c in calls[1])
    assert len(list((isolated_cache / "int8").glob("ranking-*.json"))) == 2
    assert auto_fp.children_ranking_for(source, calib, (8, 8), "outconv") == []  # a conv has no sub-modules


def test_search_that_runs_out_of_budget_says_what_to_do_next():
    first = Attempt((), 0.0, False, {"iou50": 0.51, "mean_abs": 0.14})
    result = search("onnx", RANKING, {}, MACS, 100, 0.25, _fake_attempt(lambda g: False, []), first, lambda a: 1.0)
    assert result.chosen is None and len(result.attempts) == 6
    message = auto_fp.failure_message("onnx", "int8", result, 0.25, "IoU@0.5 ≥ 0.98", "u2netp")
    assert "failed its gate (IoU@0.5 ≥ 0.98) even with layer groups in float" in message
    assert "6 conversion(s) tried" in message and "would put more than 25% of the MACs in float" in message
    assert "u2zoo sensitivity --model u2netp" in message and "--calib-size" in message and "--fp-budget" in message
    assert "\n" not in message


def test_ranking_cache_is_used_and_a_corrupt_one_is_recomputed(monkeypatch, isolated_cache, capsys):
    from types import SimpleNamespace

    calls = []
    monkeypatch.setattr(auto_fp, "_measure_ranking", lambda *a, **kw: calls.append(1) or RANKING)
    source = SimpleNamespace(weights=SimpleNamespace(sha256="ab" * 32), arch="u2netp")
    calib = SimpleNamespace(digest="cd" * 32, inputs=np.zeros((3, 3, 8, 8), np.float32))
    ranking, record = auto_fp.ranking_for(source, calib, (8, 8))
    assert ranking == RANKING and record["cached"] is False and len(calls) == 1
    again, record = auto_fp.ranking_for(source, calib, (8, 8))
    assert again == RANKING and record["cached"] is True and len(calls) == 1
    cache = next((isolated_cache / "int8").glob("ranking-*.json"))
    cache.write_text('{"weights": "ab", "ranking": [')  # truncated
    auto_fp.ranking_for(source, calib, (8, 8))
    assert len(calls) == 2 and "unreadable: recomputing it" in capsys.readouterr().err
    data = json.loads(cache.read_text())
    data["calibration"] = "ef" * 32  # a file of other inputs under this name is not trusted
    cache.write_text(json.dumps(data))
    auto_fp.ranking_for(source, calib, (8, 8))
    assert len(calls) == 3
    other = SimpleNamespace(digest="99" * 32, inputs=calib.inputs)  # other calibration: its own entry
    auto_fp.ranking_for(source, other, (8, 8))
    assert len(calls) == 4 and len(list((isolated_cache / "int8").glob("ranking-*.json"))) == 2


def test_group_macs_add_up_to_the_model(tmp_path):
    from u2zoo.zoo.archs import build_arch, count_macs

    model = build_arch("u2net-tiny", deploy=True)
    macs, total = auto_fp.group_macs(model)
    assert total == count_macs(model) and set(macs) >= {"stage1", "stage2d", "side1", "outconv"}
    children = {k: v for k, v in macs.items() if k.startswith("stage2d/") and k.count("/") == 1}
    assert "stage2d/rebnconv1d" in children and sum(children.values()) == macs["stage2d"]


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_convert_records_the_search_and_off_switches(calib_dir, tmp_path, capsys):
    """The tiny model passes in all-INT8 under a loose gate: one step, recorded; hand-picked
    groups and --no-auto-fp turn the search off, and the manifest says why."""
    from u2zoo.conversion import convert_model
    from u2zoo.runtime.compare import Tolerance

    common = dict(
        random_weights=True, precision="int8", calib=str(calib_dir), progress=False, tolerance=Tolerance(mean_abs=0.2)
    )
    artifact = convert_model("u2net-tiny", "onnx", tmp_path / "a", **common)
    record = artifact.manifest["auto_fp"]
    assert record["status"] == "passed" and record["kept_in_float"] == [] and record["steps"][0]["passed"]
    assert 0 < record["steps"][0]["seconds"] < 600  # the step's wall time, for whoever sizes a search
    hand = convert_model("u2net-tiny", "onnx", tmp_path / "b", keep_fp_groups=("outconv",), **common)
    assert hand.manifest["auto_fp"] == {
        "status": "off",
        "reason": "layer groups chosen by hand (--keep-fp / --keep-fp-groups)",
    }
    off = convert_model("u2net-tiny", "onnx", tmp_path / "c", auto_fp=False, **common)
    assert off.manifest["auto_fp"]["reason"] == "turned off (--no-auto-fp)"
    # the parity folder is the calibration folder: said, not refused
    convert_model("u2net-tiny", "onnx", tmp_path / "d", parity_images=sorted(Path(calib_dir).iterdir())[:2], **common)
    assert "2 of the 2 parity image(s) are also calibration images" in capsys.readouterr().err


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_search_failure_writes_nothing_and_says_why(calib_dir, tmp_path):
    """A gate no INT8 can meet (max abs 1e-6): the search walks the plan, then one line."""
    from u2zoo.conversion import convert_model
    from u2zoo.runtime.compare import Tolerance

    with pytest.raises(
        ParityError,
        match=r"onnx int8 artifact failed its gate \(max abs ≤ 1e-06\) even with layer "
        r"groups in float: .* stopped because .*--fp-budget \(now 0.05\)",
    ):
        convert_model(
            "u2net-tiny",
            "onnx",
            tmp_path / "out",
            random_weights=True,
            precision="int8",
            calib=str(calib_dir),
            progress=False,
            tolerance=Tolerance(max_abs=1e-6),
            fp_budget=0.05,
        )
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.slow  # CI runs it after the default suite (keeps that under 15 minutes)
def test_the_ranking_reuses_the_calibration_of_a_dynamic_onnx_conversion(calib_dir, tmp_path, isolated_cache):
    """The ranking's graph is exported like the artifact's (here with dynamic shapes, whose
    tensors are named unlike a static graph's), so the ranges that the all-INT8 attempt cached
    serve the ranking: one calibration pass for the whole search, not two."""
    from u2zoo.conversion import convert_model
    from u2zoo.runtime.compare import Tolerance

    with pytest.raises(ParityError):
        convert_model(
            "u2net-tiny",
            "onnx",
            tmp_path / "out",
            random_weights=True,
            precision="int8",
            dynamic=True,
            calib=str(calib_dir),
            progress=False,
            tolerance=Tolerance(max_abs=1e-6),
            fp_budget=0.05,
        )
    cache = isolated_cache / "int8"
    assert len(list(cache.glob("ranking-*.json"))) == 1
    assert len(list(cache.glob("ranges-*.json"))) == 1


@pytest.mark.slow  # about 150 s: a sensitivity ranking and three quantizations of the real U2NETP
@needs_shared
def test_plain_int8_of_real_u2netp_passes_by_falling_back(tmp_path, capsys):
    """The headline case: all-INT8 U2NETP misses the gate; the fallback finds a passing set."""
    code, out, err = run_cli(
        capsys,
        "convert",
        "--model",
        "u2netp",
        "--target",
        "onnx",
        "--int8",
        "--calib",
        TEST_DATA / "test_images",
        "--out",
        tmp_path,
    )
    assert code == 0, err
    manifest = json.loads(next(tmp_path.glob("*.u2zoo.json")).read_text())
    record = manifest["auto_fp"]
    assert record["status"] == "passed" and not record["steps"][0]["passed"]  # all-INT8 failed first
    assert record["ranking"]["groups"][0]["group"] == "stage2d" and record["float_macs"] <= 0.25
    assert record["ranking"]["seconds"] >= 0 and all(step["seconds"] > 0 for step in record["steps"])
    assert manifest["parity"]["iou50"] >= 0.98 and "int8 float fallback: kept [" in out


def test_only_a_stand_in_that_clearly_misses_the_gate_skips_the_build():
    """``_screened_out`` trusts a stand-in's miss only beyond the margin, and only for int8."""
    from types import SimpleNamespace

    from u2zoo.conversion import SCREEN_MARGIN, _screened_out
    from u2zoo.converters.base import ModelSource
    from u2zoo.runtime.compare import Tolerance
    from u2zoo.zoo.reference import TorchPredictor, sample_images
    from u2zoo.zoo.weights import load_model

    model, info, contract = load_model("u2net-tiny", random_weights=True, deploy=True, progress=False)
    source = ModelSource(model, info, contract, info.arch, 0)
    reference = TorchPredictor(model)

    class StandIn:
        what, fixed_batch, fixed_size = "a test stand-in", None, None

        def __init__(self, shift):
            self.shift = shift

        def predict(self, batch):
            return np.clip(reference.predict(batch) + self.shift, 0, 1)

    images = sample_images()[:2]
    opts = SimpleNamespace(precision="int8", height=64, width=64)
    gate = Tolerance(iou50_min=0.98)
    spec = SimpleNamespace(screen=lambda src, o: StandIn(0.6))  # every pixel above 0.5: far off
    record = _screened_out(spec, opts, source, images, gate)
    assert record is not None and not record["passed"] and record["iou50"] < 0.98 - SCREEN_MARGIN
    assert record["screened"].startswith("not built: a test stand-in reached IoU@0.5")
    step = Attempt(("stage2d",), 0.1, False, record).to_dict()
    assert step["screened"] == record["screened"]
    near = SimpleNamespace(screen=lambda src, o: StandIn(0.0))
    assert _screened_out(near, opts, source, images, gate) is None  # might pass: built and measured for real
    assert _screened_out(SimpleNamespace(screen=None), opts, source, images, gate) is None
    assert _screened_out(spec, SimpleNamespace(precision="dynamic-int8"), source, images, gate) is None
    assert _screened_out(spec, opts, source, images, Tolerance(mean_abs=0.05)) is None  # no IoU gate to loosen


def test_cached_ranking_only_reads_never_measures(isolated_cache, capsys):
    from types import SimpleNamespace

    source = SimpleNamespace(weights=SimpleNamespace(sha256="ab" * 32), arch="u2netp")
    calib = SimpleNamespace(digest="cd" * 32, inputs=np.zeros((3, 3, 8, 8), np.float32))
    assert auto_fp.cached_ranking(source, calib) is None
    auto_fp._cached_ranking(source, calib.digest, lambda: RANKING)
    assert auto_fp.cached_ranking(source, calib) == RANKING
    next((isolated_cache / "int8").glob("ranking-*.json")).write_text("{")
    assert auto_fp.cached_ranking(source, calib) is None
    assert capsys.readouterr().err == ""  # the search itself warns when it recomputes
