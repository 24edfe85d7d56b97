"""The ``u2zoo`` command line. Every expected failure is one line on stderr and a non-zero exit.

One module per group of verbs (``convert``, ``run``, ``bench``, ``train``, ``models``), each with
an ``add_<verb>(add)`` that declares the verb's flags and handler; ``run`` takes ``predict`` and
``time`` itself and the task verbs from ``portrait``, ``video`` and ``serve``. What several share
is in ``common`` and, for the task verbs, ``task_args``. Below this package nothing parses
arguments: the tasks are plain functions.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from u2zoo.cli import bench, convert, masks, models, publish, run, train
from u2zoo.errors import U2ZooError, one_line

# the order of `u2zoo --help`
VERBS = (
    models.add_models,
    convert.add_convert,
    run.add_predict,
    run.add_time,
    bench.add_bench,
    bench.add_report,
    bench.add_sensitivity,
    publish.add_publish,
    train.add_train,
    train.add_distill,
    train.add_prune,
    masks.add_masks,
    models.add_fetch,
    run.add_portrait,
    run.add_video,
    run.add_serve,
    models.add_doctor,
    models.add_demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="u2zoo", description="U²-Net model zoo and deployment converter")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        # also after the verb (`u2zoo predict -q …`); SUPPRESS keeps a -q given before it
        p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
        return p

    for add_verb in VERBS:
        add_verb(add)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "weights_sha256", None):  # before the command creates anything (it names a cache file)
            from u2zoo.zoo.weights import checked_sha256

            checked_sha256(args.weights_sha256)
        return args.func(args)
    except U2ZooError as exc:
        message = one_line(exc)
        print(f"u2zoo: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("u2zoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
