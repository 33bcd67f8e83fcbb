"""Figures of a trained VAE: `python visualize.py` (see --help). Writes PNGs into --plots-dir.

Default: latent_scatter.png, manifold_20x20.png, reconstructions.png, samples.png, interpolation.png,
training_curves.png, and training.gif if the run kept frames (train.py --frames). A conditional model gets
class_grid.png and analogies.png in place of the manifold.
--compare BERNOULLI_CKPT CB_CKPT: one figure, compare_bernoulli_cb.png, that sets a Bernoulli decoder beside a
continuous-Bernoulli one, and shows why a CB decoder's images are displayed as its mean, not as lambda
(Loaiza-Ganem & Cunningham 2019).
"""

import argparse
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from checkpoints import CKPT_FILE, FRAMES_DIR, LOG_FILE, CheckpointError, load_checkpoint, read_log
from cli import add_device_arg, add_model_args, load_model, parse, script
from data import load_mnist, load_test_set
from files import write_atomic, write_png
from manifold import MANIFOLD_SIDE, class_grid_images, decode_means, latent_plane, manifold_images, prior_z, tile
from model import N_CLASSES
from scoring import posterior_means

N_RECONSTRUCTIONS = 10
SAMPLES_SIDE = 10
N_PAIRS, STEPS = 5, 10  # the interpolation: pairs of test images of different digits, steps between them
N_ANALOGIES = 8  # test images whose style the analogies carry through every digit
FRAME_MS, LAST_FRAME_MS = 250, 2000  # the training film
LONG_RUN = 200  # epochs: the training curves of a longer run, on a log axis, without markers
FILM_GREY_LEVELS = 32  # of 256: a GIF of 30 such frames is about 2 MB, not 5
COMPARE_FILE = "compare_bernoulli_cb.png"
WAYS_FILE = "ways_of_fitting.png"
COMPARE_ROWS = ["Bernoulli: mean", "CB: λ", "CB: mean"]  # what --compare shows of each model, top to bottom


# --------------------------------------------------------------------------------------------- latent geometry


def show_image(ax, array, title):
    ax.imshow(array, cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def show_rows(ax, rows, labels, title):
    """Rows of images (each (n, 1, 28, 28)) stacked into one image, each row named on the left."""
    n = rows[0].shape[0]
    show_image(ax, tile(torch.cat([r.cpu() for r in rows]), len(rows), n), title)
    ax.set_yticks([28 * i + 14 for i in range(len(rows))], labels)
    ax.tick_params(left=False)


def save(fig, path):
    write_png(fig, path)
    print(f"wrote {path}")


@torch.inference_mode()
def reconstruct(model, x, y=None):
    """decode(mu): the reconstruction at the posterior mean; returns the logits (B, 1, 28, 28)."""
    mu, _ = model.encode(x, y)
    return model.decode(mu, y)


# --------------------------------------------------------------------------------------------- the five figures
# Each is a matplotlib Figure, made without pyplot (no global state, no backend to choose): main saves it,
# a notebook shows it.


def latent_scatter_figure(mu, labels, plane, conditional=False):
    center, directions, _ = plane
    d = mu.shape[1]
    points = ((mu - center) @ directions.T).cpu()  # (N, 2)
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.cpu(), cmap="tab10", vmin=-0.5, vmax=9.5, s=2, alpha=0.7)
    handles, names = scatter.legend_elements(fmt="{x:.0f}")
    ax.legend(handles, names, title="digit", loc="center left", bbox_to_anchor=(1, 0.5), frameon=False)
    if d == 2:
        posterior = "q(z|x, y)" if conditional else "q(z|x)"
        ax.set(title=f"Test set: posterior means of {posterior}", xlabel="$z_1$", ylabel="$z_2$")
        ax.set_aspect("equal")
    else:
        ax.set(
            title=f"Test set: posterior means, PCA of {d}-D latent to 2-D",
            xlabel="principal component 1",
            ylabel="principal component 2",
        )
    fig.tight_layout()
    return fig


