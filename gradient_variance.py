"""How noisy each way of fitting is: `python gradient_variance.py --checkpoint out/ckpt.pt` (see --help).

For the checkpoint's model and the same model at initialisation, on one fixed batch of test images (presented as
in training), it draws the encoder's gradient many times with each estimator and k: pathwise, through z = mu +
sigma * eps (Kingma & Welling 2014), and score, through log q(z|x), with a leave-one-out baseline for k >= 2
(Williams 1992; Kool et al. 2019; for L_k, VIMCO, Mnih & Rezende 2016). It reports the variance of each
parameter's gradient across the draws and its signal-to-noise ratio |mean| / std (Rainforth et al. 2018), each
averaged over the encoder's parameters, in gradient_variance.png under --plots-dir and, with --json, as numbers.
"""

import argparse
from pathlib import Path

import torch
from matplotlib.figure import Figure

from cli import add_device_arg, add_json_arg, add_model_args, load_model, parse, positive_int, script, write_results
from data import load_test_set, load_train_set
from files import write_png
from model import ESTIMATORS, OBJECTIVES, VAE

KS = (1, 2, 5, 10, 50)
FIGURE = "gradient_variance.png"
ENCODER = ("features.", "encoder.", "to_mu.", "to_logvar.")  # q(z|x): the encoder's body and its two heads


def encoder_gradients(model, x, draws, objective, k, estimator, generator, y=None):
    """`draws` independent estimates of the gradient of the batch's loss w.r.t. the encoder's parameters:
    (draws, P), all parameters flattened. y: the batch's labels (a conditional model's)."""
    params = [p for name, p in model.named_parameters() if name.startswith(ENCODER)]
    rows = []
    for _ in range(draws):
        surrogate = model.loss(x, y, objective, k, estimator, generator=generator).surrogate
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(surrogate, params)]))
    return torch.stack(rows)


def noise_summary(grads):
    """Mean over parameters of the per-parameter variance across draws, and of |mean| / std (parameters
    whose gradient is exactly 0 in every draw, such as weights of always-black pixels, are left out)."""
    mean, var = grads.mean(0), grads.var(0)
    alive = var > 0
    return {"variance": var[alive].mean().item(), "snr": (mean[alive].abs() / var[alive].sqrt()).mean().item()}


def measure(model, x, y, draws, objective, seed):
    """{estimator: {k: noise_summary}} for every estimator and k in KS; the same seed for each cell."""
    table = {estimator: {} for estimator in ESTIMATORS}
    for estimator in ESTIMATORS:
        for k in KS:
            generator = torch.Generator(device=x.device).manual_seed(seed)
            grads = encoder_gradients(model, x, draws, objective, k, estimator, generator, y)
            cell = table[estimator][k] = noise_summary(grads)
            print(f"  {estimator:8s} k={k:3d}  variance {cell['variance']:.3e}  snr {cell['snr']:.3f}")
    return table


def figure(results):
    fig = Figure(figsize=(10, 4))
    titles = {"variance": "variance per parameter", "snr": "signal-to-noise |mean| / std"}
    for ax, (stat, title) in zip(fig.subplots(1, 2), titles.items(), strict=True):
        for which, style in (("trained", "o-"), ("initial", "s--")):
            for estimator, color in zip(ESTIMATORS, ("tab:blue", "tab:red"), strict=True):
                values = [results[which][estimator][k][stat] for k in KS]
                ax.plot(KS, values, style, color=color, label=f"{estimator}, {which}")
        ax.set(title=f"Encoder gradient: {title}", ylabel="mean over parameters", xlabel="k, samples per image")
        ax.set(xscale="log", yscale="log")
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.grid(alpha=0.3, which="both")
    fig.axes[1].legend(fontsize=8)  # the signal-to-noise panel
    fig.suptitle(f"{results['objective'].upper()}, {results['n_images']} test images, {results['draws']} draws each")
    fig.tight_layout()
    return fig


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--objective", choices=OBJECTIVES, default="elbo", help="whose gradient (default: %(default)s)")
    p.add_argument("--images", type=positive_int, default=100, help="the fixed batch (default: %(default)s)")
    p.add_argument("--draws", type=positive_int, default=100, help="draws per estimator and k (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    p.add_argument("--plots-dir", default="plots", help=f"where {FIGURE} goes (default: %(default)s)")
    add_json_arg(p, "the numbers")
    add_device_arg(p)
    return p


@script
def main(argv=None):
    args, device = parse(build_parser(), argv)
    state, model, data_dir = load_model(args, device)
    train_config = state["train_config"]
    x, y = load_test_set(data_dir, train_config["pixels"], device, args.images)
    train_mean = load_train_set(data_dir, device, train_config["limit"])[0].mean(0)  # (1, 28, 28)
    torch.manual_seed(train_config["seed"])  # the model as the run began: train.py seeds, builds, sets the bias
    initial = VAE(model.config).to(device)
    initial.init_output_bias(train_mean)
    results = {"checkpoint": args.checkpoint, "objective": args.objective, "n_images": x.shape[0], "draws": args.draws}
    for which, m in (("trained", model), ("initial", initial)):
        print(f"{which} model:")
        results[which] = measure(m.train(), x, y, args.draws, args.objective, args.seed)
    Path(args.plots_dir).mkdir(parents=True, exist_ok=True)
    write_png(figure(results), Path(args.plots_dir) / FIGURE)
    print(f"wrote {Path(args.plots_dir) / FIGURE}")
    write_results(args.json, results, args, device)
    return results


if __name__ == "__main__":
    main()
