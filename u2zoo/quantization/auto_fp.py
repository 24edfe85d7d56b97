"""Automatic float fallback: INT8 that passes its gate without hand-picked layer groups.

Plain ``--int8`` first tries everything in INT8. When the artifact misses its parity gate on
the parity photos, layer groups go back to float in the order of a sensitivity ranking,
until the gate passes or the float share of the MACs would exceed a budget (default 25%):

1. The ranking quantizes one group at a time with ONNX Runtime and measures the output error
   (``onnx_int8.sensitivity``). Every backend uses it as its order: the groups are the same
   modules in every backend, and ranking with each backend's own quantizer would cost a full
   quantization per group per backend. It is cached on disk per (weights sha256, calibration
   digest, ranking backend), and a cached file that does not parse is recomputed, never trusted.
2. For backends that keep ONNX node names (ONNX Runtime, OpenVINO, the TensorRT Q/DQ ONNX), a
   group is first tried with only its element-wise joins in float (its ``Add``, ``Concat`` and
   ``Resize`` ops: on U2NETP's stage2d they cause most of the error) — no MACs in float. When
   that passes, the whole-group alternative is built too and the faster passing one is kept;
   the manifest records both speeds.
3. A target with a stand-in (``TargetSpec.screen``: ExecuTorch's quantized graph run in torch
   before its 40 s XNNPACK lowering) builds a candidate only when it may be the answer: one
   whose stand-in passes the gate is *provisional*, its narrower alternatives are screened
   first, and only the candidate with fewest MACs in float is built and proven in the runtime
   (then the next, if it fails there).

The manifest's ``auto_fp`` records the ranking, every step with its parity, and what was kept.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from u2zoo.errors import ConfigError
from u2zoo.runtime.precisions import FLOAT_FALLBACK_PRECISIONS

DEFAULT_BUDGET = 0.25  # at most this share of the MACs in float
MAX_ATTEMPTS = 16  # conversions per search, whatever the budget: each one re-quantizes the model
FINE_OPS = ("Add", "Concat", "Resize")  # a group's element-wise joins, tried in float before its convs
FINE_TARGETS = ("onnx", "openvino", "tensorrt")  # targets whose group names select ONNX nodes
RANKING_BACKEND = "onnxruntime-u8s8-reduce-range"
AUTO_PRECISIONS = FLOAT_FALLBACK_PRECISIONS


def check_options(auto_fp: bool, fp_budget: float | None) -> float:
    """Validate ``--no-auto-fp`` / ``--fp-budget``; return the budget to use."""
    if fp_budget is not None and not auto_fp:
        raise ConfigError("--fp-budget sets the automatic float fallback, which --no-auto-fp turns off: give one")
    budget = DEFAULT_BUDGET if fp_budget is None else fp_budget
    if not 0 < budget <= 1:
        raise ConfigError(f"--fp-budget must be in (0, 1] (a share of the MACs), got {budget:g}")
    return budget


def applies(target: str, opts: Any) -> str | None:
    """Why the search does not run for these options, or None when it does."""
    precision = getattr(opts, "precision", "fp32")
    if precision not in AUTO_PRECISIONS or not hasattr(opts, "keep_fp_groups"):
        return f"not an int8 precision with layer groups ({target} {precision})"
    if getattr(opts, "onnx", None):
        return "the ONNX was given (--onnx)"
    if getattr(opts, "keep_fp", 0) or opts.keep_fp_groups:
        return "layer groups chosen by hand (--keep-fp / --keep-fp-groups)"
    return None


def group_macs(model) -> tuple[dict[str, int], int]:
    """Multiply-accumulates per module path (``stage2d``, ``stage2d/rebnconv1d``) at 320×320, and
    the total."""
    import torch
    from torch import nn

    per_group: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parts = name.split(".")
            paths = ["/".join(parts[:depth]) for depth in range(1, len(parts))] or [parts[0]]

            def hook(mod, _inputs, output, paths=paths):
                kh, kw = mod.kernel_size
                macs = output.numel() // output.shape[0] * (mod.in_channels // mod.groups) * kh * kw
                for path in paths:  # "stage2d" and "stage2d/rebnconv1d" both hold this conv
                    per_group[path] = per_group.get(path, 0) + macs

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 320, 320))
    finally:
        for handle in handles:
            handle.remove()
    return per_group, sum(v for k, v in per_group.items() if "/" not in k)


# --- the ranking and its cache -------------------------------------------------------------


@dataclass(frozen=True)
class RankedGroup:
    group: str
    mean_abs: float  # output error with only this group quantized
    max_abs: float
    fine_ops: tuple[str, ...] = ()  # which of FINE_OPS the group has, as "group/Op" names


def _cache_path(weights_key: str, calib_digest: str) -> Path:
    from u2zoo.zoo.weights import cache_dir

    key = hashlib.sha256(f"{weights_key}|{calib_digest}|{RANKING_BACKEND}".encode()).hexdigest()[:32]
    return cache_dir() / "int8" / f"ranking-{key}.json"


def _read_cached(path: Path, weights_key: str, calib_digest: str, warn: bool = True) -> list[RankedGroup] | None:
    """The cached ranking if it parses and belongs to these inputs; None (and a warning) if not."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if (data["weights"], data["calibration"], data["backend"]) != (weights_key, calib_digest, RANKING_BACKEND):
            raise ValueError("keys differ")
        ranking = [
            RankedGroup(
                str(r["group"]), float(r["mean_abs"]), float(r["max_abs"]), tuple(str(o) for o in r["fine_ops"])
            )
            for r in data["ranking"]
        ]
        if not ranking:
            raise ValueError("empty")
        return ranking
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        if warn:
            print(
                f"u2zoo: warning: cached INT8 sensitivity ranking {path} is unreadable: recomputing it", file=sys.stderr
            )
        return None


