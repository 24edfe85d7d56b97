"""Open a Segmenter on a model (its PyTorch reference) or on a converted artifact (its real
runtime): what ``u2zoo.load`` and the evaluation scripts share. The CLI's task verbs do the same
from their flags (``u2zoo.cli.task_args``), where they also print what they chose."""

from __future__ import annotations

from pathlib import Path

from u2zoo.errors import ConfigError
from u2zoo.tasks.engine import Segmenter


def load_segmenter(
    model: str | None = None,
    *,
    artifact: str | Path | None = None,
    weights: str | None = None,
    contract: str | None = None,
    threads: int | None = None,
    batch_size: int = 1,
    weights_sha256: str | None = None,
    random_weights: bool = False,
) -> Segmenter:
    """A Segmenter on ``artifact`` (its own weights and contract; close the Segmenter to free
    the runtime), else on the torch reference of ``model`` (default: the best shipped saliency
    model, ``u2zoo.zoo.default_model``) with ``weights`` (checked against ``weights_sha256``)
    or, asked for explicitly, ``random_weights``."""
    if artifact is not None:
        if model or weights or contract or weights_sha256 or random_weights:
            raise ConfigError(
                "an artifact carries its own weights and contract: give no model name, weights or contract with it"
            )
        return _open_artifact(Path(artifact), threads, batch_size)
    from u2zoo.zoo.default_model import choose_default
    from u2zoo.zoo.reference import TorchPredictor
    from u2zoo.zoo.weights import load_model

    name = model or choose_default().name
    module, _, model_contract = load_model(
        name, weights, weights_sha256, random_weights, contract_variant=contract, progress=False
    )
    return Segmenter(TorchPredictor(module, threads=threads), model_contract, batch_size)


def _open_artifact(path: Path, threads: int | None, batch_size: int) -> Segmenter:
    from u2zoo.artifact import open_artifact
    from u2zoo.converters import get_target

    opened = open_artifact(path)
    spec = get_target(opened.target)
    spec.ensure_available()
    runner = spec.runner(opened, threads=threads).__enter__()  # Segmenter.close() exits it
    try:
        return Segmenter(runner, opened.contract, batch_size)
    except Exception:
        runner.close()
        raise
