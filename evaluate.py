"""Score a trained VAE on the MNIST test set: `python evaluate.py --checkpoint out/ckpt.pt` (see --help).

Reports, averaged over the test images, the -ELBO (Kingma & Welling 2014, eq. (10)); -log p(x) by the k-sample
importance-weighted bound (Burda et al. 2016, eq. (8); k = 5000 as in their Section 5.1), also in bits per pixel
and, for dequantized pixels, as a bound on the 8-bit images'; and the active units (Burda et al., Section 5.2) and
the 15-NN digit accuracy against the training set (Loaiza-Ganem & Cunningham 2019) of the posterior means. For a
2-D latent also the exact -log p(x), by quadrature over the latent plane, on the first --exact-images test images.
For a conditional model -log p(x|y), and, from L_k(x|y) under each of the ten labels (--classifier-k samples),
the marginal -log (1/10) sum_y p(x|y) and the accuracy of argmax_y L_k(x|y) as a classifier (Kingma et al. 2014).
"""

import argparse
import functools
import math
from pathlib import Path

import torch
from tqdm import tqdm

import cli
import scoring
from checkpoints import LOG_FILE, read_log
from data import IMPORTANCE_SEED, load_reference_set, load_test_set

EXACT_IMAGES = 1000  # for the default model about 9000 decoder passes an image: twice the time of k = 5000
PER_IMAGE_KS = (5000, 50000)  # the bounds beside log p(x) in each --per-image record


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_args(p)
    p.add_argument(
        "--k", type=cli.positive_int, default=5000, help="importance samples per image (default: %(default)s)"
    )
    p.add_argument("--classifier-k", type=cli.positive_int, help="a conditional model's k per label (default: --k)")
    p.add_argument("--limit", type=cli.positive_int, help="only the first N test images (default: all)")
    p.add_argument(
        "--batch-size",
        type=cli.positive_int,
        default=scoring.BATCH_SIZE,
        help="images per batch (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=IMPORTANCE_SEED, help="the importance samples' seed (default: %(default)s)"
    )
    p.add_argument(
        "--exact-images",
        type=cli.non_negative_int,
        default=EXACT_IMAGES,
        help="for a 2-D latent, the exact -log p(x) on the first N test images, 0 for none (default: %(default)s)",
    )
    p.add_argument(
        "--per-image",
        metavar="PATH",
        help="for a 2-D latent, write to this JSON file a record per image of the --exact-images: log p(x), a second "
        f"grid's check of it, the ELBO, KL(q || p(z|x)), L_k for k = {', '.join(map(str, PER_IMAGE_KS))}",
    )
    cli.add_json_arg(p)
    cli.add_device_arg(p)
    return p


@cli.script
def main(argv=None):
    args, device = cli.parse(build_parser(), argv)
    state, model, data_dir = cli.load_model(args, device)  # the images exactly as in training (pixels)
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
        results["bits_per_dim_8bit"] = scoring.bits_per_dim_8bit(results["test_nll"])
    print_table(args.checkpoint, results)
    cli.write_results(args.json, results, args, device)
    if args.per_image is not None and grids:
        records = per_image(model, *(t[: len(grids)] for t in test), grids, args.batch_size, args.seed)
        cli.write_results(args.per_image, {"images": records}, args, device)
    return results


def progress(desc, total, unit="batch"):
    return functools.partial(tqdm, desc=desc, total=total, unit=unit, leave=False)


