"""The shipped weights (pretrained/): `train.py --export` makes them from a run's checkpoint; they load with
weights_only=True through the same loader as every checkpoint, hold no optimizer or random-number state, give
the test -ELBO recorded beside them (all 10000 test images), are the file whose sha256 their README gives, and
evaluate.py and visualize.py take them as they are."""

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import evaluate
import train
import visualize
from checkpoints import CKPT_FILE, load_checkpoint
from data import load_test_set
from scoring import mean_neg_elbo

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"
WEIGHTS = PRETRAINED / "iwae-protocol-vae.pt"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recorded():
    """The evaluate.py --json results recorded beside the weights."""
    return json.loads((PRETRAINED / "iwae-protocol-vae.json").read_text())


def test_export_writes_a_runs_model_its_configs_and_epoch_only(tiny_run, tmp_path, scripts):
    run = tiny_run()
    code, out, err = scripts.run(train.main, "--export", tmp_path / "model.pt", "--out-dir", run)
    assert code == 0, err
    shipped, saved = (torch.load(path, weights_only=True) for path in (tmp_path / "model.pt", run / CKPT_FILE))
    assert list(shipped) == ["model", "model_config", "train_config", "epoch"]
    assert all(torch.equal(shipped["model"][name], saved["model"][name]) for name in saved["model"])
    assert shipped["model_config"] == saved["model_config"] and shipped["epoch"] == saved["epoch"] == 1
    folders = {"data_dir": "data", "out_dir": "out"}  # a reader's clone has these, not the run's own folders
    assert shipped["train_config"] == {**saved["train_config"], **folders} != saved["train_config"]
    assert list(shipped["train_config"]) == [f.name for f in fields(train.TrainConfig)]


def test_the_file_holds_what_export_writes(recorded):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert list(state) == ["model", "model_config", "train_config", "epoch"]
    assert list(state["train_config"]) == [f.name for f in fields(train.TrainConfig)]
    assert (state["train_config"]["data_dir"], state["train_config"]["out_dir"]) == ("data", "out")
    as_json = json.loads(json.dumps({key: state[key] for key in ("model_config", "train_config")}))
    assert as_json == {key: recorded[key] for key in ("model_config", "train_config")}
    assert state["epoch"] == recorded["epoch"]


def test_its_test_elbo_is_the_recorded_one(recorded, data_dir):
    state, model = load_checkpoint(WEIGHTS)
    images, labels = load_test_set(data_dir, state["train_config"]["pixels"], "cpu")
    neg_elbo, recon, kl = mean_neg_elbo(model, images, labels=labels)
    assert images.shape[0] == recorded["n_images"] == 10000
    assert neg_elbo.item() == pytest.approx(recorded["test_neg_elbo"], abs=0.01)
    assert kl.item() == pytest.approx(recorded["test_kl"], abs=0.01)


def test_its_readme_gives_the_files_sha256():
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()
    assert f"`{digest}`" in (PRETRAINED / "README.md").read_text()


def test_evaluate_and_visualize_take_it(data_dir, tmp_path, no_progress_bars):
    results = evaluate.main(["--checkpoint", str(WEIGHTS), "--data-dir", str(data_dir), "--k", "2", "--limit", "100"])
    assert results["n_images"] == 100 and results["epoch"] > 0
    visualize.main(["--checkpoint", str(WEIGHTS), "--data-dir", str(data_dir), "--plots-dir", str(tmp_path)])
    assert {"latent_scatter.png", "manifold_20x20.png", "reconstructions.png", "samples.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
