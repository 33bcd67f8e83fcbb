"""The ways of fitting: the pathwise and score-function gradient estimators, and training with each objective.

Estimators are checked against each other: two unbiased estimators of the same gradient have the same mean,
so for every encoder parameter the difference of their sample means, divided by its standard error, is
approximately N(0, 1). The tests take the largest |z| over all parameters; with P parameters, the chance
that it exceeds Z_MAX when both are unbiased is at most P * 2 * (1 - Phi(Z_MAX)) (Bonferroni): for
P ~ 1600 and Z_MAX = 5.5 that is 1600 * 3.8e-8 = 6e-5. A real bias shows as |z| in the tens.
"""

import json
import math

import pytest
import torch

import gradient_variance
import model
import train
import visualize
from checkpoints import load_checkpoint
from data import load_test_set
from gradient_variance import encoder_gradients, noise_summary
from scoring import mean_neg_iwae_bound

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
Z_MAX = 5.5
DRAWS = 2000
# The training runs of this module: tiny runs in steps of 64, with a 4-D latent (and the flags of each test).
FITTING = ["--batch-size", "64", "--hidden-dims", "32", "--latent-dim", "4"]


@pytest.fixture
def grads(make_vae):
    """grads(objective, k, estimator, seed, draws=DRAWS): (draws, P) estimates of the encoder's gradient on 3
    binary images, by a tiny float64 VAE (2-D latent, one hidden layer of 2)."""
    vae = make_vae(latent_dim=2, hidden_dims=(2,), activation="relu").double()
    with torch.no_grad():  # a posterior with some spread: otherwise every estimator is nearly exact
        vae.to_logvar.bias.fill_(-0.5)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=F64).bernoulli(generator=g)

    def estimates(objective, k, estimator, seed, draws=DRAWS):
        return encoder_gradients(vae, x, draws, objective, k, estimator, torch.Generator().manual_seed(seed))

    return estimates


def max_z(a, b):
    """The largest |difference of means| / standard error over the parameters (both (draws, P))."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    alive = se > 0
    return ((a.mean(0) - b.mean(0))[alive].abs() / se[alive]).max().item()


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
@pytest.mark.parametrize("k", [1, 5])
def test_score_function_gradient_is_unbiased(objective, k, grads):
    """Score-function and pathwise estimates of the encoder's gradient have the same mean."""
    assert max_z(grads(objective, k, "score", seed=2), grads(objective, k, "pathwise", seed=1, draws=500)) < Z_MAX


def test_a_biased_score_estimator_is_caught(monkeypatch, grads):
    """The check above can fail: a baseline that includes the sample's own term (b_i = the mean of all k f_j,
    f_i among them) shrinks the learning signal (f_i - b_i) / k by (k - 1)/k: a 20 % bias at k = 5."""
    pathwise = grads("elbo", 5, "pathwise", seed=1, draws=500)
    monkeypatch.setattr(model, "leave_one_out", lambda f, total: total(f) - (f - f.mean(0)) / f.shape[0])
    assert max_z(grads("elbo", 5, "score", seed=2), pathwise) > Z_MAX


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_leave_one_out_baseline_keeps_the_mean_and_lowers_the_variance(objective, monkeypatch, grads):
    with_baseline = grads(objective, 5, "score", seed=3)
    monkeypatch.setattr(model, "leave_one_out", lambda f, total: torch.zeros_like(f))  # b = 0
    without = grads(objective, 5, "score", seed=4)
    assert max_z(with_baseline, without) < Z_MAX
    assert noise_summary(with_baseline)["variance"] < 0.5 * noise_summary(without)["variance"]


@pytest.mark.parametrize("total", [model.mean_over_samples, model.log_mean_exp], ids=["elbo", "iwae"])
def test_leave_one_out_baseline_replaces_each_sample_by_the_mean_of_the_others(total):
    """b_i = total(f with f_i replaced by the mean of the other k - 1 samples), computed here one i at a time; for
    L_k, where f = log w, this is VIMCO's baseline (w_i replaced by the geometric mean of the others)."""
    k = 5
    f = torch.randn(k, 3, generator=torch.Generator().manual_seed(7), dtype=F64) * 10 - 100
    expected = []
    for i in range(k):
        replaced = f.clone()
        replaced[i] = torch.cat([f[:i], f[i + 1 :]]).mean(0)
        expected.append(total(replaced))
    torch.testing.assert_close(model.leave_one_out(f, total), torch.stack(expected), rtol=1e-12, atol=1e-12)


