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
"""

import argparse
import math

import torch
from tqdm import tqdm

from data import ELBO_NOISE_SEED, IMPORTANCE_SEED, DataError, batches, load_scored_split, load_test_set
from model import N_PIXELS
from utils import (
    CheckpointError,
    add_device_arg,
    check_json_flag,
    fail,
    load_checkpoint,
    pick_device,
    positive_int,
    stop_on_ctrl_c,
    write_results,
)

# Burda et al. (2016), Section 5.2: unit u is active if A_u = Cov_x(E_{q(z|x)}[z_u]) > 10^-2.
ACTIVE_UNIT_THRESHOLD = 1e-2
N_NEIGHBORS = 15
N_CLASSES = 10
# At most this many elements in one block of work: the decoder output (chunk, B, 1, 28, 28) of one chunk of
# importance samples, or one block of the test-to-training distance matrix, so that memory stays bounded
# whatever k and --batch-size are. The size depends on the device (block_elements):
# on a CPU, 2^22 float32 = 16 MiB: the blocks stay below glibc's 32 MiB mmap threshold, so they are reused
# rather than mapped and zeroed anew each time (with 2^25, the importance sampling took 1.6 times as long on a
# 2-core CPU, much of it in the kernel);
# on a GPU (cuda, mps), 2^26 float32 = 256 MiB: k = 5000 samples of a batch of 500 in 30 chunks rather than
# 500 chunks of 10, each a string of small kernel launches; the likelihood's temporaries of one chunk stay
# within a few GiB.
BLOCK_ELEMENTS = 2**22
DEVICE_BLOCK_ELEMENTS = 2**26
BATCH_SIZE = 500  # test images per batch, the default of --batch-size


# --------------------------------------------------------------------------------------------- measures


@torch.inference_mode()
def mean_neg_elbo(model, images, batch_size=1000):
    """Mean -ELBO over `images` and its two terms (recon, kl), nats per image, one z per image drawn from
    ELBO_NOISE_SEED: every epoch, run and script scores with the same noise, and never touches the training
    random stream. Returns 0-dim tensors on the images' device: no host synchronisation here.
    """
    generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)
    recon_sum = torch.zeros((), device=images.device)
    kl_sum = torch.zeros((), device=images.device)
    for x in batches(images, batch_size):
        recon, kl = model.elbo_terms(x, generator)
        recon_sum += recon.sum()
        kl_sum += kl.sum()
    n = images.shape[0]
    return (recon_sum + kl_sum) / n, recon_sum / n, kl_sum / n


def mean_neg_iwae_bound(model, images, k, batch_size=BATCH_SIZE):
    """Mean -L_k over `images`, nats per image, with samples drawn from ELBO_NOISE_SEED (a 0-dim tensor)."""
    generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)
    return -log_likelihood_estimates(model, images, k, batch_size, generator).mean()


@torch.inference_mode()
def posterior_means(model, images, batch_size=1000):
    """E_q[z|x] = mu(x) for every image: (N, 1, 28, 28) -> (N, latent_dim), in batches to bound memory."""
    return torch.cat([model.encode(x)[0] for x in batches(images, batch_size)])


def block_elements(device):
    """The most elements of one block of work on this device: BLOCK_ELEMENTS on the CPU, else DEVICE_BLOCK_ELEMENTS."""
    return BLOCK_ELEMENTS if torch.device(device).type == "cpu" else DEVICE_BLOCK_ELEMENTS


def samples_per_chunk(k, batch_size, device="cpu"):
    """How many of the k importance samples to draw at once for a batch of images on `device` (block_elements)."""
    return max(1, min(k, block_elements(device) // (batch_size * N_PIXELS)))


@torch.inference_mode()
def log_likelihood_estimates(model, images, k, batch_size, generator=None, progress=False):
    """log p^(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), for every image: (N, 1, 28, 28) -> (N,).

    Burda et al. (2016), eq. (8): a lower bound on log p(x) in expectation, rising to it as k grows.
    """
    chunk = samples_per_chunk(k, batch_size, images.device)
    n_batches = math.ceil(images.shape[0] / batch_size)
    estimates = [
        model.iwae_bound(x, k, chunk, generator)  # (B,)
        for x in tqdm(
            batches(images, batch_size),
            total=n_batches,
            desc=f"log p(x), k={k}",
            unit="batch",
            leave=False,
            disable=not progress,
        )
    ]
    return torch.cat(estimates)


def iwae_nll(model, images, k, batch_size=BATCH_SIZE, generator=None, progress=False):
    """The test negative log-likelihood: -mean over the images of log p^(x) (above), nats per image.

    The mean is taken in float64 on the CPU: MPS has no float64, and the N estimates are a small copy.
    """
    estimates = log_likelihood_estimates(model, images, k, batch_size, generator, progress)
    return -estimates.cpu().double().mean().item()


def active_units(means):
    """Number of latent dims u with Cov_x(E_q[z_u|x]) > 10^-2 (Burda et al. 2016, Section 5.2); means: (N, d).

    The variance is over the given images (the population variance: one image gives 0 active units).
    """
    return int((means.var(dim=0, correction=0) > ACTIVE_UNIT_THRESHOLD).sum())


def knn_accuracy(queries, query_labels, reference, reference_labels, n_neighbors=N_NEIGHBORS):
    """Fraction of queries (Q, d) whose label is the majority label of their n_neighbors nearest (Euclidean)
    reference points (R, d). A tie goes to the smallest label. The (Q, R) distances are computed in blocks."""
    rows = max(1, block_elements(reference.device) // reference.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], rows):
        distances = torch.cdist(queries[start : start + rows], reference)  # (rows, R)
        nearest = distances.topk(n_neighbors, dim=1, largest=False).indices  # (rows, n_neighbors)
        votes = torch.nn.functional.one_hot(reference_labels[nearest], N_CLASSES).sum(dim=1)  # (rows, 10)
        correct += (votes.argmax(dim=1) == query_labels[start : start + rows]).sum().item()
    return correct / queries.shape[0]


def load_reference_set(data_dir, pixels, device):
    """All 60000 training images as the model was trained on them, presented once (load_scored_split)."""
    return load_scored_split(data_dir, True, pixels, device)


def bits_per_dim_8bit(nll):
    """A negative log-density of dequantized images x = (k + u)/256, turned into a bound on the negative
    log-likelihood of the 8-bit images k, in bits per pixel: -log P(k) <= -E_u log p((k + u)/256) + 784 log 256
    (Theis, van den Oord & Bethge 2016, Section 3.1; the bin width 1/256 gives the 784 log 256)."""
    return (nll + N_PIXELS * math.log(256)) / (N_PIXELS * math.log(2))


# --------------------------------------------------------------------------------------------- script


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="out/ckpt.pt", help="written by train.py (default: %(default)s)")
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
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: the checkpoint's training --data-dir)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results to this JSON file")
    add_device_arg(p)
    return p


@stop_on_ctrl_c
def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    check_json_flag(parser, args.json)

    try:
        state, model = load_checkpoint(args.checkpoint, device)
        # The images exactly as in training (pixels), from the same folder unless told otherwise.
        data_dir = args.data_dir if args.data_dir is not None else state["train_config"]["data_dir"]
        test = load_test_set(data_dir, state["train_config"]["pixels"], device, args.limit)  # (images, labels)
        reference = load_reference_set(data_dir, state["train_config"]["pixels"], device)
    except (CheckpointError, DataError) as e:
        fail(str(e))
    generator = torch.Generator(device=device).manual_seed(args.seed)
    results = {
        **score(model, test, reference, args.k, args.batch_size, generator),
        "n_images": test[0].shape[0],
        "k": args.k,
        "model_config": state["model_config"],
        "train_config": state["train_config"],
        "epoch": state["epoch"],
    }
    if state["train_config"]["pixels"] == "dequantized":  # a density of (k + u)/256 bounds the 8-bit likelihood
        results["bits_per_dim_8bit"] = bits_per_dim_8bit(results["test_nll"])
    print_table(args.checkpoint, results)
    write_results(args.json, results)
    return results


def score(model, test, reference, k, batch_size, generator):
    """The measures of the module docstring for the test (images, labels); the k-NN's reference is the
    training (images, labels)."""
    (test_images, test_labels), (train_images, train_labels) = test, reference
    neg_elbo, recon, kl = mean_neg_elbo(model, test_images)
    test_nll = iwae_nll(model, test_images, k, batch_size, generator, progress=True)
    test_means = posterior_means(model, test_images, batch_size)  # (N, d)
    train_means = posterior_means(model, train_images, batch_size)  # (60000, d)
    return {
        "test_neg_elbo": neg_elbo.item(),
        "test_recon": recon.item(),
        "test_kl": kl.item(),
        "test_nll": test_nll,
        "bits_per_dim": test_nll / (N_PIXELS * math.log(2)),
        "active_units": active_units(test_means),
        "knn_accuracy": knn_accuracy(test_means, test_labels, train_means, train_labels),
    }


def print_table(checkpoint, r):
    print(f"{checkpoint} (epoch {r['epoch']}), {r['n_images']} test images")
    print(
        f"  -ELBO            {r['test_neg_elbo']:9.3f} nats/image  "
        f"(recon {r['test_recon']:.3f} + KL {r['test_kl']:.3f})"
    )
    print(f"  -log p(x)        {r['test_nll']:9.3f} nats/image  (importance sampled, k = {r['k']})")
    print(f"  -log p(x)        {r['bits_per_dim']:9.4f} bits/pixel")
    if "bits_per_dim_8bit" in r:
        print(f"  -log P(8-bit) <= {r['bits_per_dim_8bit']:9.4f} bits/pixel  (the dequantized density's bound)")
    print(f"  active units     {r['active_units']:5d} of {r['model_config']['latent_dim']}")
    print(f"  {N_NEIGHBORS}-NN accuracy  {r['knn_accuracy']:9.4f}  (posterior means; the training set as reference)")


if __name__ == "__main__":
    main()
