"""What several verbs share: comma-separated lists and the INT8 float-fallback flags."""

from __future__ import annotations

import argparse
from typing import Callable

# what each verb module's add_<verb>(add) receives: add(name, handler, help) -> its subparser
AddVerb = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def csv_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def add_auto_fp_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-auto-fp",
        dest="auto_fp",
        action="store_false",
        help="int8: no automatic float fallback when the gate fails (it is on by default)",
    )
    p.add_argument(
        "--fp-budget",
        type=float,
        help="int8: the fallback keeps at most this share of the MACs in float (default 0.25)",
    )
