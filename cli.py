"""The command line of every script: flags made from the config fields, the device, and how a script ends: a
bad flag is argparse's usage error (status 2); CheckpointError, DataError and OSError, one `error:` line (status
1); Ctrl-C, one line (status 130)."""

import argparse
import functools
import os
import platform
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from checkpoints import CheckpointError, load_checkpoint
from data import DataError
from files import write_json

ERRORS = (CheckpointError, DataError, OSError)  # what a user can fix: a checkpoint, the data, a path


def fail(message):
    """Stop a script on bad input: one line on stderr, exit status 1, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def interrupted(message="interrupted (Ctrl-C)"):
    """Stop a script on Ctrl-C: one line on stderr (after a newline that ends a progress bar's), exit status 130."""
    print(f"\n{message}", file=sys.stderr)
    sys.exit(130)


def script(main):
    """A script's main, which ends on a user's error with one `error:` line and on Ctrl-C with one line and exit
    status 130, instead of a traceback."""

    @functools.wraps(main)
    def main_ending_in_one_line(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            interrupted()
        except ERRORS as e:
            fail(str(e))

    return main_ending_in_one_line


# --------------------------------------------------------------------------------------------- flags


def int_at_least(least, what):
    """A flag's parser: its integer, if it is one and at least `least`; a usage error saying `what` otherwise."""

    def parse(text):
        if not text.lstrip("-").isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return int(text)

    return parse


positive_int, non_negative_int = int_at_least(1, "a positive integer"), int_at_least(0, "a non-negative integer")


def int_list(text):
    """'400' or '200,200' -> (400,) or (200, 200); each width's range is the config's to check."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 400 or 200,200, got {text!r}"
        ) from None


def add_config_args(parser, config_class, title, defaults=None):
    """One flag per field of a config dataclass (latent_dim: --latent-dim), its parser, choices, default and help
    read from the field (its valid range is the config's own check); `defaults`, an instance, overrides the class's
    defaults."""
    group = parser.add_argument_group(title)
    for f in fields(config_class):
        default = getattr(defaults, f.name) if defaults is not None else f.default
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            group.add_argument(flag, action="store_true", default=default, help=f.metadata["help"])
            continue
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else "all" if default is None else default
        parse = {tuple[int, ...]: int_list, int | None: int}.get(f.type, f.type)
        group.add_argument(
            flag,
            type=parse,
            choices=f.metadata.get("choices"),
            default=default,
            help=f"{f.metadata['help']} (default: {shown})",
        )


def config_from_args(config_class, args, parser):
    """The config built by name from the parsed flags of add_config_args; a value out of its range is a usage
    error."""
    try:
        return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})
    except ValueError as e:
        parser.error(str(e))


# --------------------------------------------------------------------------------------------- a script's flags


def add_device_arg(parser):
    parser.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="auto picks cuda, else mps, else cpu (default: auto)",
    )


def add_model_args(parser, what="the model"):
    """--checkpoint and --data-dir, for a script that uses a trained model."""
    parser.add_argument("--checkpoint", default="out/ckpt.pt", help=f"{what}, from train.py (default: %(default)s)")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: the one the model was trained on)")


def add_json_arg(parser, what="the results"):
    parser.add_argument("--json", metavar="PATH", default=None, help=f"also write {what} to this JSON file")


def parse(parser, argv):
    """A script's parsed flags and its torch.device; a device that is not there is a usage error. The flags also
    carry the command line and the time it started, for write_results."""
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", parser.prog, *map(str, sys.argv[1:] if argv is None else argv)])
    args.started = time.perf_counter()
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available to this PyTorch; use --device cpu or auto")
    elif name == "mps" and not torch.backends.mps.is_available():
        parser.error("--device mps: the Apple MPS backend is not available here; use --device cpu or auto")
    return args, torch.device(name)


def load_model(args, device):
    """The model of --checkpoint on the device, its checkpoint's state, and the MNIST folder to read: --data-dir, or
    the one it was trained on."""
    state, model = load_checkpoint(args.checkpoint, device)
    return state, model, args.data_dir or state["train_config"]["data_dir"]


def write_results(path, results, args, device):
    """Write a script's results to a JSON file (path None: nothing), after they were printed, with how they were
    made: the command, the machine, torch, and the wall time so far."""
    if path is not None:
        made_by = {
            "command": args.command,
            "machine": machine(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "wall_seconds": round(time.perf_counter() - args.started, 1),
        }
        write_json(path, {**results, "made_by": made_by})
        print(f"wrote {path}")


def machine(device):
    """The GPU's name, or the CPU's and its cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []  # Linux
    names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or platform.machine()}, {os.cpu_count()} cores"
