"""Decides whether to build the CUDA extension `omni_kernels._C`; all static metadata lives in pyproject.toml.

The extension is built when torch imports, is a CUDA build, finds a CUDA toolkit, and OMNI_SKIP_CUDA_BUILD
is not "1". Otherwise the package installs as pure Python and says why in one line. Nothing here probes the
hardware or the network: what gets built depends only on the installed torch, the toolkit and the environment.
Install with `pip install --no-build-isolation .` so the extension is built against the torch you run.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _nvidia_wheel_includes() -> list[str]:
    # The nvidia-* pip wheels that CUDA torch depends on carry headers (cuBLAS, cuSPARSE, ...) that a bare
    # toolkit may lack. Passed as -isystem, they are searched after the toolkit's own -I dirs: gap-fillers only.
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "include")))


def _cuda_extension():
    """Returns ((ext_modules, cmdclass), None), or (None, why the extension is not built)."""
    if os.environ.get("OMNI_SKIP_CUDA_BUILD") == "1":
        return None, "OMNI_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension, is_ninja_available
    except ImportError:
        return None, "torch is not importable here; install with --no-build-isolation"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return None, "no CUDA toolkit found; set CUDA_HOME"

    # torch derives arch flags from the visible GPUs when this is unset, and crashes when there are none.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:  # the `ninja` wheel's binary is not on PATH unless its venv is activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    system_includes = [f for d in _nvidia_wheel_includes() for f in ("-isystem", d)]
    # torch no longer passes its libstdc++ ABI; a host compiler that defaults to the other one would hand libc10
    # std::strings of another layout. Pin the ABI torch was built with.
    abi = [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    # Share the process's libstdc++ with torch. A toolchain that links libstdc++ statically by default (seen: the
    # GPU machines' /opt/gcc, which is CC/CXX there) gives the extension a second, never-initialised copy of the
    # iostreams and locales, and the first TORCH_CHECK message that formats a number segfaults. Naming the shared
    # library first leaves the static archive only what the system's libstdc++.so lacks.
    link_shared_libstdcxx = ["-Wl,-Bdynamic", "-lstdc++"]
    ext = CUDAExtension(
        name="omni_kernels._C",
        sources=sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp")),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        # No --use_fast_math: the kernels must reproduce the reference's rounding. No -std either: torch adds the
        # standard its headers need (2.13/2.14 add C++20; 2.14's headers fail as C++17). csrc/include is C++17.
        extra_compile_args={"cxx": ["-O3", *abi, *system_includes], "nvcc": ["-O3", *abi, *system_includes]},
        extra_link_args=link_shared_libstdcxx,
    )
    print(
        f"omni-runtime: building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}",
        file=sys.stderr,
    )
    return ([ext], {"build_ext": BuildExtension.with_options(use_ninja=is_ninja_available())}), None


def main() -> None:
    os.chdir(ROOT)  # sources are globbed relative to the project root
    try:
        built, reason = _cuda_extension()
    except Exception as e:  # deciding must never break a pure-Python install
        built, reason = None, f"{type(e).__name__}: {e}"
    if built is None:
        print(f"omni-runtime: building without the CUDA extension ({reason})", file=sys.stderr)
        setup()
    else:
        ext_modules, cmdclass = built
        setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
