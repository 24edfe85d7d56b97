"""NNCF post-training quantization of an OpenVINO model, with statistics reused across calls.

``nncf.quantize`` collects activation statistics by running the model on every calibration
image with an extra output at each quantizer and bias-correction point: on U2NETP at 320 px
that is most of an INT8 conversion (about 1 s an image on one core). The automatic float
fallback quantizes the same graph again with other layer groups ignored; the statistics of a
point do not depend on what is ignored (they are taken on the float model), so points seen
before are not collected again.

This follows ``nncf.openvino.quantization.quantize_model.native_quantize_impl`` step by step
(the same ``PostTrainingQuantization`` algorithm, the same weight compression afterwards),
with the statistics collection split out. Statistics are matched by target point and by the
reducer/aggregator configuration of their collectors, and kept for this process only.
"""

from __future__ import annotations

from typing import Any

# (graph digest, calibration digest, subset size) → statistic points collected so far
_COLLECTED: dict[tuple, Any] = {}


def _algorithm_kind(key: str) -> str:
    """'MMQ_8751…' → 'MMQ': NNCF keys statistics by algorithm instance (its hash)."""
    return key.split("_", 1)[0]


def _signature(collectors: list) -> tuple:
    """What a collector computes: its statistic type, and its (reducer, aggregator) branches."""
    return tuple((repr(getattr(c, "_stat_container", None)), tuple(sorted(c.aggregators))) for c in collectors)


def _entries(container):
    """(node, target point, algorithm key, its collectors) of every statistic point in ``container``."""
    for node, points in container.items():
        for point in points:
            for algorithm, collectors in point.algorithm_to_tensor_collectors.items():
                yield node, point.target_point, algorithm, collectors


def _add(into, target_point, algorithm: str, collectors: list) -> None:
    from nncf.common.tensor_statistics.statistic_point import StatisticPoint

    for collector in collectors:
        into.add_statistic_point(StatisticPoint(target_point, collector, algorithm))


def _split(wanted, known) -> tuple[Any, Any]:
    """(points answered from ``known`` under ``wanted``'s algorithm keys, points still to collect)."""
    from nncf.common.tensor_statistics.statistic_point import StatisticPointsContainer

    answered, missing = StatisticPointsContainer(), StatisticPointsContainer()
    for node, target_point, algorithm, collectors in _entries(wanted):
        found = _find(known, node, target_point, _algorithm_kind(algorithm), _signature(collectors))
        if found is not None:
            _add(answered, target_point, algorithm, found)
        else:
            _add(missing, target_point, algorithm, collectors)
    return answered, missing


def _find(known, node: str, target_point, kind: str, signature: tuple) -> list | None:
    if known is None:
        return None
    for point in known.get(node, []):
        if point.target_point != target_point:
            continue
        for algorithm, collectors in point.algorithm_to_tensor_collectors.items():
            if _algorithm_kind(algorithm) == kind and _signature(collectors) == signature:
                return collectors
    return None


def _merge(into, points) -> None:
    for _, target_point, algorithm, collectors in _entries(points):
        _add(into, target_point, algorithm, collectors)


def advanced_parameters(bias_correction: bool):
    """NNCF's advanced settings for u2zoo: bias correction only when asked (see the OpenVINO target)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    return AdvancedQuantizationParameters(disable_bias_correction=not bias_correction)


def quantize(
    ov_model,
    dataset,
    subset_size: int,
    ignored_scope,
    cache_key: tuple,
    bias_correction: bool = False,
    also_for: tuple = (),
) -> tuple[Any, str]:
    """``nncf.quantize(ov_model, dataset, subset_size=…, ignored_scope=…)`` (default preset;
    fast bias correction only when asked), collecting only the statistics this process has not
    collected for ``cache_key`` yet. Returns the quantized model and what happened to the
    statistics, for the manifest.

    ``also_for`` names ignored scopes a later call will probably ask for: when a pass over the
    calibration set is needed anyway, their missing points ride along in it (a pass costs the
    same for 1 point as for 300), so that later call collects nothing.
    """
    from nncf.common.tensor_statistics.statistic_point import StatisticPointsContainer
    from nncf.openvino.graph.model_utils import remove_friendly_name_duplicates
    from nncf.openvino.graph.nncf_graph_builder import GraphConverter
    from nncf.quantization.algorithms.pipeline import collect_statistics
    from openvino._offline_transformations import compress_quantize_weights_transformation

    model = remove_friendly_name_duplicates(ov_model)
    graph = GraphConverter.create_nncf_graph(model)
    algorithm = _algorithm(subset_size, ignored_scope, bias_correction)
    wanted = algorithm.get_statistic_points(model, graph)
    known = _COLLECTED.setdefault(cache_key, StatisticPointsContainer())
    _, missing = _split(wanted, known)
    total = sum(len(points) for points in wanted.values())
    still = sum(len(points) for points in missing.values())
    if still:
        for scope in also_for:
            _, extra = _split(
                _algorithm(subset_size, scope, bias_correction).get_statistic_points(model, graph),
                _union(known, missing),
            )
            _merge(missing, extra)
        _merge(known, collect_statistics(missing, model, graph, dataset))
    answered, _ = _split(wanted, known)
    quantized = algorithm.apply(model, graph, statistic_points=answered, dataset=dataset)
    compress_quantize_weights_transformation(quantized)
    if not still:
        return quantized, f"reused: all {total} statistic points from this process's earlier calibration"
    if still == total:
        return quantized, f"measured: {total} statistic points"
    return (
        quantized,
        f"measured {still} of {total} statistic points; the rest reused from this process's earlier calibration",
    )


def _algorithm(subset_size: int, ignored_scope, bias_correction: bool):
    from nncf.quantization.algorithms.post_training.algorithm import PostTrainingQuantization

    return PostTrainingQuantization(
        subset_size=subset_size, ignored_scope=ignored_scope, advanced_parameters=advanced_parameters(bias_correction)
    )


def _union(first, second):
    from nncf.common.tensor_statistics.statistic_point import StatisticPointsContainer

    both = StatisticPointsContainer()
    _merge(both, first)
    _merge(both, second)
    return both
