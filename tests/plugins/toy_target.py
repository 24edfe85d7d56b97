"""A toy target in one module, as a plugin would ship it: ``torch.export`` → ``.pt2``.

It exists to prove the registry: importing this module (or naming it under the
``u2zoo.targets`` entry-point group) is all it takes for ``convert --help``, ``bench`` and
``doctor`` to know the target and its options; no file of u2zoo changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from u2zoo.artifact import Artifact, TensorSpec, tool_versions
from u2zoo.converters.base import ModelSource, Runner, TargetSpec, build_artifact, network_size_for, register
from u2zoo.converters.options import SizeOptions, option


@dataclass(frozen=True)
class ToyOptions(SizeOptions):
    toy_decompose: bool = option(
        False, help="lower the exported program to core ATen ops (run_decompositions)", suffix="_core"
    )


def convert(source: ModelSource, options: ToyOptions, out_dir: Path, stem: str) -> Artifact:
    import torch

    height, width = network_size_for(options, source)
    started = time.perf_counter()
    program = torch.export.export(source.model, (torch.zeros(1, 3, height, width),))
    if options.toy_decompose:
        program = program.run_decompositions()
    final = out_dir / f"{stem}.pt2"
    torch.export.save(program, final)
    return build_artifact(
        source,
        options,
        target="toy",
        files=[final],
        inputs=[TensorSpec("input", (1, 3, height, width), "float32")],
        outputs=[TensorSpec("output", (1, 1, height, width), "float32")],
        tools=tool_versions("torch"),
        size=(height, width),
        started=started,
    )


class ToyRunner(Runner):
    def load(self) -> None:
        import torch

        self.module = torch.export.load(self.artifact.path).module()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        started = time.perf_counter()
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(feeds[self.input_name])))
        self.last_latency_s = time.perf_counter() - started
        return {self.output_name: out.numpy()}


SPEC = TargetSpec(
    name="toy",
    source="torch",
    precisions=("fp32",),
    dynamic_shapes=False,
    devices=("cpu",),
    host_os=None,
    extra="",
    requires=("torch",),
    options_type=ToyOptions,
    convert=convert,
    runner=ToyRunner,
    description="torch.export program (.pt2), a plugin example",
)
register(SPEC)