def manifold_figure(model, plane):
    images = manifold_images(model, plane)  # (400, 1, 28, 28)
    d = model.config.latent_dim
    where = (
        "$z$ on a grid of Gaussian quantiles"
        if d == 2
        else (
            f"$z$ in the plane of the two leading principal directions of the {d}-D posterior means,\n"
            "at Gaussian quantiles times the means' std along each"
        )
    )
    fig = Figure(figsize=(7, 7.3))
    ax = fig.subplots()
    show_image(ax, tile(images, MANIFOLD_SIDE, MANIFOLD_SIDE), f"Learned manifold: E[x|z] for\n{where}")
    fig.tight_layout()
    return fig


def reconstructions_figure(model, images, labels=None):
    x = images[:N_RECONSTRUCTIONS]  # (n, 1, 28, 28)
    recon = model.mean(reconstruct(model, x, None if labels is None else labels[:N_RECONSTRUCTIONS]))
    fig = Figure(figsize=(8, 2.2))
    ax = fig.subplots()
    show_rows(ax, [x, recon], ["test", "recon"], "Test images and their reconstructions E[x | z = mu(x)]")
    fig.tight_layout()
    return fig


def samples_figure(model):
    """E[x|z] at z ~ p(z); for a conditional model, row r shows the digit r."""
    device = next(model.parameters()).device
    z = prior_z(SAMPLES_SIDE**2, model.config.latent_dim, device)
    y = torch.arange(SAMPLES_SIDE**2, device=device) // SAMPLES_SIDE if model.config.conditional else None
    fig = Figure(figsize=(6, 6.3))
    ax = fig.subplots()
    title = (
        "Samples: E[x|z, y], z ~ N(0, I), row r the digit y = r" if y is not None else "Samples: E[x|z], z ~ N(0, I)"
    )
    show_image(ax, tile(decode_means(model, z, y), SAMPLES_SIDE, SAMPLES_SIDE), title)
    fig.tight_layout()
    return fig


def pairs_of_different_digits(labels, n=N_PAIRS):
    """n pairs (i, j) of test images, in order, i's digit different from j's: each i the next unused image, j the
    first image after it of another digit."""
    labels, pairs, i = labels.tolist(), [], 0
    while len(pairs) < n:
        j = next(j for j in range(i + 1, len(labels)) if labels[j] != labels[i])
        pairs.append((i, j))
        i = j + 1
    return pairs


@torch.inference_mode()
def interpolation_figure(model, images, labels):
    """For pairs of test images of different digits (shown at the ends of each row), STEPS points on the straight
    line between their posterior means, decoded. A conditional model gets two rows a pair: code and label morphed
    together (the label as weights (1 - t) y_a + t y_b on the two one-hot vectors), and the label alone, with the
    code held at x_a's."""
    t = torch.linspace(0, 1, STEPS, device=images.device)[:, None]  # (STEPS, 1)
    rows, names = [], []
    for i, j in pairs_of_different_digits(labels):
        x, y = images[[i, j]], labels[[i, j]]
        mu, _ = model.encode(x, y)  # (2, d)
        z = (1 - t) * mu[0] + t * mu[1]  # (STEPS, d)
        a, b = y.tolist()
        if model.config.conditional:
            one_hot = torch.nn.functional.one_hot(y, N_CLASSES).to(t.dtype)  # (2, 10)
            weights = (1 - t) * one_hot[0] + t * one_hot[1]  # (STEPS, 10)
            steps = [decode_means(model, z, weights), decode_means(model, mu[:1].expand(STEPS, -1), weights)]
            names += [f"z, y: {a} → {b}", f"y: {a} → {b}"]
        else:
            steps = [decode_means(model, z)]
            names.append(f"{a} → {b}")
        rows += [torch.cat([x[:1], between, x[1:]]) for between in steps]  # the two test images at the ends
    fig = Figure(figsize=(8, 0.75 * len(rows) + 0.8))
    ax = fig.subplots()
    kind = (
        "E[x|z, y] along the straight line between two codes and labels"
        if model.config.conditional
        else ("E[x|z] along the straight line between two posterior means")
    )
    show_rows(ax, rows, names, f"Interpolation: {kind}")
    fig.tight_layout()
    return fig


