"""``u2zoo publish``: a release folder (artifacts, manifests, SHA256SUMS, index.json, model card)
from a bench output folder, or from a model after running the matrix; ``--push`` copies it to a
folder or a Hugging Face Hub repo."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from u2zoo.cli.bench import add_matrix_args, run_bench
from u2zoo.cli.common import AddVerb
from u2zoo.errors import ConfigError


def cmd_publish(args: argparse.Namespace) -> int:
    from u2zoo.release.bundle import publish_bench
    from u2zoo.release.push import HUB_PREFIX, push

    if bool(args.bench) == bool(args.model):
        raise ConfigError("give either --bench FOLDER (a bench output) or --model NAME (and --data) to publish")
    if args.push and not args.push.startswith(HUB_PREFIX) and Path(args.push).resolve() == Path(args.out).resolve():
        raise ConfigError("--push names the --out folder itself")
    with tempfile.TemporaryDirectory(prefix="u2zoo-publish-") as scratch:
        bench_dir = Path(args.bench) if args.bench else Path(scratch) / "bench"
        if args.model:
            if args.gate is None:
                args.gate = "default"  # only cells that pass the shipped gates are published
            run_bench(args, bench_dir)
        release = publish_bench(
            bench_dir,
            Path(args.out),
            name=args.name,
            version=args.version,
            license_id=args.license,
            force=args.force,
            dataset=args.dataset,
            split=args.split,
        )
    entries = release.index["entries"]
    print(f"release {release.index['release']['name']} v{args.version}: {release.folder}")
    for entry in entries:
        print(
            f"  {entry['file']}  {entry['target']} {entry['precision']}  {entry['status']}  {entry['size_bytes']:,} B"
        )
    for note in release.notes:
        print(f"note: {note}")
    print(f"  {len(release.files) + 1} files in all, with SHA256SUMS, index.json and README.md (the model card)")
    if args.push:
        where = push(release.folder, args.push, force=args.force)
        print(f"pushed: {where}", file=sys.stderr if args.quiet else sys.stdout)
    return 0


def add_publish(add: AddVerb) -> None:
    p = add(
        "publish",
        cmd_publish,
        "release folder of proven artifacts: manifests, SHA256SUMS, index.json and a model card",
    )
    p.add_argument("--bench", metavar="FOLDER", help="publish the ok cells of this bench output folder")
    p.add_argument("--out", required=True, help="the release folder to write (must be empty unless --force)")
    p.add_argument("--name", help="release name (default: the model names)")
    p.add_argument("--version", default="1", help="release version that `fetch --version` selects (default 1)")
    p.add_argument("--license", help="licence id for the card (default: the weights' registry licence, else other)")
    p.add_argument("--dataset", help="the ground truth's data set, e.g. DUTS-TR (default: its folder's name)")
    p.add_argument("--split", help="its split, e.g. val (default: train/val/test if the folder path names one)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (and --push folder)")
    p.add_argument("--push", metavar="DEST", help="also copy the release to a folder, or hf://OWNER/REPO[@REVISION]")
    group = p.add_argument_group("publishing from a model (runs the matrix first, gated by the shipped gates)")
    add_matrix_args(group, required=False)
