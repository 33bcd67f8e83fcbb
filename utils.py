"""What every script shares: flags made from config dataclasses, the device, output paths, Ctrl-C, and
checkpoints."""

import argparse
import errno
import functools
import hashlib
import json
import os
import pickle
import sys
import tempfile
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from data import BINARIZE_TO_PIXELS, PIXELS
from model import VAE, VAEConfig

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
CHECKPOINT_KEYS = ("model", "model_config", "train_config", "epoch")


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why and what to do."""


class PathError(Exception):
    """An output path cannot be written; the message names it and says what to do."""


def fail(message):
    """Stop a script on bad input: one line on stderr, exit status 1, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def stop_on_ctrl_c(main):
    """A script's main that ends on Ctrl-C, whenever it comes (loading, fetching, computing, writing), with one
    line and exit status 130 instead of a traceback. train.fit catches it first, to say what the checkpoint holds."""

    @functools.wraps(main)
    def main_stopping_on_ctrl_c(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("\ninterrupted (Ctrl-C)", file=sys.stderr)  # the newline ends a progress bar's line
            sys.exit(130)

    return main_stopping_on_ctrl_c


# --------------------------------------------------------------------------------------------- flags


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
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


def add_device_arg(parser):
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto picks cuda, else mps, else cpu")


def pick_device(name, parser):
    """The torch.device for --device; a device that is not there is a usage error, reported via the parser."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available to this PyTorch; use --device cpu or auto")
    elif name == "mps" and not torch.backends.mps.is_available():
        parser.error("--device mps: the Apple MPS backend is not available here; use --device cpu or auto")
    return torch.device(name)


# --------------------------------------------------------------------------------------------- output paths

# What to do about an output path the system refuses, by errno; for anything else, another path.
PATH_ADVICE = {
    errno.ENOSPC: "free some disk space or choose another {flag}",
    errno.EDQUOT: "free some of your disk quota or choose another {flag}",
    errno.EACCES: "make it writable for you or choose another {flag}",
    errno.EPERM: "make it writable for you or choose another {flag}",
    errno.EROFS: "it is on a read-only file system: choose another {flag}",
    errno.ENOTDIR: "part of that path is a file, not a folder: choose another {flag}",
    errno.ENOENT: "no folder can be made there: choose another {flag}",
}


def path_advice(e, flag):
    """What to do about the OSError e met writing into the path given by `flag`."""
    return PATH_ADVICE.get(e.errno, "choose another {flag}").format(flag=flag)


def path_problem(flag, path, e):
    """The PathError for the OSError e met writing into `path`, given by `flag`."""
    return PathError(f"{flag} {path}: cannot write there ({e.strerror or e}); {path_advice(e, flag)}")


def check_output_dir(path, flag):
    """Create the folder `path` (given by `flag`) if need be, and check that files can be written into it: a
    bad --out-dir or --plots-dir stops the script at once, not after its expensive work. Raises PathError."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise PathError(f"{flag} {path} is a file, not a folder; give a folder (a new one is created)")
        path.mkdir(parents=True, exist_ok=True)
        probe_write(path)
    except OSError as e:
        raise path_problem(flag, path, e) from e


def check_output_file(path, flag):
    """Check that the file `path` (given by `flag`) can be written: it is not a folder, and its folder exists and
    takes new files. `path` itself is not touched: write_json replaces it at the end. Raises PathError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise PathError(f"{flag} {path} is a folder; give a file name, such as {path / 'results.json'}")
        if not path.parent.is_dir():
            what = "is a file, not a folder" if path.parent.exists() else "does not exist; create it or"
            raise PathError(f"{flag} {path}: its folder {path.parent} {what}; choose another path")
        probe_write(path.parent)
    except OSError as e:
        raise path_problem(flag, path, e) from e


def probe_write(folder):
    """Write a nameless file of one block into `folder`: what the system refuses now, it would refuse later."""
    with tempfile.TemporaryFile(dir=folder) as f:
        f.write(bytes(4096))
        f.flush()


def write_atomic(path, write):
    """Call write(file) to write `path` atomically: a failure at any moment (a full disk, Ctrl-C, a kill) leaves
    either the old file or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half-written file behind
        raise


def write_json(path, obj, flag):
    """Write `obj` as JSON into `path` (given by `flag`), atomically; a failure is a PathError."""
    try:
        write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
    except OSError as e:
        raise path_problem(flag, path, e) from e


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


# --------------------------------------------------------------------------------------------- checkpoints

# The parts of a checkpoint whose tensors carry a checksum: load_checkpoint verifies the model's, train.py's
# --resume the others, each once it has checked that the part fits.
CHECKSUMMED = {"model": "model weights", "optimizer": "optimizer state", "rng": "random-number state"}


def save_checkpoint(path, state):
    """Write `state` with the checksums of its tensors, atomically (write_atomic)."""
    state = {**state, "checksum": {part: tensor_digest(state[part]) for part in CHECKSUMMED if part in state}}
    write_atomic(path, lambda f: torch.save(state, f))


def tensor_digest(obj):
    """sha256 of the name, dtype, shape and bytes of every tensor in nested dicts and lists, in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors(obj):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def named_tensors(obj, name=""):
    """(name, tensor) for every tensor in nested dicts (in the order of their keys), lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from named_tensors(obj[key], f"{name}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from named_tensors(item, f"{name}/{i}")


def verify_checksums(state, path, parts):
    """Raise CheckpointError if the tensors of these parts of a loaded checkpoint are not the bytes saved: a flip
    in a tensor's data loads without complaint otherwise. A checkpoint saved before checksums has none."""
    saved = state.get("checksum")
    if saved is None:
        return
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its checksum is {type(saved).__name__}, not what train.py writes")
    for part in parts:
        if saved.get(part) != tensor_digest(state[part]):
            raise CheckpointError(
                f"{path}: checksum mismatch in its {CHECKSUMMED[part]}: the file was changed or damaged after it "
                f"was written; use another copy of it, or train again"
            )


def _load_error_reason(e):
    """The informative line of a torch.load error. A weights-only refusal opens with boilerplate (which even
    suggests weights_only=False) and names the real cause, such as a blocked GLOBAL like os.system, further down."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, pickle.UnpicklingError):
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line for line in lines if not line.startswith(boilerplate)] or lines
    return lines[0] if lines else type(e).__name__


def load_checkpoint(path, device="cpu"):
    """Load and validate a checkpoint of this project; never unpickles code (weights_only=True).

    Returns (state dict, model on `device` in eval mode). Raises CheckpointError with one clear sentence.
    Everything is read onto the CPU first: the saved random-number states must stay CPU tensors whatever the
    device, and the optimizer's state follows its parameters when it is loaded.
    """
    path = Path(path)
    state = _read_checkpoint(path)
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        present = sorted(state, key=str) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it needs the keys {', '.join(CHECKPOINT_KEYS)}, "
            f"found {present}"
        )
    verify_checksums(state, path, ["model"])
    config = state["model_config"]
    _check_configs(config, state["train_config"], path)
    try:
        model = VAE(VAEConfig(**config))
        model.load_state_dict(upgrade_state_dict(state["model"], model.config.arch))
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot build the model from it: {str(e).splitlines()[0]}") from e
    if "checksum" not in state:
        print(
            f"note: {path} has no checksum (it predates them): damage to its weights would go unseen", file=sys.stderr
        )
    return state, model.to(device).eval()


def _check_configs(config, train_config, path):
    """Raise CheckpointError unless the model config fits VAEConfig and the training config holds what every
    script needs to prepare the data as training did; upgrades a training config of an earlier version."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: model_config must be a dict, found {type(config).__name__}")
    known = {f.name for f in fields(VAEConfig)}
    unknown, missing = sorted(set(config) - known), sorted(known - set(config))
    if unknown or missing:
        which = ", ".join([f"unknown field {n!r}" for n in unknown] + [f"missing field {n!r}" for n in missing])
        raise CheckpointError(f"{path}: model_config does not fit this version's VAEConfig ({which})")
    if isinstance(train_config, dict):
        upgrade_train_config(train_config, config.get("likelihood"))
    if (
        not isinstance(train_config, dict)
        or train_config.get("pixels") not in PIXELS[1:]
        or not isinstance(train_config.get("data_dir"), str)
        or not isinstance(train_config.get("beta"), (int, float))
    ):
        raise CheckpointError(
            f"{path}: its train_config must hold pixels (one of {', '.join(PIXELS[1:])}), data_dir and beta; "
            f"was it written by train.py?"
        )


def _read_checkpoint(path):
    """The unpickled contents of the file `path`, read onto the CPU; CheckpointError if there is none to read."""
    try:
        if path.is_file():
            with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol: the error says enough
                warnings.simplefilter("ignore")
                return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # the file, or a folder on the way to it
        raise CheckpointError(f"cannot read {path} ({e.strerror}); make it readable for you, or copy it") from e
    except Exception as e:  # damaged bytes make the unpickler raise almost anything (KeyError, IndexError, ...)
        raise CheckpointError(
            f"{path} is not a loadable checkpoint of this project (refused or unreadable: {_load_error_reason(e)})"
        ) from e
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file in it, such as {path / 'ckpt.pt'}")
    raise CheckpointError(f"no checkpoint at {path}; check the path, or train a model first (python train.py)")


# Every run from before --objective, --k and --estimator was fitted so.
FITTED_BEFORE_WAYS = {"objective": "elbo", "k": 1, "estimator": "pathwise"}


def upgrade_train_config(train_config, likelihood):
    """A training config of an earlier version, in this version's terms: how it was fitted, and, from before
    --pixels, what its --binarize meant for that likelihood."""
    for name, value in FITTED_BEFORE_WAYS.items():
        train_config.setdefault(name, value)
    binarize = train_config.pop("binarize", None)
    if "pixels" in train_config or binarize not in BINARIZE_TO_PIXELS:
        return
    pixels = BINARIZE_TO_PIXELS[binarize]
    train_config["pixels"] = pixels.get(likelihood) if isinstance(pixels, dict) else pixels


# Checkpoints from before the decoder's last layer was named to_logits held it inside the decoder.
LEGACY_TO_LOGITS = {"mlp": "decoder.1.", "conv": "decoder.4."}


def upgrade_state_dict(state_dict, arch):
    old = LEGACY_TO_LOGITS[arch]
    return {("to_logits." + k[len(old) :] if k.startswith(old) else k): v for k, v in state_dict.items()}
