"""train.py end to end: its logged numbers, its fast paths, its schedule; and a smoke run of bench.py."""

import json
import math

import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Normal, kl_divergence

import bench
import train
from checkpoints import load_checkpoint
from data import load_test_set

# The runs of this module: 1 epoch of 256 images in 4 steps of 64 (and the flags of each test).
SLICE = ["--limit", "256", "--batch-size", "64"]


pytestmark = pytest.mark.usefixtures("one_thread")


def last_record(out):
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])


@torch.no_grad()
def independent_terms(ckpt, data_dir, n_samples=20):
    """The test -ELBO's two terms recomputed from the checkpoint with torch.distributions alone, nothing of
    model.py's loss code used: (recon, its standard error against the logged one-sample estimate, KL).

    The KL is in closed form on both sides; recon is averaged over n_samples draws of z per image, while the
    logged recon has one draw per image, whose noise the standard error measures."""
    state, model = load_checkpoint(ckpt)
    config = state["train_config"]
    x, _ = load_test_set(data_dir, config["pixels"], "cpu", config["limit"])
    x = x.double()
    model.double()
    mu, logvar = model.encode(x)
    q = Independent(Normal(mu, (0.5 * logvar).exp()), 1)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    logits = model.decode(q.sample((n_samples,)))  # (S, N, 1, 28, 28)
    # float64 and moderate logits: ContinuousBernoulli's clamping of lambda costs nothing here.
    p = Bernoulli(logits=logits) if model.config.likelihood == "bernoulli" else ContinuousBernoulli(logits=logits)
    recon = -Independent(p, 3).log_prob(x)  # (S, N)
    n = x.shape[0]
    standard_error = math.sqrt(recon.var(0).mean().item() / n * (1 + 1 / n_samples))
    return recon.mean().item(), standard_error, kl_divergence(q, prior).mean().item()


@pytest.mark.parametrize(
    "flags",
    [
        ["--likelihood", "cb", "--hidden-dims", "64"],
        ["--likelihood", "bernoulli", "--hidden-dims", "64"],
        ["--likelihood", "bernoulli", "--arch", "conv", "--hidden-dims", "32", "--latent-dim", "4"],
    ],
    ids=["mlp-cb", "mlp-bernoulli", "conv-bernoulli"],
)
def test_logged_test_loss_matches_an_independent_recomputation(tiny_run, data_dir, flags):
    """Each term on its own: the KL exactly (a KL counted twice, or not at all, fails even where it is 0.1 nats),
    the reconstruction term within 5 standard errors of its one-sample noise, and the loss as their sum."""
    out = tiny_run(*SLICE, *flags)
    logged = last_record(out)
    recon, standard_error, kl = independent_terms(out / "ckpt.pt", data_dir)
    assert kl > 0.02  # the KL is there to be checked
    assert logged["test_kl"] == pytest.approx(kl, rel=1e-3)
    assert logged["test_recon"] == pytest.approx(recon, abs=5 * standard_error + 1e-5 * abs(recon))
    assert logged["test_loss"] == pytest.approx(logged["test_recon"] + logged["test_kl"], rel=1e-6, abs=1e-4)


def test_log_and_checkpoint_describe_the_run(tiny_run):
    out = tiny_run(*SLICE, "--hidden-dims", "32", "--latent-dim", "3")
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["epoch"] == 1
    assert state["model_config"]["latent_dim"] == 3 and list(state["model_config"]["hidden_dims"]) == [32]
    assert state["train_config"]["limit"] == 256
    record = last_record(out)
    assert {"epoch", "train_loss", "test_loss", "test_recon", "test_kl", "seconds"} <= record.keys()
    assert all(math.isfinite(record[key]) for key in ("train_loss", "test_loss", "test_recon", "test_kl"))


def test_compiled_step_gives_the_same_test_loss(tiny_run):
    """--compile is a speed option only: the same seed gives the same numbers, up to float rounding."""
    flags = ["--hidden-dims", "32", "--likelihood", "bernoulli"]
    plain = last_record(tiny_run(*SLICE, *flags))
    compiled = last_record(tiny_run(*SLICE, *flags, "--compile"))
    assert compiled["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-4)
    assert compiled["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)


def test_iwae_schedule_is_burda_et_al():
    """lr 1e-3 * 10^(-i/7) for 3^i epochs, i = 0..7: 3280 epochs (Burda et al. 2016, Section 5)."""
    config = train.TrainConfig(schedule="iwae", lr=1e-3)
    lrs = [train.learning_rate(config, epoch) for epoch in range(1, 3281)]
    stages = [sorted(set(lrs), reverse=True).index(lr) for lr in lrs]
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)]
    assert lrs[0] == 1e-3 and lrs[-1] == pytest.approx(1e-3 * 10 ** (-7 / 7))
    assert stages == sorted(stages)
    assert train.learning_rate(train.TrainConfig(lr=3e-4), 100) == 3e-4


def test_bench_measures_all_three_in_one_run(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    flags = "--device cpu --limit 256 --epochs 1 --eval-k 4 --eval-images 4 --hidden-dims 32".split()
    bench.main([*flags, "--data-dir", str(data_dir), "--json", str(out)])
    r = json.loads(out.read_text())
    for key in ("images_per_s", "baseline_images_per_s", "gemm_bound_images_per_s", "eval_images_per_s"):
        assert r[key] > 0
    assert r["speedup"] == pytest.approx(r["images_per_s"] / r["baseline_images_per_s"])
    assert r["gemm_bound_fraction"] == pytest.approx(r["images_per_s"] / r["gemm_bound_images_per_s"])
    assert r["device"] == "cpu" and r["n_train"] == 256


@pytest.mark.parametrize(
    "flag, says", [("--arch conv", "counts the products of Linear layers only"), ("--conditional", "unconditional")]
)
def test_bench_refuses_what_its_loops_do_not_measure(capsys, data_dir, flag, says):
    tiny = ["--limit", "64", "--epochs", "1", "--eval-k", "2", "--eval-images", "2", "--data-dir", str(data_dir)]
    with pytest.raises(SystemExit) as stopped:  # (refused or not, it is over in seconds)
        bench.main(["--device", "cpu", *tiny, "--hidden-dims", "16", *flag.split()])
    assert stopped.value.code == 2 and says in capsys.readouterr().err
