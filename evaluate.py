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
--exact-images test images: a grid of 201 x 201 decoder passes per image). For a conditional model, -log p(x|y)
(the images' own labels), the marginal -log p(x) = -log (1/10) sum_y p(x|y) from the same estimates, and the
accuracy of the model as a generative classifier, argmax_y L_k(x|y) (Kingma et al. 2014): k importance samples
for each of the ten labels.
"""

import argparse
import functools
import math

import torch
from tqdm import tqdm

from cli import add_device_arg, add_json_arg, add_model_args, load_model, parse, positive_int, script, write_results
from data import IMPORTANCE_SEED, load_reference_set, load_test_set
from scoring import (
    BATCH_SIZE,
    N_NEIGHBORS,
    active_units,
    bits_per_dim,
    bits_per_dim_8bit,
    conditional_scores,
    exact_log_likelihood,
    iwae_nll,
    knn_accuracy,
    label_log_likelihoods,
    mean_neg_elbo,
    posterior_means,
)

EXACT_IMAGES = 1000  # 201 x 201 decoder passes an image, 8 times what k = 5000 costs


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument(
        "--k",
        type=positive_int,
        default=5000,
        help="importance samples per image for -log p(x) (default: %(default)s, as Burda et al.)",
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
        type=positive_int,
        default=EXACT_IMAGES,
        help="for a 2-D latent, the exact -log p(x) on the first N of the test images (default: %(default)s)",
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
    results = {
        **score(model, test, reference, args.k, args.batch_size, generator),
        **(score_exactly(model, *(t[: args.exact_images] for t in test)) if model.config.latent_dim == 2 else {}),
        "n_images": test[0].shape[0],
        "k": args.k,
        "model_config": state["model_config"],
        "train_config": state["train_config"],
        "epoch": state["epoch"],
    }
    if state["train_config"]["pixels"] == "dequantized":  # a density of (k + u)/256 bounds the 8-bit likelihood
        results["bits_per_dim_8bit"] = bits_per_dim_8bit(results["test_nll"])
    print_table(args.checkpoint, results)
    write_results(args, results, device)
    return results


def score(model, test, reference, k, batch_size, generator):
    """The measures of the module docstring for the test (images, labels); the k-NN's reference is the
    training (images, labels)."""
    (test_images, test_labels), (train_images, train_labels) = test, reference
    neg_elbo, recon, kl = mean_neg_elbo(model, test_images, labels=test_labels)
    n_batches = math.ceil(test_images.shape[0] / batch_size)
    bar = functools.partial(tqdm, total=n_batches, desc=f"log p(x), k={k}", unit="batch", leave=False)
    if model.config.conditional:
        log_px_y = label_log_likelihoods(model, test_images, k, batch_size, generator, progress=bar)  # (N, 10)
        likelihoods = {**conditional_scores(log_px_y, test_labels), "classifier_k": k}
    else:
        likelihoods = {"test_nll": iwae_nll(model, test_images, k, batch_size, generator, progress=bar)}
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
    """-log p(x) (or -log p(x|y)) by quadrature, averaged over `images` (a 2-D model), and how negligible the
    integrand was at the grids' borders (the smallest distance below the peak, in nats)."""
    bar = tqdm(images, desc="exact log p(x)", unit="image", leave=False)
    log_px, border_nats = exact_log_likelihood(model, bar, labels=labels)  # an unconditional model ignores them
    return {
        "test_nll_exact": -log_px.mean().item(),
        "exact_n_images": images.shape[0],
        "exact_border_nats": border_nats.min().item(),
    }


def print_table(checkpoint, r):
    print(f"{checkpoint} (epoch {r['epoch']}), {r['n_images']} test images")
    print(
        f"  -ELBO            {r['test_neg_elbo']:9.3f} nats/image  "
        f"(recon {r['test_recon']:.3f} + KL {r['test_kl']:.3f})"
    )
    given = "|y)    " if "test_nll_marginal" in r else ")      "
    print(f"  -log p(x{given}  {r['test_nll']:9.3f} nats/image  (importance sampled, k = {r['k']})")
    if "test_nll_marginal" in r:
        print(f"  -log p(x)        {r['test_nll_marginal']:9.3f} nats/image  (-log mean_y p(x|y), same estimates)")
        print(f"  classifier       {r['classifier_accuracy']:9.4f}  (argmax_y L_k(x|y), k = {r['classifier_k']})")
    if "test_nll_exact" in r:
        print(
            f"  -log p(x{given}  {r['test_nll_exact']:9.3f} nats/image  (exact, by quadrature, first "
            f"{r['exact_n_images']} images; integrand at the grids' borders >= {r['exact_border_nats']:.0f} nats "
            f"below its peak)"
        )
    print(f"  -log p(x)        {r['bits_per_dim']:9.4f} bits/pixel")
    if "bits_per_dim_8bit" in r:
        print(f"  -log P(8-bit) <= {r['bits_per_dim_8bit']:9.4f} bits/pixel  (the dequantized density's bound)")
    print(f"  active units     {r['active_units']:5d} of {r['model_config']['latent_dim']}")
    print(f"  {N_NEIGHBORS}-NN accuracy  {r['knn_accuracy']:9.4f}  (posterior means; the training set as reference)")


if __name__ == "__main__":
    main()
