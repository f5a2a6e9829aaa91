"""Package metadata lives in pyproject.toml; this file adds the optional ahead-of-time builds of the C++/CUDA
kernels. Without ``PTV2_BUILD_CUDA=1`` or ``PTV2_BUILD_CPU=1`` nothing here imports torch and no extension is
built (the kernels are then compiled with ninja on first use). torch must already be installed, so disable
build isolation::

    TORCH_CUDA_ARCH_LIST="8.0;9.0" PTV2_BUILD_CUDA=1 pip install --no-build-isolation -e .
    PTV2_BUILD_CPU=1 pip install --no-build-isolation -e .

CUDA (``ptv2_kernels._cuda_ext`` from ``csrc/prefix_attention``): ``TORCH_CUDA_ARCH_LIST`` picks the GPU
architectures compiled for (8.0 = A100, 9.0 = H100; the kernels need tensor cores with bf16, i.e. >= 8.0);
unset, torch builds for the GPUs it sees.

CPU (``ptv2_kernels._cpu_ext`` from ``csrc/cpu``): a binary that may run on other machines, so no
``-march=native``. ``PTV2_CPU_CAPABILITY`` picks the instruction set (ATen's names): ``AVX2`` (default on x86-64:
AVX2 + FMA, every x86 server since 2013), ``AVX512`` (AVX-512 F/BW/VL/DQ) or ``DEFAULT`` (no vector extensions
beyond the compiler's baseline; other architectures). At run time the extension is used only on a CPU that
has the instruction set it was built for; otherwise the kernels are compiled for the machine on first use.
"""

import os

from setuptools import setup

CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"],
}


def _cuda_extension():
    from torch.utils.cpp_extension import CUDAExtension

    csrc = os.path.join("csrc", "prefix_attention")
    return CUDAExtension(
        "ptv2_kernels._cuda_ext",
        sources=[os.path.join(csrc, name) for name in ("binding.cpp", "forward.cu", "backward.cu")],
        include_dirs=[os.path.abspath(csrc)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )


def _cpu_extension():
    import platform
    import sys

    import torch
    from torch.utils.cpp_extension import CppExtension

    default = "AVX2" if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    capability = os.environ.get("PTV2_CPU_CAPABILITY", default).upper()
    if capability not in CPU_CAPABILITY_FLAGS:
        raise SystemExit(f"PTV2_CPU_CAPABILITY must be one of {', '.join(CPU_CAPABILITY_FLAGS)}, got {capability!r}")
    csrc = os.path.join("csrc", "cpu")
    # at::parallel_for is inline OpenMP code: without -fopenmp the kernels would run on one thread
    openmp = ["-fopenmp"] if "OpenMP" in torch.__config__.parallel_info() and sys.platform == "linux" else []
    return CppExtension(
        "ptv2_kernels._cpu_ext",
        sources=[os.path.join(csrc, name) for name in ("binding.cpp", "forward.cpp", "backward.cpp")],
        include_dirs=[os.path.abspath(csrc)],
        extra_compile_args=["-O3", *CPU_CAPABILITY_FLAGS[capability], *openmp],
        extra_link_args=openmp,
    )


def _extension_kwargs() -> dict:
    modules = []
    if os.environ.get("PTV2_BUILD_CUDA") == "1":
        modules.append(_cuda_extension())
    if os.environ.get("PTV2_BUILD_CPU") == "1":
        modules.append(_cpu_extension())
    if not modules:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return dict(ext_modules=modules, cmdclass={"build_ext": BuildExtension})


setup(**_extension_kwargs())
