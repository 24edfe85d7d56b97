"""Core ML weight compression, simulated in torch before conversion: what fp16, int8
per-channel and k-means palettes do to the weights, the error that makes on real photos, and
which tensors to leave in float so the compressed model keeps the int8-weights gate.

It needs only the compression settings (``WeightCompression``: the Core ML target's options
satisfy it), so it sits with quantization, below the converters.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from u2zoo.errors import BackendUnavailable
from u2zoo.runtime.compare import compare
from u2zoo.runtime.gates import default_gates

# Weight tensors of more elements than this are compressed (int8 or palettized); smaller ones
# (biases, the 1×1 fusing conv) stay float. coremltools' default, 2048, would leave U2NETP's
# side-output convs (576 elements) and the whole tiny test network uncompressed.
WEIGHT_THRESHOLD = 256
# Compressed weights must keep the torch-side IoU@0.5 at or above the bar `u2zoo convert` sets
# for int8 weights (0.98); otherwise up to MAX_KEPT of the most harmful tensors stay float.
COMPRESSION_TARGET_IOU = default_gates().precisions["int8-weights"]["iou50_min"]
MAX_KEPT = 4
SCAN_IMAGES = 2  # images of the sensitivity scan
SCANNED_GROUPS = 2  # layer groups whose tensors are scanned one by one


class WeightCompression(Protocol):
    """The settings the simulation reads (``CoreMLOptions`` has them)."""

    precision: str  # fp32 | fp16 | int8-weights
    palettize: int | None  # k-means palette bits, or None

    @property
    def compression(self) -> str | None: ...  # what compresses the weights, None for plain fp16/fp32


def _fold_batchnorm(module) -> None:
    """Fold every BatchNorm2d into the conv registered just before it, in place.

    coremltools folds conv + batch norm before it compresses, so the weights it quantizes or
    palettizes are the folded ones; the simulation must compress the same numbers. In
    REBNCONV (conv_s1, bn_s1) and DSREBNCONV (conv_dw, conv_pw, bn_s1) registration order is
    forward order.
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())


def _fp16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


def int8_round_trip(weight: np.ndarray) -> np.ndarray:
    """Linear symmetric int8 per output channel (axis 0), computed like coremltools'
    linear_quantize_weights: in the weight's own dtype (fp16 for an fp16 model), range ±127."""
    axes = tuple(range(1, weight.ndim))
    max_abs = np.abs(weight).max(axis=axes, keepdims=True)
    scale = (max_abs - (-max_abs)) / (127 - (-127))
    scale = np.where(scale > 0, scale, np.ones_like(scale)).astype(weight.dtype)
    quantized = np.clip(np.round(weight / scale), -127, 127)
    return (quantized.astype(np.float32) * scale).astype(weight.dtype)


def kmeans_round_trip(weight: np.ndarray, bits: int) -> np.ndarray:
    """k-means with 2**bits clusters over one weight tensor, like coremltools' palettize_weights
    (scikit-learn, k-means++, n_init=1, random_state=0; fp16 weights are clustered as float64)."""
    from sklearn.cluster import KMeans

    values = weight.reshape(-1, 1).astype(np.float64 if weight.dtype == np.float16 else np.float32)
    clusters = min(len(values), 1 << bits)
    kmeans = KMeans(clusters, init="k-means++", tol=1e-2, n_init=1, random_state=0).fit(values)
    return kmeans.cluster_centers_[kmeans.labels_].reshape(weight.shape).astype(weight.dtype)


def _compress(weight: np.ndarray, options: WeightCompression) -> np.ndarray:
    if options.precision == "int8-weights":
        return int8_round_trip(weight)
    return kmeans_round_trip(weight, options.palettize)


def _group(name: str) -> str:
    """A weight's layer group: its top-level module (stage2d, side3, outconv)."""
    return name.split(".")[0]


@dataclass
class CompressionPlan:
    """What Core ML will store for each conv weight, decided and measured on the torch side.

    ``stored``: module name → folded weight in the model's float type (fp16-rounded for fp16
    models); ``compressed``: the compressed version of every tensor large enough to compress;
    ``kept``: tensors left uncompressed; ``parity``: the model with these weights vs the float
    model; ``sensitivity``: mean abs error with only one group / tensor compressed, where the
    search ran.
    """

    net: Any  # the BN-folded float copy
    half: bool
    stored: dict[str, np.ndarray]
    compressed: dict[str, np.ndarray]
    kept: list[str] = field(default_factory=list)
    parity: Any = None  # u2zoo.runtime.compare.Parity
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)

    def weights(self, compress: list[str] | None = None) -> dict[str, np.ndarray]:
        names = [n for n in self.compressed if n not in self.kept] if compress is None else compress
        return self.stored | {n: self.compressed[n] for n in names}

    def model(self, compress: list[str] | None = None):
        """The folded copy with the stored weights: those of ``compress`` (default: every
        compressed tensor not kept) compressed, biases fp16-rounded for fp16 models."""
        import torch
        from torch import nn

        weights = self.weights(compress)
        net = copy.deepcopy(self.net)
        with torch.no_grad():
            for name, conv in net.named_modules():
                if isinstance(conv, nn.Conv2d):
                    conv.weight.copy_(torch.from_numpy(weights[name].astype(np.float32)))
                    if self.half and conv.bias is not None:
                        conv.bias.copy_(torch.from_numpy(_fp16(conv.bias.detach().float().numpy())))
        return net