@torch.inference_mode()
def analogies_figure(model, images, labels):
    """Kingma, Rezende, Mohamed & Welling (2014), Fig. 1: each test image's code mu(x, y), decoded with every
    label 0-9: the writer's style, carried through the ten digits."""
    x, y = images[:N_ANALOGIES], labels[:N_ANALOGIES]
    mu, _ = model.encode(x, y)  # (n, d)
    digits = torch.arange(N_CLASSES, device=x.device)
    rows = [torch.cat([x[i : i + 1], decode_means(model, mu[i].expand(N_CLASSES, -1), digits)]) for i in range(len(x))]
    fig = Figure(figsize=(7, 0.62 * len(rows) + 0.8))
    ax = fig.subplots()
    show_rows(ax, rows, [f"test: {d}" for d in y.tolist()], "Analogies: mu(x, y) decoded with y = 0 … 9")
    ax.set_xticks([28 * c + 14 for c in range(N_CLASSES + 1)], ["x", *map(str, range(N_CLASSES))])
    ax.tick_params(bottom=False)
    fig.tight_layout()
    return fig


def class_grid_figure(model):
    """Rows the ten digits, columns ten shared z ~ p(z): E[x|z, y] of a conditional model."""
    fig = Figure(figsize=(6, 6.3))
    ax = fig.subplots()
    show_rows(
        ax,
        list(class_grid_images(model).split(N_CLASSES)),
        [str(d) for d in range(N_CLASSES)],
        "Class grid: E[x|z, y], row y, column one z ~ N(0, I)",
    )
    fig.tight_layout()
    return fig


def write_film(frames_dir, path):
    """The frames train.py --frames kept, epoch by epoch, as an animated GIF (Pillow), each with its epoch."""
    levels = [round(v * (FILM_GREY_LEVELS - 1) / 255) * 255 // (FILM_GREY_LEVELS - 1) for v in range(256)]
    film = []
    for frame_path in sorted(frames_dir.glob("*.png")):
        with Image.open(frame_path) as frame:
            canvas = Image.new("L", (frame.width, frame.height + 24), 0)
            canvas.paste(frame.convert("L").point(levels), (0, 24))
        ImageDraw.Draw(canvas).text((6, 5), f"epoch {int(frame_path.stem)}", fill=255)
        film.append(canvas)
    durations = [FRAME_MS] * (len(film) - 1) + [LAST_FRAME_MS]
    write_atomic(
        path, lambda f: film[0].save(f, format="GIF", save_all=True, append_images=film[1:], duration=durations, loop=0)
    )
    print(f"wrote {path} ({len(film)} frames)")


def training_curves_figure(records):
    epochs = [r["epoch"] for r in records]
    # The training loss is averaged over the epoch while the model improves, and is the bound the run
    # trains (train_bound); the test loss is -ELBO.
    bound = records[-1]["train_bound"]
    style = "o-" if len(records) <= LONG_RUN else "-"  # a long run (the IWAE protocol's 3280 epochs): lines only
    fig = Figure(figsize=(10, 4))
    loss_ax, kl_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in records], style, markersize=3, label=f"train, {bound}")
    loss_ax.plot(epochs, [r["test_loss"] for r in records], style, markersize=3, label="test, -ELBO")
    loss_ax.set(title="Loss", xlabel="epoch", ylabel="nats / image")
    loss_ax.legend()
    kl_ax.plot(epochs, [r["test_kl"] for r in records], style, markersize=3, color="tab:green")
    kl_ax.set(title="Test KL(q(z|x) || p(z))", xlabel="epoch", ylabel="nats / image")
    for ax in (loss_ax, kl_ax):
        ax.grid(alpha=0.3)
        if len(records) > LONG_RUN:  # the schedule's stages are 3^i epochs long: even on a log axis
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs only
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------- --compare


def model_inputs(state, data_dir, n, device):
    """The first n test images as this model was scored on them (a Bernoulli model's usually binarized), and
    their labels."""
    return load_test_set(data_dir, state["train_config"]["pixels"], device, limit=n)


