"""No kernel spills registers: ptxas's report for every kernel file and every architecture the build targets."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("ptxas_report", Path(__file__).parents[1] / "bench" / "ptxas_report.py")
ptxas_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ptxas_report)


@pytest.fixture(scope="module")
def rows():
    if ptxas_report.find_nvcc() is None:
        pytest.skip("nvcc is not installed: nothing to compile the CUDA kernels with")
    return ptxas_report.report("all")


def test_every_kernel_file_is_reported(rows):
    sources = {p.name for p in (Path(__file__).parents[1] / "kernels").glob("*.cu")}
    for arch in ptxas_report.DEFAULT_ARCHS:
        assert {r["file"] for r in rows if r["arch"] == arch} == sources, arch


def test_no_kernel_spills(rows):
    spilled = [f"{r['kernel']}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded" for r in rows
               if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_no_kernel_uses_a_stack_frame(rows):
    # A stack frame means local memory: an array indexed at run time, or a spill by another name.
    framed = [f"{r['kernel']}: {r['stack']} B" for r in rows if r["stack"]]
    assert not framed, "stack frames:\n" + "\n".join(framed)
