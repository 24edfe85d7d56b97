"""Verbs about the zoo itself: ``models``, ``fetch``, ``doctor``, ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from u2zoo.cli.common import AddVerb
from u2zoo.cli.task_args import add_contract_arg


def cmd_models(args: argparse.Namespace) -> int:
    from u2zoo.zoo.archs import ARCHS, build_arch, count_macs, count_params
    from u2zoo.zoo.weights import DEFAULT, REGISTRY

    print(f"{'architecture':<12} {'params':>12} {'GMACs@320':>10}  description")
    for name, spec in ARCHS.items():
        model = build_arch(name)
        macs = f"{count_macs(model) / 1e9:10.2f}" if not args.no_macs else f"{'-':>10}"
        print(f"{name:<12} {count_params(model):>12,} {macs}  {spec.description}")
    print(f"\n{'weights':<22} {'arch':<10} {'task':<17} {'hash':<22} {'here':<8} license")
    for entry in REGISTRY.values():
        digest = (
            f"sha256:{entry.sha256[:12]}"
            if entry.sha256
            else (f"md5:{entry.md5[:12]}" if entry.md5 else "none published")
        )
        here = "shipped" if entry.bundled else ("cached" if entry.cache_path().is_file() else "-")
        print(f"{entry.name:<22} {entry.arch:<10} {entry.task:<17} {digest:<22} {here:<8} {entry.license}")
    from u2zoo.zoo.default_model import choose_default

    print(f"\n--model u2netp uses {DEFAULT['u2netp']} (shipped); with no --model: {choose_default().describe()}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    """Registered weights into the cache, or with --index a release file (path printed alone on
    stdout, so that ``--artifact "$(u2zoo fetch -q --index …)"`` works)."""
    import sys

    from u2zoo.errors import ConfigError

    if args.index:
        from u2zoo.release.fetch import fetch_artifact

        if not (args.target and args.precision):
            raise ConfigError("--index needs --target and --precision (which file of the release)")
        if args.source:
            raise ConfigError("--from fetches registered weights; with --index the release says where files are")
        artifact, entry = fetch_artifact(
            args.index, args.name, args.target, args.precision, args.version, progress=not args.quiet
        )
        if not args.quiet:
            print(
                f"{entry['name']} {entry['target']} {entry['precision']} v{entry['version']} ({entry['status']}): "
                "verified against the index and its manifest",
                file=sys.stderr,
            )
        print(artifact.path)
        return 0
    if args.target or args.precision or args.version:
        raise ConfigError("--target, --precision and --version select a release file: give --index too")
    from u2zoo.zoo.weights import fetch, find_entry

    path = fetch(find_entry(args.name), args.source, progress=not args.quiet)
    print(f"{args.name}: verified and cached at {path}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    from u2zoo.artifact import tool_versions
    from u2zoo.converters import PLUGIN_FAILURES, TARGETS
    from u2zoo.zoo.weights import REGISTRY, cache_dir

    core = tool_versions("torch", "numpy", "pillow", "scikit-image", "tqdm", "filelock")
    print(f"python {platform.python_version()} on {platform.system()} {platform.machine()}")
    print("core: " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in core.items()))
    from u2zoo.gpu import cuda_device_info, cuda_unavailable_reason

    no_gpu = cuda_unavailable_reason()
    print(f"cuda: {no_gpu}" if no_gpu else "cuda: " + ", ".join(f"{k} {v}" for k, v in cuda_device_info().items()))
    print("\ntargets:")
    for spec in TARGETS.values():
        reason = spec.unavailable_reason()
        versions = tool_versions(*[m.replace("_", "-") for m in spec.requires])
        detail = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
        if reason and not spec.missing_modules():
            state = f"convert only (artifacts are validated, not run): {reason}"
        else:
            state = "ok" if reason is None else "unavailable: " + reason
        print(f"  {spec.name:<13} {'/'.join(spec.devices):<8} {state}  [{detail}]")
        if spec.handoff and reason:
            print(
                f"  {'':<13} {'':<8} without it, `u2zoo convert --target {spec.name}` still writes the proven "
                "ONNX and the command that finishes the build on the device"
            )
    for name, why in PLUGIN_FAILURES.items():
        print(f"  {name:<13} {'':<8} plugin failed to load: {why}")
    print("\nfeatures:")
    for feature, package, extra in (
        ("prune", "torch-pruning", "prune"),
        ("onnx --int8-qat", "torchao", "qat"),
        ("report plots", "matplotlib", "report"),
        ("portrait (face crop)", "opencv-python-headless", "portrait"),
        ("masks (GrabCut)", "opencv-python-headless", "portrait"),
        ("portrait --align", "dlib", "landmarks"),
        ("--alpha-matting", "pymatting", "matting"),
        ("--decontaminate", "pymatting", "matting"),
        ("--crf", "pydensecrf2", "crf"),
        ("video", "av", "video"),
    ):
        version = tool_versions(package)[package]
        state = f"ok [{package} {version}]" if version else f"unavailable: pip install 'u2zoo[{extra}]'"
        print(f"  {feature:<22} {state}")
    print(f"  {'--upscale (SR)':<22} {_upscale_state()}")
    for feature, packages, extra in (
        ("serve (ASGI, metrics)", ("fastapi", "uvicorn", "prometheus-client"), "serve"),
        ("predict --engine ray", ("ray", "pyarrow"), "ray"),
        ("publish --push hf://", ("huggingface-hub", "matplotlib"), "publish"),
    ):
        versions = tool_versions(*packages)
        missing = [name for name, version in versions.items() if not version]
        found = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
        state = (
            f"ok [{found}]"
            if not missing
            else f"unavailable: {', '.join(missing)} missing; pip install 'u2zoo[{extra}]'"
        )
        print(f"  {feature:<22} {state}")
    shipped = [e.name for e in REGISTRY.values() if e.bundled and e.cache_path().is_file()]
    cached = [e.name for e in REGISTRY.values() if not e.bundled and e.cache_path().is_file()]
    print(f"\nweights shipped in the package: {', '.join(shipped) or 'none (a broken install?)'}")
    print(f"weights cache: {cache_dir() / 'weights'} ({', '.join(cached) or 'empty'})")
    if not cached:
        print(
            "  other weights: `u2zoo fetch u2net` (official U2NET, needs network), or "
            "`u2zoo fetch NAME --from PATH` for a copy you have (`u2zoo models` lists the names)"
        )
    from u2zoo.zoo.default_model import choose_default

    print(choose_default().describe())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default (the best shipped saliency model, or ``--model``) → ONNX → masks,
    cut-outs and one contact sheet of bundled sample photos; offline."""
    from u2zoo.conversion import convert_model
    from u2zoo.converters import get_target
    from u2zoo.tasks.contact_sheet import write_contact_sheet
    from u2zoo.tasks.engine import Segmenter
    from u2zoo.tasks.folder import process_files
    from u2zoo.tasks.outputs import OutputOptions
    from u2zoo.zoo.default_model import choose_default
    from u2zoo.zoo.reference import sample_images
    from u2zoo.zoo.weights import cache_dir, cached_entries, resolve_model_name

    out = Path(args.out)
    if args.model is None:
        choice = choose_default()
        print(choice.describe())
        args.model = choice.name
    arch, entry = resolve_model_name(args.model)
    usable = [entry] if entry and entry.cache_path().is_file() else cached_entries(arch)
    if usable:
        model, random_weights = usable[0].name, False
        print(f"weights: {model} ({'shipped in the package' if usable[0].bundled else 'from the cache'})")
    else:
        model, random_weights = arch, True
        print(
            f"NOTE: no {arch} weights in {cache_dir() / 'weights'}: this demo runs on RANDOM weights, so the "
            f"masks are meaningless. Get real ones with `u2zoo fetch {arch}` (needs network), or run "
            "`u2zoo demo` without --model: its default's weights ship in the package."
        )
    artifact = convert_model(
        model,
        "onnx",
        out / "artifacts",
        random_weights=random_weights,
        dynamic=True,
        contract_variant=args.contract,
        progress=not args.quiet,
    )
    parity = artifact.manifest["parity"]
    print(
        f"ONNX artifact: {artifact.path} ({artifact.contract.variant} contract) — parity vs torch max abs "
        f"{parity['max_abs']:.3g}, IoU@0.5 {parity['iou50']:.4f}"
    )
    photos = sample_images()
    with get_target("onnx").runner(artifact) as runner:
        report = process_files(
            Segmenter(runner, artifact.contract),
            photos,
            out / "masks",
            OutputOptions(kinds=("mask", "cutout")),
            progress=not args.quiet,
        )
    print(f"masks and cut-outs of {len(photos)} sample photos: {out / 'masks'} ({len(report.written)} files)")
    if report.failed:
        return 1
    sheet = write_contact_sheet(
        photos,
        out / "masks",
        out / "contact_sheet.png",
        f"u2zoo demo: {model} ({'random weights' if random_weights else 'real weights'}), "
        f"ONNX Runtime, {artifact.contract.variant} contract",
    )
    print(f"contact sheet (photo | mask | cut-out): {sheet}")
    return 0


