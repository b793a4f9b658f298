"""The emulator's own fiber switch (kernels/emu/fiber_switch.h, issue 16 item 1) tested on its own: a scheduler and
seven fibers switching 7,000 times with values live in callee-saved registers (tests/emu/fiber_switch_test.cpp),
built for this machine and, with a cross compiler and qemu-user (.ci/run installs them), for the other of x86-64 and
AArch64. A planted fault (two registers restored crosswise) must be caught on each."""

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "emu" / "fiber_switch_test.cpp"
HEADER = ROOT / "kernels" / "emu" / "fiber_switch.h"
HOST = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine())
# Each architecture's planted fault: two restores swapped, so two registers come back crosswise.
SWAPS = {"x86_64": ('"    popq %r15\\n"\n    "    popq %r14\\n"', '"    popq %r14\\n"\n    "    popq %r15\\n"'),
         "aarch64": ('"    ldp x21, x22, [sp, #16]\\n"', '"    ldp x22, x21, [sp, #16]\\n"')}

pytestmark = pytest.mark.emu


def _toolchain(arch):
    """(compiler, runner prefix) for `arch`, or None when this machine cannot build and run it."""
    if arch == HOST:
        return (shutil.which("g++"), []) if shutil.which("g++") else None
    compiler, qemu = shutil.which(f"{arch}-linux-gnu-g++"), shutil.which(f"qemu-{arch}")
    return (compiler, [qemu]) if compiler and qemu else None


def _build_and_run(arch, include: Path, tmp_path, opt="-O2"):
    tools = _toolchain(arch)
    if tools is None:
        pytest.skip(f"needs {arch}-linux-gnu-g++ and qemu-{arch} (Debian: g++-{arch.replace('_', '-')}-linux-gnu, "
                    "qemu-user; see .ci/run)")
    compiler, runner = tools
    exe = tmp_path / f"fiber_switch_{arch}{opt}"
    static = [] if arch == HOST else ["-static"]
    subprocess.run([compiler, opt, "-std=c++20", *static, f"-I{include}", str(SOURCE), "-o", str(exe)], check=True,
                   capture_output=True, text=True, timeout=300)
    return subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
@pytest.mark.parametrize("opt", ["-O0", "-O2"])
def test_fibers_keep_their_registers_and_stacks(arch, opt, tmp_path):
    r = _build_and_run(arch, ROOT / "kernels", tmp_path, opt)
    assert r.returncode == 0 and r.stdout.strip() == "ok 7007", (r.returncode, r.stdout, r.stderr)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_a_switch_that_swaps_two_registers_is_caught(arch, tmp_path):
    planted = HEADER.read_text()
    old, new = SWAPS[arch]
    assert old in planted
    (tmp_path / "emu").mkdir()
    (tmp_path / "emu" / "fiber_switch.h").write_text(planted.replace(old, new))
    r = _build_and_run(arch, tmp_path, tmp_path)
    assert r.returncode != 0 and "ok" not in r.stdout, (r.returncode, r.stdout)
