"""`pyalexnet bench` and bench/results_md.py where no GPU is: the emulated correctness run, and the report."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import ON_CUDA

import pyalexnet.bench as bench
from pyalexnet.__main__ import main as cli

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(ON_CUDA, reason="the emulated run is what a machine without a GPU gets")
def test_bench_without_a_gpu_runs_the_pipeline_on_the_emulator_and_checks_it(capsys):
    assert cli(["bench", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device" in out
    assert "emulated — a correctness run, not a speed figure" in out
    assert out.count(" ok") == 2 and "MISMATCH" not in out


def test_bench_options_are_checked():
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--mode", "fast"])


def test_training_flops_count_the_layers():
    net = bench.pa.AlexNet("torchvision")
    # torchvision's AlexNet: about 0.71 GFLOP-MAC forward per image, i.e. ~1.43 GFLOP.
    assert 1.40e9 < bench.conv_flops(net) < 1.45e9


def test_results_md_renders_each_kind_of_result(tmp_path):
    spec = importlib.util.spec_from_file_location("results_md", ROOT / "bench" / "results_md.py")
    results_md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_md)
    results_md.RESULTS, results_md.OUT = tmp_path, tmp_path / "RESULTS.md"
    results_md.main()
    assert "No GPU results yet" in results_md.OUT.read_text()
    whole = {"variant": "paper", "mode": "strict", "batch": 128, "images_per_s": 1000.0, "torch_ms": 100.0,
             "torch_images_per_s": 1280.0, "speedup": 0.78}
    (tmp_path / "a-bench.json").write_text(json.dumps(
        {"bench": "pyalexnet bench", "card": "H100", "date": "2026-11-26", "commit": "abc", "whole_network": [whole]}))
    results_md.main()
    text = results_md.OUT.read_text()
    assert "## pyalexnet bench: H100, 2026-11-26, commit abc" in text
    assert "| paper | strict | 128 | 1000 | 1280 | 0.78x |" in text
