"""Steady-state throughput of the Arm W4A4 GEMM micro-kernels from LLVM's scheduling models, without Arm hardware.

Each Arm GEMM source (cpp/cpu/gemm_dotprod.cpp, and gemm_i8mm.cpp where it exists) is compiled to assembly with
the flags CMakeLists.txt gives it (read from there) plus ``-DSVDQ_MCA_MARKERS``, which puts ``LLVM-MCA-BEGIN`` /
``LLVM-MCA-END`` comments around one group (64 values of K) of the micro-kernel's K loop; the region of the
full row block (the most dot instructions) goes to ``llvm-mca`` for each CPU name. The peak is a loop of
independent ``sdot`` (and ``smmla``) on the same model, so the % says how much of the core's int8 dot-product
throughput, as the model sees it, the kernel's steady state keeps: the group's float work (convert, s_x·s_w,
fma) and the loads against its dot products. Memory is not modelled (every load hits L1).

LLVM has no model for some cores and maps their names to another core's: the table says which model each
name uses (read from llvm-mca's resource names). The markers exist only in this build: the module pip builds
has no such comments (they are asm comments anyway, no instructions).

    python benchmarks/bench_arm_mca.py [--cxx aarch64-linux-gnu-g++] [--mca llvm-mca-19] [--cpus neoverse-n1,...]

Needs an AArch64 C++ compiler (Debian: g++-aarch64-linux-gnu, what .ci/arm-toolchain.sh installs) and
llvm-mca (Debian bookworm: llvm-19 has the NeoverseN1/V1/V2 models; llvm-16 maps N1 to CortexA57 and V1 to N2).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# CPU name -> (what it stands for, has i8mm). Every one has the dot product.
CPUS = {
    "neoverse-n1": ("Graviton2, Ampere Altra; the Cortex-A76's server twin", False),
    "neoverse-n2": ("Azure Cobalt 100, Alibaba Yitian 710", True),
    "neoverse-v1": ("Graviton3", True),
    "neoverse-v2": ("Graviton4, NVIDIA Grace", True),
    "apple-m1": ("Apple M1", False),
    "apple-m2": ("Apple M2 (LLVM 19 has one model for M1-M4)", True),
    "cortex-a76": ("Snapdragon 855-865 big cores, Raspberry Pi 5", False),
    "cortex-x2": ("Snapdragon 8 Gen 1 prime core", True),
}
# llvm-mca's resource-name prefix -> the scheduling model's name.
MODELS = {
    "N1Unit": "NeoverseN1",
    "N2Unit": "NeoverseN2",
    "V1Unit": "NeoverseV1",
    "V2Unit": "NeoverseV2",
    "CyUnit": "Cyclone (Apple A7)",
    "A57Unit": "CortexA57",
    "CortexA55Unit": "CortexA55",
    "CortexA510Unit": "CortexA510",
    "A64FXIP": "A64FX",
    "THX2T99": "ThunderX2",
    "TSV110Unit": "TSV110",
}
PATHS = {"dotprod": "gemm_dotprod.cpp", "i8mm": "gemm_i8mm.cpp"}
MACS = {"sdot": 16, "smmla": 32}  # int8 multiply-adds per instruction (128-bit vectors)
ITERATIONS = 200


def newest_mca() -> str | None:
    for v in range(25, 13, -1):
        if shutil.which(f"llvm-mca-{v}"):
            return f"llvm-mca-{v}"
    return shutil.which("llvm-mca")


def cmake_flags(source: str) -> list[str]:
    """The COMPILE_OPTIONS CMakeLists.txt gives `source` (its -march)."""
    text = (ROOT / "CMakeLists.txt").read_text()
    pattern = rf"set_source_files_properties\(cpp/cpu/{re.escape(source)} PROPERTIES COMPILE_OPTIONS \"([^\"]+)\""
    m = re.search(pattern, text)
    if not m:
        raise SystemExit(f"CMakeLists.txt gives {source} no COMPILE_OPTIONS")
    return m.group(1).split(";")


def kernel_region(cxx: list[str], source: str, tmp: Path) -> str:
    """The marked group of the full row block, as assembly llvm-mca reads."""
    asm = tmp / (source + ".s")
    cmd = [*cxx, "-std=c++17", "-O3", "-ffp-contract=off", "-fno-fast-math", "-DSVDQ_MCA_MARKERS"]
    cmd += [*cmake_flags(source), "-I", str(ROOT / "cpp"), "-S", str(ROOT / "cpp" / "cpu" / source), "-o", str(asm)]
    subprocess.run(cmd, check=True)
    regions, current = [], None
    for line in asm.read_text().splitlines():
        if "LLVM-MCA-BEGIN" in line:
            current = []
        elif "LLVM-MCA-END" in line:
            regions.append(current)
            current = None
        elif current is not None:
            s = line.strip()
            # Instructions only: no labels, directives, comments or the #APP/#NO_APP of inline asm.
            if s and not s.startswith((".", "#", "//", "@")) and not re.match(r"^[\w.$]+:", s):
                current.append(s)
    if not regions:
        raise SystemExit(f"no LLVM-MCA markers in {source}'s assembly")
    return "\n".join(max(regions, key=lambda r: sum(dot_count(r).values()))) + "\n"


def dot_count(lines) -> dict[str, int]:
    out = dict.fromkeys(MACS, 0)
    for line in lines if isinstance(lines, list) else lines.splitlines():
        op = line.split()[0] if line.split() else ""
        if op in out:
            out[op] += 1
    return out


def peak_loop(op: str) -> str:
    """24 independent `op` (no chain shorter than the instruction's latency on any of these cores)."""
    form = "sdot v{d}.4s, v{a}.16b, v{b}.4b[{l}]" if op == "sdot" else "smmla v{d}.4s, v{a}.16b, v{b}.16b"
    return "\n".join(form.format(d=i, a=24 + i % 4, b=28 + i % 4, l=i % 4) for i in range(24)) + "\n"


def mca(tool: str, cpu: str, asm: str, tmp: Path) -> tuple[float, str]:
    """(cycles per iteration, scheduling model name) of `asm` on `cpu`."""
    f = tmp / "region.s"
    f.write_text(asm)
    cmd = [tool, "-mtriple=aarch64", f"-mcpu={cpu}", "-mattr=+dotprod,+i8mm", f"-iterations={ITERATIONS}"]
    out = subprocess.run([*cmd, "-resource-pressure", str(f)], check=True, capture_output=True, text=True).stdout
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1)) / ITERATIONS
    units = re.findall(r"^\[[\d.]+\]\s+-\s+(\S+)", out, re.M)
    model = next((name for prefix, name in MODELS.items() if units and units[0].startswith(prefix)), None)
    return cycles, model or (units[0] if units else "?")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cxx", default="aarch64-linux-gnu-g++", help="AArch64 C++ compiler (a command, may have args)")
    p.add_argument("--mca", default=None, help="llvm-mca binary (default: the newest llvm-mca-N on PATH)")
    p.add_argument("--cpus", default=",".join(CPUS), help="comma-separated -mcpu names")
    args = p.parse_args()
    cxx = args.cxx.split()
    tool = args.mca or newest_mca()
    if not shutil.which(cxx[0]):
        raise SystemExit(f"{cxx[0]} not found: apt-get install g++-aarch64-linux-gnu (or pass --cxx)")
    if not tool or not shutil.which(tool):
        raise SystemExit("llvm-mca not found: apt-get install llvm-19 (or pass --mca)")
    version = lambda c: subprocess.run([c, "--version"], capture_output=True, text=True).stdout  # noqa: E731
    print(f"compiler: {version(cxx[0]).splitlines()[0]}")
    print(f"llvm-mca: {tool}, {next(s.strip() for s in version(tool).splitlines() if 'version' in s)}")
    cpus = [c for c in args.cpus.split(",") if c]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for path, source in PATHS.items():
            if not (ROOT / "cpp" / "cpu" / source).exists():
                continue
            region = kernel_region(cxx, source, tmp)
            dots = dot_count(region)
            macs = sum(MACS[op] * n for op, n in dots.items())
            counts = ", ".join(f"{n} {op}" for op, n in dots.items() if n)
            print(
                f"\n{path} ({source}): one group of the full row block = {len(region.splitlines())} instructions, "
                f"{counts} ({macs} int8 multiply-adds)"
            )
            head = f"{'-mcpu':<12} {'LLVM model':<19} | {'cycles':>6} {'MAC/cyc':>7} | {'sdot peak':>9} {'% sdot':>6}"
            print(head + (f" | {'smmla peak':>10} {'% smmla':>7}" if dots["smmla"] else "") + " | stands for")
            for cpu in cpus:
                about, has_i8mm = CPUS.get(cpu, ("", True))
                if dots["smmla"] and not has_i8mm:
                    continue  # the path does not run there
                cycles, model = mca(tool, cpu, region, tmp)
                rate = macs / cycles
                peaks = {op: 24 * MACS[op] / mca(tool, cpu, peak_loop(op), tmp)[0] for op in MACS}
                row = f"{cpu:<12} {model:<19} | {cycles:>6.1f} {rate:>7.1f} | {peaks['sdot']:>9.1f} "
                row += f"{100 * rate / peaks['sdot']:>5.0f}%"
                if dots["smmla"]:
                    row += f" | {peaks['smmla']:>10.1f} {100 * rate / peaks['smmla']:>6.0f}%"
                print(row + f" | {about}")


if __name__ == "__main__":
    main()