@torch.inference_mode()
def compare_figure(bernoulli, cb, data_dirs, device):
    """Reconstructions and prior samples of both models; the CB ones both as lambda and as the CB mean.

    A CB decoder's lambda is not its mean: E[x] = 1 / (1 - e^-l) - 1 / l is pulled towards 1/2 (CB paper,
    eq. (4)), so images shown as lambda look sharper than what the model actually predicts.
    """
    n = N_RECONSTRUCTIONS
    (bernoulli_state, bernoulli_model), (cb_state, cb_model) = bernoulli, cb
    originals, labels = load_mnist(data_dirs[0], train=False, limit=n)  # (n, 1, 28, 28), grayscale
    labels = labels.to(device)  # for conditional models: the first n test digits
    bernoulli_recon = reconstruct(bernoulli_model, *model_inputs(bernoulli_state, data_dirs[0], n, device))
    cb_recon = reconstruct(cb_model, *model_inputs(cb_state, data_dirs[1], n, device))  # logits
    bernoulli_prior = bernoulli_model.decode(prior_z(n, bernoulli_model.config.latent_dim, device), labels)
    cb_prior = cb_model.decode(prior_z(n, cb_model.config.latent_dim, device), labels)  # one z for both CB rows

    fig = Figure(figsize=(8, 6.5))
    recon_ax, sample_ax = fig.subplots(2, 1, height_ratios=[4, 3])
    show_rows(
        recon_ax,
        [originals, bernoulli_model.mean(bernoulli_recon), torch.sigmoid(cb_recon), cb_model.mean(cb_recon)],
        ["test (grayscale)", *COMPARE_ROWS],
        "Reconstructions, z = mu(x)",
    )
    show_rows(
        sample_ax,
        [bernoulli_model.mean(bernoulli_prior), torch.sigmoid(cb_prior), cb_model.mean(cb_prior)],
        COMPARE_ROWS,
        "Samples, z ~ N(0, I)",
    )
    fig.suptitle("Bernoulli vs continuous Bernoulli (CB) decoder: λ = sigmoid(logits) is not the CB mean")
    fig.tight_layout()
    return fig


def load_for_compare(paths, data_dir, device):
    """Both checkpoints, checked to be a Bernoulli and a CB model in that order, and the data dir of each."""
    loaded = [load_checkpoint(path, device) for path in paths]
    for (_, model), path, expected in zip(loaded, paths, ("bernoulli", "cb"), strict=True):
        if model.config.likelihood != expected:
            raise CheckpointError(
                f"--compare takes BERNOULLI_CKPT CB_CKPT, in this order, but {path} is a "
                f"{model.config.likelihood!r} model where a {expected!r} one belongs"
            )
    return loaded, [data_dir or state["train_config"]["data_dir"] for state, _ in loaded]


# --------------------------------------------------------------------------------------------- --ways-of-fitting


