"""A release's ``README.md``: a model card in the Hugging Face format (YAML front matter with
license, tags, ``pipeline_tag`` and a ``model-index`` whose metrics are the index's own), then
the matrix, how to load each file, provenance and limits. Built only from ``index.json``, so the
card can never say something the index does not."""

from __future__ import annotations

import json
from typing import Any

# Accuracy metrics a card lists, in order: (index key, model-index metric type, shown name)
CARD_METRICS = (("mae", "mae", "MAE"), ("max_f", "max_f", "max F-measure"), ("s_measure", "s_measure", "S-measure"))
_TARGET_TAGS = {
    "onnx": "onnx",
    "openvino": "openvino",
    "tflite": "tflite",
    "coreml": "coreml",
    "executorch": "executorch",
    "tensorrt": "tensorrt",
    "ncnn": "ncnn",
    "mnn": "mnn",
}


def metric_config(entry: dict[str, Any]) -> str:
    """How a model-index metric names its file: ``target-precision`` (and the model when a
    release holds several)."""
    return f"{entry['name']}/{entry['target']}-{entry['precision']}"


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _dataset(entry: dict[str, Any]) -> dict[str, str]:
    data = (entry.get("accuracy") or {}).get("data") or {}
    images = data.get("images") or "unnamed images"
    name = data.get("dataset") or images.split("/")[0]
    return {
        "name": f"{name} ({data.get('count', '?')} images of {images})",
        "type": name.lower().replace(" ", "-"),
        "split": data.get("split") or _split(images),
    }


def _split(images: str) -> str:
    parts = images.split("/")
    return next((p for p in parts if p in ("train", "val", "test")), "unknown")


