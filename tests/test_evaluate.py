"""evaluate.py: the importance-sampled log-likelihood against references computed independently here
(numerical quadrature, torch.distributions, mpmath, brute-force nearest neighbours), and the script end to end."""

import hashlib
import json
import math

import mpmath
import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Independent, Normal

import data
import evaluate
import scoring
from checkpoints import load_checkpoint
from data import load_scored_split, load_test_set

RESULT_KEYS = {"made_by", "train_seconds", "test_neg_elbo", "test_recon", "test_kl", "test_nll", "bits_per_dim"}
RESULT_KEYS |= {"active_units", "knn_accuracy", "n_images", "k", "model_config", "train_config", "epoch"}
DISTRIBUTION = {"bernoulli": Bernoulli, "cb": ContinuousBernoulli}


def random_images(n, likelihood, seed=0):
    x = torch.rand(n, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x.bernoulli(generator=torch.Generator().manual_seed(seed + 1)) if likelihood == "bernoulli" else x


def reference_log_weights(model, x, eps):
    """log p(x|z) + log p(z) - log q(z|x) at z = mu + sigma * eps, with torch.distributions: eps (k, B, d) -> (k, B)."""
    mu, logvar = model.encode(x)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    prior = Independent(Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    z = mu + torch.exp(0.5 * logvar) * eps
    p_x_given_z = Independent(DISTRIBUTION[model.config.likelihood](logits=model.decode(z)), 3)
    return p_x_given_z.log_prob(x) + prior.log_prob(z) - q.log_prob(z)


def quadrature_log_px(model, x, lo=-10.0, hi=10.0, n=4001):
    """log p(x) = log int p(x|z) p(z) dz for a model with a 1-d latent, by the trapezoid rule on a grid: (B,)."""
    z = torch.linspace(lo, hi, n, dtype=torch.float64)[:, None]  # (n, 1)
    p_x_given_z = Independent(DISTRIBUTION[model.config.likelihood](logits=model.decode(z)[:, None]), 3)
    log_joint = p_x_given_z.log_prob(x) + Normal(0.0, 1.0).log_prob(z)  # (n, B)
    log_trapezoid_weights = torch.full((n, 1), math.log((hi - lo) / (n - 1)), dtype=torch.float64)
    log_trapezoid_weights[[0, -1]] -= math.log(2)
    assert (log_joint[[0, -1]] < log_joint.max(0).values - 30).all()  # the integrand vanishes at the grid's ends
    return torch.logsumexp(log_joint + log_trapezoid_weights, dim=0)


# --------------------------------------------------------------------------------------------- the bound
# The models are small untrained VAEs in float64 (make_vae), where q(z|x) is far from p(z|x): the gap is large.


@torch.inference_mode()
def test_one_sample_bound_is_the_elbo_in_expectation(make_vae):
    """E_q[log p(x, z) - log q(z|x)] = E_q[log p(x|z)] - KL(q || p) (AEVB eq. (10)): k = 1 has the ELBO's mean,
    within the standard error of the differences (the same seed makes them less noisy if both draw alike)."""
    model, x = make_vae(latent_dim=3).double(), random_images(4, "bernoulli")
    model.to_logvar.bias.fill_(-2.0)  # sigma ~ 0.4: a q(z|x) unlike the prior, so every term of log q counts
    repeats = 2000
    xs = x.repeat(repeats, 1, 1, 1)  # (repeats * 4, 1, 28, 28): an independent draw for each copy
    bound = model.iwae_bound(xs, 1, generator=torch.Generator().manual_seed(0)).reshape(repeats, 4)
    loss = model.loss(xs, generator=torch.Generator().manual_seed(0))
    difference = bound + (loss.recon + loss.kl).reshape(repeats, 4)  # log w - ELBO estimate
    assert (difference.mean(0).abs() < 4 * difference.std(0) / math.sqrt(repeats)).all()
    assert (loss.kl > 1).all()  # the KL term matters here


@torch.inference_mode()
def test_bound_rises_with_k_towards_log_px_from_quadrature(make_vae):
    """Burda et al. (2016), Theorem 1: E log p^_k <= E log p^_{k+1} <= log p(x), the bound -> log p(x)."""
    model, x = make_vae(latent_dim=1).double(), random_images(2, "bernoulli")
    log_px = quadrature_log_px(model, x)  # (2,)
    repeats, generator = 60, torch.Generator().manual_seed(0)
    means, errors = [], []
    for k in (1, 10, 100):
        bound = model.iwae_bound(x.repeat(repeats, 1, 1, 1), k, chunk=50, generator=generator).reshape(repeats, 2)
        means.append(bound.mean(0))
        errors.append(bound.std(0) / math.sqrt(repeats))
        assert (means[-1] <= log_px + 3 * errors[-1]).all()
    assert (means[0] + 3 * errors[0] < means[1]).all() and (means[1] < means[2]).all()
    assert (log_px - means[0] > 0.5).all()  # the one-sample gap is large here ...
    assert (log_px - means[2]).abs().max() < 0.1  # ... and closes with k


@pytest.mark.parametrize("dtype, level, tolerance", [(torch.float64, -1e5, 1e-8), (torch.float32, -1e4, 1e-2)])
def test_bound_is_stable_for_very_negative_log_weights(make_vae, monkeypatch, dtype, level, tolerance):
    """exp(-1e4) underflows to 0: only the shifted form log sum exp(a_i) = m + log sum exp(a_i - m) works."""
    k, n = 10, 3
    log_w = level + 30 * torch.rand(k, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(torch.log(torch.exp(log_w).mean(0))).all()  # the naive formula fails
    expected = [float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(a))) for a in w) / k)) for w in log_w.T]
    model, x = make_vae(latent_dim=3).double(), random_images(n, "bernoulli")
    for chunk in (None, 3, 7):  # chunks whose maxima differ are combined by a second logsumexp
        served = 0

        def fake_log_weights(x, count, generator=None, posterior=None, y=None):
            nonlocal served
            served += count
            return log_w[served - count : served].to(dtype)  # (count, n)

        monkeypatch.setattr(model, "log_weights", fake_log_weights)
        with torch.inference_mode():
            bound = model.iwae_bound(x, k, chunk)
        assert served == k and torch.isfinite(bound).all()
        np.testing.assert_allclose(bound.double().numpy(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cb"])
@torch.inference_mode()
def test_chunked_estimates_equal_a_manual_computation_on_the_same_draws(make_vae, monkeypatch, likelihood):
    """Images in batches of 2 and the k = 10 samples in chunks of 3 (3 + 3 + 3 + 1); the reference draws
    eps for each chunk in the same order from the same seed and does the rest with torch.distributions."""
    model, images = make_vae(likelihood=likelihood, latent_dim=3).double(), random_images(5, likelihood)
    k, batch_size, chunk, seed = 10, 2, 3, 7
    monkeypatch.setattr(scoring, "BLOCK_ELEMENTS", chunk * batch_size * 784)
    assert scoring.samples_per_chunk(k, batch_size) == chunk
    got = scoring.log_likelihood_estimates(model, images, k, batch_size, torch.Generator().manual_seed(seed))
    generator, expected = torch.Generator().manual_seed(seed), []
    for x in images.split(batch_size):
        eps = [torch.randn(c, x.shape[0], 3, generator=generator, dtype=torch.float64) for c in (3, 3, 3, 1)]
        log_w = torch.cat([reference_log_weights(model, x, e) for e in eps])
        expected.append(torch.logsumexp(log_w, dim=0) - math.log(k))
    torch.testing.assert_close(got, torch.cat(expected), rtol=0, atol=1e-9)


@pytest.mark.parametrize("k, batch_size", [(5000, 100), (5000, 1000), (7, 100), (5000, 10**6)])
def test_samples_per_chunk_respects_the_budget(k, batch_size):
    chunk = scoring.samples_per_chunk(k, batch_size)
    assert 1 <= chunk <= k and (chunk == 1 or chunk * batch_size * 784 <= scoring.BLOCK_ELEMENTS)


# --------------------------------------------------------------------------------------------- latent measures


def test_active_units_counts_dims_with_posterior_mean_variance_above_0_01():
    variances = torch.tensor([1.0, 0.04, 0.011, 0.009, 0.0025, 0.0])
    means = torch.randn(500, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    means = (means - means.mean(0)) / means.std(0, correction=0) * variances.double().sqrt() + 5.0
    assert scoring.active_units(means) == 3 and scoring.active_units(means[:1]) == 0


@torch.inference_mode()
def test_posterior_means_are_the_encoder_means_in_batches(make_vae):
    model, images = make_vae(latent_dim=3).double(), random_images(7, "bernoulli")
    torch.testing.assert_close(scoring.posterior_means(model, images, batch_size=3), model.encode(images)[0])


def test_knn_accuracy_equals_brute_force(monkeypatch):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 4)) * 1.5
    reference_labels, query_labels = rng.integers(0, 10, 600), rng.integers(0, 10, 150)
    reference = centres[reference_labels] + rng.normal(size=(600, 4))
    queries = centres[query_labels] + rng.normal(size=(150, 4))
    nearest = np.argsort(np.linalg.norm(queries[:, None] - reference[None], axis=-1), axis=1)[:, :15]  # (Q, 15)
    votes = [np.bincount(reference_labels[row], minlength=10).argmax() for row in nearest]
    expected = np.mean(np.array(votes) == query_labels)
    assert 0.3 < expected < 0.95  # neither trivial nor hopeless
    monkeypatch.setattr(scoring, "BLOCK_ELEMENTS", 600 * 40)  # 40 queries per block: 4 blocks, the last short
    arrays = (queries, query_labels, reference, reference_labels)
    assert scoring.knn_accuracy(*map(torch.from_numpy, arrays)) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------- the script
# Tiny runs with a 4-D latent. The MLP runs are trained enough (2 epochs of 2048 images) for their codes to be
# used and to tell the digits apart: an untrained encoder of the same shape has no active unit and a 15-NN
# accuracy below 0.3. The conv run, which is slow on a CPU, only checks the plumbing (1 epoch of 512 images).

TRAINED = ["--limit", "2048", "--epochs", "2", "--batch-size", "64"]
CONV = ["--arch", "conv", "--likelihood", "bernoulli", "--hidden-dims", "32", "--latent-dim", "4"]
CHECKPOINTS = {
    "mlp-bernoulli": ["--likelihood", "bernoulli", "--hidden-dims", "64", "--latent-dim", "4", *TRAINED],
    "mlp-cb": ["--likelihood", "cb", "--hidden-dims", "64", "--latent-dim", "4", *TRAINED],
    "conv-bernoulli": [*CONV, "--limit", "512", "--batch-size", "128"],
}
LIMIT, K = 200, 64


def digest(images):
    return images.shape[0], hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def evaluate_with_spies(ckpt, json_path, n_reference):
    """evaluate.main on ckpt, its k-NN reference the first n_reference training images: results, the JSON it
    wrote, and the digest of every set of images it encoded for posterior means."""
    encoded, load_reference_set, posterior_means = [], data.load_reference_set, scoring.posterior_means

    def reference_set(*args, **kwargs):
        images, labels = load_reference_set(*args, **kwargs)
        return images[:n_reference], labels[:n_reference]

    def means(model, images, *args, **kwargs):
        encoded.append(digest(images))
        return posterior_means(model, images, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "load_reference_set", reference_set)
        patch.setattr(scoring, "posterior_means", means)
        argv = ["--checkpoint", ckpt, "--k", K, "--limit", LIMIT, "--json", json_path, "--device", "cpu"]
        results = evaluate.main([str(a) for a in argv])
    return results, json.loads(json_path.read_text()), encoded


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory, one_thread_for_the_module):
    """Each tiny checkpoint (shared: read-only) scored once: name -> (ckpt, results, JSON, encoded). The conv
    run's k-NN reference is the first 6000 training images only (encoding all 60000 with the conv encoder takes
    longer than everything else here); the MLP runs use all."""
    runs = {}
    for name, flags in CHECKPOINTS.items():
        ckpt, json_path = tiny_run(*flags) / "ckpt.pt", tmp_path_factory.mktemp(name) / "results.json"
        runs[name] = ckpt, *evaluate_with_spies(ckpt, json_path, 6000 if name.startswith("conv") else 60000)
    return runs


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_script_writes_every_result_with_sane_values(evaluated, name):
    ckpt, results, written, _ = evaluated[name]
    dequantized = written["train_config"]["pixels"] == "dequantized"
    assert set(written) == RESULT_KEYS | ({"bits_per_dim_8bit"} if dequantized else set())
    if dequantized:  # the bound on the 8-bit images: + 784 ln 256 nats, in bits per pixel
        expected = (written["test_nll"] + 784 * math.log(256)) / (784 * math.log(2))
        assert written["bits_per_dim_8bit"] == pytest.approx(expected, rel=1e-12)
    assert {**written, "made_by": None} == json.loads(json.dumps({**results, "made_by": None}))  # as it returned
    log = [json.loads(line) for line in (ckpt.parent / "log.jsonl").read_text().splitlines()]
    assert written["train_seconds"] == sum(record["seconds"] for record in log)  # the run's, from its log
    state, model = load_checkpoint(ckpt)
    assert written["model_config"] == json.loads(json.dumps(state["model_config"]))
    flags = CHECKPOINTS[name]
    assert written["train_config"]["limit"] == int(flags[flags.index("--limit") + 1])
    assert written["epoch"] == (int(flags[flags.index("--epochs") + 1]) if "--epochs" in flags else 1)
    assert written["n_images"] == LIMIT and written["k"] == K
    if written["model_config"]["likelihood"] == "bernoulli":
        assert 50 < written["test_nll"] < 600  # binary images: p(x) is a probability, -log p(x) > 0
    else:  # a density on [0, 1]^784: a mostly black image is far more likely than under the uniform (0 nats)
        assert -3000 < written["test_nll"] < 0
    assert written["test_neg_elbo"] == pytest.approx(written["test_recon"] + written["test_kl"], rel=1e-5)
    assert written["test_nll"] <= written["test_neg_elbo"] + 1.0  # -log p(x) <= -ELBO, up to the ELBO's noise
    assert written["bits_per_dim"] == pytest.approx(written["test_nll"] / (784 * math.log(2)))
    # Active units recomputed here: the variance over the scored test images of the encoder's means, > 0.01.
    images, _ = load_test_set(state["train_config"]["data_dir"], state["train_config"]["pixels"], "cpu", LIMIT)
    with torch.no_grad():
        variances = model.double().encode(images.double())[0].var(0, correction=0)
    assert written["active_units"] == int((variances > 0.01).sum())
    if name.startswith("mlp"):  # trained: every unit in use, by far, and a code that tells the digits apart
        assert written["active_units"] == 4 and (variances > 0.1).all()
        assert written["knn_accuracy"] > 0.5  # chance is 0.11, an untrained encoder's 0.3
    else:
        assert 0 <= written["knn_accuracy"] <= 1


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_knn_reference_is_the_training_split_as_the_model_sees_it(evaluated, data_dir, name):
    """evaluate.py encodes the test images and the k-NN reference, the training images (all of them, whatever
    --limit), both presented as in training (binary for a Bernoulli model, dequantized for a CB one), once, with
    the fixed seed of every scored split: the very numbers every script scores."""
    _, _, written, encoded = evaluated[name]
    pixels = written["train_config"]["pixels"]
    (test_n, test_digest), (reference_n, reference_digest) = encoded
    assert (test_n, test_digest) == digest(load_test_set(data_dir, pixels, "cpu", LIMIT)[0])
    assert reference_n == (6000 if name.startswith("conv") else 60000)
    assert (reference_n, reference_digest) == digest(load_scored_split(data_dir, True, pixels, "cpu")[0][:reference_n])


@pytest.mark.parametrize("name", ["mlp-bernoulli", "mlp-cb"])
@torch.inference_mode()
def test_script_nll_agrees_with_an_independent_estimate(evaluated, data_dir, name):
    """Our own importance sampler (torch.distributions, float64, other draws) on the same 200 test images."""
    ckpt, results, _, _ = evaluated[name]
    state, model = load_checkpoint(ckpt)
    images, _ = load_test_set(data_dir, state["train_config"]["pixels"], "cpu", LIMIT)
    model, generator, log_px = model.double(), torch.Generator().manual_seed(12345), []
    for x in images.double().split(50):
        eps = torch.randn(K, x.shape[0], 4, generator=generator, dtype=torch.float64)
        log_px.append(torch.logsumexp(reference_log_weights(model, x, eps), dim=0) - math.log(K))
    assert -torch.cat(log_px).mean().item() == pytest.approx(results["test_nll"], abs=0.5)


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--k", value, "a positive integer") for value in ("0", "-3", "five")]
    + [("--exact-images", value, "a non-negative integer") for value in ("-1", "all")],  # 0: no exact pass
)
def test_bad_counts_are_usage_errors(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([flag, value])
    assert exit_info.value.code == 2 and f"expected {expected}" in capsys.readouterr().err
