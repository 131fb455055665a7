"""The ``cnnjax`` command line: a thin layer over library functions.

Each subcommand parses its flags and calls one importable function, so a
notebook gets the same result as the shell. Heavy imports (jax, flax) happen
inside the subcommands, so ``cnnjax --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_shape(args: argparse.Namespace) -> int:
    from cnnjax.shapes import ShapeError, conv_output_size, effective_kernel_size

    padding = args.padding
    if padding.upper() in ("SAME", "VALID"):
        pad_value: int | str = padding.upper()
    else:
        try:
            pad_value = int(padding)
        except ValueError:
            print(f"error: --padding must be an integer, SAME or VALID, got {padding!r}.",
                  file=sys.stderr)
            return 2
    try:
        out = conv_output_size(
            args.size, args.kernel, args.stride, pad_value, args.dilation,
            exact=not args.floor, name="shape",
        )
    except (ShapeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    f_eff = effective_kernel_size(args.kernel, args.dilation)
    if isinstance(pad_value, str):
        from cnnjax.shapes import same_padding

        lo, hi = (0, 0) if pad_value == "VALID" else same_padding(
            args.size, args.kernel, args.stride, args.dilation)
        pad_text = f"{lo}+{hi}"
    else:
        pad_text = f"2*{pad_value}"
    f_text = str(args.kernel) if args.dilation == 1 else (
        f"{f_eff} (= {args.dilation}*({args.kernel}-1)+1)")
    division = "//" if args.floor else "/"
    print(f"(W - F + 2P) {division} S + 1 = ({args.size} - {f_text} + {pad_text}) {division} "
          f"{args.stride} + 1 = {out}")
    return 0


# --------------------------------------------------------------------------- train / eval


def _load_config(args: argparse.Namespace):
    """The config from --config FILE (or the package default) plus --config.* overrides."""
    from cnnjax.train.config import apply_overrides, default_config, load_config_file

    config = load_config_file(args.config) if args.config else default_config()
    return apply_overrides(config, args.config_overrides)


# Exit statuses of `cnnjax train` / `cnnjax eval` (docs/reliability.md).
EXIT_OK = 0            # finished
EXIT_USER_ERROR = 2    # a mistake to fix (config, data, paths, disk full, checkpoint that
                       # does not fit, processes that never connected); one `error:` line
EXIT_NON_FINITE = 3    # NaN/Inf loss, gradient or parameter; the last checkpoint is intact
EXIT_PREEMPTED = 75    # SIGTERM/SIGINT: checkpoint saved at the current step; rerun to resume
                       # (75 = EX_TEMPFAIL: "try again later")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _run_reporting_errors(args: argparse.Namespace, fn) -> int:
    """Runs ``fn()``; a user mistake becomes one ``error:`` line and status 2.

    A non-finite value gives status 3, a preemption (SIGTERM/SIGINT after the
    checkpoint was saved) status 75; ``--debug`` shows the traceback instead.
    """
    import logging

    logger = logging.getLogger("cnnjax")  # orbax/absl keep their own (WARNING) level
    if not any(getattr(h, "_cnnjax_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._cnnjax_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    from cnnjax.train.loop import TrainingPreempted

    try:
        return fn()
    except TrainingPreempted as stop:
        print(f"stopped: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (ValueError, OSError, ImportError) as err:
        if args.debug:
            raise
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            from cnnjax.train.checkpoint import is_disk_full

            what = ("the disk is full" if is_disk_full(err) else
                    err.strerror or type(err).__name__)
            where = f" at {err.filename}" if err.filename else ""
            print(f"error: {what}{where} ({_one_line(err)}); free space or fix the path "
                  "and rerun the same command (saved checkpoints are kept).", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FloatingPointError as err:
        if args.debug:
            raise
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_NON_FINITE


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    def run() -> int:
        config = _load_config(args)
        name = config.get("name") or (os.path.splitext(os.path.basename(args.config))[0]
                                      if args.config else "lenet5_digits")
        workdir = args.workdir or os.path.join("runs", name)
        from cnnjax.train import train_and_evaluate

        result = train_and_evaluate(config, workdir)
        shown = ", ".join(f"{k} {result[k]:.4f}" for k in
                          ("test_accuracy", "test_top5_accuracy", "test_loss") if k in result)
        print(f"{config.model} on {config.dataset}: {shown} after {result['step']} steps, "
              f"{result['wall_time_s']:.1f} s; workdir {workdir}")
        return 0

    return _run_reporting_errors(args, run)


def _cmd_eval(args: argparse.Namespace) -> int:
    def run() -> int:
        from cnnjax.train import apply_overrides, evaluate, stored_config

        if args.config:
            config = _load_config(args)
        else:  # the config saved with the checkpoint, plus any --config.* overrides
            config = apply_overrides(stored_config(args.workdir), args.config_overrides)

        result = evaluate(config, args.workdir, split=args.split)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step")
        print(f"checkpoint step {result['step']}: {shown}")
        return 0

    return _run_reporting_errors(args, run)


def _add_train_commands(sub) -> None:
    overrides_help = ("override any config field: --config.FIELD=VALUE, nested as "
                      "--config.augment.rotation=10 (parsed by the field's type)")
    train = sub.add_parser(
        "train", help="train a model from a config (default: LeNet-5 on digits)",
        description="Train a model from an ml_collections config file. With no arguments "
                    "trains LeNet-5 on the embedded digits into ./runs/lenet5_digits. "
                    + overrides_help + ".",
    )
    train.add_argument("--config", default=None,
                       help="config file with get_config() (default: lenet5_digits, built in)")
    train.add_argument("--workdir", default=None,
                       help="checkpoints, metrics.jsonl, tensorboard/ (default runs/<config>); "
                            "an existing one is resumed")
    train.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    train.epilog = ("exit status: 0 finished; 2 a mistake to fix (one error: line); 3 NaN/Inf "
                    "loss or gradient (last checkpoint intact); 75 stopped by SIGTERM/SIGINT "
                    "after saving a checkpoint: rerun the same command to resume. See "
                    "docs/reliability.md.")
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser(
        "eval", help="evaluate the newest checkpoint of a workdir",
        description="Evaluate the newest checkpoint in WORKDIR, with the config stored beside "
                    "it unless --config is given. " + overrides_help + ".",
    )
    ev.add_argument("--workdir", required=True, help="the run's workdir")
    ev.add_argument("--config", default=None, help="config file (default: the stored one)")
    ev.add_argument("--split", default="test", help="split to evaluate (default test)")
    ev.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    ev.set_defaults(func=_cmd_eval)


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    if not any(arg.startswith("--config.") for arg in argv):
        return argv, []  # keeps `cnnjax --help` free of jax imports
    from cnnjax.train.config import ConfigError, split_override_args

    try:
        return split_override_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_summary(args: argparse.Namespace) -> int:
    from cnnjax import models
    from cnnjax.shapes import ShapeError
    from cnnjax.summary import summary

    kwargs = {}
    if args.input_shape:
        try:
            kwargs["input_shape"] = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            kwargs["input_shape"] = ()
        if len(kwargs["input_shape"]) != 3:
            print(f"error: --input-shape must be H,W,C such as 224,224,3, got "
                  f"{args.input_shape!r}.", file=sys.stderr)
            return 2
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = models.get(args.name, **kwargs)
        print(summary(model))
    except (ShapeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _add_summary_command(sub) -> None:
    summ = sub.add_parser(
        "summary", help="Keras-style table of a model: layers, output shapes, parameters",
        description="Print a registered model's layers, output shapes and parameter counts "
                    "(shapes only: nothing is initialized).",
    )
    summ.add_argument("name", help="model name: lenet5, alexnet, vgg16, vgg19, allconv")
    summ.add_argument("--input-shape", default=None,
                      help="H,W,C of one input (default: the model's own, e.g. 224,224,3)")
    summ.add_argument("--num-classes", type=int, default=None,
                      help="size of the last layer (default: the model's own)")
    summ.set_defaults(func=_cmd_summary)


def _cmd_visualize(args: argparse.Namespace) -> int:
    chosen = [flag for flag, value in (("--workdir", args.workdir), ("--demo", args.demo),
                                       ("--model", args.model)) if value]
    if len(chosen) != 1:
        print("error: give exactly one of --workdir DIR, --demo edges or --model NAME"
              + (f" (got {', '.join(chosen)})." if chosen else "."), file=sys.stderr)
        return 2
    if (args.image is not None or args.index is not None) and not args.workdir:
        print("error: --image and --index choose the feature-map input of a run; "
              "use them with --workdir.", file=sys.stderr)
        return 2

    def run() -> int:
        import os

        from cnnjax import viz

        if args.workdir:
            out = args.out or os.path.join(args.workdir, "viz")
            paths = viz.visualize_run(args.workdir, out, image=args.image,
                                      index=args.index or 0)
        elif args.demo:
            paths = viz.edge_demo(args.out or "viz")
        else:
            paths = viz.visualize_model(args.model, args.out or os.path.join("viz", args.model))
        for path in paths.values():
            print(path)
        return 0

    return _run_reporting_errors(args, run)


def _add_visualize_command(sub) -> None:
    vis = sub.add_parser(
        "visualize", help="PNG pictures: filters, feature maps, curves, errors, architecture",
        description="Write PNG pictures of a trained run (--workdir: first-layer filters, the "
                    "feature maps of every conv layer for one image, training curves, "
                    "confusion matrix, worst-classified test images, architecture), of an "
                    "untrained registered model (--model: architecture and initial filters, "
                    "shapes only), or the lecture's edge-filter demo (--demo edges).",
    )
    vis.add_argument("--workdir", default=None, help="a training run's workdir")
    vis.add_argument("--model", default=None,
                     help="a registered model name (lenet5, alexnet, vgg16, ...), untrained")
    vis.add_argument("--demo", choices=["edges"], default=None,
                     help="edges: hand-set edge and Sobel filters on a sample photo")
    source = vis.add_mutually_exclusive_group()
    source.add_argument("--image", default=None,
                        help="image file whose feature maps are drawn (default: a test image)")
    source.add_argument("--index", type=int, default=None,
                        help="index of the test image whose feature maps are drawn (default 0)")
    vis.add_argument("--out", default=None,
                     help="output folder (default WORKDIR/viz, viz/MODEL, or viz for --demo)")
    vis.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    vis.set_defaults(func=_cmd_visualize)


def _cmd_bench(args: argparse.Namespace) -> int:
    def run() -> int:
        from cnnjax import bench

        result = bench.run_benchmark(args.model, args.batch, args.mode, dtype=args.dtype,
                                     steps=args.steps, warmup=args.warmup, peer=args.peer)
        print(bench.to_json(result) if args.json else bench.format_result(result))
        return 0

    return _run_reporting_errors(args, run)


def _add_bench_command(sub) -> None:
    bench = sub.add_parser(
        "bench", help="time the real jitted train/eval step: images/s, FLOPs, MFU",
        description="Time the trainer's jitted train step (--mode train) or eval step "
                    "(--mode infer) on synthetic data: warm-up excluded, median of --steps "
                    "steps. Reports images/s, step time, compile time, FLOPs per image "
                    "(from the layer shapes, cross-checked with XLA), achieved FLOP/s, the "
                    "matmul peak measured in the same process, MFU and peak device memory.",
    )
    bench.add_argument("--model", default="lenet5",
                       help="lenet5, alexnet, vgg16, vgg19, allconv (default lenet5)")
    bench.add_argument("--batch", type=int, default=128, help="global batch size (default 128)")
    bench.add_argument("--mode", choices=["train", "infer"], default="train",
                       help="train: forward+backward+update; infer: forward (default train)")
    bench.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                       help="compute dtype; parameters stay float32 (default float32)")
    bench.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    bench.add_argument("--warmup", type=int, default=2,
                       help="untimed steps after compiling (default 2)")
    bench.add_argument("--peer", choices=["torch"], default=None,
                       help="also time the PyTorch equivalent, alternating, and print the ratio")
    bench.add_argument("--json", action="store_true", help="print one JSON line")
    bench.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    bench.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnjax",
        description="Classic convolutional networks in JAX/Flax: train, evaluate, inspect.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    shape = sub.add_parser(
        "shape", aliases=["shapes"],
        help="output size of a conv/pool layer: (W - F + 2P) / S + 1",
        description="Output size of a convolution or pooling layer along one dimension.",
    )
    shape.add_argument("--size", type=int, required=True, help="input size W")
    shape.add_argument("--kernel", type=int, required=True, help="filter size F")
    shape.add_argument("--stride", type=int, default=1, help="stride S (default 1)")
    shape.add_argument("--padding", default="0", help="zero padding P per side, SAME or VALID")
    shape.add_argument("--dilation", type=int, default=1, help="dilation D (default 1)")
    shape.add_argument("--floor", action="store_true",
                       help="floor an inexact division (TensorFlow/PyTorch) instead of failing")
    shape.set_defaults(func=_cmd_shape)
    _add_train_commands(sub)
    _add_summary_command(sub)
    _add_visualize_command(sub)
    _add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, config_overrides = _split_config_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    args.config_overrides = config_overrides
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_malloc() -> bool:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    XLA:CPU allocates every step's large buffers (a VGG-16 weight gradient is
    411 MB, its step's temporaries 1.3 GB) afresh. glibc serves such sizes with
    mmap and unmaps them on free, so each step pays page faults on all of it: a
    quarter of a VGG-16 or AlexNet train step on a 2-core CPU
    (experiments/benchmarks/NOTES.md). With mmap and trimming off the memory is
    reused, but only by allocations of the main thread: another thread's arena
    maps any request above 64 MB afresh whatever the settings, and XLA:CPU runs
    (and allocates for) a program on its worker threads unless dispatch is
    synchronous. So this also turns JAX's asynchronous CPU dispatch off (no effect
    on GPUs and TPUs): AlexNet's train step 16% faster, VGG-16's 15%, LeNet-5's the
    same (NOTES.md, attempt 56). Called by the ``cnnjax`` program before anything
    is allocated (not on import: a library must not change its host's allocator
    or JAX's settings); ``CNNJAX_TUNE_MALLOC=0`` turns it off. Returns whether the
    settings were applied.
    """
    import os

    if os.environ.get("CNNJAX_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        # -1: never trim (mallopt(3)); the largest finite threshold, 2 GB, is less than
        # what one step of a large model frees at once.
        if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
            return False
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave malloc alone
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def tune_gc() -> None:
    """Take what is loaded now out of Python's cyclic garbage collector, now and at exit.

    Importing JAX and Flax leaves some hundred thousand long-lived objects that
    every full collection walks again: the collections during start-up and the
    last one at exit cost ~0.2 s of ``cnnjax train``'s start-up (NOTES.md,
    attempt 63). ``gc.freeze()`` moves them to a generation the collector
    skips; registered with ``atexit`` it does the same for whatever exists at
    exit, so the interpreter's final collection has nothing to walk (objects
    in reference cycles are then left to the OS without their finalizers; the
    trainer closes its files and checkpoints itself). Called by the ``cnnjax``
    program after its imports (not on import: a library must not change its
    host's collector); ``CNNJAX_TUNE_GC=0`` turns it off.
    """
    import atexit
    import gc
    import os

    if os.environ.get("CNNJAX_TUNE_GC", "1") == "0":
        return
    gc.freeze()
    atexit.register(gc.freeze)


def console_main() -> int:
    """The ``cnnjax`` program: :func:`tune_malloc` and :func:`tune_gc`, then :func:`main`."""
    tune_malloc()
    tune_gc()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