def front_matter(index: dict[str, Any], license_id: str) -> str:
    entries = index["entries"]
    tags = ["u2net", "salient-object-detection", "background-removal", "u2zoo"]
    tags += sorted({_TARGET_TAGS.get(e["target"], e["target"]) for e in entries})
    lines = ["---", f"license: {license_id}", "library_name: u2zoo", "pipeline_tag: image-segmentation", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    measured = [e for e in entries if e.get("accuracy")]
    if measured:
        lines += ["model-index:", f"- name: {_yaml_str(index['release']['name'])}", "  results:"]
        for entry in measured:
            dataset = _dataset(entry)
            lines += [
                "  - task:",
                "      type: image-segmentation",
                "      name: Salient object segmentation",
                "    dataset:",
                f"      name: {_yaml_str(dataset['name'])}",
                f"      type: {_yaml_str(dataset['type'])}",
                f"      split: {_yaml_str(dataset['split'])}",
                "    metrics:",
            ]
            for key, kind, shown in CARD_METRICS:
                value = entry["accuracy"].get(key)
                if value is None:
                    continue
                label = f"{shown} ({entry['target']} {entry['precision']})"
                lines += [
                    f"    - type: {kind}",
                    f"      value: {value!r}",
                    f"      name: {_yaml_str(label)}",
                    f"      config: {_yaml_str(metric_config(entry))}",
                    "      verified: false",
                ]
    lines.append("---")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _matrix(entries: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| model | target | precision | status | file | MB | max abs vs torch | IoU@0.5 vs torch | MAE (GT) "
        "| max F (GT) | p50 ms | FPS | measured on |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        parity, accuracy, speed = e.get("parity") or {}, e.get("accuracy") or {}, e.get("speed") or {}
        machine = speed.get("machine") or {}
        where = f"{machine.get('cpu')} ({machine.get('cores')} cores, {speed.get('device')})" if speed else "–"
        rows.append(
            f"| {e['name']} | {e['target']} | {e['precision']} | {e['status']} | `{e['file']}` "
            f"| {e['size_bytes'] / 1e6:.2f} | {_fmt(parity.get('max_abs'), '.3g')} | {_fmt(parity.get('iou50'), '.3f')} "
            f"| {_fmt(accuracy.get('mae'), '.4f')} | {_fmt(accuracy.get('max_f'), '.3f')} "
            f"| {_fmt(speed.get('latency_ms_p50'), '.1f')} | {_fmt(speed.get('fps'), '.1f')} | {where} |"
        )
    return rows


def _contract_lines(entry: dict[str, Any]) -> list[str]:
    pre, post = entry["contract"].get("pre", {}), entry["contract"].get("post", {})
    scale = "divided by the image's own maximum" if pre.get("scale") == "image_max" else f"scaled ({pre.get('scale')})"
    dtype = (entry.get("io") or {}).get("inputs", [{}])[0].get("dtype", pre.get("dtype"))
    return [
        f"- **Input**: {pre.get('color')} resized to {pre.get('size')} (height, width), {pre.get('resize_filter')}"
        f"{' with antialiasing' if pre.get('antialias') else ', no antialiasing'}; {scale}; normalised with mean "
        f"{pre.get('mean')} and std {pre.get('std')}; layout {pre.get('layout')}, {dtype}.",
        f"- **Output**: the fused side output ({post.get('output')}), a 0–1 saliency map; min-max normalised "
        f"per image ({post.get('normalize')}), then resized back to the photo ({post.get('resize_filter')}). "
        "Threshold 0.5 for a binary mask.",
    ]


def _how_to_load(entries: list[dict[str, Any]]) -> list[str]:
    by_target = {e["target"]: e for e in entries}
    runnable = [e for e in entries if e["status"] == "ok"] or entries
    first = next((e for e in runnable if e["target"] == "onnx"), runnable[0])
    lines = [
        "## How to load",
        "",
        "Fetch a verified file from this release's index, then run it (Python):",
        "",
        "```bash",
        f"u2zoo fetch --index https://…/index.json {first['name']} --target {first['target']} "
        f"--precision {first['precision']}",
        'u2zoo predict --artifact "$(u2zoo fetch --index https://…/index.json '
        f'{first["name"]} --target {first["target"]} --precision {first["precision"]} -q)" photos/ --out masks/',
        "```",
        "",
        "```python",
        "import u2zoo",
        "",
        "# checks the manifest beside the file, then runs it in its own runtime",
        f'mask = u2zoo.segment("photo.jpg", model="{first["file"]}")  # 0–1 map at the photo\'s size',
        "```",
    ]
    if "onnx" in by_target:
        e = by_target["onnx"]
        lines += [
            "",
            "Plain ONNX Runtime (the pre/post below is the whole contract):",
            "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            f'session = ort.InferenceSession("{e["file"]}")',
            "x = ...  # (1, 3, H, W) float32, preprocessed as described under Pre- and post-processing",
            "d0 = session.run(None, {session.get_inputs()[0].name: x})[0][0, 0]",
            "mask = (d0 - d0.min()) / (d0.max() - d0.min() + 1e-8)",
            "```",
        ]
    tflite = [e for e in entries if e["target"] == "tflite"]
    if tflite:
        e = tflite[0]
        lines += [
            "",
            "**Android (TFLite, LiteRT)**: feed the image preprocessed as under *Pre- and post-processing* "
            "in the tensor's dtype, read the first output (the fused map) and min-max it:",
            "",
            *(f"- `{t['file']}`: {_tensor_line(t)}" for t in tflite),
            "",
            "```kotlin",
            f'val interpreter = Interpreter(FileUtil.loadMappedFile(context, "{e["file"].split("/")[-1]}"))',
            "interpreter.run(inputBuffer, outputBuffer)  // inputBuffer: normalised with the mean/std below",
            "```",
        ]
    if "coreml" in by_target:
        e = by_target["coreml"]
        lines += [
            "",
            f"**iOS / macOS (Core ML)**: unzip `{e['file']}` to `{(e.get('packaging') or {}).get('unpacks_to')}`, "
            "add it to the Xcode project (Xcode compiles it), or compile at run time:",
            "",
            "```swift",
            "let url = try MLModel.compileModel(at: packageURL)  // the unzipped .mlpackage",
            "let model = try MLModel(contentsOf: url)",
            "```",
        ]
    if "executorch" in by_target:
        e = by_target["executorch"]
        lines += [
            "",
            f"**ExecuTorch** (Android/iOS/embedded): `{e['file']}`:",
            "",
            "```python",
            "from executorch.runtime import Runtime",
            f'program = Runtime.get().load_program("{e["file"].split("/")[-1]}")',
            'd0 = program.load_method("forward").execute([x])[0]',
            "```",
        ]
    if "tensorrt" in by_target:
        e = by_target["tensorrt"]
        script = (e.get("handoff") or {}).get("script")
        lines += [
            "",
            f"**TensorRT**: engines are tied to one GPU and TensorRT version, so the release holds the "
            f"TensorRT-ready ONNX `{e['file']}` and `{script}`: run the script on the GPU that will serve.",
        ]
    return lines


def _tensor_line(entry: dict[str, Any]) -> str:
    """One file's input and output as an app sees them, with the int8 scale where there is one."""
    io = entry.get("io") or {}
    parts = []
    for side, spec in (("input", (io.get("inputs") or [{}])[0]), ("output", (io.get("outputs") or [{}])[0])):
        text = f"{side} `{spec.get('name')}` {spec.get('dtype')} {spec.get('shape')}"
        quant = spec.get("quantization")
        if quant:
            text += f" (real = (q − {quant['zero_point']}) × {quant['scale']:.6g})"
        parts.append(text)
    return f"{'; '.join(parts)}; layout {entry['layout']}"


def render_card(index: dict[str, Any], license_id: str, plots: list[str]) -> str:
    """The whole README.md of a release."""
    release, entries = index["release"], index["entries"]
    first = entries[0]
    weights = first.get("weights") or {}
    lines = [
        front_matter(index, license_id),
        f"# {release['name']} v{release['version']}",
        "",
        f"U²-Net (Qin et al. 2020) salient-object segmentation, {len(entries)} deployment file(s) published by "
        f"u2zoo {release.get('u2zoo_version')}. Every `ok` file was converted with its real tool, loaded back and "
        "run in its real runtime on the images named below and compared with a fresh PyTorch reference; "
        "files marked `unavailable` were built and validated but could not run here (the reason is given).",
        "",
        f"- **Architecture**: {first.get('arch')} ({_fmt(first.get('num_params'), ',')} parameters)",
        f"- **Weights**: {weights.get('name') or weights.get('file')} (sha256 `{weights.get('sha256')}`)",
        f"- **Licence**: {license_id}",
        "",
        "## Matrix",
        "",
        *_matrix(entries),
        "",
    ]
    lines += _data_lines(entries)
    lines += ["", "## Pre- and post-processing", "", *_contract_lines(first), ""]
    lines += _how_to_load(entries)
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] or [
        "Not made: matplotlib was not installed where this release was published."
    ]
    lines += ["", "## Provenance", ""]
    for e in entries:
        calib = e.get("calibration")
        line = (
            f"- `{e['file']}` ({e['target']} {e['precision']}): sha256 `{e['sha256']}`; bench run "
            f"{(e.get('bench') or {}).get('run_id')}; tools "
            + ", ".join(f"{k} {v}" for k, v in sorted((e.get("tools") or {}).items()) if v)
        )
        if calib:
            line += f"; INT8 calibrated on {calib.get('num_images')} image(s) (named in the index, set sha256 "
            line += f"`{str(calib.get('sha256'))[:12]}…`)"
        lines.append(line)
    lines += ["", "## Limits", ""]
    for e in entries:
        if e["status"] != "ok":
            lines.append(f"- {e['target']} {e['precision']}: {e['status']}: {e.get('note')}")
    lines += [
        "- Speed is a median measured once on the machine named in the matrix; other machines differ.",
        "- Checksums: `sha256sum -c SHA256SUMS` in this folder; `u2zoo fetch` verifies each file against "
        "`index.json` and its manifest before use.",
    ]
    return "\n".join(lines) + "\n"


def _data_lines(entries: list[dict[str, Any]]) -> list[str]:
    measured = [e for e in entries if e.get("accuracy")]
    if not measured:
        return ["No ground truth was given: the accuracy columns are empty; parity is against PyTorch."]
    data = measured[0]["accuracy"].get("data") or {}
    lines = [
        f"Accuracy (MAE, max F) is against the ground-truth masks of `{data.get('gt')}` for the "
        f"{data.get('count')} images of `{data.get('images')}`"
        + (f" ({data['dataset']} {data.get('split') or ''})".replace(" )", ")") if data.get("dataset") else "")
        + ", through the deploy path of the contract below "
        "(contract size, min-max, resize back); parity is each file against PyTorch on the same images."
    ]
    optimistic = measured[0].get("accuracy_caveat")
    if optimistic:
        lines += ["", f"**Caveat**: {optimistic}"]
    return lines