def cached_ranking(source, calib) -> list[RankedGroup] | None:
    """The ranking cached for ``source``'s weights on ``calib``, or None; never measures (a
    backend uses it to prepare for the search's first steps, when an earlier run left one)."""
    weights_key = _weights_key(source)
    return _read_cached(_cache_path(weights_key, calib.digest), weights_key, calib.digest, warn=False)


def _weights_key(source) -> str:
    """What a ranking is cached under for these weights: their sha256 (random weights: the arch)."""
    return source.weights.sha256 or f"random:{source.arch}"


def _cached_ranking(
    source, calib_key: str, measure: Callable[[], list[RankedGroup]]
) -> tuple[list[RankedGroup], Path, bool]:
    """The ranking cached for (``source``'s weights, ``calib_key``), or ``measure()`` it and cache
    it; returns it, its cache file and whether it came from there."""
    from u2zoo.artifact import atomic_write_text

    weights_key = _weights_key(source)
    path = _cache_path(weights_key, calib_key)
    cached = _read_cached(path, weights_key, calib_key)
    if cached is not None:
        return cached, path, True
    ranking = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        path,
        json.dumps(
            {
                "weights": weights_key,
                "calibration": calib_key,
                "backend": RANKING_BACKEND,
                "ranking": [vars(r) | {"fine_ops": list(r.fine_ops)} for r in ranking],
            },
            indent=1,
        )
        + "\n",
    )
    return ranking, path, False


ExportGraph = Callable[[Path], str]  # writes the model's ONNX graph to a path; returns its input's name


def ranking_for(
    source, calib, size: tuple[int, int], export_graph: ExportGraph | None = None
) -> tuple[list[RankedGroup], dict[str, Any]]:
    """The sensitivity ranking of ``source`` on ``calib``: from the cache, or measured and cached.

    ``export_graph`` writes the ONNX graph the ranking quantizes (``convert`` passes the ONNX
    target's exporter, which sits above this module). For an ONNX Runtime conversion it exports
    like the artifact being converted: the same bytes, so the calibration ranges that conversion
    cached serve the ranking too (a dynamic-shape graph's tensors have other names than a static
    one's). The ranking itself does not depend on that, so its cache key leaves it out.
    """
    started = time.perf_counter()
    ranking, path, cached = _cached_ranking(
        source, calib.digest, lambda: _measure_ranking(source, calib, size, export_graph=export_graph)
    )
    record = {"backend": RANKING_BACKEND, "cache": str(path), "eval_images": min(8, len(calib.inputs))}
    return ranking, record | {"cached": cached, "seconds": round(time.perf_counter() - started, 1)}


