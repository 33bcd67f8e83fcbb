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
DIGITS = [str(d) for d in range(N_CLASSES)]


def show_rows(ax, rows, title, labels=None, columns=None):
    """Rows of images (each (n, 1, 28, 28)) as one image, each row named on the left by labels, each column at
    the bottom by columns (if given)."""
    ax.imshow(tile(torch.cat([r.cpu() for r in rows]), len(rows), rows[0].shape[0]), cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if labels:
        ax.set_yticks([28 * i + 14 for i in range(len(rows))], labels)
        ax.tick_params(left=False)
    if columns:
        ax.set_xticks([28 * c + 14 for c in range(len(columns))], columns)
        ax.tick_params(bottom=False)


def rows_figure(figsize, rows, title, labels=None, columns=None):
    """A figure of one image: show_rows."""
    fig = Figure(figsize=figsize)
    show_rows(fig.subplots(), rows, title, labels, columns)
    fig.tight_layout()
    return fig


def save(fig, path):
    write_png(fig, path)
    print(f"wrote {path}")


@torch.inference_mode()
def reconstruct(model, x, y=None):
    """decode(mu): the reconstruction at the posterior mean; returns the logits (B, 1, 28, 28)."""
    return model.decode(model.encode(x, y)[0], y)


# --------------------------------------------------------------------------------------------- the figures
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
        pc = "principal component"
        ax.set(title=f"Test set: posterior means, PCA of {d}-D latent to 2-D", xlabel=f"{pc} 1", ylabel=f"{pc} 2")
    fig.tight_layout()
    return fig


def manifold_figure(model, plane):
    d = model.config.latent_dim
    where = "$z$ on a grid of Gaussian quantiles"
    if d > 2:
        where = (
            f"$z$ in the plane of the two leading principal directions of the {d}-D posterior means,\n"
            "at Gaussian quantiles times the means' std along each"
        )
    rows = manifold_images(model, plane).split(MANIFOLD_SIDE)  # 20 rows of (20, 1, 28, 28)
    return rows_figure((7, 7.3), rows, f"Learned manifold: E[x|z] for\n{where}")


def reconstructions_figure(model, images, labels=None):
    x = images[:N_RECONSTRUCTIONS]  # (n, 1, 28, 28)
    recon = model.mean(reconstruct(model, x, None if labels is None else labels[:N_RECONSTRUCTIONS]))
    title = "Test images and their reconstructions E[x | z = mu(x)]"
    return rows_figure((8, 2.2), [x, recon], title, ["test", "recon"])


def samples_figure(model):
    """E[x|z] at z ~ p(z); for a conditional model, row r shows the digit r."""
    device = next(model.parameters()).device
    z = prior_z(SAMPLES_SIDE**2, model.config.latent_dim, device)
    y, title = None, "Samples: E[x|z], z ~ N(0, I)"
    if model.config.conditional:
        y = torch.arange(SAMPLES_SIDE**2, device=device) // SAMPLES_SIDE
        title = "Samples: E[x|z, y], z ~ N(0, I), row r the digit y = r"
    return rows_figure((6, 6.3), decode_means(model, z, y).split(SAMPLES_SIDE), title)


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
    conditional = model.config.conditional
    t = torch.linspace(0, 1, STEPS, device=images.device)[:, None]  # (STEPS, 1)
    rows, names = [], []
    for i, j in pairs_of_different_digits(labels):
        x, y = images[[i, j]], labels[[i, j]]
        mu, _ = model.encode(x, y)  # (2, d)
        z = (1 - t) * mu[0] + t * mu[1]  # (STEPS, d)
        a, b = y.tolist()
        if conditional:
            one_hot = torch.nn.functional.one_hot(y, N_CLASSES).to(t.dtype)  # (2, 10)
            weights = (1 - t) * one_hot[0] + t * one_hot[1]  # (STEPS, 10)
            steps = [decode_means(model, z, weights), decode_means(model, mu[:1].expand(STEPS, -1), weights)]
            names += [f"z, y: {a} → {b}", f"y: {a} → {b}"]
        else:
            steps = [decode_means(model, z)]
            names.append(f"{a} → {b}")
        rows += [torch.cat([x[:1], between, x[1:]]) for between in steps]  # the two test images at the ends
    kind = "between two codes and labels" if conditional else "between two posterior means"
    title = f"Interpolation: E[x|z{', y' if conditional else ''}] along the straight line {kind}"
    return rows_figure((8, 0.75 * len(rows) + 0.8), rows, title, names)


@torch.inference_mode()
def analogies_figure(model, images, labels):
    """Kingma, Rezende, Mohamed & Welling (2014), Fig. 1: each test image's code mu(x, y), decoded with every
    label 0-9: the writer's style, carried through the ten digits."""
    x, y = images[:N_ANALOGIES], labels[:N_ANALOGIES]
    mu, _ = model.encode(x, y)  # (n, d)
    digits = torch.arange(N_CLASSES, device=x.device)
    rows = [torch.cat([x[i : i + 1], decode_means(model, mu[i].expand(N_CLASSES, -1), digits)]) for i in range(len(x))]
    title, names = "Analogies: mu(x, y) decoded with y = 0 … 9", [f"test: {d}" for d in y.tolist()]
    return rows_figure((7, 0.62 * len(rows) + 0.8), rows, title, names, ["x", *DIGITS])


def class_grid_figure(model):
    """Rows the ten digits, columns ten shared z ~ p(z): E[x|z, y] of a conditional model."""
    title = "Class grid: E[x|z, y], row y, column one z ~ N(0, I)"
    return rows_figure((6, 6.3), class_grid_images(model).split(N_CLASSES), title, DIGITS)


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
    ms = [FRAME_MS] * (len(film) - 1) + [LAST_FRAME_MS]  # each frame's duration
    write_atomic(path, lambda f: film[0].save(f, "GIF", save_all=True, append_images=film[1:], duration=ms, loop=0))
    print(f"wrote {path} ({len(film)} frames)")


def training_curves_figure(records):
    epochs = [r["epoch"] for r in records]
    # The training loss is averaged over the epoch while the model improves, and is the bound the run
    # trains (train_bound); the test loss is -ELBO.
    bound = records[-1]["train_bound"]
    long_run = len(records) > LONG_RUN  # the IWAE protocol's 3280 epochs: lines only, on a log axis
    style = "-" if long_run else "o-"
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
        if long_run:  # the schedule's stages are 3^i epochs long: even on a log axis
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs only
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------- --compare, --ways-of-fitting


@torch.inference_mode()
def compare_figure(bernoulli, cb, data_dirs, device):
    """Reconstructions and prior samples of both models; the CB ones both as lambda and as the CB mean.

    A CB decoder's lambda is not its mean: E[x] = 1 / (1 - e^-l) - 1 / l is pulled towards 1/2 (CB paper,
    eq. (4)), so images shown as lambda look sharper than what the model actually predicts.
    """
    n = N_RECONSTRUCTIONS
    (_, bernoulli_model), (_, cb_model) = bernoulli, cb
    originals, labels = load_mnist(data_dirs[0], train=False, limit=n)  # (n, 1, 28, 28), grayscale
    # Each model reconstructs the test images as it was scored on them (a Bernoulli model's usually binarized),
    # and samples (a conditional one the first n test digits).
    recon = [
        reconstruct(model, *load_test_set(data_dir, state["train_config"]["pixels"], device, limit=n))
        for (state, model), data_dir in zip((bernoulli, cb), data_dirs, strict=True)
    ]
    prior = [m.decode(prior_z(n, m.config.latent_dim, device), labels.to(device)) for m in (bernoulli_model, cb_model)]

    def shown(bernoulli_logits, cb_logits):  # COMPARE_ROWS; the same logits for both CB rows
        return [bernoulli_model.mean(bernoulli_logits), torch.sigmoid(cb_logits), cb_model.mean(cb_logits)]

    fig = Figure(figsize=(8, 6.5))
    recon_ax, sample_ax = fig.subplots(2, 1, height_ratios=[4, 3])
    show_rows(recon_ax, [originals, *shown(*recon)], "Reconstructions, z = mu(x)", ["test (grayscale)", *COMPARE_ROWS])
    show_rows(sample_ax, shown(*prior), "Samples, z ~ N(0, I)", COMPARE_ROWS)
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


def ways_of_fitting_figure(runs):
    """Test -ELBO (solid) and, for IWAE runs, the test -L_k they train (dashed), against epoch and wall time, of
    runs: [(label, log records)], each record as train.py logs it."""
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
        c = load_checkpoint(ckpt_path)[0]["train_config"]
        records = read_log(ckpt_path.with_name(LOG_FILE))
        if not records:
            raise CheckpointError(
                f"{ckpt_path.with_name(LOG_FILE)} is needed for --ways-of-fitting; train the run anew"
            )
        runs.append((f"{c['objective'].upper()}, {c['estimator']}, k = {c['k']}", records))
    return runs


# --------------------------------------------------------------------------------------------- main


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p, "the model to show")
    p.add_argument("--plots-dir", default="plots", help="where the PNGs go (default: plots)")
    compare = f"instead of the five figures, write {COMPARE_FILE} for these two models"
    p.add_argument("--compare", nargs=2, metavar=("BERNOULLI_CKPT", "CB_CKPT"), help=compare)
    ways = f"instead, write {WAYS_FILE}: the test loss of these train.py runs by epoch and by wall time"
    p.add_argument("--ways-of-fitting", nargs="+", metavar="RUN_DIR", help=ways)
    add_device_arg(p)
    return p


def plot_all(state, model, data_dir, run_dir, device, plots_dir):
    """The figures of one model; the training curves and the film if its run folder has the log and the frames."""
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
        name, fig = COMPARE_FILE, compare_figure(bernoulli, cb, data_dirs, device)
    elif args.ways_of_fitting:
        name, fig = WAYS_FILE, ways_of_fitting_figure(load_runs(args.ways_of_fitting))
    else:
        state, model, data_dir = load_model(args, device)
        return plot_all(state, model, data_dir, Path(args.checkpoint).parent, device, plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    save(fig, plots_dir / name)


if __name__ == "__main__":
    main()
