"""What the scripts do, checked from the outside: what the training loop feeds the model and reports, the noise
of the test ELBO, the optimizer of the IWAE protocol, what the figures draw, and bench.py's GEMM bound. Each test
watches what a deliberate bug would change: what the model is given (a spy on VAE.loss), what ends up in the log
and the checkpoint, what matplotlib is asked to draw, and which matrix products autograd really runs.
"""

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import manifold
import train
import visualize
from data import PRIOR_SAMPLE_SEED, load_mnist, load_test_set
from model import VAE, VAEConfig, cb_mean
from scoring import mean_neg_elbo, mean_neg_iwae_bound

pytestmark = pytest.mark.usefixtures("one_thread")

# 100 images in batches of 32: three full batches and a short one of 4.
N_TRAIN, BATCH = 100, 32
BATCH_SIZES = [32, 32, 32, 4]
LOOP = ["--limit", str(N_TRAIN), "--batch-size", str(BATCH), "--hidden-dims", "16", "--latent-dim", "2"]


# --------------------------------------------------------------------------------------------- the training loop


@pytest.fixture
def training_steps(monkeypatch):
    """Every training step's call of VAE.loss, as the model met it: {x: the batch, y: its labels, neg_bound: the
    per-image negative bound it returned, weights: the model's weights before it, rng: the CPU random state before
    it} (copies)."""
    seen = []
    real_loss = VAE.loss

    def loss(self, x, y=None, *args, **kwargs):
        if torch.is_inference_mode_enabled():  # the test ELBO, not a training step
            return real_loss(self, x, y, *args, **kwargs)
        before = {"weights": {k: v.clone() for k, v in self.state_dict().items()}, "rng": torch.get_rng_state()}
        result = real_loss(self, x, y, *args, **kwargs)
        seen.append({"x": x.clone(), "y": y, "neg_bound": result.neg_bound.clone(), **before})
        return result

    monkeypatch.setattr(VAE, "loss", loss)
    return seen


