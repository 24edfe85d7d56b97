"""``torch.compile`` target: the same state-dict artifact as ``torch`` (eager), run through
``torch.compile`` (Inductor: C++/OpenMP kernels on CPU, Triton on CUDA).

Compilation happens when the runner first sees a shape, so the matrix's warm-up runs absorb
it and the timed runs measure the compiled graph only.
"""

from __future__ import annotations

from pathlib import Path

from u2zoo.artifact import Artifact
from u2zoo.converters.aoti import DEVICES
from u2zoo.converters.base import ModelSource, TargetSpec, register
from u2zoo.converters.torch_eager import TorchOptions, TorchRunner, save_state_dict


def convert(source: ModelSource, options: TorchOptions, out_dir: Path, stem: str) -> Artifact:
    return save_state_dict(source, options, out_dir, stem, "torch-compile")


class TorchCompileRunner(TorchRunner):
    compile_model = True


register(
    TargetSpec(
        name="torch-compile",
        source="torch",
        precisions=("fp32", "fp16"),
        dynamic_shapes=True,
        devices=DEVICES,
        host_os=None,
        extra="",
        requires=("torch",),
        options_type=TorchOptions,
        convert=convert,
        runner=TorchCompileRunner,
        description="torch.compile (Inductor) of the state dict, CPU or CUDA",
    )
)