def add_models(add: AddVerb) -> None:
    p = add("models", cmd_models, "list architectures (params, GMACs measured) and registered weights")
    p.add_argument("--no-macs", action="store_true", help="skip the MAC count (faster)")


def add_fetch(add: AddVerb) -> None:
    p = add(
        "fetch",
        cmd_fetch,
        "download registered weights (or import with --from), or with --index a release file, verified and cached",
    )
    p.add_argument("name", help="registered weights name, or with --index the model name in the release")
    p.add_argument("--from", dest="source", help="a local file or URL to take the weights from")
    p.add_argument("--index", metavar="URL_OR_PATH", help="a release's index.json (http(s)/file URL or path)")
    p.add_argument("--target", help="with --index: the target, e.g. tflite")
    p.add_argument("--precision", help="with --index: the precision, e.g. int8")
    p.add_argument("--version", help="with --index: the release version (default: the newest)")


def add_doctor(add: AddVerb) -> None:
    add("doctor", cmd_doctor, "which backends are installed, their versions, and what to install")


def add_demo(add: AddVerb) -> None:
    p = add(
        "demo", cmd_demo, "offline demo: the best shipped model → ONNX → masks and a contact sheet of sample photos"
    )
    p.add_argument(
        "--model", help="model or weights name (default: the best shipped saliency model, printed with the reason)"
    )
    add_contract_arg(p)
    p.add_argument("--out", default="u2zoo-demo", help="output folder (default: ./u2zoo-demo)")


def _upscale_state() -> str:
    """Whether ``--upscale`` can run: spandrel imports (torchvision with or without its ops)."""
    from u2zoo.artifact import tool_versions
    from u2zoo.errors import BackendUnavailable
    from u2zoo.tasks.upscale import import_spandrel, torchvision_ops_missing

    versions = tool_versions("spandrel", "torchvision")
    try:
        import_spandrel()
    except BackendUnavailable:
        return "unavailable: pip install 'u2zoo[sr]'"
    except Exception as exc:  # a broken torchvision beyond the known case: say what, not a traceback
        return f"unavailable: spandrel does not import ({type(exc).__name__}: {str(exc)[:120]})"
    stand_in = (
        " without its compiled ops (a CUDA build beside a CPU torch): SR does not use them"
        if torchvision_ops_missing()
        else ""
    )
    return f"ok [spandrel {versions['spandrel']}, torchvision {versions['torchvision']}{stand_in}]"
