"""One description of the compiled kernels, for both of their builds: the ahead-of-time build of ``setup.py``
(``PTV2_BUILD_CPU=1`` / ``PTV2_BUILD_CUDA=1``) and the first-use (JIT) build of ``ops/cpu_backend.py`` /
``ops/cuda_backend.py`` (as FlashInfer's ``JitSpec`` serves both of its builds).

The C++/CUDA sources are package data (``ptv2_kernels/csrc``), found beside this file, so a wheel, an sdist
and an editable install all resolve them the same way. This module imports nothing of the package and imports
torch only inside the functions that need it: ``setup.py`` loads it by path, and without ``PTV2_BUILD_*``
imports no torch at all.

The first-use build goes to torch's extension cache (``TORCH_EXTENSIONS_DIR``, else torch's default root), in a
directory named after everything that decides the binary (the sources and their place, flags, torch, Python and,
for ``-march=native`` builds, the CPU), so one cache can be shared by venvs, checkouts and machines. Processes that start the
same build at once take turns on a lock the kernel releases when a process dies: the first compiles, the others
find it built.
"""

import contextlib
import hashlib
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

CSRC = Path(__file__).resolve().parent / "csrc"  # absolute: the installed package's sources

# ATen's CPU_CAPABILITY names, weakest first
CPU_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
# instruction-set flags of a portable (ahead-of-time) CPU build, which may run on other machines: no -march=native
PORTABLE_CPU_FLAGS = {
    "DEFAULT": (),
    "AVX2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"),
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"),
}


@dataclass(frozen=True)
class ExtensionSpec:
    """A compiled extension: ``module`` is its name when built ahead of time into the package (tagged with the
    torch it is compiled against, :func:`aot_module`), ``jit_base`` the stem of its first-use build's name;
    ``sources`` lie in ``root/subdir``, which is also the include path."""

    module: str
    jit_base: str
    subdir: str
    sources: Tuple[str, ...]
    cxx_flags: Tuple[str, ...]
    nvcc_flags: Tuple[str, ...] = ()
    ld_flags: Tuple[str, ...] = ()
    machine: str = ""  # what of the build machine the binary depends on (the CPU for -march=native), hashed
    root: Path = CSRC  # where the sources' directories lie (the installed package's csrc)

    def directory(self, root: Optional[Path] = None) -> Path:
        return (self.root if root is None else root) / self.subdir

    def source_paths(self, root: Optional[Path] = None) -> list:
        return [str(self.directory(root) / name) for name in self.sources]

    def missing_sources(self) -> list:
        return [path for path in self.source_paths() if not Path(path).is_file()]

    def setuptools_extension(self, root: Path):
        """The ``CppExtension``/``CUDAExtension`` of ``setup.py``; ``root``: the sources' directory relative to
        ``setup.py`` (setuptools wants relative source paths)."""
        from torch.utils.cpp_extension import CppExtension, CUDAExtension

        common = dict(sources=self.source_paths(root), include_dirs=[str(self.directory(root).resolve())],
                      extra_link_args=list(self.ld_flags))
        if self.nvcc_flags:
            return CUDAExtension(self.module, extra_compile_args={"cxx": list(self.cxx_flags),
                                                                  "nvcc": list(self.nvcc_flags)}, **common)
        return CppExtension(self.module, extra_compile_args=list(self.cxx_flags), **common)

    def jit_name(self) -> str:
        """Name of the first-use build: the stem and a hash of what decides the binary (the sources and where they
        lie, flags, torch and where it lies, Python, the machine where it matters), so a cache shared by venvs,
        checkouts, source versions or machines never hands one a binary built for another, nor makes them
        rebuild each other's."""
        import torch

        digest = hashlib.sha1()
        # torch's build file names the torch headers and the sources by path: another venv or another checkout
        # gets a build of its own instead of rewriting (and rebuilding) this one's
        torch_install = os.path.dirname(torch.__file__)
        for part in (self.machine, torch.__version__, torch_install, str(self.directory()), sys.version,
                     *self.cxx_flags, *self.nvcc_flags, *self.ld_flags):
            digest.update(part.encode() + b"\0")
        for path in sorted(self.directory().iterdir()):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        return f"{self.jit_base}_{digest.hexdigest()[:10]}"

    def jit_directory(self) -> Path:
        """``TORCH_EXTENSIONS_DIR`` (else torch's default root) / :meth:`jit_name`."""
        from torch.utils.cpp_extension import get_default_build_root

        return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / self.jit_name()

    def jit_built(self) -> bool:
        """Whether the first-use build is already in the cache (so loading it compiles nothing)."""
        directory = self.jit_directory()
        return (directory / f"{directory.name}.so").exists()

    def jit_load(self):
        """Build (once per cache) and import the extension; :class:`BuildError` if compiling or linking fails."""
        from torch.utils.cpp_extension import load

        directory = self.jit_directory()
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / "ptv2.lock"):
            # torch's own lock file outlives a build that was killed, and would then make every later
            # process wait for ever; under our lock (released by the kernel on death) any such file is stale
            (directory / "lock").unlink(missing_ok=True)
            try:
                return load(name=directory.name, sources=self.source_paths(), extra_cflags=list(self.cxx_flags),
                            extra_cuda_cflags=list(self.nvcc_flags) or None, extra_ldflags=list(self.ld_flags),
                            extra_include_paths=[str(self.directory())], build_directory=str(directory),
                            verbose=False)
            except Exception as error:  # keep the compiler output for the user
                log = directory / "build.log"
                log.write_text(f"{type(error).__name__}: {error}\n")
                raise BuildError(log) from error


