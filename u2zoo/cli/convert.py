"""``u2zoo convert``: its flags (every target option) and its report of the artifact and its parity."""

from __future__ import annotations

import argparse
from typing import Any

from u2zoo.cli.common import AddVerb, add_auto_fp_args, csv_list
from u2zoo.errors import ConfigError, U2ZooError
from u2zoo.tasks.cli_args import add_contract_arg, add_weights_args

# precision flags of `convert`; each one is also the precision's name in manifests and bench
_PRECISION_FLAGS = ("fp16", "int8", "int8-qat", "dynamic-int8", "int8-weights")


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user actually set: a target that lacks one must say so."""
    options: dict[str, Any] = {}
    chosen = [flag for flag in _PRECISION_FLAGS if getattr(args, flag.replace("-", "_"))]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join('--' + f for f in chosen)} exclude each other")
    if chosen:
        options["precision"] = chosen[0]
    for name in (
        "dynamic",
        "opset",
        "batch",
        "height",
        "width",
        "exporter",
        "calib",
        "calib_size",
        "calib_method",
        "keep_fp",
        "accuracy_control",
        "max_drop",
        "bias_correction",
        "int8_scheme",
        "nhwc",
        "palettize",
        "image_input",
        "deployment_target",
        "device",
        "min_batch",
        "opt_batch",
        "max_batch",
        "workspace_mb",
        "timing_cache",
        "onnx",
        "compile_mode",
        "qat_epochs",
        "qat_lr",
    ):
        value = getattr(args, name)
        if value is not None and value is not False:  # 0 is a value the target must judge
            options[name] = value
    if args.keep_fp_groups:
        options["keep_fp_groups"] = tuple(csv_list(args.keep_fp_groups))
    return options


def _auto_fp_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Only what the user set, so that convert can refuse them for a non-INT8 precision."""
    kwargs: dict[str, Any] = {} if args.auto_fp else {"auto_fp": False}
    if args.fp_budget is not None:
        kwargs["fp_budget"] = args.fp_budget
    return kwargs


def _print_auto_fp(record: dict[str, Any] | None) -> None:
    if not record or record.get("status") == "off":
        return
    for step in record["steps"]:
        groups = ", ".join(step["keep_fp_groups"]) or "none (all INT8)"
        speed = f", p50 {step['p50_ms']:.1f} ms" if "p50_ms" in step else ""
        parity = step["parity"]
        iou = f"IoU@0.5 {parity['iou50']:.4f}" if parity.get("iou50") is not None else "not converted"
        verdict = "passed" if step["passed"] else "failed"
        if "screened" in step:
            verdict += " (screened, not built)"
        print(f"int8 float fallback: float [{groups}] ({step['float_macs']:.1%} of MACs): {iou}{speed} — {verdict}")
    if record["kept_in_float"] is not None:
        print(
            f"int8 float fallback: kept [{', '.join(record['kept_in_float']) or 'nothing'}] in float "
            f"({record['float_macs']:.1%} of MACs)"
        )


def cmd_convert(args: argparse.Namespace) -> int:
    from u2zoo.convert import convert_model
    from u2zoo.zoo.images import list_images

    images = list_images([args.parity_images]) if args.parity_images else None
    if args.parity_images and not images:
        raise U2ZooError(f"no images in {args.parity_images}")
    artifact = convert_model(
        args.model,
        args.target,
        args.out,
        weights=args.weights,
        weights_sha256=args.weights_sha256,
        random_weights=args.random_weights,
        contract_variant=args.contract,
        parity_images=images,
        progress=not args.quiet,
        **_auto_fp_kwargs(args),
        **_target_options(args),
    )
    parity = artifact.manifest["parity"]
    _print_auto_fp(artifact.manifest.get("auto_fp"))
    print(
        f"wrote {artifact.path} ({artifact.manifest['files'][0]['size'] / 1e6:.2f} MB) and {artifact.manifest_path.name}"
    )
    for line in artifact.manifest.get("validation", {}).get("summary", {}).items():
        print(f"validated: {line[0]}: {line[1]}")
    if parity.get("status") == "not_run":
        print(f"parity vs torch: NOT RUN — {parity['reason']} (run `u2zoo bench` there to measure it)")
        return 0
    print(
        f"parity vs torch on {parity['num_images']} image(s): max abs {parity['max_abs']:.3g}, "
        f"mean abs {parity['mean_abs']:.3g}, IoU@0.5 {parity['iou50']:.4f} — ok"
    )
    if "odd_shape" in parity:
        odd = parity["odd_shape"]
        print(f"dynamic shape check {odd['shape']}: max abs {odd['max_abs']:.3g} — ok")
    return 0


