"""The measures every script uses, averaged over a split in nats per image (train.py's test ELBO, evaluate.py's
table, visualize.py's posterior means): each is drawn from a fixed seed, so that every epoch, run and script
scores on the very same numbers.

  -ELBO           with one z ~ q(z|x) per image (Kingma & Welling 2014, eq. (10));
  -L_k            the k-sample importance-weighted bound (Burda et al. 2016, eq. (8)), whose -L_5000 is the
                  test negative log-likelihood the papers report;
  active units    latent dims whose posterior mean varies across the images (Burda et al., Section 5.2);
  k-NN accuracy   digit classification from the posterior means, the training images as the reference set
                  (the measure Loaiza-Ganem & Cunningham 2019 use to compare the latent codes of their VAEs).
"""

import math

import torch

from data import ELBO_NOISE_SEED, batches
from model import N_PIXELS

# Burda et al. (2016), Section 5.2: unit u is active if A_u = Cov_x(E_{q(z|x)}[z_u]) > 10^-2.
ACTIVE_UNIT_THRESHOLD = 1e-2
N_NEIGHBORS = 15
N_CLASSES = 10
# At most this many elements in one block of work (the decoder output (chunk, B, 1, 28, 28) of one chunk of
# importance samples, or one block of the test-to-training distance matrix), so that memory stays bounded
# whatever k and the batch size are. On a CPU, 2^22 float32 = 16 MiB: below glibc's 32 MiB mmap threshold, so
# a block's memory is reused rather than mapped and zeroed anew each time. On a GPU, 2^26 float32 = 256 MiB:
# few, large kernels instead of many small ones.
BLOCK_ELEMENTS = 2**22
DEVICE_BLOCK_ELEMENTS = 2**26
BATCH_SIZE = 500  # test images per batch of the importance-sampled bound


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
def log_likelihood_estimates(model, images, k, batch_size, generator=None, progress=iter):
    """log p^(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), for every image: (N, 1, 28, 28) -> (N,).

    Burda et al. (2016), eq. (8): a lower bound on log p(x) in expectation, rising to it as k grows.
    progress wraps the iterator of batches (evaluate.py passes a progress bar).
    """
    chunk = samples_per_chunk(k, batch_size, images.device)
    return torch.cat([model.iwae_bound(x, k, chunk, generator) for x in progress(batches(images, batch_size))])


def iwae_nll(model, images, k, batch_size=BATCH_SIZE, generator=None, progress=iter):
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


def bits_per_dim(nll):
    """Nats per image -> bits per pixel."""
    return nll / (N_PIXELS * math.log(2))


def bits_per_dim_8bit(nll):
    """A negative log-density of dequantized images x = (k + u)/256, turned into a bound on the negative
    log-likelihood of the 8-bit images k, in bits per pixel: -log P(k) <= -E_u log p((k + u)/256) + 784 log 256
    (Theis, van den Oord & Bethge 2016, Section 3.1; the bin width 1/256 gives the 784 log 256)."""
    return bits_per_dim(nll + N_PIXELS * math.log(256))
