"""What every script shares: flag types, the device, checkpoints, and the test-set ELBO."""

import argparse
import os
import pickle
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from data import BINARIZE_CHOICES, batches
from model import VAE, VAEConfig

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
CHECKPOINT_KEYS = ("model", "model_config", "train_config", "epoch")
# The test ELBO is estimated with one z per image drawn from this seed, so numbers of different epochs,
# runs and scripts use the same noise (and scoring never touches the training random stream).
EVAL_SEED = 1234


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why and what to do."""


def fail(message):
    """Stop a script on bad input: one line on stderr, exit status 1, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


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


def add_device_arg(parser):
    parser.add_argument(
        "--device", default="auto", choices=DEVICE_CHOICES, help="auto picks cuda, else mps, else cpu"
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


# --------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path, state):
    """Write atomically: a kill at any moment leaves either the old checkpoint or the new one, whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, Ctrl-C) leaves no half-written file behind
        raise


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
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the path, or train a model first (python train.py)")
    try:
        with warnings.catch_warnings():  # e.g. torch's note on a foreign pickle protocol: the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # damaged bytes make the unpickler raise almost anything (KeyError, IndexError, ...)
        raise CheckpointError(
            f"{path} is not a loadable checkpoint of this project (refused or unreadable: {_load_error_reason(e)})"
        ) from e
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        present = sorted(state, key=str) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint of this project: it needs the keys {', '.join(CHECKPOINT_KEYS)}, "
            f"found {present}"
        )
    config = state["model_config"]
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: model_config must be a dict, found {type(config).__name__}")
    known = {f.name for f in fields(VAEConfig)}
    unknown, missing = sorted(set(config) - known), sorted(known - set(config))
    if unknown or missing:
        which = ", ".join([f"unknown field {n!r}" for n in unknown] + [f"missing field {n!r}" for n in missing])
        raise CheckpointError(f"{path}: model_config does not fit this version's VAEConfig ({which})")
    # Every script prepares the data as training did, so these settings of the run must be there too.
    train_config = state["train_config"]
    if (
        not isinstance(train_config, dict)
        or train_config.get("binarize") not in BINARIZE_CHOICES
        or not isinstance(train_config.get("data_dir"), str)
        or not isinstance(train_config.get("beta"), (int, float))
    ):
        raise CheckpointError(
            f"{path}: its train_config must hold binarize (one of {', '.join(BINARIZE_CHOICES)}), data_dir and "
            f"beta; was it written by train.py?"
        )
    try:
        model = VAE(VAEConfig(**config))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot build the model from it: {str(e).splitlines()[0]}") from e
    return state, model.to(device).eval()


# --------------------------------------------------------------------------------------------- scoring


@torch.inference_mode()
def test_elbo(model, images, batch_size=1000):
    """Mean -ELBO over `images` and its two terms (recon, kl), nats per image, one z per image (EVAL_SEED).

    Returns 0-dim tensors on the images' device: no host synchronisation here.
    """
    generator = torch.Generator(device=images.device).manual_seed(EVAL_SEED)
    recon_sum = torch.zeros((), device=images.device)
    kl_sum = torch.zeros((), device=images.device)
    for x in batches(images, batch_size):
        recon, kl = model.elbo_terms(x, generator)
        recon_sum += recon.sum()
        kl_sum += kl.sum()
    n = images.shape[0]
    return (recon_sum + kl_sum) / n, recon_sum / n, kl_sum / n


@torch.inference_mode()
def posterior_means(model, images, batch_size=1000):
    """E_q[z|x] = mu(x) for every image: (N, 1, 28, 28) -> (N, latent_dim), in batches to bound memory."""
    return torch.cat([model.encode(x)[0] for x in batches(images, batch_size)])