def log_of(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def source_of(x, grey, pixels):
    """For each presented image x[b], the index n of the grey image grey[n] (k/255) it is a presentation of."""
    x, grey = x.flatten(1)[:, None, :], grey.flatten(1)[None, :, :]  # (B, 1, 784), (1, N, 784)
    if pixels == "grey":
        possible = (x == grey).all(-1)
    elif pixels == "dequantized":  # x = (k + u) / 256, u in [0, 1): inside bin k
        possible = ((x * 256).floor() == (grey * 255).round()).all(-1)
    else:  # x ~ Bernoulli(k/255): 0 where k = 0, 1 where k = 255; a few images could come from two sources,
        possible = ~(((grey == 0) & (x != 0)) | ((grey == 1) & (x != 1))).any(-1)  # so the likeliest one is taken
        assert possible.any(1).all(), "an image that no training image can give"
        p = grey.clamp(1e-3, 1 - 1e-3)
        log_likelihood = (x * p.log() + (1 - x) * (-p).log1p()).sum(-1)
        return torch.where(possible, log_likelihood, -math.inf).argmax(1)
    assert (possible.sum(1) == 1).all(), "every image given to the model is one training image, presented"
    return possible.int().argmax(1)


@pytest.mark.parametrize(
    "flags, pixels",
    [("--likelihood bernoulli", "binary"), ("--likelihood cb", "dequantized"), ("--pixels grey --conditional", "grey")],
)
def test_each_epoch_feeds_every_image_once_in_a_new_order_presented_anew(
    tmp_path, data_dir, tiny_run, training_steps, flags, pixels
):
    """Per epoch, the model is given every training image exactly once, shuffled, in an order that changes from
    epoch to epoch; a Bernoulli model sees binary images and a CB model dequantized ones, drawn anew each epoch;
    a conditional model, each image with its label; and the logged training loss is the exact mean over the
    images, the short last batch weighted by its size."""
    log = log_of(tiny_run.train(tmp_path / "run", *LOOP, *flags.split(), epochs=2))
    grey, labels = load_mnist(data_dir, train=True, limit=N_TRAIN)
    steps = len(BATCH_SIZES)
    assert len(training_steps) == 2 * steps
    orders, presented = [], []
    for epoch in range(2):
        batches = training_steps[epoch * steps : (epoch + 1) * steps]
        assert [step["x"].shape[0] for step in batches] == BATCH_SIZES
        x = torch.cat([step["x"] for step in batches])  # (100, 1, 28, 28)
        if pixels == "binary":
            assert ((x == 0) | (x == 1)).all(), "a Bernoulli model's training images must be binary"
            assert 0.05 < x.mean() < 0.3  # and not all zeros: MNIST's mean pixel is 0.13
        order = source_of(x, grey, pixels)
        assert sorted(order.tolist()) == list(range(N_TRAIN)), "each training image exactly once per epoch"
        if "--conditional" in flags:
            assert torch.equal(torch.cat([step["y"] for step in batches]), labels[order])
        orders.append(order.tolist())
        presented.append(x[order.argsort()])  # back in index order
        # The logged loss is the mean over the 100 images, not over the 4 batches.
        neg_bounds = [step["neg_bound"].double() for step in batches]
        mean = torch.cat(neg_bounds).mean().item()
        assert log[epoch]["train_loss"] == pytest.approx(mean, rel=1e-6)
        batch_means = torch.stack([b.mean() for b in neg_bounds])  # what equal weights would give
        assert abs(batch_means.mean().item() - mean) > 1e-4 * abs(mean)
    assert orders[0] != list(range(N_TRAIN)) and orders[1] != list(range(N_TRAIN)), "shuffled"
    assert orders[0] != orders[1], "a new order each epoch"
    if pixels == "grey":
        assert torch.equal(presented[0], presented[1])
    else:
        different = (presented[0] != presented[1]).flatten(1).any(1)
        assert different.float().mean() > 0.9, "each image drawn anew when it is used again"


def test_each_step_is_plain_adam_on_the_batch_loss(tmp_path, data_dir, tiny_run, training_steps):
    """Replayed from the first step's weights with torch's own Adam (lr 1e-3, its defaults otherwise), on the same
    batches and the same noise, the run ends with the weights it saved: each step zeroes the gradients, takes
    those of the batch's mean loss, and makes one Adam step with the run's settings. The first step starts with
    the decoder's output bias at the logit of the mean training image (clipped to [0.001, 0.999], as Burda et al.)."""
    tiny_run.train(tmp_path / "run", *LOOP, "--likelihood", "bernoulli", epochs=1)
    saved = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    steps = list(training_steps)
    assert len(steps) == len(BATCH_SIZES)
    grey, _ = load_mnist(data_dir, train=True, limit=N_TRAIN)
    expected_bias = torch.logit(grey.mean(0).clamp(0.001, 0.999)).flatten()
    torch.testing.assert_close(steps[0]["weights"]["to_logits.bias"], expected_bias, rtol=1e-5, atol=1e-5)
    model = VAE(VAEConfig(**saved["model_config"]))
    model.load_state_dict(steps[0]["weights"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in steps:
        for name, weight in model.state_dict().items():
            torch.testing.assert_close(weight, step["weights"][name], rtol=1e-5, atol=1e-6)
        torch.set_rng_state(step["rng"])  # the same eps
        surrogate = model.loss(step["x"]).surrogate
        optimizer.zero_grad()
        surrogate.backward()
        optimizer.step()
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(weight, saved["model"][name], rtol=1e-5, atol=1e-6)
        assert not torch.equal(saved["model"][name], steps[0]["weights"][name]), f"{name} never moved"


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@torch.no_grad()
def test_networks_are_not_affine_and_use_their_activation(make_vae, arch):
    """Every hidden layer applies the configured nonlinearity: the encoder and the decoder are not affine maps
    (for an affine f, f(a) + f(b) = f(a + b) + f(0)), and the same weights under relu and tanh differ."""
    relu, tanh = (make_vae(latent_dim=3, arch=arch, activation=act) for act in ("relu", "tanh"))
    tanh.load_state_dict(relu.state_dict())
    a, b = torch.rand(2, 4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    za, zb = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))

    def affine_defect(f, a, b):
        return (f(a) + f(b) - f(a + b) - f(torch.zeros_like(a))).abs().max()

    for model in (relu, tanh):
        assert affine_defect(lambda x, model=model: torch.cat(model.encode(x), -1), a, b) > 1e-3
        assert affine_defect(model.decode, za, zb) > 1e-3
    assert not torch.allclose(relu.encode(a)[0], tanh.encode(a)[0])
    assert not torch.allclose(relu.decode(za), tanh.decode(za))


# --------------------------------------------------------------------------------------------- the test ELBO


def test_test_elbo_is_the_same_whatever_the_training_random_state(make_vae, monkeypatch):
    """The test ELBO and L_k draw their z from a generator of their own (ELBO_NOISE_SEED): whatever state the
    training stream is in, they give the same numbers, and they leave that stream where it was."""
    model = make_vae(latent_dim=3)
    with torch.no_grad():
        model.to_logvar.bias.fill_(1.0)  # a wide q(z|x): the one-sample ELBO depends on its draw
    g = torch.Generator().manual_seed(1)
    images = torch.rand(30, 1, 28, 28, generator=g).bernoulli(generator=g)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        before = torch.get_rng_state()
        results.append([*mean_neg_elbo(model, images, batch_size=16), mean_neg_iwae_bound(model, images, 5)])
        assert torch.equal(torch.get_rng_state(), before), "the scoring drew from the training stream"
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    # ... and the equality is not vacuous: other noise gives another estimate.
    monkeypatch.setattr("scoring.ELBO_NOISE_SEED", 99)
    assert not torch.equal(mean_neg_elbo(model, images, batch_size=16)[1], results[0][1])


# --------------------------------------------------------------------------------------------- optimizer, schedule


def test_iwae_protocol_runs_adam_with_eps_1e_4(run_copy):
    """Burda et al. (2016), Section 5: Adam with eps = 1e-4 under --schedule iwae, in the run and after a resume;
    PyTorch's default 1e-8 otherwise."""
    for schedule, eps in (("iwae", 1e-4), ("constant", 1e-8)):
        out = run_copy("--schedule", schedule, name=schedule)  # a finished 1-epoch tiny run
        state = torch.load(out / "ckpt.pt", weights_only=True)
        assert [group["eps"] for group in state["optimizer"]["param_groups"]] == [eps]
        train.main(["--resume", "--epochs", "2", "--out-dir", str(out), "--device", "cpu"])
        state = torch.load(out / "ckpt.pt", weights_only=True)
        assert state["epoch"] == 2 and [group["eps"] for group in state["optimizer"]["param_groups"]] == [eps]
        lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert lrs == pytest.approx([1e-3, 1e-3 * 10 ** (-1 / 7) if schedule == "iwae" else 1e-3], rel=1e-12)


def test_iwae_learning_rate_stays_at_its_last_value_after_the_last_stage():
    """After the 3280 epochs of the 8 stages the lr stays at 1e-3 * 10^(-7/7) = 1e-4: it does not decay on."""
    config = train.TrainConfig(schedule="iwae", lr=1e-3)
    lrs = [train.learning_rate(config, epoch) for epoch in (3279, 3280, 3281, 3282, 4000, 3280 + 3**8, 10**6)]
    assert lrs[0] == pytest.approx(1e-4, rel=1e-12) and len(set(lrs)) == 1  # 3279: in the last stage, of 3^7 epochs


# --------------------------------------------------------------------------------------------- the figures


def images_of(fig):
    """[(title, y tick labels, the array drawn)] for every image of a figure."""
    return [
        (ax.get_title(), [t.get_text() for t in ax.get_yticklabels()], np.asarray(image.get_array()))
        for ax in fig.axes
        for image in ax.get_images()
    ]


def untiled(array, side=28):
    """A tiled figure array back into its (rows, cols, 28, 28) images."""
    rows, cols = array.shape[0] // side, array.shape[1] // side
    return array.reshape(rows, side, cols, side).transpose(0, 2, 1, 3)


def right_and_wrong(model, logits):
    """What a figure must show for these logits, E[x|z] (the CB mean for a CB decoder, not lambda), and what it must
    not: the other likelihood's mean."""
    lam, mean = torch.sigmoid(logits), cb_mean(logits)
    return (mean, lam) if model.config.likelihood == "cb" else (lam, mean)


def assert_drawn(array, expected, wrong=None):
    expected = expected.detach().reshape(array.shape).numpy()
    np.testing.assert_allclose(array, expected, rtol=0, atol=1e-6)
    if wrong is not None:  # the check can tell the right images from the wrong ones
        assert np.abs(wrong.detach().reshape(array.shape).numpy() - expected).max() > 0.05


@pytest.mark.parametrize("likelihood", ["cb", "bernoulli"])
@torch.inference_mode()
def test_figures_draw_the_decoder_mean(make_vae, likelihood):
    """Samples, the manifold and the reconstructions show E[x|z] of the decoder's logits: cb_mean for a CB
    decoder, sigmoid for a Bernoulli one; at the prior draws of PRIOR_SAMPLE_SEED, the grid of Gaussian
    quantiles and the posterior means. The model's logits span -6..6 (spread), where a CB's mean and its lambda
    differ by up to 0.16."""
    model = make_vae(likelihood=likelihood, latent_dim=2, spread=True)

    ((_, _, array),) = images_of(visualize.samples_figure(model))
    z = torch.randn(100, 2, generator=torch.Generator().manual_seed(PRIOR_SAMPLE_SEED))
    assert_drawn(untiled(array), *right_and_wrong(model, model.decode(z)))

    ((_, _, array),) = images_of(visualize.manifold_figure(model, manifold.latent_plane(torch.randn(50, 2))))
    # Kingma & Welling's Fig. 4: z1 at the Gaussian quantiles (c + 1/2) / 20 along the columns, z2 along the rows,
    # growing upwards.
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(20) + 0.5) / 20)
    z = torch.stack([q[None, :].expand(20, 20), q.flip(0)[:, None].expand(20, 20)], -1)  # [row, col] -> (z1, z2)
    assert_drawn(untiled(array), *right_and_wrong(model, model.decode(z)))

    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ((_, labels, array),) = images_of(visualize.reconstructions_figure(model, x))
    assert labels == ["test", "recon"]
    assert_drawn(untiled(array)[0], x[:10, 0])
    assert_drawn(untiled(array)[1], *right_and_wrong(model, model.decode(model.encode(x[:10])[0])))