def children_ranking_for(
    source, calib, size: tuple[int, int], group: str, export_graph: ExportGraph | None = None
) -> list[RankedGroup]:
    """The sub-modules of ``group`` (``stage2d/rebnconv1d``, …) ranked the same way, cached the same way.

    Measured only for the whole groups of a set that passed the gate: often one of a group's
    convs carries the error, and keeping just that one in float is nearly as fast as all-INT8.
    """
    children = [f"{group}/{name}" for name, _ in source.model.get_submodule(group).named_children()]
    if not children:
        return []
    ranking, _, _ = _cached_ranking(
        source,
        f"{calib.digest}|children-of:{group}",
        lambda: _measure_ranking(source, calib, size, only=children, export_graph=export_graph),
    )
    return ranking


def _measure_ranking(
    source, calib, size: tuple[int, int], only: list[str] | None = None, export_graph: ExportGraph | None = None
) -> list[RankedGroup]:
    import onnx

    from u2zoo.quantization.onnx_int8 import TOP_LEVEL, group_pattern, sensitivity

    if export_graph is None:
        raise ValueError("measuring a ranking needs export_graph (the ONNX exporter)")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "graph.onnx"
        input_name = export_graph(onnx_path)
        names = [n.name for n in onnx.load(str(onnx_path)).graph.node]
        ranked = sensitivity(onnx_path, calib, input_name, calib.inputs[:8], only=only)
    if only is not None:
        return [RankedGroup(r.group, r.mean_abs, r.max_abs) for r in ranked]
    import re

    def fine(group: str) -> tuple[str, ...]:
        if group == TOP_LEVEL:
            return ()
        return tuple(
            f"{group}/{op}" for op in FINE_OPS if any(re.match(group_pattern(f"{group}/{op}"), n) for n in names)
        )

    return [RankedGroup(r.group, r.mean_abs, r.max_abs, fine(r.group)) for r in ranked]


# --- the search ----------------------------------------------------------------------------


@dataclass
class Attempt:
    """What one conversion with some groups in float gave."""

    keep_fp_groups: tuple[str, ...]
    float_macs: float  # share of the model's MACs kept in float
    passed: bool
    parity: dict[str, Any]
    artifact: Any = None  # kept only for passing attempts
    p50_ms: float | None = None
    seconds: float | None = None  # wall time of the conversion and its parity check
    provisional: bool = False  # passed on the target's stand-in, not built yet (see ``search``)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "keep_fp_groups": list(self.keep_fp_groups),
            "float_macs": round(self.float_macs, 4),
            "passed": self.passed,
            "parity": {k: self.parity.get(k) for k in ("max_abs", "mean_abs", "iou50")},
        }
        if "screened" in self.parity:  # judged on a stand-in, not built (see convert._screen)
            out["screened"] = self.parity["screened"]
        if "stand_in_iou50" in self.parity:  # built after passing on its stand-in
            out["stand_in_iou50"] = self.parity["stand_in_iou50"]
        if self.seconds is not None:
            out["seconds"] = round(self.seconds, 1)
        if self.p50_ms is not None:
            out["p50_ms"] = round(self.p50_ms, 2)
        return out


@dataclass
class SearchResult:
    chosen: Attempt | None
    attempts: list[Attempt] = field(default_factory=list)
    ranking: list[RankedGroup] = field(default_factory=list)
    ranking_record: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""

    def record(self, budget: float) -> dict[str, Any]:
        return {
            "status": "passed" if self.chosen else "failed",
            "budget_float_macs": budget,
            "ranking": {
                **self.ranking_record,
                "groups": [{"group": r.group, "mean_abs": r.mean_abs, "max_abs": r.max_abs} for r in self.ranking],
            },
            "steps": [a.to_dict() for a in self.attempts],
            "kept_in_float": list(self.chosen.keep_fp_groups) if self.chosen else None,
            "float_macs": round(self.chosen.float_macs, 4) if self.chosen else None,
            "stopped": self.stopped or None,
        }


