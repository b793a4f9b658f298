"""pyalexnet's command line.

    pyalexnet info          which backend runs the kernels, and how
    pyalexnet check         runs every kernel on the active backend against the float64 reference, prints the errors
    pyalexnet bench         training throughput and per-layer times against PyTorch + cuDNN (see pyalexnet/bench.py)
    pyalexnet demo-data OUT a small synthetic ImageFolder (ten classes of drawn shapes)
    pyalexnet prepare SRC OUT   the paper's preprocessing into shards, the mean image and the colour PCA
    pyalexnet train --data DIR  training as in the paper (pyalexnet/train.py)
    pyalexnet eval --data DIR --weights CKPT     top-1 and top-5 error, centre crop and 10-crop
    pyalexnet predict IMG... --weights CKPT      the top-5 classes of each image, from the checkpoint alone
    pyalexnet show-filters --weights CKPT -o F   the first layer's kernels, labelled (the paper's Figure 3)
    pyalexnet demo DIR      demo-data, prepare, train and eval of a small network, end to end
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

import pyalexnet as pa
from pyalexnet import reference as R
from pyalexnet._cli import NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, POSITIVE_INT, Parser, integer, number


def info() -> int:
    be = pa._backend.active  # a forced backend that cannot run raises here: main prints it as one line
    print(f"pyalexnet {pa.__version__}")
    print(f"backend:  {be.name}")
    if be.name == "emu":
        print(f"emulator: {be.module.worker_count()} worker threads, fibers switched with {be.module.fiber_switch}")
        print("          (the kernels run on the CPU emulator, for correctness, not speed)")
        print(f"cuda:     not in use: {pa._backend.cuda_unavailable}")
    else:
        dev = be.xp.cuda.Device()
        props = be.xp.cuda.runtime.getDeviceProperties(dev.id)
        print(f"device:   {props['name'].decode()} (compute capability {dev.compute_capability})")
    return 0


def _checks(rng):
    """(name, tolerance, function returning (ours, reference) pairs) for every kernel."""
    f32 = np.float32

    def host(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(f32)

    def relu():
        x, dy = host(3, 96, 27, 27), host(3, 96, 27, 27)
        y = pa.ops.relu_forward(pa.asarray(x))
        dx = pa.ops.relu_backward(pa.asarray(dy), y)
        return [(y, R.relu_forward(x)), (dx, R.relu_backward(dy, pa.to_numpy(y)))]

    def linear():
        x, w, b, dy = host(7, 1000), host(300, 1000, scale=0.03), host(300), host(7, 300)
        y = pa.ops.linear_forward(pa.asarray(x), pa.asarray(w), pa.asarray(b))
        grads = pa.ops.linear_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(w))
        return [(y, R.linear_forward(x, w, b)), *zip(grads, R.linear_backward(dy, x, w))]

    def softmax_xent():
        z, labels = host(5, 1000, scale=3.0), rng.integers(0, 1000, 5).astype(np.int64)
        loss, dz = pa.ops.softmax_cross_entropy(pa.asarray(z), pa.asarray(labels))
        ref_loss, ref_dz = R.softmax_cross_entropy(z, labels)
        return [(np.array([loss]), np.array([ref_loss])), (dz, ref_dz)]

    def sgd():
        w, dw, v = host(4097), host(4097), host(4097)
        ref = R.sgd_update(w, dw, v, 0.01)
        wd, vd = pa.asarray(w), pa.asarray(v)
        pa.ops.sgd_update(wd, pa.asarray(dw), vd, 0.01)
        return list(zip((wd, vd), ref))

    def conv():
        x, w, b = host(2, 48, 13, 13), host(64, 24, 3, 3, scale=0.1), host(64)
        y = pa.ops.conv2d_forward(pa.asarray(x), pa.asarray(w), pa.asarray(b), 1, 1, 2)
        dy = host(*y.shape)
        grads = pa.ops.conv2d_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(w), 1, 1, 2)
        return [(y, R.conv2d_forward(x, w, b, 1, 1, 2)), *zip(grads, R.conv2d_backward(dy, x, w, 1, 1, 2))]

    def lrn():
        x, dy = host(2, 96, 13, 13, scale=20.0), host(2, 96, 13, 13)
        y = pa.ops.lrn_forward(pa.asarray(x))
        dx = pa.ops.lrn_backward(pa.asarray(dy), pa.asarray(x), y)
        return [(y, R.lrn_forward(x)), (dx, R.lrn_backward(dy, x))]

    def maxpool():
        x = host(2, 96, 27, 27)
        y = pa.ops.maxpool_forward(pa.asarray(x))
        dy = host(*y.shape)
        dx = pa.ops.maxpool_backward(pa.asarray(dy), pa.asarray(x), y)
        return [(y, R.maxpool_forward(x)), (dx, R.maxpool_backward(dy, x))]

    def dropout():
        x, dy = host(8, 4096), host(8, 4096)
        y, mask = pa.ops.dropout_forward(pa.asarray(x), 0.5, seed=1)
        keep = R.dropout_mask(x.shape, 0.5, 1)
        dx = pa.ops.dropout_backward(pa.asarray(dy), mask)
        return [(y, R.dropout_forward(x, keep)), (dx, R.dropout_backward(dy, keep))]

    return [("conv", conv), ("relu", relu), ("lrn", lrn), ("maxpool", maxpool), ("dropout", dropout),
            ("linear (sgemm)", linear), ("softmax_xent", softmax_xent), ("sgd_update", sgd)]


def check() -> int:
    info()
    rng = np.random.default_rng(0)
    tol = 1e-5
    print(f"\n{'kernel':<16}{'outputs':>8}{'max rel err':>14}{'ms':>10}  vs float64 reference (bound {tol:g})")
    failed = 0
    for name, run in _checks(rng):
        start = time.perf_counter()
        pairs = run()
        pa.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        errs = []
        for ours, ref in pairs:
            ours = np.asarray(pa.to_numpy(ours), np.float64)
            errs.append(float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-300)))
        worst = max(errs)
        ok = worst < tol
        failed += not ok
        print(f"{name:<16}{len(pairs):>8}{worst:>14.2e}{ms:>10.1f}  {'ok' if ok else 'FAILED'}")
    print("\nall kernels agree with the reference" if not failed else f"\n{failed} kernel(s) FAILED")
    return 1 if failed else 0


# The small-input configuration the demo trains (and the tests use): a quarter of AlexNet's widths on 67 x 67
# crops of 80 x 80 images. Every layer is there, with the paper's kernel sizes and strides.
DEMO = {"size": 80, "crop": 67, "width": 0.25, "batch_size": 32, "epochs": 8, "lr": 0.01, "scale": 1 / 64,
        "init": "kaiming"}


def _add_train_args(p):
    p.add_argument("--data", required=True, help="a folder written by 'pyalexnet prepare'")
    p.add_argument("--out", default="runs/alexnet", help="checkpoints, log.jsonl and curves.png")
    p.add_argument("--variant", choices=["paper", "torchvision"], default="paper",
                   help="paper: the 2012 network (LRN, two groups, dropout on fc6/fc7 outputs); torchvision: "
                        "torchvision's one-tower AlexNet")
    p.add_argument("--epochs", type=POSITIVE_INT, default=90, help="passes over the training set")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per SGD step")
    p.add_argument("--lr", type=POSITIVE, default=0.01, help="the initial learning rate")
    p.add_argument("--momentum", type=number(0.0, 1.0, high_open=True), default=0.9, help="SGD momentum, in [0, 1)")
    p.add_argument("--weight-decay", type=NONNEGATIVE, default=5e-4, help="L2 penalty on the weights")
    p.add_argument("--schedule", choices=["plateau", "step", "constant"], default="plateau",
                   help="plateau: lr / 10 after more than --patience epochs without a new best validation error, at "
                        "most 3 times (the paper); step: lr / 10 every --step-every epochs; constant")
    p.add_argument("--step-every", type=POSITIVE_INT, default=30, help="epochs between lr / 10 for --schedule step")
    p.add_argument("--width", type=POSITIVE, default=1.0, help="scales every layer's channels (smaller networks)")
    p.add_argument("--crop", type=POSITIVE_INT, default=None,
                   help="the network's input size (default: 227 for paper, 224 for torchvision)")
    p.add_argument("--init", choices=["paper", "kaiming"], default="paper",
                   help="paper: N(0, 0.01) weights, biases 1/0; kaiming: He's N(0, 2/fan_in), the last layer "
                        "N(0, 0.01), biases 0 (short runs)")
    p.add_argument("--scale", type=POSITIVE, default=None,
                   help="multiplies the mean-subtracted 0-255 input (default: 1 for --init paper, 1 / (2 x the "
                        "training pixels' standard deviation) for --init kaiming)")
    p.add_argument("--patience", type=NONNEGATIVE_INT, default=4,
                   help="plateau schedule: lr / 10 once more than this many epochs in a row bring no new best "
                        "validation error (PyTorch's ReduceLROnPlateau rule)")
    p.add_argument("--threshold", type=number(0.0, 1.0, high_open=True), default=1e-4,
                   help="plateau schedule: a new best must beat the best by this fraction")
    p.add_argument("--cooldown", type=NONNEGATIVE_INT, default=0,
                   help="plateau schedule: epochs after a reduction that are not counted")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--no-pca", action="store_true", help="no PCA colour shifts")
    p.add_argument("--no-random-crop", action="store_true", help="the centre crop instead of random crops")
    p.add_argument("--log-loss", action="store_true", help="curves.png: the training loss on a log scale")
    p.add_argument("--no-tensorboard", action="store_true",
                   help="no TensorBoard events in OUT/tb/ (written only when torch.utils.tensorboard or tensorboardX "
                        "imports)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete OUT's earlier run (log.jsonl, last.npz, best.npz, curves.png, tb/) first; without it "
                        "(or --resume) a folder holding a run is refused")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="the initial weights, batches and dropout")
    p.add_argument("--checkpoint-every", type=POSITIVE_INT, default=1000,
                   help="steps between checkpoints (OUT/last.npz; also at each epoch's end)")
    p.add_argument("--log-every", type=POSITIVE_INT, default=10, help="steps between log lines")
    p.add_argument("--resume", default=None, help="continue the run of this checkpoint (e.g. OUT/last.npz)")
    p.add_argument("--max-steps", type=POSITIVE_INT, default=None,
                   help="stop, with a checkpoint, after this many steps of this call (default: no limit)")
    p.add_argument("--loader-threads", type=POSITIVE_INT, default=None,
                   help="threads staging the batches (default: one per CPU, at most 4)")
    p.add_argument("--shuffle", choices=["full", "window"], default="full",
                   help="full: a permutation of the whole set each epoch; window: shards in random order, images "
                        "shuffled within --shuffle-window shards (for data larger than memory)")
    p.add_argument("--shuffle-window", type=POSITIVE_INT, default=8, help="shards per window of --shuffle window")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train(args) -> int:
    from .train import train

    r = train(args.data, args.out, variant=args.variant, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
              momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
              step_every=args.step_every, width=args.width, crop=args.crop, init=args.init, seed=args.seed,
              scale=args.scale, patience=args.patience, threshold=args.threshold, cooldown=args.cooldown,
              flip=not args.no_flip, pca=not args.no_pca, random_crop=not args.no_random_crop,
              log_loss=args.log_loss, tensorboard=not args.no_tensorboard, overwrite=args.overwrite,
              checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
              max_steps=args.max_steps, progress=not args.no_progress, loader_threads=args.loader_threads,
              shuffle=args.shuffle, shuffle_window=args.shuffle_window)
    print(f"checkpoints in {args.out}")  # train() has said what this call did
    return 130 if r["stopped"] == "interrupted" else 0


def _print_eval(result) -> None:
    print(f"{result['images']} images")
    print(f"centre crop: top-1 error {result['top1_error']:.4f}  top-5 error {result['top5_error']:.4f}  "
          f"(accuracy {1 - result['top1_error']:.4f} / {1 - result['top5_error']:.4f})")
    if "top1_error_10crop" in result:
        label = f"{len(result['views'])} crops:" if "views" in result else "10 crops:"
        print(f"{label:<13}top-1 error {result['top1_error_10crop']:.4f}  top-5 error "
              f"{result['top5_error_10crop']:.4f}  (accuracy {1 - result['top1_error_10crop']:.4f} / "
              f"{1 - result['top5_error_10crop']:.4f})")


def _eval(args) -> int:
    from .checkpoint import load
    from .data import Dataset
    from .train import check_classes, eval_views, evaluate

    ck = load(args.weights)
    dataset = Dataset(args.data)
    check_classes(ck.extra, ck.net.num_classes, dataset, args.weights)
    if ck.net.input_size > dataset.size:  # the crop is the checkpoint's: no flag of eval sets it
        raise ValueError(f"{args.weights}: the network takes {ck.net.input_size} x {ck.net.input_size} crops, larger "
                         f"than {args.data}'s {dataset.size} x {dataset.size} images; prepare the images with "
                         f"--size >= {ck.net.input_size}")
    scale = (ck.extra.get("train") or {}).get("scale", 1.0)
    _print_eval(evaluate(ck.net, dataset, args.split, args.batch_size, not args.no_ten_crop, scale,
                         progress=not args.no_progress, views=eval_views(ck.extra)))
    return 0


def _predict(args) -> int:
    from .infer import predict

    def show(r):
        if r.error is not None:
            print(f"pyalexnet predict: skipped {r.error}", file=sys.stderr)
            return
        print(r.path)
        for name, p in r.top:
            print(f"  {p:7.4f}  {name}")

    results = predict(args.images, args.weights, args.top, args.ten_crop, args.batch_size, args.data, on_result=show)
    skipped = sum(r.error is not None for r in results)
    if skipped:
        print(f"pyalexnet predict: {skipped} of {len(results)} file(s) skipped", file=sys.stderr)
    return 2 if skipped == len(results) else 0


def _show_filters(args) -> int:
    from .infer import save_filter_figure

    save_filter_figure(args.weights, args.output, args.columns, args.zoom)
    print(f"wrote {args.output}")
    return 0


def _prepare(args) -> int:
    import logging

    from .data import prepare

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    t = time.perf_counter()
    call = {}
    m = prepare(args.src, args.out, args.size, args.workers, args.shard_images, progress=not args.no_progress,
                report=call, interleave=args.interleave)
    dt = time.perf_counter() - t
    print(f"{m['splits']['train']['count']} training and {m['splits'].get('val', {}).get('count', 0)} validation "
          f"images of {len(m['classes'])} classes in {args.out} ({len(m['skipped'])} unreadable, skipped)")
    kept = f"; {call['shards_kept']} shard(s) of an earlier run kept" if call["shards_kept"] else ""
    if call["shards"]:
        print(f"this run decoded {call['images']} files in {call['shards']} shard(s) in {dt:.1f} s, "
              f"{call['images'] / dt:.1f} images/s{kept}")
    else:
        print(f"nothing to decode: every shard was already done ({dt:.1f} s){kept}")
    return 0


def _demo_data(args) -> int:
    from .demo import write_demo_data

    r = write_demo_data(args.out, args.train_per_class, args.val_per_class, args.size, args.seed)
    print(f"wrote {r['train']} training and {r['val']} validation images of {len(r['classes'])} classes to {args.out}")
    return 0


def _demo(args) -> int:
    """demo-data, prepare, train and eval of the small configuration, each step timed."""
    import logging

    from .checkpoint import load
    from .data import Dataset, prepare
    from .demo import write_demo_data
    from .train import evaluate, train

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    root = Path(args.dir)
    times = {}
    t = time.perf_counter()
    write_demo_data(root / "images", seed=args.seed)
    times["demo-data"] = time.perf_counter() - t
    t = time.perf_counter()
    prepare(root / "images", root / "prepared", size=DEMO["size"], progress=not args.no_progress)
    times["prepare"] = time.perf_counter() - t
    print(f"prepared {root / 'prepared'} in {times['prepare']:.1f} s")
    t = time.perf_counter()
    train(root / "prepared", root / "run", epochs=args.epochs, batch_size=DEMO["batch_size"], lr=DEMO["lr"],
          schedule="plateau", width=DEMO["width"], crop=DEMO["crop"], init=DEMO["init"], seed=args.seed,
          scale=DEMO["scale"], overwrite=True,  # the demo's own folder: a rerun starts its run over
          checkpoint_every=10**9, progress=not args.no_progress)
    times["train"] = time.perf_counter() - t
    t = time.perf_counter()
    ck = load(root / "run" / "best.npz")
    result = evaluate(ck.net, Dataset(root / "prepared"), "val", DEMO["batch_size"], True, DEMO["scale"])
    times["eval"] = time.perf_counter() - t
    _print_eval(result)
    print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + f" (backend {pa.backend_name()})")
    print(f"chance is a top-1 error of {1 - 1 / 10:.2f}; curves in {root / 'run' / 'curves.png'}")
    return 0


def _parser() -> Parser:
    parser = Parser(prog="pyalexnet", description="AlexNet from hand-written CUDA kernels, with a CPU emulator "
                    "that runs the same kernel source.")
    parser.add_argument("--version", action="version", version=f"pyalexnet {pa.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="which backend runs the kernels, and why not cuda")
    sub.add_parser("check", help="run every kernel against the float64 reference")
    sub.add_parser("bench", help="training throughput and per-layer times against PyTorch (pyalexnet bench --help)")
    sub.add_parser("profile", help="predicted time of every layer pass on a named GPU, without one "
                                   "(pyalexnet profile --help)")
    p = sub.add_parser("demo-data", help="write a small synthetic ImageFolder")
    p.add_argument("out", help="the folder to write (train/<class>/*.jpg, val/)")
    p.add_argument("--train-per-class", type=POSITIVE_INT, default=80, help="training images per class")
    p.add_argument("--val-per-class", type=NONNEGATIVE_INT, default=20, help="validation images per class")
    p.add_argument("--size", type=integer(16), default=96, help="the images' side, in pixels")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="the drawings' random seed")
    p = sub.add_parser("prepare", help="preprocess an ImageNet-style folder into shards, mean and colour PCA")
    p.add_argument("src", help="a folder with train/<class>/* and optionally val/")
    p.add_argument("out", help="the prepared dataset's folder (rerunning resumes)")
    p.add_argument("--size", type=POSITIVE_INT, default=256, help="the stored images' side (the paper's 256)")
    p.add_argument("--workers", type=POSITIVE_INT, default=None, help="processes (default: one per CPU)")
    p.add_argument("--shard-images", type=POSITIVE_INT, default=512, help="images per shard")
    p.add_argument("--interleave", action="store_true",
                   help="shard the training images in a fixed random order, not class by class (every shard a "
                        "sample of all classes: for train --shuffle window)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_train_args(sub.add_parser("train", help="train AlexNet on a prepared dataset"))
    p = sub.add_parser("eval", help="top-1 / top-5 error of a checkpoint")
    p.add_argument("--data", required=True, help="a folder written by 'pyalexnet prepare'")
    p.add_argument("--weights", required=True, help="a checkpoint (e.g. runs/alexnet/best.npz)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which images")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per forward pass")
    p.add_argument("--no-ten-crop", action="store_true", help="the centre crop only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("predict", help="the top classes of image files, from a checkpoint alone",
                       epilog="A file that does not decode is reported on stderr and skipped; the exit code is 2 only "
                              "when no file could be read.")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    p.add_argument("--weights", required=True, help="a checkpoint (it carries its classes and preprocessing)")
    p.add_argument("--data", default=None,
                   help="the prepared dataset it was trained on, for checkpoints without preprocessing (default: "
                        "the checkpoint's own)")
    p.add_argument("--top", type=POSITIVE_INT, default=5, help="classes to print per image")
    p.add_argument("--ten-crop", action="store_true", help="average the test-time views (the paper's 10 crops)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per forward pass")
    p = sub.add_parser("show-filters", help="the first layer's kernels as a labelled PNG grid")
    p.add_argument("--weights", required=True, help="a checkpoint")
    p.add_argument("-o", "--output", default="filters.png", help="the PNG to write")
    p.add_argument("--columns", type=POSITIVE_INT, default=12, help="kernels per row")
    p.add_argument("--zoom", type=POSITIVE_INT, default=4, help="screen pixels per kernel pixel")
    p = sub.add_parser("demo", help="demo-data -> prepare -> train -> eval of a small network, timed")
    p.add_argument("dir", help="the folder for images/, prepared/ and run/ (a rerun starts over)")
    p.add_argument("--epochs", type=POSITIVE_INT, default=DEMO["epochs"], help="training epochs")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0, help="the data's and the run's seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["bench"], ["profile"]):  # their own parsers (pyalexnet/bench.py, pyalexnet/profile.py)
        command = argv[0]

        def run():
            from importlib import import_module

            return import_module(f"pyalexnet.{command}").main(argv[1:])
    else:
        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help, --version, a bad flag (already reported): a status, for callers of main()
            return e.code if isinstance(e.code, int) else 2
        command = args.command
        commands = {"info": lambda a: info(), "check": lambda a: check(), "demo-data": _demo_data,
                    "prepare": _prepare, "train": _train, "eval": _eval, "predict": _predict,
                    "show-filters": _show_filters, "demo": _demo}

        def run():
            return commands[command](args)

    from .data import BadImage
    from .train import TrainingDiverged

    try:
        return run()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except TrainingDiverged as e:
        print(f"pyalexnet {command}: {e}", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError, BadImage) as e:  # bad input, missing or unreadable files, disk full
        print(f"pyalexnet {command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a kernel fault (KernelError), a dead worker process, a forced backend missing
        print(f"pyalexnet {command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"pyalexnet {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