def ways_of_fitting_figure(runs):
    """Test -ELBO (solid) and, for IWAE runs, the test -L_k they train (dashed), against epoch and wall time.

    runs: [(label, log records)], each record as train.py logs it.
    """
    fig = Figure(figsize=(11, 4.2))
    epoch_ax, time_ax = fig.subplots(1, 2, sharey=True)
    for (label, records), color in zip(runs, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"], strict=False):
        epochs = [r["epoch"] for r in records]
        minutes = torch.tensor([r["seconds"] for r in records]).cumsum(0).div(60).tolist()
        bound_key = next((key for key in records[0] if key.startswith("test_neg_l")), None)
        for ax, xs in ((epoch_ax, epochs), (time_ax, minutes)):
            ax.plot(xs, [r["test_loss"] for r in records], "-", color=color, label=f"{label}: test -ELBO")
            if bound_key is not None:
                k = bound_key.removeprefix("test_neg_l")
                ax.plot(xs, [r[bound_key] for r in records], "--", color=color, label=f"{label}: test -L_{k}")
    epoch_ax.set(title="Test loss by epoch", xlabel="epoch", ylabel="nats / image")
    time_ax.set(title="Test loss by wall time (training and test passes)", xlabel="minutes")
    time_ax.legend(fontsize=8)
    for ax in (epoch_ax, time_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def load_runs(run_dirs):
    """[(label, log records)] of train.py's runs in these folders; the label says how each was fitted."""
    runs = []
    for ckpt_path in (Path(d) / CKPT_FILE for d in run_dirs):
        state, _ = load_checkpoint(ckpt_path)
        records = read_log(ckpt_path.with_name(LOG_FILE))
        if not records:
            raise CheckpointError(
                f"{ckpt_path.with_name(LOG_FILE)} is needed for --ways-of-fitting; train the run anew"
            )
        c = state["train_config"]
        runs.append((f"{c['objective'].upper()}, {c['estimator']}, k = {c['k']}", records))
    return runs


# --------------------------------------------------------------------------------------------- main


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p, "the model to show")
    p.add_argument("--plots-dir", default="plots", help="where the PNGs go (default: plots)")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("BERNOULLI_CKPT", "CB_CKPT"),
        help=f"instead of the five figures, write {COMPARE_FILE} for these two models",
    )
    p.add_argument(
        "--ways-of-fitting",
        nargs="+",
        metavar="RUN_DIR",
        help=f"instead, write {WAYS_FILE}: the test loss of these train.py runs by epoch and by wall time",
    )
    add_device_arg(p)
    return p


def plot_all(state, model, data_dir, run_dir, device, plots_dir):
    """The figures of one model; the training curves and the film only if its run folder has the log and the
    frames."""
    # The test set exactly as training scored it (same pixels), but all of it: --limit is for training.
    images, labels = load_test_set(data_dir, state["train_config"]["pixels"], device, limit=None)
    plots_dir.mkdir(parents=True, exist_ok=True)
    if model.config.latent_dim >= 2:
        mu = posterior_means(model, images, labels=labels)  # (N, d)
        plane = latent_plane(mu)
        save(latent_scatter_figure(mu, labels, plane, model.config.conditional), plots_dir / "latent_scatter.png")
        if not model.config.conditional:
            save(manifold_figure(model, plane), plots_dir / f"manifold_{MANIFOLD_SIDE}x{MANIFOLD_SIDE}.png")
    else:
        print("latent_dim is 1: skipping the latent scatter and the manifold, which need a 2-D plane")
    save(reconstructions_figure(model, images, labels), plots_dir / "reconstructions.png")
    save(samples_figure(model), plots_dir / "samples.png")
    save(interpolation_figure(model, images, labels), plots_dir / "interpolation.png")
    if model.config.conditional:
        save(class_grid_figure(model), plots_dir / "class_grid.png")
        save(analogies_figure(model, images, labels), plots_dir / "analogies.png")
    records = read_log(run_dir / LOG_FILE)
    if records:
        save(training_curves_figure(records), plots_dir / "training_curves.png")
    else:
        print(f"no training log at {run_dir / LOG_FILE}; skipping the training curves")
    if any((run_dir / FRAMES_DIR).glob("*.png")):
        write_film(run_dir / FRAMES_DIR, plots_dir / "training.gif")


@script
def main(argv=None):
    args, device = parse(build_parser(), argv)
    plots_dir = Path(args.plots_dir)
    if args.compare:
        (bernoulli, cb), data_dirs = load_for_compare(args.compare, args.data_dir, device)
        plots_dir.mkdir(parents=True, exist_ok=True)
        save(compare_figure(bernoulli, cb, data_dirs, device), plots_dir / COMPARE_FILE)
    elif args.ways_of_fitting:
        runs = load_runs(args.ways_of_fitting)
        plots_dir.mkdir(parents=True, exist_ok=True)
        save(ways_of_fitting_figure(runs), plots_dir / WAYS_FILE)
    else:
        state, model, data_dir = load_model(args, device)
        plot_all(state, model, data_dir, Path(args.checkpoint).parent, device, plots_dir)


if __name__ == "__main__":
    main()
