"""What a user meets when something goes wrong: one line and a non-zero exit status (2 for a bad flag, 130 for
Ctrl-C, 1 otherwise), and nothing already saved lost; and the promises that make a stop cheap, atomic
checkpoints and the exact resume. The mains run in-process (conftest's scripts.run): a traceback fails a test."""

import io
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoints
import data
import evaluate
import gradient_variance
import train
import visualize
from checkpoints import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def log_records(run):
    """{epoch: record} of a run's log.jsonl."""
    path = run / "log.jsonl"
    return {r["epoch"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def saved_epoch(run):
    return load_checkpoint(run / "ckpt.pt")[0]["epoch"]


@pytest.fixture
def run(run_copy):
    """A private copy of the finished 1-epoch tiny run."""
    return run_copy()


@pytest.fixture
def epoch2_run(tiny_run):
    """The same run, 2 epochs straight (shared: read-only)."""
    return tiny_run(epochs=2)


def resume(scripts, run, epochs=2):
    return scripts.run(train.main, "--resume", "--epochs", epochs, "--out-dir", run, "--device", "cpu")


# --------------------------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, says",
    [
        ("--epochs 0", "epochs must be a number >= 1"),
        ("--epochs 1.5", "invalid int value"),
        ("--batch-size -1", "batch_size must be a number >= 1"),
        ("--latent-dim two", "invalid int value"),
        ("--lr 0", "lr must be a number > 0"),
        ("--lr nan", "lr must be a number > 0"),
        ("--beta -0.5", "beta must be a number >= 0"),
        ("--beta inf", "beta must be a number >= 0"),
        ("--k 0", "k must be a number >= 1"),
        ("--kl-warmup -1", "kl_warmup must be a number >= 0"),
        ("--limit 0", "limit must be a number >= 1"),
        ("--hidden-dims 200,,200", "comma-separated integers"),
        ("--hidden-dims 200,0", "hidden_dims must be a number >= 1"),
        ("--likelihood gaussian", "bernoulli"),
        ("--device tpu", "cuda"),
        ("--objective iwae --beta 2", "--beta 2 weighs the ELBO's KL term; L_k has none"),
        ("--objective iwae --kl-warmup 2", "--kl-warmup ramps the ELBO's KL term; L_k has none"),
    ],
)
def test_a_value_its_setting_cannot_take_is_a_usage_error(scripts, tmp_path, flags, says):
    code, _, err = scripts.run(train.main, *flags.split(), "--out-dir", tmp_path / "run")
    assert code == 2
    scripts.the_error(err, says)
    assert not (tmp_path / "run").exists()


def test_every_value_the_math_allows_trains(scripts, tiny_run, tmp_path):
    """beta = 0 (the autoencoder ablation: no KL term), a KL warm-up of 0 epochs, a seed of 0 or below."""
    code, _, err = scripts.run(train.main, *tiny_run.argv(tmp_path / "run", "--beta", "0", "--seed", "-3"))
    assert code == 0, err
    (record,) = log_records(tmp_path / "run").values()
    assert record["train_bound"] == "recon + 0 KL" and record["kl_weight"] == 0.0
    assert record["test_loss"] == pytest.approx(record["test_recon"] + record["test_kl"], rel=1e-6)  # still -ELBO


@pytest.mark.parametrize(
    "device, present", [("cuda", torch.cuda.is_available), ("mps", torch.backends.mps.is_available)]
)
def test_an_absent_device_is_a_usage_error(scripts, tmp_path, device, present):
    if present():
        pytest.skip(f"this machine has {device}")
    code, _, err = scripts.run(train.main, "--device", device, "--out-dir", tmp_path / "run")
    assert code == 2
    scripts.the_error(err, f"--device {device}", "--device cpu")


# --------------------------------------------------------------------------------------------- data


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "name, gz, damage, says",
    [
        ("train-labels-idx1-ubyte", False, None, "is missing"),
        ("t10k-images-idx3-ubyte", False, _truncate, "is corrupt"),
        ("t10k-labels-idx1-ubyte", True, _truncate, "is corrupt"),
    ],
)
def test_missing_or_corrupt_data_stops_before_training(
    scripts, tmp_path, data_dir, offline, tiny_run, name, gz, damage, says
):
    """One IDX file missing or damaged (raw, or .gz with no raw copy), and no way to fetch it: one line that names
    the file, and no run."""
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
    code, _, err = scripts.run(train.main, *tiny_run.argv(out, "--data-dir", tmp_path / "data"))
    assert code == 1
    scripts.only_error(err, f"{bad} {says}", "no network in this test")
    assert not out.exists()


