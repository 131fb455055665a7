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


def _run_reporting_errors(args: argparse.Namespace, fn) -> int:
    """Runs ``fn()``; a user mistake becomes one ``error:`` line and status 2."""
    import logging

    logger = logging.getLogger("cnnjax")  # orbax/absl keep their own (WARNING) level
    if not any(getattr(h, "_cnnjax_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._cnnjax_cli = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return fn()
    except (ValueError, FileNotFoundError, ImportError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 3


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


if __name__ == "__main__":
    sys.exit(main())
