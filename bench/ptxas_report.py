"""Registers, shared memory and spills of every kernel, from ptxas's own report (nvcc -Xptxas -v).

    python bench/ptxas_report.py [--arch sm_90]

Compiles each kernels/*.cu to a cubin for one architecture (or, with --arch all, each default architecture of
the build) and prints a table; exits 1 if any kernel spills.
tests/test_ptxas.py runs the same check, so a spill fails CI (the build also fails: -Xptxas -warn-spills,-Werror).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
DEFAULT_ARCHS = ("sm_80", "sm_90")  # CMakeLists.txt's machine-code targets

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def compile_report(source: Path, arch: str, nvcc: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, f"-arch={arch}", "-cubin", "-O3", "-std=c++17", "-Xptxas=-v", f"-I{KERNELS}",
               str(source), "-o", str(Path(tmp) / "k.cubin")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.name}:\n{proc.stderr}")
    rows, current = [], None
    for line in proc.stderr.splitlines():
        if m := _ENTRY.search(line):
            current = {"file": source.name, "kernel": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USAGE.search(line)):
            current.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    for row, name in zip(rows, demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


def report(arch: str = "sm_90") -> list[dict]:
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    archs = DEFAULT_ARCHS if arch == "all" else (arch,)
    jobs = [(source, a) for a in archs for source in sorted(KERNELS.glob("*.cu"))]
    with ThreadPoolExecutor() as pool:
        return [row for rows in pool.map(lambda job: compile_report(*job, nvcc), jobs) for row in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    args = parser.parse_args()
    rows = report(args.arch)
    print(f"{'file':<18}{'arch':<7}{'regs':>5}{'smem B':>8}{'stack':>6}{'spill st/ld':>12}  kernel")
    for r in rows:
        print(f"{r['file']:<18}{r['arch']:<7}{r['registers']:>5}{r['smem']:>8}{r['stack']:>6}"
              f"{r['spill_stores']:>6}/{r['spill_loads']:<5}  {r['kernel']}")
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} kernels, {len(spilled)} with spills")
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
