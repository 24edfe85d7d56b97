"""One PNG a person reads at a glance: photo | mask | cut-out over a checkerboard, a row per photo.

The demo writes it from the files it has just written (so the sheet shows exactly what is on
disk, not a second computation), each cell scaled to a common row height.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from u2zoo.artifact import atomic_write_bytes
from u2zoo.zoo.contract import to_uint8
from u2zoo.zoo.images import load_rgb

ROW_HEIGHT = 256
GAP = 8
LABEL_HEIGHT = 22
_COLUMNS = ("photo", "mask", "cut-out")


def checkerboard(width: int, height: int, square: int = 16) -> Image.Image:
    """Light-grey squares: how image editors show transparency."""
    ys, xs = np.indices((height, width))
    board = np.where(((ys // square + xs // square) % 2) == 0, 204, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([board] * 3), mode="RGB")


def _fit(image: Image.Image, height: int) -> Image.Image:
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def sheet_row(
    photo: Image.Image, mask: Image.Image, cutout: Image.Image, height: int = ROW_HEIGHT
) -> list[Image.Image]:
    """The three cells of one row, at ``height``: photo, mask (grey), cut-out on a checkerboard."""
    photo_cell = _fit(photo.convert("RGB"), height)
    mask_cell = _fit(mask.convert("L"), height).convert("RGB")
    cut = _fit(cutout.convert("RGBA"), height)
    cut_cell = checkerboard(cut.width, cut.height)
    cut_cell.paste(cut, (0, 0), cut)
    return [photo_cell, mask_cell, cut_cell]


def render_sheet(rows: list[list[Image.Image]], title: str) -> Image.Image:
    """Lay out rows of equal-height cells under column labels and a title line."""
    columns = len(_COLUMNS)
    widths = [max(row[c].width for row in rows) for c in range(columns)]
    height = rows[0][0].height
    sheet_w = sum(widths) + GAP * (columns + 1)
    sheet_h = 2 * LABEL_HEIGHT + len(rows) * (height + GAP) + GAP
    sheet = Image.new("RGB", (sheet_w, sheet_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 4), title, fill="black")
    x = GAP
    for c, name in enumerate(_COLUMNS):
        draw.text((x, LABEL_HEIGHT + 4), name, fill="black")
        x += widths[c] + GAP
    y = 2 * LABEL_HEIGHT
    for row in rows:
        x = GAP
        for c, cell in enumerate(row):
            sheet.paste(cell, (x, y))
            x += widths[c] + GAP
        y += height + GAP
    return sheet


def write_contact_sheet(photos: list[Path], masks_dir: Path, dest: Path, title: str) -> Path:
    """Build the sheet from ``masks_dir/<stem>.png`` and ``<stem>_cutout.png`` of each photo."""
    rows = []
    for photo in photos:
        upright = Image.fromarray(to_uint8(load_rgb(photo)), mode="RGB")  # as its mask was made: EXIF applied
        with (
            Image.open(masks_dir / f"{photo.stem}.png") as mask,
            Image.open(masks_dir / f"{photo.stem}_cutout.png") as cutout,
        ):
            rows.append(sheet_row(upright, mask, cutout))
    buffer = io.BytesIO()
    render_sheet(rows, title).save(buffer, format="PNG", optimize=True)
    atomic_write_bytes(dest, buffer.getvalue())
    return dest