@torch.inference_mode()
def test_compare_draws_the_cb_model_as_lambda_and_as_its_mean(data_dir, make_vae):
    """--compare: each row is what its label says, the CB one both as lambda = sigmoid(logits) and as cb_mean."""
    bernoulli = make_vae(likelihood="bernoulli", latent_dim=3, seed=1, spread=True)
    cb = make_vae(likelihood="cb", latent_dim=2, seed=2, spread=True)
    states = [{"train_config": {"pixels": "binary"}}, {"train_config": {"pixels": "dequantized"}}]
    fig = visualize.compare_figure((states[0], bernoulli), (states[1], cb), [data_dir, data_dir], "cpu")
    n = visualize.N_RECONSTRUCTIONS
    (recon_title, recon_labels, recon), (sample_title, sample_labels, samples) = images_of(fig)
    assert "Reconstructions" in recon_title and "Samples" in sample_title

    def logits_of(model, pixels):
        x, _ = load_test_set(data_dir, pixels, "cpu", limit=n)
        recon = model.decode(model.encode(x)[0])
        z = torch.randn(n, model.config.latent_dim, generator=torch.Generator().manual_seed(PRIOR_SAMPLE_SEED))
        return recon, model.decode(z)

    b_recon, b_prior = logits_of(bernoulli, "binary")
    c_recon, c_prior = logits_of(cb, "dequantized")
    expected = {
        "Bernoulli: mean": (torch.sigmoid(b_recon), torch.sigmoid(b_prior)),
        "CB: λ": (torch.sigmoid(c_recon), torch.sigmoid(c_prior)),
        "CB: mean": (cb_mean(c_recon), cb_mean(c_prior)),
    }
    assert recon_labels == ["test (grayscale)", *expected] and sample_labels == [*expected]
    grey, _ = load_mnist(data_dir, train=False, limit=n)
    assert_drawn(untiled(recon)[0], grey[:, 0])
    for row, (recon_images, prior_images) in enumerate(expected.values()):
        assert_drawn(untiled(recon)[row + 1], recon_images)
        assert_drawn(untiled(samples)[row], prior_images)
    assert np.abs(untiled(samples)[1] - untiled(samples)[2]).max() > 0.05  # lambda and mean differ, visibly


