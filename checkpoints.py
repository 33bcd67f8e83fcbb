"""Checkpoints: a run's state saved with the checksums of its tensors, and loaded only once it is validated.

A checkpoint is a plain dict (tensors, numbers, strings, dicts and lists only), so torch.load(path,
weights_only=True) reads it and no checkpoint can run code. train.py writes <out-dir>/ckpt.pt after every
epoch, beside the log of the run, <out-dir>/log.jsonl.
"""

import hashlib
import pickle
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from data import PIXELS
from files import write_atomic
from model import VAE, VAEConfig

CKPT_FILE = "ckpt.pt"
LOG_FILE = "log.jsonl"
FRAMES_DIR = "frames"  # train.py --frames: <out-dir>/frames/0001.png, one image an epoch
CHECKPOINT_KEYS = ("model", "model_config", "train_config", "epoch")
# The parts of a checkpoint whose tensors carry a checksum: load_checkpoint verifies the model's, train.py's
# --resume the others, each once it has checked that the part fits.
CHECKSUMMED = {"model": "model weights", "optimizer": "optimizer state", "rng": "random-number state"}


def checkpoint_path(out_dir):
    """Where train.py keeps a run's checkpoint, <out-dir>/ckpt.pt; the run's log, log.jsonl, lies beside it."""
    return Path(out_dir) / CKPT_FILE


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why and what to do."""


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
    in a tensor's data loads without complaint otherwise."""
    saved = state["checksum"]
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its checksum is {type(saved).__name__}, not what train.py writes")
    for part in parts:
        if saved.get(part) != tensor_digest(state[part]):
            raise CheckpointError(
                f"{path}: checksum mismatch in its {CHECKSUMMED[part]}: the file was changed or damaged after it "
                f"was written; use another copy of it, or train again"
            )


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
    if "checksum" not in state:
        raise CheckpointError(f"{path} was written by another version of this code (it has no checksums); train anew")
    verify_checksums(state, path, ["model"])
    _check_configs(state["model_config"], state["train_config"], path)
    try:
        model = VAE(VAEConfig(**state["model_config"]))
        model.load_state_dict(state["model"])
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot build the model from it: {str(e).splitlines()[0]}") from e
    return state, model.to(device).eval()


def _check_configs(config, train_config, path):
    """Raise CheckpointError unless the model config fits VAEConfig and the training config holds what every
    script needs to prepare the data as training did."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: model_config must be a dict, found {type(config).__name__}")
    known = {f.name for f in fields(VAEConfig)}
    unknown, missing = sorted(set(config) - known), sorted(known - set(config))
    if unknown or missing:
        which = ", ".join([f"unknown field {n!r}" for n in unknown] + [f"missing field {n!r}" for n in missing])
        raise CheckpointError(f"{path}: model_config does not fit this version's VAEConfig ({which})")
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
        raise CheckpointError(f"{path} is a folder; give the checkpoint file in it, such as {path / CKPT_FILE}")
    raise CheckpointError(f"no checkpoint at {path}; check the path, or train a model first (python train.py)")


def _load_error_reason(e):
    """The informative line of a torch.load error. A weights-only refusal opens with boilerplate (which even
    suggests weights_only=False) and names the real cause, such as a blocked GLOBAL like os.system, further down."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, pickle.UnpicklingError):
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line for line in lines if not line.startswith(boilerplate)] or lines
    return lines[0] if lines else type(e).__name__
