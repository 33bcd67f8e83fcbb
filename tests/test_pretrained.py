"""The shipped weights (pretrained/): they load with weights_only=True through the same validated loader as every
checkpoint, hold no optimizer or random-number state, give the test -ELBO recorded beside them (all 10000 test
images), are the file whose sha256 their README gives, and evaluate.py and visualize.py take them as they are;
train.py --resume refuses them in one line."""

import hashlib
import json
import shutil
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


def test_the_file_holds_weights_and_configs_only(recorded):
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert sorted(state) == ["checksum", "epoch", "model", "model_config", "train_config"]
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


def test_resuming_it_says_it_holds_weights_only(tmp_path, scripts):
    shutil.copy(WEIGHTS, tmp_path / CKPT_FILE)
    code, _, err = scripts.run(train.main, "--resume", "--out-dir", tmp_path, "--epochs", "2000")
    assert code == 1
    scripts.only_error(err, f"cannot resume: {tmp_path / CKPT_FILE} holds a model's weights only")
    assert (tmp_path / CKPT_FILE).read_bytes() == WEIGHTS.read_bytes()  # nothing saved is lost