def plan_steps(
    ranking: list[RankedGroup], macs: dict[str, int], total: int, budget: float, fine: bool
) -> tuple[list[tuple[tuple[str, ...], tuple[str, ...] | None]], str]:
    """Candidate float sets in order: (groups, whole-group alternative for fine steps or None).

    Each ranked group adds first its element-wise ops (fine targets), then the whole group. A
    group that would take the float MACs past the budget is skipped (its element-wise ops are
    still tried, and kept for the later steps) and the walk goes on with the next, smaller ones. Returns the steps and a
    note of what the budget left out.
    """
    steps: list[tuple[tuple[str, ...], tuple[str, ...] | None]] = []
    kept: tuple[str, ...] = ()
    skipped: list[str] = []
    for ranked in ranking:
        whole = kept + (ranked.group,)
        fits = sum(macs.get(g, 0) for g in whole) / total <= budget
        if fine and ranked.fine_ops:
            steps.append((kept + ranked.fine_ops, whole if fits else None))
        if not fits:
            skipped.append(ranked.group)
            if fine and ranked.fine_ops:
                kept += ranked.fine_ops  # they hold no MACs: keep them for the next groups
            continue
        steps.append((whole, None))
        kept = whole
    if skipped:
        return steps, (
            f"every group within the budget was tried; {', '.join(skipped[:3])}"
            f"{' and others' if len(skipped) > 3 else ''} would put more than {budget:.0%} "
            "of the MACs in float"
        )
    return steps, "every group was tried"


def search(
    target: str,
    ranking: list[RankedGroup],
    ranking_record: dict[str, Any],
    macs: dict[str, int],
    total: int,
    budget: float,
    attempt: Callable[[tuple[str, ...], float], Attempt],
    first: Attempt,
    latency: Callable[[Any], float],
    children: Callable[[str], list[RankedGroup]] | None = None,
    prove: Callable[[Attempt], Attempt] | None = None,
) -> SearchResult:
    """Walk the planned steps after the all-INT8 ``first`` attempt failed; stop at the first pass.

    ``attempt(groups, float_macs)`` converts and measures one candidate. A passing fine step is
    raced against its whole-group alternative on ``latency`` and the faster passing one wins.
    Then every whole group of the passing set, largest first, is tried replaced by its most
    sensitive sub-modules (``children(group)``, ranked), and the faster passing candidate wins.
    A provisional pass (``attempt`` judged it on a stand-in) is built by ``prove`` only once its
    narrower alternatives were tried; if the runtime rejects every candidate of a step, the
    walk goes on.
    """
    result = SearchResult(None, [first], ranking, ranking_record)
    steps, why_end = plan_steps(ranking, macs, total, budget, target in FINE_TARGETS)

    def share(groups: tuple[str, ...]) -> float:
        return sum(macs.get(g, 0) for g in groups) / total  # "stage2d/Add" and the like hold no MACs

    tried: set[tuple[str, ...]] = set()
    for groups, whole in steps:
        if groups in tried:
            continue
        if len(result.attempts) >= MAX_ATTEMPTS:
            result.stopped = f"{MAX_ATTEMPTS} conversions tried"
            return result
        tried.add(groups)
        step_start = len(result.attempts)
        current = attempt(groups, share(groups))
        result.attempts.append(current)
        if not current.passed:
            continue
        chosen = current
        if whole is not None and len(result.attempts) < MAX_ATTEMPTS:
            alternative = attempt(whole, share(whole))
            tried.add(whole)
            result.attempts.append(alternative)
            if alternative.passed:
                chosen = _faster(current, alternative, latency)
        if children is not None:
            chosen = _narrow_groups(chosen, children, macs, result, attempt, share, latency, tried)
        chosen = _proven(chosen, result.attempts, step_start, prove, latency)
        if chosen is None:  # every candidate that passed on the stand-in failed in the runtime
            continue
        result.chosen = chosen
        return result
    result.stopped = why_end
    return result


def _faster(a: Attempt, b: Attempt, latency: Callable[[Any], float]) -> Attempt:
    """The faster of two passing candidates: timed when both are built; otherwise (one is
    provisional) the one with fewer MACs in float, which is what makes INT8 faster."""
    if a.provisional or b.provisional:
        return min((a, b), key=lambda x: x.float_macs)
    if a.p50_ms is None:
        a.p50_ms = latency(a.artifact)
    b.p50_ms = latency(b.artifact)
    return min((a, b), key=lambda x: x.p50_ms)


