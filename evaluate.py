"""Score a trained VAE on the MNIST test set: `python evaluate.py --checkpoint out/ckpt.pt` (see --help).

Reports, averaged over the test images:
  -ELBO           the training objective, with one z ~ q(z|x) per image (Kingma & Welling 2014, eq. (10));
  -log p(x)       estimated with k importance samples: the k-sample bound of Burda et al. (2016), eq. (8),
                  with k = 5000 as in their Section 5.1; also in bits per pixel, and, for a model of
                  dequantized pixels, as a bound on the 8-bit images' negative log-likelihood;
and, from the posterior means:
  active units    latent dims whose posterior mean varies across the test images (Burda et al., Section 5.2);
  15-NN accuracy  digit classification, with the training images as the reference set (the measure
                  Loaiza-Ganem & Cunningham 2019 use to compare the latent codes of their VAEs).
For a model with a 2-D latent also the exact -log p(x), by quadrature over the latent plane (on the first
--exact-images test images: a scan of the prior's box for them all, then a grid for each, refined until it
resolves the integral), and with --per-image a record per image of the bounds beside it. For a conditional
model, -log p(x|y) (the images' own labels), and, from the bounds L_k(x|y) under each of the ten labels (with
--classifier-k samples), the marginal -log p(x) = -log (1/10) sum_y p(x|y) and the accuracy of the model as a
generative classifier, argmax_y L_k(x|y) (Kingma et al. 2014).
"""

import argparse
import functools
import math
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoints import LOG_FILE, read_log
from cli import (
    add_device_arg,
    add_json_arg,
    add_model_args,
    load_model,
    non_negative_int,
    parse,
    positive_int,
    script,
    write_results,
)
from data import IMPORTANCE_SEED, load_reference_set, load_test_set
from scoring import (
    BATCH_SIZE,
    N_NEIGHBORS,
    active_units,
    bits_per_dim,
    bits_per_dim_8bit,
    check_grid,
    conditional_scores,
    exact_elbo,
    iwae_nll,
    knn_accuracy,
    label_log_likelihoods,
    log_likelihood_estimates,
    mean_neg_elbo,
    posterior_grids,
    posterior_means,
)

EXACT_IMAGES = 1000  # for the default model about 9000 decoder passes an image: twice the time of k = 5000
PER_IMAGE_KS = (5000, 50000)  # the bounds beside log p(x) in each --per-image record


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument(
        "--k",
        type=positive_int,
        default=5000,
        help="importance samples per image for -log p(x) (default: %(default)s, as Burda et al.)",
    )
    p.add_argument(
        "--classifier-k",
        type=positive_int,
        default=None,
        help="for a conditional model, importance samples per image and label for the marginal -log p(x) and the "
        "generative classifier (default: --k)",
    )
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N test images (default: all)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=BATCH_SIZE,
        help="images per batch; the k samples are drawn in chunks that fit (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=IMPORTANCE_SEED, help="seed of the importance samples (default: %(default)s)"
    )
    p.add_argument(
        "--exact-images",
        type=non_negative_int,
        default=EXACT_IMAGES,
        help="for a 2-D latent, the exact -log p(x) on the first N test images, 0 for none (default: %(default)s)",
    )
    p.add_argument(
        "--per-image",
        metavar="PATH",
        default=None,
        help="for a 2-D latent, also write to this JSON file a record per image of the --exact-images: log p(x), "
        f"a second grid's check of it, the ELBO, KL(q || p(z|x)), L_k for k = {', '.join(map(str, PER_IMAGE_KS))}",
    )
    add_json_arg(p)
    add_device_arg(p)
    return p