def score(model, test, reference, k, batch_size, generator, classifier_k=None):
    """The measures of the module docstring for the test (images, labels), the training (images, labels) as the
    k-NN's reference; a conditional model's ten labels get classifier_k samples each (default: k)."""
    (test_images, test_labels), (train_images, train_labels) = test, reference
    neg_elbo, recon, kl = scoring.mean_neg_elbo(model, test_images, labels=test_labels)
    n_batches = math.ceil(test_images.shape[0] / batch_size)
    bar = progress(f"log p(x), k={k}", n_batches)
    likelihoods = {"test_nll": scoring.iwae_nll(model, test_images, k, batch_size, generator, bar, test_labels)}
    if model.config.conditional:  # the marginal and the classifier, from the bounds under every label
        classifier_k = classifier_k or k
        bar = progress(f"log p(x|y) for every y, k={classifier_k}", n_batches)
        log_px_y = scoring.label_log_likelihoods(model, test_images, classifier_k, batch_size, generator, bar)
        scores = scoring.conditional_scores(log_px_y, test_labels)
        likelihoods |= {key: scores[key] for key in ("test_nll_marginal", "classifier_accuracy")}
        likelihoods["classifier_k"] = classifier_k
    test_means = scoring.posterior_means(model, test_images, batch_size, test_labels)  # (N, d)
    train_means = scoring.posterior_means(model, train_images, batch_size, train_labels)  # (60000, d)
    return {
        "test_neg_elbo": neg_elbo.item(),
        "test_recon": recon.item(),
        "test_kl": kl.item(),
        **likelihoods,
        "bits_per_dim": scoring.bits_per_dim(likelihoods["test_nll"]),
        "active_units": scoring.active_units(test_means),
        "knn_accuracy": scoring.knn_accuracy(test_means, test_labels, train_means, train_labels),
    }


def score_exactly(model, images, labels):
    """-log p(x) (or -log p(x|y)) by quadrature, averaged over `images` of a 2-D model, the worst of the grids'
    border margins (nats below the peak) and resolutions (nats between a grid and every other point of it); and
    the grids."""
    grids = scoring.posterior_grids(model, images, labels, progress("exact log p(x)", len(images), "image"))
    return {
        "test_nll_exact": -sum(g.log_px for g in grids) / len(grids),
        "exact_n_images": images.shape[0],
        "exact_border_nats": min(g.border_nats for g in grids),
        "exact_resolution_nats": max(g.resolution_nats for g in grids),
    }, grids


def per_image(model, images, labels, grids, batch_size, seed):
    """A record per image of a 2-D model, with its grid: its test-set index and label, log p(x) and a second grid's
    value of it, the ELBO (by quadrature), KL(q || p(z|x)) and L_k for PER_IMAGE_KS (each drawn from `seed`)."""
    with torch.inference_mode():
        mu, logvar = model.encode(images, labels)
    elbo = scoring.exact_elbo(model, images, labels=labels)
    bounds = {}
    for k in PER_IMAGE_KS:
        bar = progress(f"L_{k}", math.ceil(len(images) / batch_size))
        generator = torch.Generator(device=images.device).manual_seed(seed)
        bounds[k] = scoring.log_likelihood_estimates(model, images, k, batch_size, generator, bar, labels).tolist()
    rows = progress("check grids", len(grids), "image")(zip(images, labels, grids, strict=True))
    checks = [scoring.check_grid(model, x, g, y).log_px for x, y, g in rows]  # an unconditional model ignores y
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
    given = "|y)    " if "test_nll_marginal" in r else ")      "
    print(f"{checkpoint} (epoch {r['epoch']}), {r['n_images']} test images")
    print(
        f"  -ELBO            {r['test_neg_elbo']:9.3f} nats/image  "
        f"(recon {r['test_recon']:.3f} + KL {r['test_kl']:.3f})"
    )
    print(f"  -log p(x{given}  {r['test_nll']:9.3f} nats/image  (importance sampled, k = {r['k']})")
    if "test_nll_marginal" in r:
        k = r["classifier_k"]
        print(f"  -log p(x)        {r['test_nll_marginal']:9.3f} nats/image  (-log mean_y p(x|y), k = {k})")
        print(f"  classifier       {r['classifier_accuracy']:9.4f}  (argmax_y L_k(x|y), k = {k})")
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
    knn = f"{scoring.N_NEIGHBORS}-NN accuracy"
    print(f"  {knn}  {r['knn_accuracy']:9.4f}  (posterior means; the training set as reference)")


if __name__ == "__main__":
    main()