def _proven(
    chosen: Attempt,
    attempts: list[Attempt],
    start: int,
    prove: Callable[[Attempt], Attempt] | None,
    latency: Callable[[Any], float],
) -> Attempt | None:
    """Build and prove a provisional ``chosen``; when the runtime rejects it, the other passing
    candidates of this step follow, fewest MACs in float first. Proven attempts replace their
    provisional ones in ``attempts``. None when every one of them failed in the runtime."""
    if not chosen.provisional:
        return chosen
    if prove is None:
        raise ValueError("a provisional attempt needs a prove() to build it")
    others = sorted((a for a in attempts[start:] if a.passed and a is not chosen), key=lambda a: a.float_macs)
    for candidate in [chosen, *others]:
        if not candidate.provisional:
            return candidate
        built = prove(candidate)
        attempts[attempts.index(candidate)] = built
        if built.passed:
            if built.p50_ms is None:
                built.p50_ms = latency(built.artifact)
            return built
    return None


NARROW_TRIES = 2  # sub-module candidates per passing group: its top one, then its top two


def _narrow_groups(
    chosen: Attempt,
    children: Callable[[str], list[RankedGroup]],
    macs: dict[str, int],
    result: SearchResult,
    attempt: Callable[[tuple[str, ...], float], Attempt],
    share: Callable[[tuple[str, ...]], float],
    latency: Callable[[Any], float],
    tried: set,
) -> Attempt:
    """Narrow every whole group of the passing set, the one with most MACs first (it has most to
    give back), within the search's conversion budget."""
    wholes = [g for g in chosen.keep_fp_groups if "/" not in g and macs.get(g, 0) > 0]
    for group in sorted(wholes, key=lambda g: -macs[g]):
        if len(result.attempts) >= MAX_ATTEMPTS:
            break
        ranked = children(group)
        if ranked:  # a lone conv (outconv, side1) has no sub-modules to narrow to
            chosen = _narrow(chosen, group, ranked, result, attempt, share, latency, tried)
    return chosen


def _narrow(
    chosen: Attempt,
    group: str,
    ranked_children: list[RankedGroup],
    result: SearchResult,
    attempt: Callable[[tuple[str, ...], float], Attempt],
    share: Callable[[tuple[str, ...]], float],
    latency: Callable[[Any], float],
    tried: set,
) -> Attempt:
    """Replace ``group`` in ``chosen`` by its top sub-modules; keep the faster pass."""
    at = chosen.keep_fp_groups.index(group)
    before, after = chosen.keep_fp_groups[:at], chosen.keep_fp_groups[at + 1 :]
    picked: tuple[str, ...] = ()
    for child in ranked_children[:NARROW_TRIES]:
        if len(result.attempts) >= MAX_ATTEMPTS:
            break
        picked += (child.group,)
        candidate = before + picked + after
        if candidate in tried:
            continue
        tried.add(candidate)
        current = attempt(candidate, share(candidate))
        result.attempts.append(current)
        if current.passed:
            return _faster(chosen, current, latency)
    return chosen


def failure_message(
    target: str, precision: str, result: SearchResult, budget: float, tolerance: str, model: str
) -> str:
    """One line: the best parity reached, what was tried, and what to do next."""
    best = max(result.attempts, key=lambda a: (a.parity.get("iou50") or 0.0, -(a.parity.get("mean_abs") or 1.0)))
    groups = ", ".join(best.keep_fp_groups) or "none"
    return (
        f"{target} {precision} artifact failed its gate ({tolerance}) even with layer groups in float: best "
        f"IoU@0.5 {best.parity.get('iou50', 0):.4f}, mean abs {best.parity.get('mean_abs', float('nan')):.3g} "
        f"with [{groups}] in float ({best.float_macs:.0%} of MACs); {len(result.attempts)} conversion(s) tried, "
        f"stopped because {result.stopped}. Next: `u2zoo sensitivity --model {model} --calib DIR` to see the "
        f"ranking, more calibration images (--calib-size), or a larger --fp-budget (now {budget:g})"
    )
