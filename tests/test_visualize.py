"""visualize.py and manifold.py: the latent grid, the PCA plane, the tiling, and the figures end to end on tiny
models."""

import matplotlib.image
import pytest
import torch

import manifold
import visualize
from checkpoints import load_checkpoint
from data import load_test_set

FIGURES = ("latent_scatter", "manifold_20x20", "reconstructions", "samples", "interpolation", "training_curves")


def test_the_manifold_grid_is_at_gaussian_quantiles_strictly_inside_the_unit_square():
    grid = manifold.manifold_grid(20)
    assert grid.shape == (20, 20, 2) and torch.isfinite(grid).all()
    a = grid[0, :, 0]
    u = torch.distributions.Normal(0.0, 1.0).cdf(a)
    assert torch.allclose(u, (torch.arange(20) + 0.5) / 20, atol=1e-5)  # evenly spaced, 1/40 away from 0 and 1
    assert torch.allclose(a, -a.flip(0), atol=1e-5)  # symmetric around 0
    # Columns run over the first coordinate left to right, rows over the second from the top (largest) down.
    assert torch.equal(grid[..., 0], a.expand(20, 20)) and torch.equal(grid[..., 1], a.flip(0)[:, None].expand(20, 20))


def test_the_latent_plane_is_the_latent_space_in_2_d_and_the_leading_principal_axes_above():
    center, directions, scales = manifold.latent_plane(torch.randn(100, 2) + 5)
    assert torch.equal(center, torch.zeros(2)) and torch.equal(directions, torch.eye(2))
    assert torch.equal(scales, torch.ones(2))

    generator = torch.Generator().manual_seed(0)
    n, d = 4000, 6
    offset = torch.arange(d, dtype=torch.float32)
    mu = offset + 0.01 * torch.randn(n, d, generator=generator)
    mu[:, 3] += 3.0 * torch.randn(n, generator=generator)  # the leading direction: e_3, std 3
    mu[:, 1] += 1.0 * torch.randn(n, generator=generator)  # the second: e_1, std 1
    center, directions, scales = manifold.latent_plane(mu)
    assert torch.allclose(center, offset, atol=0.15)
    assert torch.allclose(directions @ directions.T, torch.eye(2), atol=1e-5)
    assert torch.allclose(directions.abs(), torch.eye(d)[[3, 1]], atol=0.02)
    assert (directions[[0, 1], [3, 1]] > 0).all()  # signs fixed: largest component positive
    assert torch.allclose(manifold.latent_plane(-mu)[1], directions, atol=1e-5)  # where SVD's signs would flip
    assert torch.allclose(scales, torch.tensor([3.0, 1.0]), rtol=0.05)


def test_tile_keeps_images_upright_and_in_row_major_order():
    images = torch.arange(6 * 28 * 28, dtype=torch.float32).reshape(6, 1, 28, 28)
    grid = manifold.tile(images, 2, 3)
    assert grid.shape == (56, 84)
    for k in range(6):
        r, c = divmod(k, 3)
        assert (grid[28 * r : 28 * (r + 1), 28 * c : 28 * (c + 1)] == images[k, 0].numpy()).all()


@pytest.fixture
def cb_checkpoint(tiny_run):
    """A tiny CB run, 2-D latent (shared: read-only)."""
    return tiny_run("--likelihood", "cb", "--latent-dim", "2") / "ckpt.pt"


@pytest.fixture
def bernoulli_checkpoint(tiny_run):
    """A conv Bernoulli run, 4-D latent: 1 epoch of 512 images (shared: read-only)."""
    flags = ["--arch", "conv", "--likelihood", "bernoulli", "--hidden-dims", "32", "--latent-dim", "4"]
    return tiny_run(*flags, "--limit", "512", "--batch-size", "128") / "ckpt.pt"


def assert_png(path, min_side=150):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < path.stat().st_size < 2_000_000
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side


@pytest.mark.parametrize("which, pixels", [("cb_checkpoint", "dequantized"), ("bernoulli_checkpoint", "binary")])
def test_the_figures_of_the_test_images_as_the_model_was_trained_on_them(
    which, pixels, request, tmp_path, monkeypatch, capsys
):
    """Each figure is written and named, of a 2-D latent and of a 4-D one (the PCA path). The latent scatter, the
    principal plane and the reconstructions encode the test set presented as in training (binarized for a
    Bernoulli model, dequantized for a CB one), with the fixed seed of the scored split: the very images train.py
    scored, never the grey levels."""
    checkpoint = request.getfixturevalue(which)
    state, _ = load_checkpoint(checkpoint)
    assert state["train_config"]["pixels"] == pixels
    encoded, shown = [], []
    real_means, real_recon = visualize.posterior_means, visualize.reconstructions_figure
    monkeypatch.setattr(
        visualize, "posterior_means", lambda m, x, *a, **k: encoded.append(x) or real_means(m, x, *a, **k)
    )
    monkeypatch.setattr(visualize, "reconstructions_figure", lambda m, x, *a: shown.append(x) or real_recon(m, x, *a))
    visualize.main(["--checkpoint", str(checkpoint), "--plots-dir", str(tmp_path), "--device", "cpu"])
    printed = capsys.readouterr().out
    for name in FIGURES:
        assert_png(tmp_path / f"{name}.png", min_side=100 if name == "reconstructions" else 150)
        assert f"wrote {tmp_path / name}.png" in printed
    expected, _ = load_test_set(state["train_config"]["data_dir"], pixels, "cpu")
    grey, _ = load_test_set(state["train_config"]["data_dir"], "grey", "cpu")
    assert len(encoded) == 1 and len(shown) == 1
    for images in (encoded[0], shown[0]):
        assert torch.equal(images, expected) and not torch.equal(images, grey)


def test_compare_takes_a_bernoulli_and_a_cb_model_in_this_order(bernoulli_checkpoint, cb_checkpoint, tmp_path, scripts):
    flags = ["--plots-dir", tmp_path, "--device", "cpu"]
    code, _, err = scripts.run(visualize.main, "--compare", cb_checkpoint, bernoulli_checkpoint, *flags)
    assert code == 1 and list(tmp_path.iterdir()) == []
    scripts.only_error(err, "BERNOULLI_CKPT CB_CKPT")
    assert scripts.run(visualize.main, "--compare", bernoulli_checkpoint, cb_checkpoint, *flags)[0] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["compare_bernoulli_cb.png"]
    assert_png(tmp_path / "compare_bernoulli_cb.png")


@pytest.mark.parametrize("epochs, scale", [(30, "linear"), (visualize.LONG_RUN + 1, "log")])
def test_the_training_curves_of_a_long_run_are_on_a_log_axis(epochs, scale):
    """The IWAE protocol's stages last 3^i epochs: on a log axis each gets its share of the figure."""
    records = [
        {"epoch": e, "train_bound": "-ELBO", "train_loss": 100 / e, "test_loss": 100 / e, "test_kl": 20.0}
        for e in range(1, epochs + 1)
    ]
    fig = visualize.training_curves_figure(records)
    assert [ax.get_xscale() for ax in fig.axes] == [scale, scale]
    assert all(len(line.get_xdata()) == epochs for ax in fig.axes for line in ax.get_lines())