# --------------------------------------------------------------------------------------------- an existing run


def test_a_new_run_refuses_an_existing_one_unless_told_to_replace_it(scripts, run, tiny_run):
    ckpt, log = (run / "ckpt.pt").read_bytes(), (run / "log.jsonl").read_bytes()
    argv = tiny_run.argv(run, "--latent-dim", "3")
    code, _, err = scripts.run(train.main, *argv)
    assert code == 1
    scripts.only_error(err, "already exists", "--resume", "--overwrite")
    assert (run / "ckpt.pt").read_bytes() == ckpt and (run / "log.jsonl").read_bytes() == log

    code, _, err = scripts.run(train.main, *argv, "--overwrite")
    assert code == 0, err
    state, model = load_checkpoint(run / "ckpt.pt")
    assert state["epoch"] == 1 and model.config.latent_dim == 3 and list(log_records(run)) == [1]


# --------------------------------------------------------------------------------------------- checkpoints


def _state(run):
    return torch.load(run / "ckpt.pt", weights_only=True)


def _save(run, state):
    torch.save(state, run / "ckpt.pt")


def _edit(change):
    def edit(run):
        state = _state(run)
        change(state)
        _save(run, state)

    return edit


BAD_CHECKPOINTS = {
    "missing": (lambda run: (run / "ckpt.pt").unlink(), "no checkpoint at"),
    "a folder": (lambda run: ((run / "ckpt.pt").unlink(), (run / "ckpt.pt").mkdir()), "is a folder"),
    "empty": (lambda run: (run / "ckpt.pt").write_bytes(b""), "not a loadable checkpoint"),
    "garbage": (lambda run: (run / "ckpt.pt").write_bytes(random.Random(0).randbytes(4096)), "not a loadable"),
    "truncated": (lambda run: _truncate(run / "ckpt.pt"), "not a loadable checkpoint"),
    "another project's": (lambda run: _save(run, {"state_dict": {}, "epoch": 3}), "not a checkpoint of this project"),
    "another version's model_config": (_edit(lambda s: s["model_config"].update(dropout=0.1)), "another version"),
    "another version's train_config": (_edit(lambda s: s["train_config"].pop("pixels")), "another version"),
    "weights of another shape": (_edit(lambda s: s["model_config"].update(hidden_dims=[64])), "cannot build"),
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_a_bad_checkpoint_is_one_line_in_every_script(scripts, run, tmp_path, kind):
    spoil, says = BAD_CHECKPOINTS[kind]
    spoil(run)
    ckpt = run / "ckpt.pt"
    with pytest.raises(CheckpointError, match=says) as refused:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(refused.value) and "\n" not in str(refused.value)
    for main, argv in [
        (train.main, ["--resume", "--epochs", "2", "--out-dir", run]),
        (evaluate.main, ["--checkpoint", ckpt, "--k", "2", "--device", "cpu"]),
        (visualize.main, ["--checkpoint", ckpt, "--plots-dir", tmp_path / "plots", "--device", "cpu"]),
        (gradient_variance.main, ["--checkpoint", ckpt, "--plots-dir", tmp_path / "plots", "--device", "cpu"]),
    ]:
        code, _, err = scripts.run(main, *argv)
        assert code == 1
        scripts.only_error(err, str(ckpt), says)
    assert list(log_records(run)) == [1] and not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    "spoil, says",
    [
        (lambda state: [state.pop("optimizer"), state.pop("rng")], "holds a model's weights only"),
        (lambda state: state.pop("optimizer"), "optimizer or random-number state"),
        (lambda state: state["optimizer"]["param_groups"].clear(), "optimizer or random-number state"),
        (lambda state: state.update(rng={"cpu": torch.zeros(3)}), "optimizer or random-number state"),
        (lambda state: state["train_config"].update(momentum=0.9), "another version"),
    ],
    ids=["weights only", "no optimizer", "another optimizer", "a damaged random state", "another version"],
)
def test_a_refused_resume_names_its_cause_before_any_data_is_loaded(scripts, run, monkeypatch, spoil, says):
    """The model part is fine (evaluate.py and visualize.py may use it); what --resume also needs is not."""
    state = _state(run)
    spoil(state)
    _save(run, state)
    monkeypatch.setattr(train, "load_data", lambda *args: pytest.fail("the data was loaded for a refused resume"))
    code, _, err = resume(scripts, run)
    assert code == 1
    scripts.only_error(err, "cannot resume", str(run / "ckpt.pt"), says)
    assert list(log_records(run)) == [1]


