"""Decides how to build the extension `omni_kernels._C`; all static metadata lives in pyproject.toml.

With a CUDA build of torch and a CUDA toolkit (and OMNI_SKIP_CUDA_BUILD not "1") the extension holds the CUDA
kernels and the CPU twins (csrc/cpu/); with a CPU build of torch it holds the CPU twins alone, built as optional
(a machine without a C++ compiler still installs, and the runtime takes its Python paths). OMNI_NO_EXTENSION=1, or
no importable torch, installs pure Python. Each case says what it builds in one line. Nothing here probes the
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


def _extension():
    """Returns ((ext_modules, cmdclass), what is built), or (None, why nothing is built)."""
    if os.environ.get("OMNI_NO_EXTENSION") == "1":
        return None, "OMNI_NO_EXTENSION=1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, is_ninja_available
    except ImportError:
        return None, "torch is not importable here; install with --no-build-isolation"
    try:  # the `ninja` wheel's binary is not on PATH unless its venv is activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    base = BuildExtension.with_options(use_ninja=is_ninja_available())

    class BuildOptionalExtension(base):
        # setuptools' `optional` catches only distutils' compile errors; torch's ninja build raises RuntimeError.
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:
                if not ext.optional:
                    raise
                print(f"omni-runtime: the CPU twins did not build ({type(e).__name__}: {e}); the runtime takes "
                      "its Python paths", file=sys.stderr)

    cmdclass = {"build_ext": BuildOptionalExtension}
    # torch no longer passes its libstdc++ ABI; a host compiler that defaults to the other one would hand libc10
    # std::strings of another layout. Pin the ABI torch was built with. No FMA contraction: the CPU twins round
    # products and sums separately, as the reference does.
    optimise_and_abi = ["-O3", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    cxx = [*optimise_and_abi, "-ffp-contract=off"]
    # Share the process's libstdc++ with torch. A toolchain that links libstdc++ statically by default (seen: the
    # GPU machines' /opt/gcc, which is CC/CXX there) gives the extension a second, never-initialised copy of the
    # iostreams and locales, and the first TORCH_CHECK message that formats a number segfaults. Naming the shared
    # library first leaves the static archive only what the system's libstdc++.so lacks.
    link_shared_libstdcxx = ["-Wl,-Bdynamic", "-lstdc++"]
    cpu_sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    common = dict(name="omni_kernels._C", include_dirs=[os.path.join(ROOT, "csrc", "include")],
                  extra_link_args=link_shared_libstdcxx)

    skip_cuda = next((why for cond, why in (
        (os.environ.get("OMNI_SKIP_CUDA_BUILD") == "1", "OMNI_SKIP_CUDA_BUILD=1"),
        (torch.version.cuda is None, f"torch {torch.__version__} is a CPU build"),
        (CUDA_HOME is None, "no CUDA toolkit found; set CUDA_HOME")) if cond), None)
    if skip_cuda:
        ext = CppExtension(sources=cpu_sources, extra_compile_args=cxx, optional=True, **common)
        return ([ext], cmdclass), f"the CPU twins only ({skip_cuda})"

    # torch derives arch flags from the visible GPUs when this is unset, and crashes when there are none. +PTX embeds
    # compute_90 PTX beside the sm_90 binary: a newer GPU (sm_100, sm_120) JIT-compiles it instead of finding no image.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    system_includes = [f for d in _nvidia_wheel_includes() for f in ("-isystem", d)]
    ext = CUDAExtension(
        sources=sorted(glob.glob("csrc/*.cu")) + cpu_sources,
        # No --use_fast_math: the kernels must reproduce the reference's rounding. No -std either: torch adds the
        # standard its headers need (2.13/2.14 add C++20; 2.14's headers fail as C++17). csrc/include is C++17.
        extra_compile_args={"cxx": [*cxx, *system_includes, "-DOMNI_WITH_CUDA"],
                            "nvcc": [*optimise_and_abi, *system_includes, "-DOMNI_WITH_CUDA"]},
        **common,
    )
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    return ([ext], cmdclass), f"CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} and the CPU twins"


def main() -> None:
    os.chdir(ROOT)  # sources are globbed relative to the project root
    try:
        built, what = _extension()
    except Exception as e:  # deciding must never break a pure-Python install
        built, what = None, f"{type(e).__name__}: {e}"
    if built is None:
        print(f"omni-runtime: building without the extension ({what})", file=sys.stderr)
        setup()
    else:
        print(f"omni-runtime: building the extension: {what}", file=sys.stderr)
        ext_modules, cmdclass = built
        setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
