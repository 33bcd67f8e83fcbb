"""train.py and checkpoints.py when things go wrong: bad flags, bad data, crashes, bad, hostile or damaged
checkpoints, --resume, Ctrl-C and a diverging loss.

Every run is conftest's tiny run (128 images, one hidden layer of 32, 4 steps an epoch, one CPU thread). train.main runs
in-process, so an uncaught exception (what would print a traceback) fails the test by itself; stderr is
also checked to hold exactly one `error: ...` line. One test runs train.py in a subprocess, to kill it
with SIGKILL in the middle of a checkpoint write.
"""

import errno
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import checkpoints
import data
import evaluate
import train
import visualize
from checkpoints import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- helpers


def run_main(scripts, *argv):
    """train.main(argv) -> (exit code, stdout, shown stderr lines)."""
    return scripts.run(train.main, *argv)


def log_epochs(run):
    log = run / "log.jsonl"
    return [json.loads(line)["epoch"] for line in log.read_text().splitlines()] if log.exists() else []


def log_records(run):
    return {r["epoch"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def saved_epoch(run):
    state, _ = load_checkpoint(run / "ckpt.pt")
    return state["epoch"]


@pytest.fixture
def run(run_copy):
    """A private copy of the finished 1-epoch tiny run."""
    return run_copy()


@pytest.fixture
def epoch2_run(tiny_run):
    """The same run, 2 epochs straight (shared: read-only)."""
    return tiny_run(epochs=2)


# --------------------------------------------------------------------------------------------- flags

POSITIVE_INT = "expected a positive integer"
HIDDEN = "expected comma-separated positive integers"


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--epochs", "0", POSITIVE_INT),
        ("--epochs", "-3", POSITIVE_INT),
        ("--epochs", "1.5", POSITIVE_INT),
        ("--batch-size", "0", POSITIVE_INT),
        ("--batch-size", "-1", POSITIVE_INT),
        ("--latent-dim", "0", POSITIVE_INT),
        ("--latent-dim", "two", POSITIVE_INT),
        ("--lr", "0", "expected a positive number"),
        ("--lr", "-0.001", "expected a positive number"),
        ("--lr", "nan", "expected a positive number"),
        ("--lr", "inf", "expected a positive number"),
        ("--likelihood", "gaussian", "bernoulli"),
        ("--arch", "transformer", "mlp"),
        ("--activation", "gelu", "tanh"),
        ("--device", "tpu", "cuda"),
        ("--hidden-dims", "", HIDDEN),
        ("--hidden-dims", "a", HIDDEN),
        ("--hidden-dims", "200,,200", HIDDEN),
        ("--hidden-dims", "200,", HIDDEN),
        ("--hidden-dims", "0", HIDDEN),
        ("--hidden-dims", "-5", HIDDEN),
        ("--hidden-dims", "200,-5", HIDDEN),
        ("--hidden-dims", "1.5", HIDDEN),
    ],
)
def test_bad_flag_is_a_usage_error(scripts, tmp_path, flag, value, allowed):
    code, _, err = run_main(scripts, flag, value, "--out-dir", tmp_path / "run")
    assert code == 2
    scripts.the_error(err, flag, allowed)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "device, present, says",
    [("cuda", torch.cuda.is_available, "no CUDA GPU"), ("mps", torch.backends.mps.is_available, "MPS")],
)
def test_absent_device_is_a_usage_error(scripts, tmp_path, device, present, says):
    if present():
        pytest.skip(f"this machine has {device}")
    code, _, err = run_main(scripts, "--device", device, "--out-dir", tmp_path / "run")
    assert code == 2
    scripts.the_error(err, f"--device {device}", says, "--device cpu")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- data


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path):
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(b ^ 0xFF for b in raw[middle : middle + 64])
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "name, gz, damage, says",
    [
        ("train-labels-idx1-ubyte", False, None, "is missing"),
        ("t10k-images-idx3-ubyte", False, _truncate, "is corrupt"),
        ("train-images-idx3-ubyte", True, _truncate, "is corrupt"),
        ("t10k-labels-idx1-ubyte", True, _flip_middle, "is corrupt"),
    ],
)
def test_bad_data_stops_before_training(scripts, tmp_path, data_dir, offline, tiny_run, name, gz, damage, says):
    """One IDX file missing or damaged (raw, or .gz with no raw copy), and no way to fetch it."""
    folder = data.raw_dir(tmp_path / "data")
    folder.mkdir(parents=True)
    for other in data.MNIST_MD5:
        if other != name:
            (folder / other).symlink_to(data.raw_dir(data_dir) / other)  # verified in place, never written
    bad = folder / (name + ".gz" if gz else name)
    if damage is not None:
        shutil.copyfile(data.raw_dir(data_dir) / bad.name, bad)
        damage(bad)

    out = tmp_path / "run"
    code, _, err = run_main(scripts, *tiny_run.argv(out, "--data-dir", tmp_path / "data"))
    assert code == 1
    scripts.only_error(err, f"{bad} {says}", "no network in this test")
    assert not (out / "ckpt.pt").exists()


