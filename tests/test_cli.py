"""The command line as a user meets it (issue 17, items 9, 10, 14): an error is one line on stderr naming the flag,
never a traceback; --help shows every default and every option has help; --version; each summary line reports
what this call did. Each case runs `python -m pyalexnet` in a fresh process, as a shell would."""

import json

import numpy as np
import pytest
from conftest import cli, tiny_run

import pyalexnet as pa
from pyalexnet.__main__ import _parser

pytest.importorskip("PIL")


def one_line_error(r, *fragments, code=2, warnings=False):
    """The process failed with `code` and said so in exactly one line holding every fragment (after the
    WARNING lines of the files it skipped, where `warnings`)."""
    lines = [line for line in r.stderr.splitlines() if not (warnings and line.startswith("WARNING skipped "))]
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A prepared demo dataset (72 x 72) and a 2-step checkpoint of the small network on it."""
    return tiny_run(tmp_path_factory.mktemp("cli"), seed=3, max_steps=2)


# ---- 10: errors are one line naming the flag ------------------------------------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["show-filters", "--weights", "x.npz", "--columns", "0"], ["argument --columns", ">= 1", "got 0"]),
    (["predict", "a.jpg", "--weights", "x.npz", "--top", "-3"], ["argument --top", "got -3"]),
    (["predict", "a.jpg", "--weights", "x.npz", "--top", "0"], ["argument --top", "got 0"]),
    (["train", "--data", "d", "--batch-size", "0"], ["argument --batch-size"]),
    (["train", "--data", "d", "--lr", "nan"], ["argument --lr", "finite"]),
    (["train", "--data", "d", "--momentum", "1"], ["argument --momentum", "[0, 1)"]),
    (["eval", "--data", "d", "--weights", "w", "--batch-size", "x"], ["argument --batch-size", "'x'"]),
    (["prepare", "src", "out", "--workers", "0"], ["argument --workers"]),
    (["bench", "--batch", "0"], ["argument --batch"]),
    (["profile", "--samples", "-1"], ["argument --samples"]),
])
def test_a_bad_flag_is_one_line_naming_it(tmp_path, args, fragments):
    line = one_line_error(cli(*args, cwd=tmp_path), *fragments)
    assert line.startswith(f"pyalexnet {args[0]}: error: ")


def test_a_bad_backend_variable_breaks_neither_help_nor_info(tmp_path):
    r = cli("--help", cwd=tmp_path, PYALEXNET_BACKEND="gpu")
    assert r.returncode == 0 and r.stdout.startswith("usage: pyalexnet") and not r.stderr, r.stderr
    for command in ["info", "bench", "check"]:
        one_line_error(cli(command, cwd=tmp_path, PYALEXNET_BACKEND="gpu"), f"pyalexnet {command}: error: "
                       "PYALEXNET_BACKEND must be 'cuda' or 'emu'")
    if pa.backend_name() != "cuda":
        one_line_error(cli("info", cwd=tmp_path, PYALEXNET_BACKEND="cuda"), "pyalexnet info: error: PYALEXNET_BACKEND"
                       "=cuda, but ", code=1)


def test_info_says_why_cuda_is_not_in_use(tmp_path):
    r = cli("info", cwd=tmp_path, PYALEXNET_BACKEND="emu")
    assert r.returncode == 0 and "cuda:     not in use: PYALEXNET_BACKEND=emu chose the emulator" in r.stdout
    if pa.backend_name() != "cuda":
        r = cli("info", cwd=tmp_path, PYALEXNET_BACKEND=None)
        assert f"cuda:     not in use: {pa._backend.cuda_unavailable}" in r.stdout, r.stdout


def test_file_and_folder_errors_say_what_is_wrong(small, tmp_path):
    one_line_error(cli("eval", "--data", tmp_path / "nowhere", "--weights", small / "run" / "last.npz",
                       cwd=tmp_path), "nowhere: no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("eval", "--data", empty, "--weights", small / "run" / "last.npz", cwd=tmp_path),
                   "no dataset.json", "pyalexnet prepare")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "notes.txt").write_text("hello")
    for name, what in [("array.npy", "a .npy array"), ("notes.txt", "not a zip archive")]:
        line = one_line_error(cli("predict", "x.jpg", "--weights", tmp_path / name, cwd=tmp_path),
                              "not a pyalexnet checkpoint", what)
        assert "pickle" not in line
    one_line_error(cli("predict", "x.jpg", "--weights", tmp_path / "missing.npz", cwd=tmp_path), "missing.npz")


def test_eval_names_the_image_size_not_a_flag_it_does_not_have(small, tmp_path):
    from pyalexnet.data import prepare

    prepare(small / "images", tmp_path / "data64", size=64, workers=1, progress=False)
    line = one_line_error(cli("eval", "--data", tmp_path / "data64", "--weights", small / "run" / "last.npz",
                              "--no-progress", cwd=tmp_path), "67 x 67", "64 x 64", "--size >= 67")
    assert "--crop" not in line


def test_train_names_its_own_options_and_the_smallest_crop(small, tmp_path):
    line = one_line_error(cli("train", "--data", small / "data", "--out", tmp_path / "r", "--crop", "30",
                              "--no-progress", cwd=tmp_path), "crop: 30 x 30 is too small", "67 x 67")
    assert line.startswith("pyalexnet train: error: crop:")
    one_line_error(cli("train", "--data", small / "data", "--out", tmp_path / "r", "--threshold", "1",
                       cwd=tmp_path), "argument --threshold", "[0, 1)")


def test_prepare_errors_are_not_doubled_and_name_the_class(tmp_path):
    from pyalexnet.demo import write_demo_data

    write_demo_data(tmp_path / "src", train_per_class=2, val_per_class=0, size=32, seed=0)
    for f in (tmp_path / "src" / "train" / "circle").iterdir():
        f.write_bytes(b"not a jpeg")
    line = one_line_error(cli("prepare", tmp_path / "src", tmp_path / "out", "--no-progress", "--workers", "1",
                              cwd=tmp_path), "circle", "no training image decodes", warnings=True)
    assert line.startswith("pyalexnet prepare: error: class(es) circle") and "prepare: error: prepare" not in line


# ---- 14: help and version -------------------------------------------------------------------------------------------
def test_every_option_has_help_and_the_defaults_show(tmp_path):
    parser = _parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in commands.items()
               for a in sub._actions if a.dest != "help" and not a.help]
    assert not missing, missing
    text = cli("train", "--help", cwd=tmp_path).stdout
    for shown in ["(default: 128)", "(default: 0.9)", "(default: runs/alexnet)", "(default: plateau)",
                  "(default: 4)", "(default: 227 for paper, 224 for torchvision)"]:
        assert shown in " ".join(text.split()), shown
    for sub in ["bench", "profile"]:
        assert "(default: 128)" in cli(sub, "--help", cwd=tmp_path).stdout


def test_version(tmp_path):
    r = cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"pyalexnet {pa.__version__}"


# ---- 9: messages about this call ------------------------------------------------------------------------------------
def test_prepare_reports_the_rate_of_what_it_decoded_only(small, tmp_path):
    import shutil

    shutil.copytree(small / "data", tmp_path / "data")  # every shard done: a rerun decodes nothing
    r = cli("prepare", small / "images", tmp_path / "data", "--size", "72", "--no-progress", "--workers", "1",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "nothing to decode" in r.stdout and "images/s" not in r.stdout, r.stdout
    r = cli("prepare", small / "images", tmp_path / "fresh", "--size", "72", "--no-progress", "--workers", "1",
            cwd=tmp_path)
    assert "this run decoded 60 files in 2 shard(s)" in r.stdout and "images/s" in r.stdout, r.stdout


def test_bench_on_the_emulator_says_its_batch_and_writes_the_json_asked_for(tmp_path):
    if pa.backend_name() == "cuda":
        pytest.skip("the GPU bench is bench/gpu_check.sh's")
    out = tmp_path / "sub" / "bench.json"
    r = cli("bench", "--variant", "paper", "--iters", "1", "--batch", "128", "--json", out, cwd=tmp_path,
            PYALEXNET_BACKEND="emu")
    assert r.returncode == 0, r.stderr
    assert "--batch 128: the emulator runs batch 4" in r.stdout and f"wrote {out}" in r.stdout
    result = json.loads(out.read_text())
    assert result["measured"] is False and result["backend"] == "emu" and result["requested_batch"] == 128
    assert result["batch"] == 4 and [row["variant"] for row in result["rows"]] == ["paper"] and result["rows"][0]["ok"]