def test_noise_summary_is_the_per_parameter_variance_and_snr():
    g = torch.tensor([[1.0, 0.0, 3.0], [3.0, 0.0, 5.0], [2.0, 0.0, 7.0]], dtype=F64)  # column 1 never moves
    summary = noise_summary(g)
    assert summary["variance"] == pytest.approx((1.0 + 4.0) / 2)
    assert summary["snr"] == pytest.approx((2.0 / 1.0 + 5.0 / 2.0) / 2)


def test_iwae_bound_rises_with_k_on_a_trained_model(tiny_run, data_dir):
    state, vae = load_checkpoint(tiny_run(*FITTING, "--limit", "512", epochs=3) / "ckpt.pt")
    x, _ = load_test_set(data_dir, state["train_config"]["pixels"], "cpu", 256)
    bounds = [mean_neg_iwae_bound(vae, x, k).item() for k in (1, 5, 50)]
    assert bounds[0] > bounds[1] + 0.1 > bounds[2] + 0.2, bounds


@pytest.mark.parametrize(
    "flags, bound",
    [
        ("", "-ELBO"),
        ("--objective iwae --k 5", "-L_5"),
        ("--estimator score --k 5", "-ELBO"),
        ("--objective iwae --k 3 --estimator score", "-L_3"),
        ("--conditional", "-ELBO"),
        ("--kl-warmup 3", "recon + kl_weight KL"),  # resumed in the middle of the warm-up
    ],
)
def test_every_way_of_fitting_trains_and_resumes_exactly(tiny_run, run_copy, data_dir, flags, bound):
    common = [*FITTING, "--limit", "512", "--lr", "3e-3", *flags.split()]
    resumed = run_copy(*common, epochs=1)
    train.main(["--resume", "--epochs", "3", "--device", "cpu", "--data-dir", str(data_dir), "--out-dir", str(resumed)])
    straight, resumed = (
        [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        for run in (tiny_run(*common, epochs=3), resumed)
    )
    for a, b in zip(straight, resumed, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert straight[-1]["test_loss"] < straight[0]["test_loss"] - 1.0  # it learns
    assert straight[0]["train_bound"] == bound and math.isfinite(straight[-1]["train_loss"])
    if bound.startswith("-L_"):  # the test bound it trains is logged too, and is tighter than the test ELBO
        assert all(r[f"test_neg_l{bound[-1]}"] < r["test_loss"] for r in straight)


def test_gradient_variance_script_writes_its_figure_and_json(tmp_path, tiny_run, monkeypatch):
    run = tiny_run(*FITTING, "--limit", "256")
    monkeypatch.setattr(gradient_variance, "KS", (1, 2, 5))
    args = ["--images", "8", "--draws", "20", "--device", "cpu", "--plots-dir", str(tmp_path / "plots")]
    results = gradient_variance.main([*args, "--checkpoint", str(run / "ckpt.pt"), "--json", str(tmp_path / "gv.json")])
    assert (tmp_path / "plots" / "gradient_variance.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "gv.json").read_text())
    for which in ("trained", "initial"):
        for k in ("1", "2", "5"):
            pathwise, score = written[which]["pathwise"][k], written[which]["score"][k]
            assert score["variance"] > pathwise["variance"] > 0
    assert written["trained"]["pathwise"]["1"] == results["trained"]["pathwise"][1]
    assert written["trained"] != written["initial"]


def test_ways_of_fitting_figure_reads_every_run(tmp_path, tiny_run, monkeypatch):
    elbo = tiny_run(*FITTING, "--limit", "128", epochs=2)
    iwae = tiny_run(*FITTING, "--limit", "128", "--objective", "iwae", "--k", "3", epochs=2)
    drawn = []
    real = visualize.ways_of_fitting_figure
    monkeypatch.setattr(visualize, "ways_of_fitting_figure", lambda runs: (drawn.append(runs), real(runs))[1])
    visualize.main(["--ways-of-fitting", str(elbo), str(iwae), "--plots-dir", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "ways_of_fitting.png").stat().st_size > 10_000
    (runs,) = drawn
    assert [label for label, _ in runs] == ["ELBO, pathwise, k = 1", "IWAE, pathwise, k = 3"]
    assert [len(records) for _, records in runs] == [2, 2] and "test_neg_l3" in runs[1][1][0]
