"""The command line of every script: flags made from the config fields, the device, and how a script ends.

The library modules raise typed errors (CheckpointError, DataError, PathError); `script`, around each script's
main, turns them into one `error:` line and exit status 1, and Ctrl-C into one line and exit status 130. Bad
flags are usage errors (argparse's message and exit status 2).
"""

import argparse
import functools
import signal
import sys
from dataclasses import fields

import torch

from checkpoints import CheckpointError, load_checkpoint
from data import DataError
from files import PathError, check_output_file, write_json

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
ERRORS = (CheckpointError, DataError, PathError)  # what a user can fix: a path, the data, a checkpoint


def fail(message):
    """Stop a script on bad input: one line on stderr, exit status 1, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def interrupted(message="interrupted (Ctrl-C)"):
    """Stop a script on Ctrl-C: one line on stderr (after a newline that ends a progress bar's), exit status 130."""
    print(f"\n{message}", file=sys.stderr)
    sys.exit(130)


def script(main):
    """A script's main, which ends on the library's errors with one `error:` line and on Ctrl-C, whenever it comes
    (loading, fetching, computing, writing), with one line and exit status 130, instead of a traceback."""

    @functools.wraps(main)
    def main_ending_in_one_line(*args, **kwargs):
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # not ignored, as it is in a background job
            signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()
        except ERRORS as e:
            fail(str(e))

    return main_ending_in_one_line


# --------------------------------------------------------------------------------------------- flags


def positive_int(text):
    return int_at_least(text, 1, "a positive integer")


def non_negative_int(text):
    return int_at_least(text, 0, "a non-negative integer")


def int_at_least(text, least, what):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(text):
    """'400' or '200,200' -> (400,) or (200, 200)."""
    try:
        return tuple(positive_int(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 400 or 200,200, got {text!r}"
        ) from None


# A field's annotation gives its flag's parser, unless its metadata names one ("type").
FLAG_TYPES = {int: positive_int, float: positive_float, str: str, tuple[int, ...]: int_list, int | None: positive_int}


def add_config_args(parser, config_class, title, defaults=None):
    """One flag per field of a config dataclass (latent_dim: --latent-dim), its type, choices, default and
    help read from the field; `defaults`, an instance, overrides the class's defaults."""
    group = parser.add_argument_group(title)
    for f in fields(config_class):
        default = getattr(defaults, f.name) if defaults is not None else f.default
        flag, shown = "--" + f.name.replace("_", "-"), format_default(default)
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=default, help=f.metadata["help"])
            continue
        group.add_argument(
            flag,
            type=f.metadata.get("type", FLAG_TYPES[f.type]),
            choices=f.metadata.get("choices"),
            default=default,
            help=f"{f.metadata['help']} (default: {shown})",
        )


def format_default(value):
    """A default as it would be typed: 512,256 for (512, 256), 'all' for None."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "all" if value is None else value


def config_from_args(config_class, args):
    """The config built by name from the parsed flags of add_config_args."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


# --------------------------------------------------------------------------------------------- the device


def add_device_arg(parser):
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="auto picks cuda, else mps, else cpu (default: auto)"
    )


def pick_device(name, parser):
    """The torch.device for --device; a device that is not there is a usage error, reported via the parser."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available to this PyTorch; use --device cpu or auto")
    elif name == "mps" and not torch.backends.mps.is_available():
        parser.error("--device mps: the Apple MPS backend is not available here; use --device cpu or auto")
    return torch.device(name)


# --------------------------------------------------------------------------------------------- a script's flags


def add_model_args(parser, what="the model"):
    """--checkpoint and --data-dir, for a script that uses a trained model."""
    parser.add_argument("--checkpoint", default="out/ckpt.pt", help=f"{what}, from train.py (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: the one the model was trained on)")


def load_model(args, device):
    """The model of --checkpoint on the device, its checkpoint's state, and the MNIST folder to read: --data-dir, or
    the one it was trained on."""
    state, model = load_checkpoint(args.checkpoint, device)
    return state, model, args.data_dir or state["train_config"]["data_dir"]


def add_json_arg(parser, what="the results"):
    parser.add_argument("--json", metavar="PATH", default=None, help=f"also write {what} to this JSON file")


def parse(parser, argv):
    """A script's parsed flags and its torch.device; a --json file that cannot be written is a usage error now,
    not after the work whose results it is to hold."""
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    check_json_flag(parser, getattr(args, "json", None))
    return args, device


# --------------------------------------------------------------------------------------------- --json


def check_json_flag(parser, path):
    """A --json file that cannot be written is a usage error now, not after the work whose results it holds."""
    if path is not None:
        try:
            check_output_file(path, "--json")
        except PathError as e:
            parser.error(str(e))


def write_results(path, results):
    """Write a script's results to its --json file (none: nothing), after they were printed: a failure now is
    one error line, and the numbers are still on the screen."""
    if path is None:
        return
    try:
        write_json(path, results, "--json")
    except PathError as e:
        fail(f"{e} (the results are printed above)")
    print(f"wrote {path}")
