"""The label-conditioned VAE (q(z|x, y), p(x|z, y), p(z) = N(0, I)), KL warm-up and the training film: the
conditional densities against torch.distributions; the generative classifier where it is exact, and the conditional
and marginal NLL it reports; the warm-up's weight; the frames of the film, dropped past a resumed epoch; and the
conditional figures. (Labels travelling with their images: test_behaviour.py; resumed runs: test_fitting.py.)
"""

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

import evaluate
import scoring
import train
import visualize
from manifold import class_grid_images, prior_z

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


@pytest.fixture
def conditional_vae(make_vae):
    """conditional_vae(arch="mlp", latent_dim=3): a small untrained conditional VAE, in float64."""
    return lambda arch="mlp", latent_dim=3: make_vae(latent_dim=latent_dim, arch=arch, conditional=True).double()


def images(n, seed=1):
    return torch.bernoulli(torch.full((n, 1, 28, 28), 0.3, dtype=F64), generator=torch.Generator().manual_seed(seed))


def log_records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------- the model


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@torch.no_grad()
def test_conditional_log_weights_match_torch_distributions_for_a_fixed_label(conditional_vae, arch):
    """log w = log p(x|z, y) + log p(z) - log q(z|x, y) with the one-hot label y beside the image and the code."""
    vae, x, k, y = conditional_vae(arch), images(3), 4, torch.tensor([7, 7, 7])
    log_w = vae.log_weights(x, k, torch.Generator().manual_seed(0), y=y)
    mu, logvar = vae.encode(x, y)
    q = Independent(Normal(mu, torch.exp(0.5 * logvar)), 1)
    z = mu + q.stddev * torch.randn((k, *mu.shape), generator=torch.Generator().manual_seed(0), dtype=F64)
    one_hot = torch.nn.functional.one_hot(y, 10).to(F64).expand(k, 3, 10)  # the label, beside the code
    logits = vae.to_logits(vae.decoder(torch.cat([z, one_hot], -1).reshape(k * 3, -1))).reshape(k, 3, 1, 28, 28)
    log_p = Independent(Bernoulli(logits=logits), 3).log_prob(x) + Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(log_w, log_p - q.log_prob(z), rtol=1e-10, atol=1e-8)
    # the label matters, in the encoder and the decoder
    assert not torch.allclose(vae.encode(x, torch.tensor([1, 1, 1]))[0], mu)
    assert not torch.allclose(vae.decode(z, torch.tensor([1, 1, 1])), vae.decode(z, y))
    with pytest.raises(ValueError, match="needs the labels"):
        vae.encode(x)


def test_a_label_morph_at_its_ends_is_the_label_and_an_unconditional_model_ignores_labels(conditional_vae, make_vae):
    vae, z, y = conditional_vae(), torch.randn(4, 3, dtype=F64), torch.tensor([2, 5, 5, 9])
    assert torch.equal(vae.decode(z, torch.nn.functional.one_hot(y, 10).to(F64)), vae.decode(z, y))
    vae, x = make_vae().double(), images(2)
    assert torch.equal(vae.encode(x)[0], vae.encode(x, torch.tensor([3, 4]))[0])


# --------------------------------------------------------------------------------------------- the classifier


@torch.no_grad()
def test_the_generative_classifier_on_a_model_whose_decoder_ignores_z(make_vae):
    """With q(z|x, y) = p(z) and p(x|z, y) = p(x|y), every importance weight is p(x|y): L_k(x|y) = log p(x|y)
    exactly, and argmax_y L_k(x|y) is the label whose template explains x best."""
    vae = make_vae(hidden_dims=(10,), activation="relu", conditional=True).double()
    templates = torch.randn(10, 784, dtype=F64) * 2  # each digit's logits
    for p in vae.parameters():
        p.zero_()  # the encoder: mu = logvar = 0, q = N(0, I) = p(z)
    vae.decoder[0].weight[:, 2:] = torch.eye(10, dtype=F64)  # the hidden layer is the one-hot label: z ignored
    vae.to_logits.weight.copy_(templates.T)  # logits = templates[y]
    truth = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    g = torch.Generator().manual_seed(2)
    x = torch.bernoulli(torch.sigmoid(templates[truth]).reshape(-1, 1, 28, 28), generator=g)
    x[0] = x[1]  # one image a 1 drawn for a 3: the classifier must say 1, as p(x|y) does
    log_px_y = scoring.label_log_likelihoods(vae, x, 7, batch_size=3, generator=torch.Generator().manual_seed(0))
    each = Independent(Bernoulli(logits=templates.reshape(10, 1, 28, 28)), 3)
    exact = torch.stack([each.log_prob(image) for image in x])  # (8, 10)
    torch.testing.assert_close(log_px_y, exact, rtol=1e-10, atol=1e-8)
    scores = scoring.conditional_scores(log_px_y, truth)
    assert scores["classifier_accuracy"] == 7 / 8
    assert scores["test_nll"] == pytest.approx(-exact.gather(1, truth[:, None]).mean().item())
    marginal = torch.logsumexp(exact, 1) - math.log(10)
    assert scores["test_nll_marginal"] == pytest.approx(-marginal.mean().item())


