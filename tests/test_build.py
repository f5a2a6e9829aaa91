"""The packaging of the kernels: a wheel carries every kernel source, and the first-use build
(``ptv2_kernels/build_spec.py``) finds them in the package, goes to ``TORCH_EXTENSIONS_DIR``, gets one build when
two processes start it at once (both end up with a working extension) and does not hang on a lock left by a killed
build. A tiny extension stands in for the kernels (same code path, seconds instead of a minute); CI's sdist check
builds the real one from an installed package in two processes at once."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from ptv2_kernels import build_spec
from ptv2_kernels.build_spec import ExtensionSpec

ROOT = Path(__file__).resolve().parents[1]
TINY_SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""
# builds the tiny extension in a process of its own; prints its answer and its build directory
BUILD_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.test_build import tiny_spec
    spec = tiny_spec(Path(sys.argv[1]))
    print(spec.jit_load().answer(), spec.jit_directory())
""")


def tiny_spec(root: Path) -> ExtensionSpec:
    return ExtensionSpec(module="tiny", jit_base="ptv2_test_tiny", subdir="tiny", sources=("tiny.cpp",),
                         cxx_flags=("-O0",), root=root)


@pytest.fixture
def tiny_root(tmp_path):
    (tmp_path / "src" / "tiny").mkdir(parents=True)
    (tmp_path / "src" / "tiny" / "tiny.cpp").write_text(TINY_SOURCE)
    return tmp_path / "src"


def _start(root: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(root)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, err[-3000:]
    return out


def test_kernel_sources_are_package_data():
    """Every source of both kernels lies inside the package, so a wheel or an sdist carries it."""
    package = Path(build_spec.__file__).parent
    for spec in (build_spec.cpu_spec("AVX2", portable=True), build_spec.cuda_spec()):
        assert spec.missing_sources() == []
        assert all(Path(path).is_relative_to(package) for path in spec.source_paths())


def test_a_wheel_carries_every_kernel_source(tmp_path):
    """A wheel built from the package holds every file of ``ptv2_kernels/csrc`` (the package-data patterns)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "ptv2_kernels", source / "ptv2_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "--wheel-dir", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                            timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("PTV2_BUILD")})
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("ptv2_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = set(archive.namelist())
    csrc = ROOT / "ptv2_kernels" / "csrc"
    sources = {path.relative_to(ROOT).as_posix() for path in csrc.rglob("*") if path.is_file()}
    assert len(sources) > 10 and sources <= packed, sorted(sources - packed)


def test_two_processes_building_at_once_both_get_the_extension(tiny_root, tmp_path):
    cache = tmp_path / "cache"
    first, second = _start(tiny_root, cache), _start(tiny_root, cache)
    outputs = [_finish(first), _finish(second)]
    directories = {line.split()[1] for line in outputs}
    assert [line.split()[0] for line in outputs] == ["42", "42"]
    assert len(directories) == 1 and Path(directories.pop()).parent == cache  # one build, in TORCH_EXTENSIONS_DIR


def test_a_lock_left_by_a_killed_build_does_not_hang(tiny_root, monkeypatch, tmp_path):
    """torch's lock file outlives a build killed halfway; the next process must not wait for it for ever."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cache))
    directory = tiny_spec(tiny_root).jit_directory()
    directory.mkdir(parents=True)
    (directory / "lock").touch()
    assert _finish(_start(tiny_root, cache)).split()[0] == "42"


def test_changed_or_moved_sources_build_apart(tiny_root, monkeypatch, tmp_path):
    """The build's name hashes the sources, their place and the flags: an edited source (another installed
    version) never reuses a binary built from the old one, and another copy of the sources never rewrites this
    one's build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    spec = tiny_spec(tiny_root)
    before = spec.jit_name()
    assert ExtensionSpec(**{**spec.__dict__, "cxx_flags": ("-O1",)}).jit_name() != before
    (tiny_root / "tiny" / "tiny.cpp").write_text(TINY_SOURCE.replace("42", "43"))
    assert spec.jit_name() != before
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_root, elsewhere)  # the same sources in another checkout or venv
    assert tiny_spec(elsewhere).jit_name() != spec.jit_name()