@script
def main(argv=None):
    args, device = parse(build_parser(), argv)
    state, model, data_dir = load_model(args, device)  # the images exactly as in training (pixels)
    test = load_test_set(data_dir, state["train_config"]["pixels"], device, args.limit)  # (images, labels)
    reference = load_reference_set(data_dir, state["train_config"]["pixels"], device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    exact, grids = {}, []
    if model.config.latent_dim == 2 and args.exact_images > 0:
        exact, grids = score_exactly(model, *(t[: args.exact_images] for t in test))
    results = {
        **score(model, test, reference, args.k, args.batch_size, generator, args.classifier_k),
        **exact,
        "n_images": test[0].shape[0],
        "k": args.k,
        "model_config": state["model_config"],
        "train_config": state["train_config"],
        "epoch": state["epoch"],
    }
    log = read_log(Path(args.checkpoint).with_name(LOG_FILE))  # beside a run's checkpoint, not a shipped one's
    if log:
        results["train_seconds"] = sum(record["seconds"] for record in log)
    if state["train_config"]["pixels"] == "dequantized":  # a density of (k + u)/256 bounds the 8-bit likelihood
        results["bits_per_dim_8bit"] = bits_per_dim_8bit(results["test_nll"])
    print_table(args.checkpoint, results)
    write_results(args.json, results, args, device)
    if args.per_image is not None and grids:
        records = per_image(model, *(t[: len(grids)] for t in test), grids, args.batch_size, args.seed)
        write_results(args.per_image, {"images": records}, args, device)
    return results


def score(model, test, reference, k, batch_size, generator, classifier_k=None):
    """The measures of the module docstring for the test (images, labels); the k-NN's reference is the
    training (images, labels). A conditional model's ten labels get classifier_k samples each (default: k)."""
    (test_images, test_labels), (train_images, train_labels) = test, reference
    neg_elbo, recon, kl = mean_neg_elbo(model, test_images, labels=test_labels)
    n_batches = math.ceil(test_images.shape[0] / batch_size)
    bar = functools.partial(tqdm, total=n_batches, desc=f"log p(x), k={k}", unit="batch", leave=False)
    likelihoods = {"test_nll": iwae_nll(model, test_images, k, batch_size, generator, bar, test_labels)}
    if model.config.conditional:  # the marginal and the classifier, from the bounds under every label
        classifier_k = classifier_k or k
        bar = functools.partial(bar, desc=f"log p(x|y) for every y, k={classifier_k}")
        log_px_y = label_log_likelihoods(model, test_images, classifier_k, batch_size, generator, bar)  # (N, 10)
        scores = conditional_scores(log_px_y, test_labels)
        likelihoods |= {key: scores[key] for key in ("test_nll_marginal", "classifier_accuracy")}
        likelihoods["classifier_k"] = classifier_k
    test_means = posterior_means(model, test_images, batch_size, test_labels)  # (N, d)
    train_means = posterior_means(model, train_images, batch_size, train_labels)  # (60000, d)
    return {
        "test_neg_elbo": neg_elbo.item(),
        "test_recon": recon.item(),
        "test_kl": kl.item(),
        **likelihoods,
        "bits_per_dim": bits_per_dim(likelihoods["test_nll"]),
        "active_units": active_units(test_means),
        "knn_accuracy": knn_accuracy(test_means, test_labels, train_means, train_labels),
    }


def score_exactly(model, images, labels):
    """-log p(x) (or -log p(x|y)) by quadrature, averaged over `images` (a 2-D model), the worst of the grids'
    border margins (the least distance, in nats, of the integrand on a border below its peak) and of their
    resolutions (the largest change in log p(x) from a grid to every other point of it); and the grids."""
    bar = functools.partial(tqdm, total=len(images), desc="exact log p(x)", unit="image", leave=False)
    grids = posterior_grids(model, images, labels, progress=bar)  # an unconditional model ignores the labels
    return {
        "test_nll_exact": -sum(g.log_px for g in grids) / len(grids),
        "exact_n_images": images.shape[0],
        "exact_border_nats": min(g.border_nats for g in grids),  # the worst: the least margin
        "exact_resolution_nats": max(g.resolution_nats for g in grids),  # the worst
    }, grids


def per_image(model, images, labels, grids, batch_size, seed):
    """One record per image of a 2-D model, with its grid: its test-set index and label, log p(x) and a second
    grid's value of it (check_grid), the ELBO (by quadrature), KL(q || p(z|x)) and L_k for PER_IMAGE_KS (each
    drawn from `seed`), nats."""
    with torch.inference_mode():
        mu, logvar = model.encode(images, labels)
    elbo = exact_elbo(model, images, labels=labels)
    bounds = {}
    for k in PER_IMAGE_KS:
        bar = functools.partial(
            tqdm, total=math.ceil(len(images) / batch_size), desc=f"L_{k}", unit="batch", leave=False
        )
        generator = torch.Generator(device=images.device).manual_seed(seed)
        bounds[k] = log_likelihood_estimates(model, images, k, batch_size, generator, bar, labels).tolist()
    rows = tqdm(
        zip(images, labels, grids, strict=True), total=len(grids), desc="check grids", unit="image", leave=False
    )
    checks = [check_grid(model, x, g, y).log_px for x, y, g in rows]  # an unconditional model ignores y
    return [
        {
            "index": i,
            "label": int(labels[i]),
            "log_px": g.log_px,
            "log_px_check": checks[i],
            "elbo": elbo[i].item(),
            "kl_q_posterior": g.kl_from(mu[i], logvar[i]),
            **{f"l_{k}": bounds[k][i] for k in PER_IMAGE_KS},
            "border_nats": g.border_nats,
            "resolution_nats": g.resolution_nats,
        }
        for i, g in enumerate(grids)
    ]


def print_table(checkpoint, r):
    print(f"{checkpoint} (epoch {r['epoch']}), {r['n_images']} test images")
    print(
        f"  -ELBO            {r['test_neg_elbo']:9.3f} nats/image  "
        f"(recon {r['test_recon']:.3f} + KL {r['test_kl']:.3f})"
    )
    given = "|y)    " if "test_nll_marginal" in r else ")      "
    print(f"  -log p(x{given}  {r['test_nll']:9.3f} nats/image  (importance sampled, k = {r['k']})")
    if "test_nll_marginal" in r:
        print(
            f"  -log p(x)        {r['test_nll_marginal']:9.3f} nats/image  (-log mean_y p(x|y), "
            f"k = {r['classifier_k']})"
        )
        print(f"  classifier       {r['classifier_accuracy']:9.4f}  (argmax_y L_k(x|y), k = {r['classifier_k']})")
    if "test_nll_exact" in r:
        print(
            f"  -log p(x{given}  {r['test_nll_exact']:9.3f} nats/image  (exact, by quadrature, first "
            f"{r['exact_n_images']} images; every grid's border >= {r['exact_border_nats']:.0f} nats below its "
            f"peak, and every other point of it within {r['exact_resolution_nats']:.3f} nats of its integral)"
        )
    print(f"  -log p(x)        {r['bits_per_dim']:9.4f} bits/pixel")
    if "bits_per_dim_8bit" in r:
        print(f"  -log P(8-bit) <= {r['bits_per_dim_8bit']:9.4f} bits/pixel  (the dequantized density's bound)")
    print(f"  active units     {r['active_units']:5d} of {r['model_config']['latent_dim']}")
    print(f"  {N_NEIGHBORS}-NN accuracy  {r['knn_accuracy']:9.4f}  (posterior means; the training set as reference)")


if __name__ == "__main__":
    main()
