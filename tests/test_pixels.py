"""How pixels are presented (--pixels): dequantization's bins and freshness, the scored split's one fixed draw,
the default run's settings, the continuous Bernoulli's bounded logits on dequantized pixels."""

import pytest
import torch

import train
from checkpoints import load_checkpoint
from cli import config_from_args
from data import SCORED_SPLIT_SEED, labelled_batches, load_mnist, load_test_set, present, resolve_pixels
from model import VAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def grey_levels(n=64, seed=0):
    """n images of every grey level k/255, k = 0..255 included, as load_mnist makes them."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (n, 1, 28, 28), generator=g)
    k.view(n, -1)[0, :256] = torch.arange(256)
    return k.float().div_(255), k


def test_dequantized_pixels_stay_inside_their_bins_drawn_anew_each_epoch():
    images, k = grey_levels()
    g = torch.Generator().manual_seed(2)
    epochs = [torch.cat([x for x, _ in labelled_batches(images, None, 16, pixels="dequantized", generator=g)])]
    epochs += [present(images, "dequantized", torch.Generator().manual_seed(seed)) for seed in range(4)]
    for x in epochs:
        assert x.dtype == torch.float32
        assert (x >= k / 256).all() and (x < (k + 1) / 256).all()  # [k/256, (k+1)/256), exactly in float32
        assert (x > 0).float().mean() > 0.99 and (x < 1).all()  # never 1; 0 only when u is exactly 0
    second = torch.cat([x for x, _ in labelled_batches(images, None, 16, pixels="dequantized", generator=g)])
    assert not torch.equal(epochs[0], second)  # drawn anew each time an image is used


def test_dequantization_noise_is_uniform_within_the_bin():
    images, k = grey_levels(n=200)
    u = present(images, "dequantized", torch.Generator().manual_seed(1)) * 256 - k  # (k + u) / 256 -> u
    n = u.numel()  # 156800 draws of U[0, 1): mean 1/2 and variance 1/12, each within 6 standard errors
    assert abs(u.mean().item() - 0.5) < 6 * (1 / 12 / n) ** 0.5
    assert abs(u.var().item() - 1 / 12) < 6 * (1 / 180 / n) ** 0.5  # Var of (u - 1/2)^2 is 1/80 - 1/144 = 1/180


@pytest.mark.parametrize("pixels", ["binary", "dequantized", "grey"])
def test_scored_test_set_is_presented_once_with_a_fixed_seed(data_dir, pixels):
    torch.manual_seed(123)  # the global random state must not matter
    x, labels = load_test_set(data_dir, pixels, "cpu")
    torch.manual_seed(456)
    first, first_labels = load_test_set(data_dir, pixels, "cpu", limit=1000)
    assert torch.equal(first, x[:1000]) and torch.equal(first_labels, labels[:1000])  # a limit cuts the split
    grey, grey_labels = load_mnist(data_dir, train=False)
    assert torch.equal(x, present(grey, pixels, torch.Generator().manual_seed(SCORED_SPLIT_SEED)))
    assert torch.equal(labels, grey_labels) and x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    if pixels == "binary":  # x ~ Bernoulli(k/255): 0 where k = 0, 1 where k = 255, the mean within 6 std errors
        assert ((x == 0) | (x == 1)).all() and not x[grey == 0].any() and x[grey == 1].all()
        assert abs(x.sum() - grey.sum()) < 6 * (grey * (1 - grey)).sum().sqrt()
    elif pixels == "dequantized":
        assert torch.equal((x * 256).floor(), (grey * 255).round())  # each pixel in the bin of its grey level
    else:
        assert torch.equal(x, grey)


def test_resolve_pixels():
    assert [resolve_pixels("auto", likelihood) for likelihood in ("bernoulli", "cb")] == ["binary", "dequantized"]
    assert all(resolve_pixels(p, lik) == p for p in ("binary", "dequantized", "grey") for lik in ("bernoulli", "cb"))
    for bad in ("static", None, "Binary"):
        with pytest.raises(ValueError, match="pixels"):
            resolve_pixels(bad, "bernoulli")


def test_default_run_is_the_documented_model():
    """`python train.py` with no flags: the Bernoulli decoder on dynamically binarized MNIST, 2-D latent."""
    parser = train.build_parser()
    args = parser.parse_args([])
    model_config, config = config_from_args(VAEConfig, args, parser), config_from_args(train.TrainConfig, args, parser)
    assert model_config == VAEConfig(
        latent_dim=2, arch="mlp", hidden_dims=(512, 256), activation="relu", likelihood="bernoulli"
    )
    assert resolve_pixels(config.pixels, model_config.likelihood) == "binary"
    defaults = (config.epochs, config.batch_size, config.lr, config.objective, config.k, config.estimator)
    assert defaults == (30, 128, 1e-3, "elbo", 1, "pathwise")


def test_cb_on_dequantized_pixels_keeps_bounded_logits(tiny_run, data_dir):
    """On pixels that are exactly 0 a CB decoder gains density without bound by pushing logits to -inf; on
    dequantized pixels a background pixel's best logit is finite: x in [0, 1/256) has mean 1/512, and
    E[log p] ~ -|l|/512 + log|l| peaks at l = -512. 160 steps at a high learning rate show the difference."""
    flags = ["--likelihood", "cb", "--limit", "1024", "--batch-size", "64", "--hidden-dims", "64", "--lr", "1e-2"]
    smallest = {}
    for pixels in ("dequantized", "grey"):
        state, vae = load_checkpoint(tiny_run(*flags, "--pixels", pixels, epochs=10) / "ckpt.pt")
        x, _ = load_test_set(data_dir, state["train_config"]["pixels"], "cpu", 256)
        with torch.no_grad():
            logits = vae.decode(vae.encode(x)[0])  # (256, 1, 28, 28)
        assert torch.isfinite(logits).all()
        smallest[pixels] = logits.min().item()
    assert smallest["dequantized"] > -1000, smallest  # near the optimum of the bin, far above -1e4
    assert smallest["grey"] < -1500, smallest  # exact zeros keep pulling: the check can fail