class BuildError(RuntimeError):
    """A first-use build failed; ``log`` holds the compiler's output."""

    def __init__(self, log: Path):
        super().__init__(f"building the extension failed; compiler output in {log}")
        self.log = log


@contextlib.contextmanager
def _exclusive(path: Path):
    """An exclusive ``flock`` on ``path`` for the ``with`` block (no locking where there is no ``fcntl``)."""
    with open(path, "a") as file:  # closing it releases the lock, also when the process dies
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            fcntl.flock(file, fcntl.LOCK_EX)
        yield


def aot_module(stem: str) -> str:
    """``ptv2_kernels.<stem>_torch_<version>``: an extension compiled ahead of time only loads with the torch it
    was compiled against (torch's C++ ABI changes between releases), so another torch does not find it and
    falls back to the first-use build instead of loading a binary that does not fit."""
    import torch

    return f"ptv2_kernels.{stem}_torch_{re.sub(r'[^0-9A-Za-z]+', '_', torch.__version__)}"


def openmp_flags() -> Tuple[str, ...]:
    """``-fopenmp`` when torch's intra-op parallelism is OpenMP (Linux wheels): ``at::parallel_for`` is inline
    ``#pragma omp parallel`` code, which runs on one thread unless the extension is compiled with it (and linked
    to the ``libgomp.so.1`` torch already loaded, which torch's wheel carries)."""
    import torch

    return ("-fopenmp",) if "OpenMP" in torch.__config__.parallel_info() and sys.platform == "linux" else ()


def default_portable_capability() -> str:
    """Instruction set of a portable CPU build: AVX2 + FMA on x86-64 (every x86 server since 2013), else none."""
    return "AVX2" if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"


def _cpu_identity() -> str:
    """This CPU's model and feature flags (what a ``-march=native`` binary depends on)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def cpu_spec(capability: str, portable: bool) -> ExtensionSpec:
    """The fused CPU kernel (``csrc/cpu``) for ``capability`` (one of :data:`CPU_CAPABILITIES`; its
    ``CPU_CAPABILITY_*`` macro makes ``at::vec`` use AVX512/AVX2 registers). ``portable``: the ahead-of-time
    build, with that instruction set's flags only; otherwise the first-use build, ``-march=native`` for the
    machine it runs on."""
    if capability not in CPU_CAPABILITIES:
        raise ValueError(f"capability must be one of {', '.join(CPU_CAPABILITIES)}, got {capability!r}")
    if portable:
        isa = PORTABLE_CPU_FLAGS[capability]
    else:
        native = "-march=native" if platform.machine() in ("x86_64", "AMD64") else "-mcpu=native"
        isa = (native,) + ((f"-DCPU_CAPABILITY_{capability}",) if capability != "DEFAULT" else ())
    openmp = openmp_flags()
    return ExtensionSpec(module=aot_module("_cpu_ext"), jit_base=f"ptv2_prefix_attention_cpu_{capability.lower()}",
                         subdir="cpu", sources=("binding.cpp", "forward.cpp", "backward.cpp"),
                         cxx_flags=("-O3", *isa, *openmp), ld_flags=openmp,
                         machine="" if portable else _cpu_identity())


def cuda_spec() -> ExtensionSpec:
    """The CUDA kernels (``csrc/prefix_attention``); the GPU architectures come from ``TORCH_CUDA_ARCH_LIST``
    (unset: the GPUs torch sees), which are hashed into the first-use build's name."""
    import torch

    arches = os.environ.get("TORCH_CUDA_ARCH_LIST") or " ".join(
        "%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    return ExtensionSpec(module=aot_module("_cuda_ext"), jit_base="ptv2_prefix_attention_cuda",
                         subdir="prefix_attention", sources=("binding.cpp", "forward.cu", "backward.cu"),
                         cxx_flags=("-O3",), nvcc_flags=("-O3", "-lineinfo"),
                         machine=arches)
