"""Ahead-of-time compiles of Triton kernels for GPUs that are not here (ptxas and cuobjdump ship with triton): a
script run in a subprocess without the interpreter, its printed lines back."""
import os
import subprocess
import sys

import pytest


def compile_script_lines(script: str) -> list[str]:
    """Run ``script`` (exit code 3: no AOT compile API) from the repository root -> its stdout lines."""
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if result.returncode == 3:
        pytest.skip("this triton has no ahead-of-time compile API")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()
