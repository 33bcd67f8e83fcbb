"""Checkpoints: a run's state saved whole, and loaded only once it is known to be one of this project's.

A checkpoint is a plain dict (tensors, numbers, strings, dicts and lists only), so torch.load(path,
weights_only=True) reads it and no checkpoint can run code. train.py writes <out-dir>/ckpt.pt after every
epoch, beside the log of the run, <out-dir>/log.jsonl.
"""

import json
import warnings
from dataclasses import fields
from pathlib import Path

import torch

from files import write_atomic
from model import VAE, VAEConfig

CKPT_FILE = "ckpt.pt"
LOG_FILE = "log.jsonl"
FRAMES_DIR = "frames"  # train.py --frames: <out-dir>/frames/0001.png, one image an epoch
CHECKPOINT_KEYS = ("model", "model_config", "train_config", "epoch")
TRAIN_CONFIG_READ = ("pixels", "data_dir")  # what every script reads of train_config, to see the data as training did


class CheckpointError(Exception):
    """The checkpoint cannot be used; the message says why and what to do."""


def save_checkpoint(path, state):
    """Write `state` atomically: a crash or kill -9 in the middle leaves the previous checkpoint whole."""
    write_atomic(path, lambda f: torch.save(state, f))


def load_checkpoint(path, device="cpu"):
    """(state dict, model on `device` in eval mode) of a checkpoint of this project; CheckpointError otherwise.

    Everything is read onto the CPU first (weights_only=True: no code is ever unpickled): the saved random-number
    states must stay CPU tensors whatever the device, and the optimizer's state follows its parameters when it is
    loaded.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file in it, such as {path / CKPT_FILE}")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; check the path, or train a model first (python train.py)")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle: the error says enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # damaged bytes make the unpickler raise almost anything (KeyError, IndexError, ...)
        raise CheckpointError(f"{path} is not a loadable checkpoint of this project ({type(e).__name__})") from e
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of this project: it needs {', '.join(CHECKPOINT_KEYS)}")
    model_config, train_config = state["model_config"], state["train_config"]
    if (
        not isinstance(model_config, dict)
        or set(model_config) != {f.name for f in fields(VAEConfig)}
        or not isinstance(train_config, dict)
        or any(key not in train_config for key in TRAIN_CONFIG_READ)
    ):
        raise CheckpointError(f"{path} was written by another version of this code (its configs do not fit)")
    try:
        model = VAE(VAEConfig(**model_config))
        model.load_state_dict(state["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot build the model from it: {str(e).splitlines()[0]}") from e
    return state, model.to(device).eval()


def read_log(path):
    """A run's log.jsonl as a list of records ([] if there is none), without a last line torn by a crash."""
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]