class RunsCode:
    """Unpickling this runs a shell command: `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_hostile_checkpoint_runs_no_code(scripts, tmp_path, run):
    buffer = io.BytesIO()
    torch.save({**_state(run), "model": RunsCode(tmp_path / "marker")}, buffer)
    torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert (tmp_path / "marker").exists()  # the control: loaded the unsafe way, it does run its command
    (tmp_path / "marker").unlink()
    (run / "ckpt.pt").write_bytes(buffer.getvalue())
    code, _, err = resume(scripts, run)
    assert code == 1
    scripts.only_error(err, "cannot resume", "not a loadable checkpoint")
    assert not (tmp_path / "marker").exists()


# --------------------------------------------------------------------------------------------- atomic checkpoints


def test_a_failed_checkpoint_write_keeps_the_previous_one(scripts, run, monkeypatch):
    """The disk fills up half-way through epoch 2's checkpoint: one line, and epoch 1's is still there, whole."""
    before = (run / "ckpt.pt").read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", torn_save)
    code, _, err = resume(scripts, run)
    monkeypatch.undo()
    assert code == 1
    scripts.only_error(err, "No space left on device")
    assert (run / "ckpt.pt").read_bytes() == before and not (run / "ckpt.pt.tmp").exists()


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


def test_kill_9_during_a_checkpoint_write_then_resume(scripts, tmp_path, tiny_run, epoch2_run):
    """SIGKILL half-way through epoch 2's checkpoint, after its log line: epoch 1's checkpoint loads, and --resume
    drops the orphaned log line, redoes epoch 2 and ends exactly where a run without the crash ends."""
    run = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SECOND_SAVE, *tiny_run.argv(run, epochs=2)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run / "ckpt.pt.tmp").stat().st_size > 0  # it did die in mid-write
    assert saved_epoch(run) == 1 and list(log_records(run)) == [1, 2]  # epoch 2 was logged, not saved
    code, _, err = resume(scripts, run)
    assert code == 0, err
    assert log_records(run)[2]["test_loss"] == log_records(epoch2_run)[2]["test_loss"] and saved_epoch(run) == 2


# --------------------------------------------------------------------------------------------- the exact resume


def without_seconds(records):
    return {epoch: {k: v for k, v in r.items() if k != "seconds"} for epoch, r in records.items()}


def test_a_resumed_run_is_the_straight_run_bit_for_bit(scripts, run, epoch2_run):
    """The model, the optimizer's moments, the random state and the log: 1 epoch, then --resume to 2, is 2 epochs."""
    code, _, err = resume(scripts, run)
    assert code == 0, err
    assert without_seconds(log_records(run)) == without_seconds(log_records(epoch2_run))
    resumed, straight = _state(run), _state(epoch2_run)
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in straight["model"])
    moments = [(a, resumed["optimizer"]["state"][i]) for i, a in straight["optimizer"]["state"].items()]
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in moments)
    assert torch.equal(resumed["rng"]["cpu"], straight["rng"]["cpu"])