# --------------------------------------------------------------------------------------------- end to end


CONDITIONAL = ("--conditional", "--frames", "--latent-dim", "2")


def test_a_conditional_checkpoint_is_evaluated_and_drawn_with_no_flag_saying_so(tiny_run, tmp_path):
    ckpt = tiny_run(*CONDITIONAL, epochs=2) / "ckpt.pt"
    results = evaluate.main(["--checkpoint", str(ckpt), "--k", "4", "--limit", "64", "--exact-images", "2"])
    assert {"test_nll", "test_nll_marginal", "classifier_accuracy", "classifier_k", "test_nll_exact"} <= results.keys()
    assert results["classifier_k"] == 4 and 0 <= results["classifier_accuracy"] <= 1
    assert results["test_nll"] >= results["test_nll_marginal"] - math.log(10)
    visualize.main(["--checkpoint", str(ckpt), "--plots-dir", str(tmp_path), "--device", "cpu"])
    drawn = {p.name for p in tmp_path.iterdir()}
    assert {"class_grid.png", "analogies.png", "interpolation.png", "training.gif"} <= drawn
    assert "manifold_20x20.png" not in drawn


def test_frames_past_a_resumed_epoch_are_dropped(run_copy):
    """As if the run had stopped after epoch 3's frame was saved but before its checkpoint: the resume drops it
    (and would make it anew), as it drops the log line of that epoch."""
    run = run_copy(*CONDITIONAL, epochs=2)
    assert sorted(p.name for p in (run / "frames").iterdir()) == ["0001.png", "0002.png"]
    first = (run / "frames" / "0001.png").read_bytes()
    (run / "frames" / "0003.png").write_bytes(b"a frame of an epoch the checkpoint never saw")
    train.main(["--resume", "--epochs", "2", "--out-dir", str(run), "--device", "cpu"])
    assert sorted(p.name for p in (run / "frames").iterdir()) == ["0001.png", "0002.png"]
    assert (run / "frames" / "0001.png").read_bytes() == first


def test_the_film_plays_the_frames_in_the_order_of_their_epochs(tmp_path):
    """Frames written out of order (so that neither the file system's order nor their times give the epochs'), each
    a flat grey of its own: the GIF plays them by epoch, 9 before 10, one frame each, the last held longest."""
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    epochs = [10, 3, 12, 1, 9, 2, 11, 4, 8, 5, 7, 6]
    for epoch in epochs:
        Image.new("L", (56, 56), 20 * epoch).save(frames / f"{epoch:04d}.png")
    visualize.write_film(frames, tmp_path / "film.gif")
    with Image.open(tmp_path / "film.gif") as film:
        assert film.n_frames == len(epochs) and film.info["loop"] == 0
        greys, durations = [], []
        for i in range(film.n_frames):
            film.seek(i)
            greys.append(np.asarray(film.convert("L"))[40, 28])  # below the caption, which names the epoch
            durations.append(film.info["duration"])
    assert greys == sorted(greys) and len(set(greys)) == len(epochs)
    assert durations == [visualize.FRAME_MS] * (len(epochs) - 1) + [visualize.LAST_FRAME_MS]


# --------------------------------------------------------------------------------------------- KL warm-up


def test_the_kl_weight_rises_linearly_per_step_to_beta():
    config = train.TrainConfig(kl_warmup=3, beta=2.0)
    n = 10
    weights = torch.cat([train.kl_weights(config, epoch, n) for epoch in (1, 2, 3, 4)])  # 40 steps
    expected = 2.0 * torch.clamp(torch.arange(1, 41, dtype=F64) / 30, max=1.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-7, atol=0)
    assert weights[29] == 2.0 and (weights[30:] == 2.0).all() and weights[0] > 0
    assert torch.equal(train.kl_weights(train.TrainConfig(beta=0.5), 7, n), torch.full((n,), 0.5))


def test_a_warm_up_logs_its_weight_and_leaves_the_test_loss_the_elbo(tiny_run):
    """(A warm-up resumed where it stopped: test_fitting.py.)"""
    a = log_records(tiny_run("--kl-warmup", "3", epochs=2))
    assert [r["kl_weight"] for r in a] == pytest.approx([1 / 3, 2 / 3])
    assert a[0]["train_bound"] == "recon + kl_weight KL"
    plain = log_records(tiny_run(epochs=2))
    assert plain[0]["kl_weight"] == 1.0 and plain[0]["train_loss"] != a[0]["train_loss"]
    # the test loss stays the plain -ELBO: recon + KL at weight 1
    assert a[-1]["test_loss"] == pytest.approx(a[-1]["test_recon"] + a[-1]["test_kl"], rel=1e-6)


