"""Turn a trained ``best.pth`` into weights that ship inside the package.

The shipped file is the state dict in float16: half the size, and a distilled student loses
nothing measurable from the rounding. Beside it goes a JSON record: how the weights were
trained (the recipe), the training history, and what was measured. The registry entry pins
the file's sha256, so the package refuses a file that was changed after shipping.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from u2zoo.artifact import atomic_write_bytes, atomic_write_text
from u2zoo.zoo.weights import file_digest


def ship_weights(best: str | Path, dest: str | Path, recipe: dict[str, Any],
                 history: str | Path | None = None, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``dest`` (fp16 state dict) and ``dest.json`` (recipe, history, metrics); return the record."""
    import torch

    state = torch.load(best, map_location="cpu", weights_only=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    buffer = io.BytesIO()
    torch.save(half, buffer)
    dest = Path(dest)
    atomic_write_bytes(dest, buffer.getvalue())
    record = {"file": dest.name, "sha256": file_digest(dest), "bytes": dest.stat().st_size,
              "num_params": sum(v.numel() for k, v in half.items() if "running" not in k and "num_batches" not in k),
              "recipe": recipe, "metrics": metrics or {},
              "history": json.loads(Path(history).read_text()) if history else []}
    atomic_write_text(dest.with_suffix(".json"), json.dumps(record, indent=1) + "\n")
    return record
