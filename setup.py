"""Package metadata lives in pyproject.toml; this file adds the optional ahead-of-time builds of the C++/CUDA
kernels, from the one build description the first-use build uses too (``ptv2_kernels/build_spec.py``, loaded
by path so that nothing of the package, and without ``PTV2_BUILD_*`` no torch, is imported here). Without
``PTV2_BUILD_CUDA=1`` or ``PTV2_BUILD_CPU=1`` no extension is built: the wheel is pure Python, carries the
kernel sources, and the kernels are compiled with ninja on first use. An ahead-of-time build compiles against
the torch already installed (the extension only loads with that torch), so disable build isolation::

    PTV2_BUILD_CPU=1 pip wheel --no-build-isolation --no-deps .      # a platform wheel, CPU kernel inside
    TORCH_CUDA_ARCH_LIST="8.0;9.0" PTV2_BUILD_CUDA=1 pip install --no-build-isolation -e .

The extensions are named after the torch they are compiled against (``ptv2_kernels._cpu_ext_torch_<version>``),
so that another torch falls back to the first-use build instead of loading them.

CUDA (``ptv2_kernels/csrc/prefix_attention``): ``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures compiled
for (8.0 = A100, 9.0 = H100; the kernels need tensor cores with bf16, i.e. >= 8.0); unset, torch builds for the
GPUs it sees.

CPU (``ptv2_kernels/csrc/cpu``): a binary that may run on other machines, so no ``-march=native``.
``PTV2_CPU_CAPABILITY`` picks the instruction set (ATen's names): ``AVX2`` (default on x86-64: AVX2 + FMA, every
x86 server since 2013), ``AVX512`` (AVX-512 F/BW/VL/DQ) or ``DEFAULT`` (no vector extensions beyond the
compiler's baseline; other architectures). At run time the extension is used only on a CPU that
has the instruction set it was built for; otherwise the kernels are compiled for the machine on first use.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

CSRC = Path("ptv2_kernels") / "csrc"  # relative to this file, as setuptools wants


def _build_spec():
    path = Path(__file__).resolve().parent / "ptv2_kernels" / "build_spec.py"
    spec = importlib.util.spec_from_file_location("ptv2_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_kwargs() -> dict:
    wanted = [kind for kind in ("CUDA", "CPU") if os.environ.get(f"PTV2_BUILD_{kind}") == "1"]
    if not wanted:
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        raise SystemExit("PTV2_BUILD_CPU=1 / PTV2_BUILD_CUDA=1 compile against the installed torch: install torch "
                         "first and build with pip's --no-build-isolation") from None
    build_spec = _build_spec()
    modules = []
    if "CUDA" in wanted:
        modules.append(build_spec.cuda_spec().setuptools_extension(CSRC))
    if "CPU" in wanted:
        capability = os.environ.get("PTV2_CPU_CAPABILITY", build_spec.default_portable_capability()).upper()
        if capability not in build_spec.CPU_CAPABILITIES:
            raise SystemExit(f"PTV2_CPU_CAPABILITY must be one of {', '.join(build_spec.CPU_CAPABILITIES)}, "
                             f"got {capability!r}")
        modules.append(build_spec.cpu_spec(capability, portable=True).setuptools_extension(CSRC))
    return dict(ext_modules=modules, cmdclass={"build_ext": BuildExtension})


setup(**_extension_kwargs())