def test_resume_drops_log_lines_past_the_checkpoint(scripts, run, epoch2_run):
    """A crash after epoch 2 was logged but before its checkpoint was replaced, the last line torn too."""
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "test_loss": 12345.0}) + "\n")
        f.write('{"epoch": 3, "train_lo')
    code, _, err = resume(scripts, run)
    assert code == 0, err
    assert without_seconds(log_records(run)) == without_seconds(log_records(epoch2_run))


# --------------------------------------------------------------------------------------------- Ctrl-C, NaN, OSError


def _interrupt_epoch(monkeypatch, n):
    """Ctrl-C during the n-th epoch of this process."""
    real, calls = train.train_epoch, []

    def train_epoch(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "train_epoch", train_epoch)


def test_ctrl_c_keeps_the_last_epoch(scripts, tmp_path, tiny_run, monkeypatch):
    _interrupt_epoch(monkeypatch, 2)
    run = tmp_path / "run"
    code, _, err = scripts.run(train.main, *tiny_run.argv(run, epochs=3))
    assert code == 130 and len(err) == 1, err
    assert "interrupted during epoch 2" in err[0] and "holds epoch 1" in err[0] and "--resume" in err[0]
    assert saved_epoch(run) == 1 and list(log_records(run)) == [1] and not (run / "ckpt.pt.tmp").exists()


def test_ctrl_c_in_the_first_epoch_of_an_overwrite_leaves_no_mix_of_runs(scripts, run, tiny_run, monkeypatch):
    _interrupt_epoch(monkeypatch, 1)
    code, _, err = scripts.run(train.main, *tiny_run.argv(run, "--overwrite", epochs=2))
    assert code == 130 and len(err) == 1 and "no checkpoint was written" in err[0], err
    assert not (run / "ckpt.pt").exists() and log_records(run) == {}


def test_ctrl_c_in_any_script_is_one_line_and_status_130(scripts, run, monkeypatch):
    def ctrl_c(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "load_test_set", ctrl_c)
    code, _, err = scripts.run(evaluate.main, "--checkpoint", run / "ckpt.pt", "--device", "cpu")
    assert code == 130 and err == ["interrupted (Ctrl-C)"]


def test_a_diverging_first_epoch_writes_no_checkpoint(scripts, tmp_path, tiny_run):
    """--lr 1e6: Adam's first step moves every weight by ~1e6, the loss overflows within a few steps."""
    run = tmp_path / "run"
    code, _, err = scripts.run(train.main, *tiny_run.argv(run, "--lr", "1e6", epochs=2))
    assert code == 1
    scripts.only_error(err, "NaN or infinite at step", "of epoch 1", "no checkpoint was written", "--lr")
    assert not (run / "ckpt.pt").exists() and log_records(run) == {}


def test_a_diverging_later_epoch_keeps_the_last_good_checkpoint(scripts, run, monkeypatch):
    before = (run / "ckpt.pt").read_bytes()
    monkeypatch.setattr(train, "learning_rate", lambda config, epoch: 1e-3 if epoch == 1 else 1e6)
    code, _, err = resume(scripts, run, epochs=3)
    assert code == 1
    scripts.only_error(err, "NaN or infinite at step", "of epoch 2", "still holds epoch 1")
    assert (run / "ckpt.pt").read_bytes() == before and list(log_records(run)) == [1]


@pytest.mark.parametrize("script", ["visualize", "evaluate"])
def test_a_path_the_system_refuses_is_its_own_one_line_message(scripts, run, tmp_path, script):
    """--plots-dir a file, --json into a folder that does not exist: the OSError's own message names the path."""
    (tmp_path / "a-file").write_text("")
    if script == "visualize":
        argv, path = ["--plots-dir", tmp_path / "a-file"], tmp_path / "a-file"
        main = visualize.main
    else:
        argv, path = ["--k", "2", "--limit", "8", "--json", tmp_path / "nowhere" / "r.json"], tmp_path / "nowhere"
        main = evaluate.main
    code, _, err = scripts.run(main, "--checkpoint", run / "ckpt.pt", "--device", "cpu", *argv)
    assert code == 1
    scripts.only_error(err, str(path))
