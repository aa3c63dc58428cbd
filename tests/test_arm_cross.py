"""The AArch64 build and its kernels, proven on an x86 host: CMake configures and compiles the CPU kernels with
Debian's cross compiler (cmake/aarch64-linux-gnu.cmake, the same source selection and flags as ``pip install``
on an Arm machine), and the native driver tests/native/isa_check.cpp runs under qemu-user, comparing every Arm
path bit for bit with the generic path (itself tested against reference.py by test_native_cpu.py and
test_gemm_cpu.py).

Skipped when the toolchain is absent; ``.ci/arm-toolchain.sh`` installs it (g++-aarch64-linux-gnu, qemu-user).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSROOT = "/usr/aarch64-linux-gnu"
EM_AARCH64 = 183  # ELF e_machine


def _cmake() -> str | None:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the PyPI cmake package (what scikit-build-core uses when the system has none)
        import cmake

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        return None


CMAKE = _cmake()
MISSING = [
    name
    for name, ok in [
        ("aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu)", shutil.which("aarch64-linux-gnu-g++")),
        ("qemu-aarch64 (Debian qemu-user)", shutil.which("qemu-aarch64")),
        ("cmake", CMAKE),
    ]
    if not ok
]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs {', '.join(MISSING)}: run .ci/arm-toolchain.sh to install the Arm cross toolchain"
)


@pytest.fixture(scope="module")
def arm_build(tmp_path_factory) -> Path:
    """The kernels library and isa_check, configured and built for aarch64 in a temporary directory."""
    build = tmp_path_factory.mktemp("build-aarch64")
    _cmake_build(["-DSVDQ_KERNELS_ONLY=ON", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], build)
    return build


def _cmake_build(source_args: list[str], build: Path, *targets: str) -> None:
    configure = [CMAKE, "-S", str(ROOT), "-B", str(build), "-DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake"]
    configure += source_args
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    compile_ = [CMAKE, "--build", str(build), "-j", str(os.cpu_count() or 2)]
    for t in targets:
        compile_ += ["--target", t]
    for cmd in (configure, compile_):
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"


def _qemu(build: Path, cpu: str, *args: str) -> subprocess.CompletedProcess:
    cmd = ["qemu-aarch64", "-cpu", cpu, "-L", SYSROOT, str(build / "isa_check"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_cmake_picks_the_arm_sources_with_their_flags(arm_build):
    commands = json.loads((arm_build / "compile_commands.json").read_text())
    flags = {Path(c["file"]).name: c["command"] for c in commands}
    assert {"quantize_neon.cpp", "gemm_dotprod.cpp", "gemm_i8mm.cpp", "gemm_generic.cpp", "dispatch.cpp"} <= set(flags)
    assert not {name for name in flags if "avx" in name or name == "quantize_avx512.cpp"}, "x86 sources on aarch64"
    assert "-march=armv8.2-a+dotprod " in flags["gemm_dotprod.cpp"] + " "
    assert "-march=armv8.2-a+dotprod+i8mm" in flags["gemm_i8mm.cpp"]
    # The dispatcher and the NEON quantize_act run on any AArch64 CPU: no -march there.
    assert "-march" not in flags["dispatch.cpp"] and "-march" not in flags["quantize_neon.cpp"]
    assert _is_aarch64_elf(arm_build / "isa_check")


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("cortex-a72", ["generic"]),  # Armv8.0 (Raspberry Pi 4): no dot product
        ("neoverse-n1", ["generic", "dotprod"]),  # Armv8.2 + dotprod, no i8mm (Graviton 2)
    ],
)
def test_runtime_detection_under_qemu(arm_build, cpu, expected):
    out = _qemu(arm_build, cpu, "--list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == expected


def test_every_arm_path_matches_generic_under_qemu(arm_build):
    listed = _qemu(arm_build, "max", "--list")
    assert listed.returncode == 0, listed.stderr
    paths = listed.stdout.split()
    assert paths == ["generic", "dotprod", "i8mm"]  # -cpu max has every feature the paths need
    out = _qemu(arm_build, "max")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    for path in paths[1:]:
        assert f"OK {path}:" in out.stdout, out.stdout
    assert f"checked {len(paths) - 1} paths" in out.stdout


def _is_aarch64_elf(path: Path) -> bool:
    header = path.read_bytes()[:20]
    return header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64


def test_the_python_module_compiles_for_aarch64(tmp_path):
    """What ``pip install`` builds on an Arm Linux machine: the whole _C (cpp/bindings/ included), configured by
    the same CMakeLists.txt, compiled and linked for aarch64. There are no aarch64 CPython headers here, so it
    compiles against this interpreter's: CPython 3.11's public headers differ between x86-64 and aarch64 Linux
    only in pyconfig.h lines the extension does not use (both LP64, little-endian, glibc). The module cannot be
    imported here (no aarch64 Python); its kernels are run by the test above."""
    pybind11 = pytest.importorskip("pybind11", reason="the test extra's pybind11 (pip install -e '.[test]')")
    args = ["-DSVDQUANT_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}"]
    args += [f"-DPython_INCLUDE_DIR={sysconfig.get_paths()['include']}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"]
    _cmake_build(args, tmp_path, "_C")
    modules = list((tmp_path / "diffusers_svdquant").glob("_C*.so"))
    assert len(modules) == 1 and _is_aarch64_elf(modules[0])