def add_convert(add: AddVerb) -> None:
    p = add("convert", cmd_convert, "convert a model for a target; the artifact is verified in its runtime")
    p.add_argument("--model", required=True, help="architecture or weights name (see `u2zoo models`)")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--target", required=True, help="onnx, … (see `u2zoo doctor`)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and arithmetic")
    p.add_argument("--int8", action="store_true", help="int8 weights and activations (calibrated with --calib)")
    p.add_argument(
        "--int8-qat",
        action="store_true",
        help="int8 by quantization-aware fine-tuning against the float model (--calib): "
        "openvino (NNCF) or onnx (pt2e, a symmetric QDQ graph)",
    )
    p.add_argument("--qat-epochs", type=int, help="int8-qat: fine-tuning epochs (default 2)")
    p.add_argument("--qat-lr", type=float, help="int8-qat: Adam learning rate (default 2e-6)")
    p.add_argument(
        "--dynamic-int8",
        action="store_true",
        help="tflite: dynamic-range quantization (int8 weights, activations quantized at run time)",
    )
    p.add_argument(
        "--int8-weights", action="store_true", help="coreml/tflite: int8 weight-only compression (float arithmetic)"
    )
    p.add_argument("--dynamic", action="store_true", help="dynamic batch, height and width")
    p.add_argument("--nhwc", action="store_true", help="tflite: channels-last input and output (NHWC)")
    p.add_argument("--palettize", type=int, help="coreml: k-means palettize weights to N bits (1, 2, 3, 4, 6, 8)")
    p.add_argument(
        "--image-input",
        action="store_true",
        help="coreml: ImageType input (the app passes a 320×320 RGB image; scale/bias are in the model)",
    )
    p.add_argument("--deployment-target", help="coreml: minimum deployment target, e.g. iOS16 (default), macOS13")
    p.add_argument("--opset", type=int, help="ONNX opset (≥ 17)")
    p.add_argument("--batch", type=int, help="static batch size")
    p.add_argument("--height", type=int, help="static input height (default: the contract's)")
    p.add_argument("--width", type=int, help="static input width (default: the contract's)")
    p.add_argument("--exporter", help="ONNX exporter: torchscript (default, fast) or dynamo")
    p.add_argument("--calib", help="int8: folder of calibration images (or a dumped .npz)")
    p.add_argument(
        "--calib-size",
        type=int,
        help="int8: N calibration images (default 256; a larger folder is sampled with a fixed seed)",
    )
    p.add_argument("--calib-method", help="int8: minmax (default), entropy or percentile")
    p.add_argument("--keep-fp", type=int, help="int8: keep the N most sensitive layer groups in float")
    p.add_argument("--keep-fp-groups", help="int8: comma-separated layer groups to keep in float")
    add_auto_fp_args(p)
    p.add_argument(
        "--int8-scheme",
        help="onnx int8: u8s8-reduce-range (default, fast on AVX2), s8s8, or tensorrt "
        "(symmetric Q/DQ that TensorRT builds from)",
    )
    p.add_argument("--device", help="aoti/torch/torch-compile: cpu (default) or cuda")
    p.add_argument("--min-batch", type=int, help="tensorrt: smallest batch of the optimization profile (default 1)")
    p.add_argument("--opt-batch", type=int, help="tensorrt: batch the engine is tuned for (default 8)")
    p.add_argument("--max-batch", type=int, help="tensorrt/aoti: largest batch (default 16)")
    p.add_argument("--workspace-mb", type=int, help="tensorrt: builder workspace limit in MB")
    p.add_argument(
        "--timing-cache",
        help="tensorrt: timing cache file reused across builds (default: <U2ZOO_HOME>/tensorrt/timing.cache)",
    )
    p.add_argument("--onnx", help="tensorrt: build from this ONNX (fp32, fp16, or Q/DQ int8 made elsewhere)")
    p.add_argument("--compile-mode", help="torch-compile: default, reduce-overhead or max-autotune")
    p.add_argument(
        "--accuracy-control",
        action="store_true",
        help="openvino int8: nncf.quantize_with_accuracy_control on the parity metric",
    )
    p.add_argument("--max-drop", type=float, help="openvino int8 accuracy control: allowed drop (default 0.01)")
    p.add_argument(
        "--bias-correction",
        action="store_true",
        help="openvino int8: NNCF's fast bias correction (off by default: it worsened U2NETP's parity)",
    )
    p.add_argument("--parity-images", help="folder of photos for the parity check (default: bundled samples)")
    p.add_argument("--out", required=True, help="output folder")