# --------------------------------------------------------------------------------------------- the figures


def labelled_tiles(fig):
    """The y and the x tick labels of a figure's one image, and its tiles (rows, cols, 28, 28)."""
    (ax,) = fig.axes
    (image,) = ax.get_images()
    array = np.asarray(image.get_array())
    tiles = array.reshape(array.shape[0] // 28, 28, array.shape[1] // 28, 28).transpose(0, 2, 1, 3)
    return [t.get_text() for t in ax.get_yticklabels()], [t.get_text() for t in ax.get_xticklabels()], tiles


@torch.no_grad()
def test_each_row_and_column_of_the_conditional_figures_shows_the_digit_it_names(conditional_vae):
    """The class grid: row y, named y, is E[x|z_j, y] for the shared z_j of column j. The analogies: row i is test
    image i, then its code decoded with the digit each column names. The samples: row r is the digit r."""
    vae, digits = conditional_vae(latent_dim=2).float(), torch.arange(10)

    def mean(z, y):
        return torch.sigmoid(vae.decode(z, y)).reshape(*y.shape, 28, 28).numpy()

    rows, _, grid = labelled_tiles(visualize.class_grid_figure(vae))
    assert rows == [str(d) for d in range(10)]
    np.testing.assert_allclose(
        grid, mean(prior_z(10, 2, "cpu").expand(10, 10, 2), digits[:, None].expand(10, 10)), atol=1e-6
    )
    np.testing.assert_allclose(class_grid_images(vae).reshape(10, 10, 28, 28).numpy(), grid, atol=1e-6)

    x, y = images(8).float(), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    rows, columns, analogies = labelled_tiles(visualize.analogies_figure(vae, x, y))
    assert rows == [f"test: {d}" for d in y.tolist()] and columns == ["x", *map(str, range(10))]
    np.testing.assert_allclose(analogies[:, 0], x[:, 0].numpy(), atol=1e-6)  # the test images themselves
    mu, _ = vae.encode(x, y)
    np.testing.assert_allclose(analogies[:, 1:], mean(mu[:, None].expand(8, 10, 2), digits.expand(8, 10)), atol=1e-6)

    _, _, samples = labelled_tiles(visualize.samples_figure(vae))
    z = prior_z(100, 2, "cpu").reshape(10, 10, 2)
    np.testing.assert_allclose(samples, mean(z, digits[:, None].expand(10, 10)), atol=1e-6)


@pytest.mark.parametrize("conditional", [False, True])
@torch.no_grad()
def test_the_interpolation_runs_between_the_posterior_means_of_two_different_digits(make_vae, conditional):
    vae = make_vae(conditional=conditional)
    x, y = images(20).float(), torch.tensor([7, 7, 2, 1, 1, 0, 4, 4, 4, 9, 5, 5, 3, 8, 8, 6, 2, 2, 0, 1])
    pairs = visualize.pairs_of_different_digits(y)
    assert pairs == [(0, 2), (3, 5), (6, 9), (10, 12), (13, 15)]
    _, _, rows = labelled_tiles(visualize.interpolation_figure(vae, x, y))
    assert rows.shape[:2] == ((2 if conditional else 1) * visualize.N_PAIRS, visualize.STEPS + 2)
    i, j = pairs[0]
    np.testing.assert_allclose(rows[0, 0], x[i, 0].numpy(), atol=1e-6)  # the pair itself, at the ends
    np.testing.assert_allclose(rows[0, -1], x[j, 0].numpy(), atol=1e-6)
    rows = rows[:, 1:-1]
    mu, _ = vae.encode(x[[i, j]], y[[i, j]])
    start = torch.sigmoid(vae.decode(mu[:1], y[[i]])).reshape(28, 28).numpy()
    end = torch.sigmoid(vae.decode(mu[1:], y[[j]])).reshape(28, 28).numpy()
    np.testing.assert_allclose(rows[0, 0], start, atol=1e-6)
    np.testing.assert_allclose(rows[0, -1], end, atol=1e-6)
    if conditional:  # the label alone morphs, with the code held at x_i's
        np.testing.assert_allclose(rows[1, 0], start, atol=1e-6)
        held = torch.sigmoid(vae.decode(mu[:1], y[[j]])).reshape(28, 28).numpy()
        np.testing.assert_allclose(rows[1, -1], held, atol=1e-6)
