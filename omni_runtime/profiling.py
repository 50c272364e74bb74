"""NVTX ranges: the pipeline's stages as Nsight Systems draws them, above the kernels each one launched.

    nsys profile -t cuda,nvtx -o reply omni-runtime generate --text "Hello!" --device cuda --dtype bfloat16 \\
        --out reply.wav

Ranges mark host time: a stage whose work is one CUDA-graph replay (a thinker decode step, a whole talker frame,
a Code2Wav push) shows as a short range around the launch, with the graph's kernels later on the GPU row, which is
what tells launch-bound stages from kernel-bound ones. Graph captures and their warm-up get ranges of their own
("capture ..."), so a first call's cost is not read as a step's. Without a profiler attached the nvtx package
takes its no-op path (~1 us a range, a handful per decode step), so the ranges are always on; ``NVTX_DISABLE=1``
turns them off entirely.
"""
from __future__ import annotations

import nvtx

DOMAIN = "omni-runtime"

# One colour per part of the pipeline (the first word of a range's name), so a timeline reads at a glance.
_COLORS = {"thinker": "blue", "talker": "green", "code": "yellow", "code2wav": "purple", "audio": "orange",
           "vision": "orange", "preprocess": "orange", "capture": "red", "engine": "cyan"}


def stage_range(name: str) -> nvtx.annotate:
    """A context manager: the range of one stage (``with stage_range("thinker prefill"): ...``)."""
    part = name.split(" ", 1)[0].lower()
    return nvtx.annotate(name, color=_COLORS.get(part, "white"), domain=DOMAIN)
