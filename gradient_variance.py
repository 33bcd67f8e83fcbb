"""How noisy each way of fitting is: `python gradient_variance.py --checkpoint out/ckpt.pt` (see --help).

For the checkpoint's model and for the same model at initialisation, on one fixed batch of test images
(presented as in training), it draws the encoder's gradient many times with each estimator and k:
  pathwise  through z = mu + sigma * eps (the reparameterization trick, Kingma & Welling 2014);
  score     through log q(z|x), with the leave-one-out baseline for k >= 2 and none for k = 1
            (Williams 1992; Kool et al. 2019; for L_k, VIMCO, Mnih & Rezende 2016).
It reports, per estimator and k, the variance of each parameter's gradient across the draws, averaged over
the encoder's parameters, and the signal-to-noise ratio |mean| / std, averaged likewise (Rainforth et al.
2018). Writes gradient_variance.png into --plots-dir and, with --json, the numbers.
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


def encoder_parameters(model):
    """The parameters of q(z|x): the encoder's body (its convolutions and dense layers) and its two heads."""
    encoder = ("features.", "encoder.", "to_mu.", "to_logvar.")
    return [p for name, p in model.named_parameters() if name.startswith(encoder)]


def encoder_gradients(model, x, draws, objective, k, estimator, generator, y=None):
    """`draws` independent estimates of the gradient of the batch's loss w.r.t. the encoder's parameters:
    (draws, P), one row per draw, all parameters flattened. y: the batch's labels (a conditional model's)."""
    params = encoder_parameters(model)
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
    table = {}
    for estimator in ESTIMATORS:
        table[estimator] = {}
        for k in KS:
            generator = torch.Generator(device=x.device).manual_seed(seed)
            grads = encoder_gradients(model, x, draws, objective, k, estimator, generator, y)
            table[estimator][k] = noise_summary(grads)
            cell = table[estimator][k]
            print(f"  {estimator:8s} k={k:3d}  variance {cell['variance']:.3e}  snr {cell['snr']:.3f}")
    return table


def initial_model(state, model, train_images_mean):
    """The model as the run began: train.py seeds, builds and sets the output bias in this order."""
    torch.manual_seed(state["train_config"]["seed"])
    init = VAE(model.config).to(train_images_mean.device)
    init.init_output_bias(train_images_mean)
    return init


def figure(results):
    fig = Figure(figsize=(10, 4))
    var_ax, snr_ax = fig.subplots(1, 2)
    for which, style in (("trained", "o-"), ("initial", "s--")):
        for estimator, color in zip(ESTIMATORS, ("tab:blue", "tab:red"), strict=True):
            cells = results[which][estimator]
            label = f"{estimator}, {which}"
            var_ax.plot(KS, [cells[k]["variance"] for k in KS], style, color=color, label=label)
            snr_ax.plot(KS, [cells[k]["snr"] for k in KS], style, color=color, label=label)
    var_ax.set(title="Encoder gradient: variance per parameter", ylabel="mean over parameters")
    snr_ax.set(title="Encoder gradient: signal-to-noise |mean| / std", ylabel="mean over parameters")
    for ax in (var_ax, snr_ax):
        ax.set(xscale="log", yscale="log", xlabel="k, samples per image")
        ax.set_xticks(KS, [str(k) for k in KS])
        ax.grid(alpha=0.3, which="both")
    snr_ax.legend(fontsize=8)
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
    results = {"checkpoint": args.checkpoint, "objective": args.objective, "n_images": x.shape[0], "draws": args.draws}
    for which, m in (("trained", model), ("initial", initial_model(state, model, train_mean))):
        print(f"{which} model:")
        results[which] = measure(m.train(), x, y, args.draws, args.objective, args.seed)
    Path(args.plots_dir).mkdir(parents=True, exist_ok=True)
    write_png(figure(results), Path(args.plots_dir) / FIGURE)
    print(f"wrote {Path(args.plots_dir) / FIGURE}")
    write_results(args.json, results, args, device)
    return results


if __name__ == "__main__":
    main()
