"""Package metadata lives in pyproject.toml; this file adds the ahead-of-time build of the CUDA backend.

Without ``PTV2_BUILD_CUDA=1`` nothing here imports torch and no extension is built (``backend="cuda"``
then compiles its kernels with ninja on first use). With it, torch's CUDAExtension builds
``ptv2_kernels._cuda_ext`` from ``csrc/prefix_attention``; torch must already be installed, so disable
build isolation::

    TORCH_CUDA_ARCH_LIST="8.0;9.0" PTV2_BUILD_CUDA=1 pip install --no-build-isolation -e .

``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures compiled for (8.0 = A100, 9.0 = H100; the kernels
need tensor cores with bf16, i.e. >= 8.0); unset, torch builds for the GPUs it sees.
"""

import os

from setuptools import setup


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("PTV2_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = os.path.join("csrc", "prefix_attention")
    extension = CUDAExtension(
        "ptv2_kernels._cuda_ext",
        sources=[os.path.join(csrc, name) for name in ("binding.cpp", "forward.cu", "backward.cu")],
        include_dirs=[os.path.abspath(csrc)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return dict(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})


setup(**_cuda_extension_kwargs())