# --------------------------------------------------------------------------------------------- bench's GEMM bound


class MatrixProducts(TorchDispatchMode):
    """Counts the matrix products that run, as (m, k, n) for an (m x k)(k x n) product."""

    def __init__(self):
        super().__init__()
        self.products = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        operands = {aten.mm.default: args[:2], aten.addmm.default: args[1:3]}.get(func)
        if func in (aten.bmm.default, aten.baddbmm.default, aten.matmul.default):
            raise AssertionError(f"{func}: a product this test does not count")
        if operands is not None:
            a, b = operands
            self.products[(a.shape[0], a.shape[1], b.shape[1])] += 1
        return func(*args, **(kwargs or {}))


def test_gemm_plan_is_the_products_autograd_runs(make_vae):
    """bench's GEMM bound counts, for every layer, the forward product and both backward ones (weight and input
    gradients) of each training batch, the short last one included, and the forward products of the test pass:
    exactly the matrix products that a training step and the test ELBO really run."""
    model = make_vae(latent_dim=3, hidden_dims=(20, 10), activation="relu")
    n_train, n_test, batch_size = 2 * 16 + 5, 25, 16
    ran = MatrixProducts()
    with ran:
        for size in (16, 16, 5):
            x = torch.rand(size, 1, 28, 28).bernoulli()
            model.loss(x).surrogate.backward()
        with torch.no_grad():  # the test pass (under inference_mode, which hides its ops from a dispatch mode)
            model.loss(torch.rand(n_test, 1, 28, 28).bernoulli())
    planned = Counter()
    for m, k, n, _, repeats in bench.gemm_plan(model, n_train, n_test, batch_size):
        planned[(m, k, n)] += repeats
    assert +planned == ran.products  # +: without the shapes planned zero times
    n_layers = 7  # encoder 784-20-10, mu and logvar heads, decoder 3-10-20-784
    assert sum(ran.products.values()) == 3 * (3 * n_layers - 1) + n_layers

    run, flops = bench.gemm_epoch(bench.gemm_plan(model, n_train, n_test, batch_size), "cpu")
    run()  # every planned product has operands of its shape and layout
    assert flops == sum(2 * m * k * n * count for (m, k, n), count in ran.products.items())
    weights = sum(layer.in_features * layer.out_features for layer in model.modules() if hasattr(layer, "in_features"))
    assert flops == 2 * weights * (3 * n_train + n_test) - 2 * 784 * 20 * n_train  # no input gradient for x