# --------------------------------------------------------------------------------------------- atomic checkpoints


def test_failed_checkpoint_write_keeps_the_previous_one(scripts, run, monkeypatch):
    """The disk fills up half-way through epoch 2's checkpoint: epoch 1's is still there, whole."""
    before = (run / "ckpt.pt").read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", torn_save)
    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    monkeypatch.undo()
    assert code == 1
    scripts.only_error(err, "epoch 2", "No space left on device", "still holds epoch 1")
    assert (run / "ckpt.pt").read_bytes() == before
    assert saved_epoch(run) == 1
    assert not (run / "ckpt.pt.tmp").exists()


KILL_DURING_SECOND_SAVE = """
import io, os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.getcwd())
import train

real_save, calls = torch.save, []

def save_then_die(obj, f, *args, **kwargs):
    calls.append(obj)
    if len(calls) == 2:  # epoch 2's checkpoint: write half of it, then die as `kill -9` does
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
train.main(sys.argv[1:])
"""


def test_kill_during_checkpoint_write_then_resume(scripts, tmp_path, tiny_run, epoch2_run):
    """SIGKILL half-way through epoch 2's checkpoint, after its log line: epoch 1's checkpoint loads, and
    --resume drops the orphaned log line, redoes epoch 2 and ends where a run without the crash ends."""
    run = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *tiny_run.argv(run, epochs=2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert 0 < (run / "ckpt.pt.tmp").stat().st_size  # it did die in mid-write
    assert saved_epoch(run) == 1
    assert log_epochs(run) == [1, 2]  # epoch 2 was logged, not saved

    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 0, err
    assert log_epochs(run) == [1, 2]
    assert log_records(run)[2]["test_loss"] == pytest.approx(log_records(epoch2_run)[2]["test_loss"], rel=1e-5)
    assert saved_epoch(run) == 2


# --------------------------------------------------------------------------------------------- loading checkpoints


def _state(run):
    return torch.load(run / "ckpt.pt", weights_only=True)


def _save(run, state):
    torch.save(state, run / "ckpt.pt")


def _edit_model_config(**changes):
    def edit(run):
        state = _state(run)
        state["model_config"].update(changes)
        _save(run, state)

    return edit


def _drop_model_config_field(name):
    def edit(run):
        state = _state(run)
        del state["model_config"][name]
        _save(run, state)

    return edit


BAD_CHECKPOINTS = {
    "missing": (lambda run: (run / "ckpt.pt").unlink(), "no checkpoint at"),
    "empty": (lambda run: (run / "ckpt.pt").write_bytes(b""), "not a loadable checkpoint"),
    "garbage bytes": (
        lambda run: (run / "ckpt.pt").write_bytes(random.Random(0).randbytes(4096)),
        "not a loadable checkpoint",
    ),
    "truncated": (lambda run: _truncate(run / "ckpt.pt"), "not a loadable checkpoint"),
    "another project's": (
        lambda run: _save(run, {"state_dict": _state(run)["model"], "epoch": 3}),
        "not a checkpoint of this project",
    ),
    "not a dict": (lambda run: _save(run, [1, 2, 3]), "not a checkpoint of this project"),
    "unknown model_config field": (_edit_model_config(dropout=0.1), "unknown field 'dropout'"),
    "missing model_config field": (_drop_model_config_field("latent_dim"), "missing field 'latent_dim'"),
    "bad arch": (_edit_model_config(arch="transformer"), "arch must be one of mlp, conv"),
    "bad hidden_dims": (_edit_model_config(hidden_dims="wide"), "cannot build the model"),
    "weights of another shape": (_edit_model_config(hidden_dims=[64]), "cannot build the model"),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_refused(scripts, run, kind):
    spoil, says = BAD_CHECKPOINTS[kind]
    spoil(run)
    with pytest.raises(CheckpointError, match="ckpt.pt") as refused:
        load_checkpoint(run / "ckpt.pt")
    assert says in str(refused.value) and "\n" not in str(refused.value)

    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 1
    scripts.only_error(err, "cannot resume", says)
    assert log_epochs(run) == [1]


@pytest.mark.parametrize(
    "spoil, says",
    [
        (lambda state: state["train_config"].update(momentum=0.9), "train_config"),
        (lambda state: state.update(epoch="one"), "epoch"),
        (lambda state: state.pop("optimizer"), "optimizer"),
        (lambda state: state["optimizer"]["param_groups"].clear(), "optimizer"),
        (lambda state: state.update(rng={"cpu": torch.zeros(3)}), "random state"),
    ],
)
def test_bad_training_state_is_refused_on_resume(scripts, run, spoil, says):
    """The model part is fine (load_checkpoint accepts it), what --resume also needs is not."""
    state = _state(run)
    spoil(state)
    _save(run, state)
    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 1
    scripts.only_error(err, "cannot resume", says)


class RunsCode:
    """Unpickling this runs a shell command: `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _as_checkpoint(payload, run):
    state = _state(run)
    return {**state, "model": payload}


def _write_plain_pickle(path, payload, run, protocol):
    checkpoint = _as_checkpoint(payload, run)  # before `path`, which may be run's checkpoint, is emptied
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f, protocol=protocol)


def _write_torch_save(path, payload, run, protocol=None):
    torch.save(_as_checkpoint(payload, run), path)


def _unsafe_load(path):
    """What loading without weights_only does (only ever on the control file)."""
    if path.read_bytes()[:2] == b"PK":
        return torch.load(path, weights_only=False)
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize(
    "write, protocol",
    [(_write_plain_pickle, 2), (_write_plain_pickle, pickle.HIGHEST_PROTOCOL), (_write_torch_save, None)],
    ids=["pickle-protocol-2", "pickle-highest", "torch.save"],
)
def test_malicious_checkpoint_runs_no_code(scripts, tmp_path, run, write, protocol):
    # Control: the payload is real; loaded the unsafe way it does create its marker.
    control_marker = tmp_path / "control-marker"
    write(tmp_path / "control.pt", RunsCode(control_marker), run, protocol)
    _unsafe_load(tmp_path / "control.pt")
    assert control_marker.exists()

    marker = tmp_path / "marker"
    write(run / "ckpt.pt", RunsCode(marker), run, protocol)
    with warnings.catch_warnings(record=True) as warned:  # torch's notes on foreign pickles would be noise
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not a loadable checkpoint") as refused:
            load_checkpoint(run / "ckpt.pt")
        assert not marker.exists()
        code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert not marker.exists()
    assert code == 1
    scripts.only_error(err, "cannot resume", "not a loadable checkpoint")
    assert not warned, [str(w.message) for w in warned]
    if write is _write_torch_save:  # it says what was refused, not torch's advice to load with weights_only=False
        assert "GLOBAL posix.system" in str(refused.value) or "GLOBAL os.system" in str(refused.value)
        assert "weights_only" not in str(refused.value)


# --------------------------------------------------------------------------------------------- checksums


def _flip_a_bit_of(path, tensor):
    """Flip one bit in the middle of `tensor`'s bytes where the checkpoint file `path` stores them (a zip of
    uncompressed entries): the pickle, and so the checkpoint's structure, stay as they were."""
    stored = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    with zipfile.ZipFile(path) as archive:
        (entry,) = [e for e in archive.infolist() if "/data/" in e.filename and archive.read(e) == stored]
    raw = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", raw[entry.header_offset + 26 : entry.header_offset + 30])
    raw[entry.header_offset + 30 + name_length + extra_length + len(stored) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _largest(tensors):
    return max(tensors.values(), key=lambda t: t.numel())


def test_checkpoint_carries_the_checksums_of_its_tensors(capsys, run):
    state = _state(run)  # still a plain dict that torch.load reads with weights_only=True
    assert set(state["checksum"]) == {"model", "optimizer", "rng"}
    for part, digest in state["checksum"].items():
        assert digest == checkpoints.tensor_digest(state[part]) and len(digest) == 64
    capsys.readouterr()
    load_checkpoint(run / "ckpt.pt")
    assert capsys.readouterr().err == ""


def test_a_bit_flipped_in_a_weight_is_refused_by_every_script(scripts, tmp_path, run):
    weight = _largest(_state(run)["model"])
    _flip_a_bit_of(run / "ckpt.pt", weight)
    damaged = (run / "ckpt.pt").read_bytes()
    # Control: torch.load reads it without complaint, one number different; only the checksum tells.
    changed = _largest(_state(run)["model"]) != weight
    assert changed.sum() == 1
    with pytest.raises(CheckpointError, match="checksum mismatch in its model weights") as refused:
        load_checkpoint(run / "ckpt.pt")
    assert str(run / "ckpt.pt") in str(refused.value) and "\n" not in str(refused.value)

    for main, argv in [
        (train.main, ["--resume", "--epochs", "2", "--out-dir", run]),
        (evaluate.main, ["--checkpoint", run / "ckpt.pt", "--k", "2", "--device", "cpu"]),
        (visualize.main, ["--checkpoint", run / "ckpt.pt", "--plots-dir", tmp_path / "plots", "--device", "cpu"]),
        (visualize.main, ["--compare", run / "ckpt.pt", run / "ckpt.pt", "--plots-dir", tmp_path / "plots"]),
    ]:
        code, _, err = scripts.run(main, *argv)
        assert code == 1
        scripts.only_error(err, str(run / "ckpt.pt"), "checksum mismatch in its model weights", "another copy")
    assert (run / "ckpt.pt").read_bytes() == damaged and log_epochs(run) == [1]
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    "part, tensor, says",
    [
        ("optimizer", lambda state: _largest(state["optimizer"]["state"][0]), "optimizer state"),
        ("rng", lambda state: state["rng"]["cpu"], "random-number state"),
    ],
)
def test_a_bit_flipped_in_the_training_state_is_refused_on_resume(scripts, run, part, tensor, says):
    _flip_a_bit_of(run / "ckpt.pt", tensor(_state(run)))
    damaged = (run / "ckpt.pt").read_bytes()
    load_checkpoint(run / "ckpt.pt")  # the model is intact: evaluate.py and visualize.py may use it
    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 1
    scripts.only_error(err, "cannot resume", str(run / "ckpt.pt"), f"checksum mismatch in its {says}")
    assert (run / "ckpt.pt").read_bytes() == damaged and log_epochs(run) == [1]


def test_checkpoint_without_checksums_is_refused_as_another_versions(scripts, run):
    state = _state(run)
    del state["checksum"]
    _save(run, state)
    with pytest.raises(CheckpointError, match="another version of this code") as refused:
        load_checkpoint(run / "ckpt.pt")
    assert str(run / "ckpt.pt") in str(refused.value) and "\n" not in str(refused.value)
    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 1
    scripts.only_error(err, "cannot resume", "another version of this code")


@pytest.mark.parametrize("checksum", ["0" * 64, {"model": "0" * 64}, {"optimizer": "0" * 64}])
def test_a_checksum_that_does_not_fit_is_refused(run, checksum):
    _save(run, {**_state(run), "checksum": checksum})
    with pytest.raises(CheckpointError, match="checksum") as refused:
        load_checkpoint(run / "ckpt.pt")
    assert str(run / "ckpt.pt") in str(refused.value)


def test_tensor_digest_sees_every_value_name_dtype_and_shape_but_not_the_order_of_keys():
    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    digest = checkpoints.tensor_digest(weights)
    assert checkpoints.tensor_digest({"b": torch.zeros(3), "a": torch.arange(6.0).reshape(2, 3)}) == digest
    for other in [
        {**weights, "b": torch.tensor([0.0, 0.0, 1e-30])},
        {**weights, "b": torch.zeros(3, dtype=torch.float64)},
        {**weights, "a": torch.arange(6.0).reshape(3, 2)},
        {"a": weights["a"], "c": weights["b"]},
    ]:
        assert checkpoints.tensor_digest(other) != digest


# --------------------------------------------------------------------------------------------- --resume


def test_resume_matches_a_straight_run(scripts, run, epoch2_run):
    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 0, err
    assert log_epochs(run) == [1, 2]
    resumed, straight = log_records(run), log_records(epoch2_run)
    for epoch in (1, 2):
        assert resumed[epoch]["test_loss"] == pytest.approx(straight[epoch]["test_loss"], rel=1e-5)
        assert resumed[epoch]["train_loss"] == pytest.approx(straight[epoch]["train_loss"], rel=1e-5)
    (state, _), (straight_state, _) = load_checkpoint(run / "ckpt.pt"), load_checkpoint(epoch2_run / "ckpt.pt")
    assert state["epoch"] == straight_state["epoch"] == 2
    assert state["model"].keys() == straight_state["model"].keys()
    for name, weight in state["model"].items():
        assert torch.allclose(weight, straight_state["model"][name], rtol=1e-6, atol=1e-7), name


def test_resume_drops_log_lines_past_the_checkpoint(scripts, run, epoch2_run):
    """A crash after epoch 2 was logged but before its checkpoint was replaced, the last line torn too."""
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "test_loss": 12345.0}) + "\n")
        f.write('{"epoch": 3, "train_lo')
    code, _, err = run_main(scripts, "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 0, err
    assert log_epochs(run) == [1, 2]
    assert log_records(run)[2]["test_loss"] == pytest.approx(log_records(epoch2_run)[2]["test_loss"], rel=1e-5)


def test_new_run_refuses_an_existing_checkpoint(scripts, run, tiny_run):
    ckpt, log = (run / "ckpt.pt").read_bytes(), (run / "log.jsonl").read_bytes()
    args = tiny_run.argv(run, "--latent-dim", "3")
    code, _, err = run_main(scripts, *args)
    assert code == 1
    scripts.only_error(err, "already exists", "--resume", "--overwrite")
    assert (run / "ckpt.pt").read_bytes() == ckpt and (run / "log.jsonl").read_bytes() == log

    code, _, err = run_main(scripts, *args, "--overwrite")
    assert code == 0, err
    state, model = load_checkpoint(run / "ckpt.pt")
    assert state["epoch"] == 1 and model.config.latent_dim == 3
    assert log_epochs(run) == [1]


def _interrupt_call(monkeypatch, n):
    """Ctrl-C during the n-th call of train.train_epoch (the n-th epoch of this process)."""
    real, calls = train.train_epoch, []

    def train_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", train_epoch)


def test_overwrite_interrupted_leaves_no_mix_of_runs(scripts, run, tiny_run, monkeypatch):
    """--overwrite stopped in its first epoch: the old checkpoint is gone with the old log, not resumable."""
    _interrupt_call(monkeypatch, 1)
    code, _, err = run_main(scripts, *tiny_run.argv(run, "--overwrite", epochs=2))
    assert code == 130
    assert len(err) == 1 and "interrupted during epoch 1" in err[0] and "no epoch had finished" in err[0], err
    assert not (run / "ckpt.pt").exists() and log_epochs(run) == []


# --------------------------------------------------------------------------------------------- Ctrl-C, NaN


def test_ctrl_c_keeps_the_last_epoch(scripts, tmp_path, tiny_run, monkeypatch):
    _interrupt_call(monkeypatch, 2)
    run = tmp_path / "run"
    code, _, err = run_main(scripts, *tiny_run.argv(run, epochs=3))
    assert code == 130
    assert len(err) == 1, err
    assert "interrupted during epoch 2" in err[0] and "holds epoch 1" in err[0] and "--resume" in err[0]
    assert saved_epoch(run) == 1
    assert log_epochs(run) == [1]
    assert not (run / "ckpt.pt.tmp").exists()


def test_diverging_first_epoch_writes_no_checkpoint(scripts, tmp_path, tiny_run):
    """--lr 1e6: Adam's first step moves every weight by ~1e6, the loss overflows within a few steps."""
    run = tmp_path / "run"
    code, _, err = run_main(scripts, *tiny_run.argv(run, "--lr", "1e6", epochs=2))
    assert code == 1
    line = scripts.only_error(
        err, "NaN or infinite", "of epoch 1", "no checkpoint was written", "learning rate", "--lr"
    )
    assert " step " in line
    assert not (run / "ckpt.pt").exists() and log_epochs(run) == []


def test_diverging_later_epoch_keeps_the_last_good_checkpoint(scripts, run, monkeypatch):
    """Epoch 1 went well; in epoch 2 the learning rate jumps to 1e6 and the loss becomes NaN."""
    before = (run / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train, "learning_rate", lambda config, epoch: 1e-3 if epoch == 1 else 1e6)
    code, _, err = run_main(scripts, "--resume", "--epochs", "3", "--out-dir", run)
    assert code == 1
    line = scripts.only_error(err, "NaN or infinite", "of epoch 2", "still holds epoch 1", "learning rate")
    assert " step " in line
    assert (run / "ckpt.pt").read_bytes() == before
    assert saved_epoch(run) == 1
    assert log_epochs(run) == [1]
