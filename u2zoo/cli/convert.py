"""``u2zoo convert``: its flags (every target option) and its report of the artifact and its parity."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from u2zoo.cli.common import AddVerb, add_auto_fp_args, csv_list
from u2zoo.cli.task_args import add_contract_arg, add_weights_args
from u2zoo.errors import ConfigError, U2ZooError
from u2zoo.runtime.precisions import DEFAULT_PRECISION, PRECISIONS

# precision flags of `convert` (fp32 is the default, no flag); each is the precision's name
_PRECISION_FLAGS = tuple(name for name in PRECISIONS if name != DEFAULT_PRECISION)


def _target_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user actually set: a target that lacks one must say so."""
    options: dict[str, Any] = {}
    chosen = [flag for flag in _PRECISION_FLAGS if getattr(args, flag.replace("-", "_"))]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join('--' + f for f in chosen)} exclude each other")
    if chosen:
        options["precision"] = chosen[0]
    for flag in target_flags():
        value = getattr(args, flag.name)
        if value is not None and value is not False:  # 0 is a value the target must judge
            options[flag.name] = tuple(csv_list(value)) if flag.kind is tuple else value
    return options


@dataclasses.dataclass(frozen=True)
class TargetFlag:
    """One ``convert`` flag made from a target option field (all its declarations agree: they
    come from one factory in ``converters.options``)."""

    field: dataclasses.Field
    kind: type  # bool, int, float, str, or tuple (a comma-separated list)
    targets: tuple[str, ...]  # the targets that have it

    @property
    def name(self) -> str:
        return self.field.name


def _kind(annotation: Any) -> type:
    for kind in (bool, int, float, tuple):
        if annotation is kind or kind in typing.get_args(annotation) or typing.get_origin(annotation) is kind:
            return kind
    return str


def target_flags() -> list[TargetFlag]:
    """Every target option field that is a flag, in registration order."""
    from u2zoo.converters import TARGETS
    from u2zoo.converters.options import cli_fields, field_types

    first: dict[str, tuple[dataclasses.Field, type]] = {}
    owners: dict[str, list[str]] = {}
    for spec in TARGETS.values():
        types = field_types(spec.options_type)
        for field in cli_fields(spec.options_type):
            first.setdefault(field.name, (field, _kind(types[field.name])))
            owners.setdefault(field.name, []).append(spec.name)
    return [TargetFlag(field, kind, tuple(owners[name])) for name, (field, kind) in first.items()]


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """One flag per target option; one that not every target has names its targets."""
    from u2zoo.converters import TARGETS
    from u2zoo.converters.options import flag_of

    for flag in target_flags():
        help_text = flag.field.metadata["help"]
        if len(flag.targets) < len(TARGETS):
            help_text += f" [{', '.join(flag.targets)}]"
        if flag.kind is bool:
            p.add_argument(flag_of(flag.field), dest=flag.name, action="store_true", help=help_text)
        else:
            p.add_argument(
                flag_of(flag.field),
                dest=flag.name,
                type=flag.kind if flag.kind in (int, float) else str,
                help=help_text,
            )


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
    from u2zoo.conversion import convert_model
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


def _when_used(p: argparse.ArgumentParser, setup) -> None:
    """Run ``setup(p)`` the first time ``p`` parses or prints help, not when the CLI is built:
    the target flags import every target module (and torch), which ``u2zoo --help``, ``report``
    or ``fetch`` should not pay for."""
    parse, help_text = p.parse_known_args, p.format_help
    done: list[bool] = []

    def ensure() -> None:
        if not done:
            done.append(True)
            setup(p)

    def parse_known_args(args=None, namespace=None):  # argparse calls this for the verb's own arguments
        ensure()
        return parse(args, namespace)

    def format_help() -> str:
        ensure()
        return help_text()

    p.parse_known_args = parse_known_args  # type: ignore[method-assign]
    p.format_help = format_help  # type: ignore[method-assign]


def _add_registry_flags(p: argparse.ArgumentParser) -> None:
    from u2zoo.converters import TARGETS

    next(a for a in p._actions if a.dest == "target").help = f"{', '.join(TARGETS)} (see `u2zoo doctor`)"
    add_target_flags(p)


def add_convert(add: AddVerb) -> None:
    p = add("convert", cmd_convert, "convert a model for a target; the artifact is verified in its runtime")
    p.add_argument("--model", required=True, help="architecture or weights name (see `u2zoo models`)")
    add_weights_args(p)
    add_contract_arg(p)
    p.add_argument("--target", required=True, help="the target (see `u2zoo doctor`)")
    for name in _PRECISION_FLAGS:
        p.add_argument(PRECISIONS[name].flag, action="store_true", help=PRECISIONS[name].help)
    _when_used(p, _add_registry_flags)  # every target option's flag, from the registry
    add_auto_fp_args(p)
    p.add_argument("--parity-images", help="folder of photos for the parity check (default: bundled samples)")
    p.add_argument("--out", required=True, help="output folder")