def _outputs(net, inputs: np.ndarray) -> np.ndarray:
    from u2zoo.runtime.pipeline import run_batched
    from u2zoo.zoo.reference import TorchPredictor

    return run_batched(TorchPredictor(net), inputs)


def plan_compression(
    model, options: WeightCompression, inputs: np.ndarray, reference: np.ndarray | None = None
) -> CompressionPlan:
    """Fold BN, compress every conv weight of more than WEIGHT_THRESHOLD elements exactly as
    Core ML will, and measure the result on ``inputs`` against the float model.

    When the fully compressed model misses the target (IoU@0.5 ≥ COMPRESSION_TARGET_IOU, the
    bar ``u2zoo convert`` sets for int8 weights), find the weights that hurt most and keep up
    to MAX_KEPT of them in float, most harmful first, until the target is met: each layer
    group compressed alone, then each tensor of the SCANNED_GROUPS worst groups alone, on the
    first SCAN_IMAGES inputs at half resolution.

    Real U2NETP needs this: in ``stage2d.rebnconv1d`` one input channel has weights up to 5.6
    where the others stay below 0.16, so per-output-channel int8 (step 5.6/127) rounds the
    others to zero, and its biases (up to 1361) leave what follows to cancel large values.
    Every weight in int8: IoU@0.5 0.72 on the sample photos; that one tensor kept in fp16: 0.992.
    """
    from torch import nn

    net = copy.deepcopy(model).eval()
    _fold_batchnorm(net)
    half = options.precision in ("fp16", "int8-weights")
    stored = {}
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d):
            weight = conv.weight.detach().float().numpy()
            stored[name] = weight.astype(np.float16) if half else weight  # Core ML compresses the fp16 weights
    candidates = [n for n, w in stored.items() if w.size > WEIGHT_THRESHOLD] if options.compression else []
    plan = CompressionPlan(net, half, stored, {n: _compress(stored[n], options) for n in candidates})
    if options.precision == "fp32" and not candidates:
        return plan  # nothing changes
    reference = _outputs(model, inputs) if reference is None else reference
    plan.parity = compare(reference, _outputs(plan.model(), inputs))
    if candidates and plan.parity.iou50 < COMPRESSION_TARGET_IOU:
        keep_harmful(plan, model, inputs, reference)
    return plan


def keep_harmful(plan: CompressionPlan, model, inputs: np.ndarray, reference: np.ndarray) -> None:
    """Rank the compressed tensors by the harm each does alone and keep the worst in float,
    one by one, until the plan meets the target or MAX_KEPT are kept (see plan_compression)."""
    # the scan only ranks: the first images, every other pixel (4× cheaper); the final
    # check below runs on every input at full size
    scan = np.ascontiguousarray(inputs[:SCAN_IMAGES, :, ::2, ::2])
    scan_reference = _outputs(model, scan)

    def alone(names: list[str]) -> float:
        return compare(scan_reference, _outputs(plan.model(compress=names), scan)).mean_abs

    groups: dict[str, list[str]] = {}
    for name in plan.compressed:
        groups.setdefault(_group(name), []).append(name)
    by_group = {group: alone(names) for group, names in groups.items()}
    worst = sorted(by_group, key=lambda g: -by_group[g])[:SCANNED_GROUPS]
    by_tensor = {name: alone([name]) for group in worst for name in groups[group]}
    plan.sensitivity = {
        "groups": {g: round(e, 5) for g, e in by_group.items()},
        "tensors": {n: round(e, 5) for n, e in by_tensor.items()},
    }
    for name in sorted(by_tensor, key=lambda n: -by_tensor[n])[:MAX_KEPT]:
        plan.kept.append(name)
        plan.parity = compare(reference, _outputs(plan.model(), inputs))
        if plan.parity.iou50 >= COMPRESSION_TARGET_IOU:
            break


def compression_error(plan: CompressionPlan, options: WeightCompression, images: list[Path]) -> dict[str, Any]:
    """The plan's measured error, as the manifest records it."""
    if plan.parity is None:
        return {"method": "none", "note": "fp32 weights are stored unchanged"}
    method = {"fp16": "fp16 weights", "int8-weights": "int8 per-channel weights (fp16 model)"}[options.precision]
    if options.palettize:
        method = f"{options.palettize}-bit k-means palettes per tensor ({options.precision} model)"
    parity = plan.parity
    result = {
        "method": method,
        "max_abs": parity.max_abs,
        "mean_abs": parity.mean_abs,
        "iou50": parity.iou50,
        "num_images": parity.num_images,
        "images": [p.name for p in images],
        "note": "weights only, simulated in torch; fp16 arithmetic is measured by the parity check on macOS",
    }
    if options.compression:
        result |= {
            "weight_threshold": WEIGHT_THRESHOLD,
            "compressed": len(plan.compressed) - len(plan.kept),
            "kept_in_float": plan.kept,
            "target": f"IoU@0.5 >= {COMPRESSION_TARGET_IOU:g}",
            "within_target": parity.iou50 >= COMPRESSION_TARGET_IOU,
        }
        if plan.sensitivity:
            result["sensitivity_mean_abs"] = plan.sensitivity
    return result


def require_sklearn() -> None:
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise BackendUnavailable("--palettize needs scikit-learn (k-means)", extra="coreml")
