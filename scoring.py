"""The measures every script uses, averaged over a split in nats per image (train.py's test ELBO, evaluate.py's
table, visualize.py's posterior means): each is drawn from a fixed seed, so that every epoch, run and script
scores on the very same numbers.

  -ELBO           with one z ~ q(z|x) per image (Kingma & Welling 2014, eq. (10));
  -L_k            the k-sample importance-weighted bound (Burda et al. 2016, eq. (8)), whose -L_5000 is the
                  test negative log-likelihood the papers report;
  active units    latent dims whose posterior mean varies across the images (Burda et al., Section 5.2);
  k-NN accuracy   digit classification from the posterior means, the training images as the reference set
                  (the measure Loaiza-Ganem & Cunningham 2019 use to compare the latent codes of their VAEs);
and, for a model with a 2-D latent, log p(x) itself, by quadrature on a grid, and the ELBO without sampling.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from data import ELBO_NOISE_SEED, labelled_batches
from model import N_CLASSES, N_PIXELS, diag_normal_log_prob, kl_std_normal, std_normal_log_prob

# Burda et al. (2016), Section 5.2: unit u is active if A_u = Cov_x(E_{q(z|x)}[z_u]) > 10^-2.
ACTIVE_UNIT_THRESHOLD = 1e-2
N_NEIGHBORS = 15
# At most this many elements in one block of work (the decoder output (chunk, B, 1, 28, 28) of one chunk of
# importance samples, or one block of the test-to-training distance matrix), so that memory stays bounded
# whatever k and the batch size are. On a CPU, 2^22 float32 = 16 MiB: below glibc's 32 MiB mmap threshold, so
# a block's memory is reused rather than mapped and zeroed anew each time. On a GPU, 2^26 float32 = 256 MiB:
# few, large kernels instead of many small ones.
BLOCK_ELEMENTS = 2**22
DEVICE_BLOCK_ELEMENTS = 2**26
BATCH_SIZE = 500  # test images per batch of the importance-sampled bound


@torch.inference_mode()
def mean_neg_elbo(model, images, batch_size=1000, labels=None):
    """Mean -ELBO over `images` and its two terms (recon, kl), nats per image: the loss train.py minimizes
    (VAE.loss), with one z per image drawn from ELBO_NOISE_SEED, so that every epoch, run and script scores with
    the same noise and never touches the training random stream. Returns 0-dim tensors on the images' device: no
    host synchronisation here. labels (N,): the images' labels, which a conditional model needs (an unconditional
    one ignores them), here and below.
    """
    generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)
    recon_sum = torch.zeros((), device=images.device)
    kl_sum = torch.zeros((), device=images.device)
    for x, y in labelled_batches(images, labels, batch_size):
        loss = model.loss(x, y, generator=generator)
        recon_sum += loss.recon.sum()
        kl_sum += loss.kl.sum()
    n = images.shape[0]
    return (recon_sum + kl_sum) / n, recon_sum / n, kl_sum / n


def mean_neg_iwae_bound(model, images, k, batch_size=BATCH_SIZE, labels=None):
    """Mean -L_k over `images`, nats per image, with samples drawn from ELBO_NOISE_SEED (a 0-dim tensor)."""
    generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)
    return -log_likelihood_estimates(model, images, k, batch_size, generator, labels=labels).mean()


@torch.inference_mode()
def posterior_means(model, images, batch_size=1000, labels=None):
    """E_q[z|x] = mu(x) for every image: (N, 1, 28, 28) -> (N, latent_dim), in batches to bound memory."""
    return torch.cat([model.encode(x, y)[0] for x, y in labelled_batches(images, labels, batch_size)])


def block_elements(device):
    """The most elements of one block of work on this device: BLOCK_ELEMENTS on the CPU, else DEVICE_BLOCK_ELEMENTS."""
    return BLOCK_ELEMENTS if torch.device(device).type == "cpu" else DEVICE_BLOCK_ELEMENTS


def samples_per_chunk(k, batch_size, device="cpu"):
    """How many of the k importance samples to draw at once for a batch of images on `device` (block_elements)."""
    return max(1, min(k, block_elements(device) // (batch_size * N_PIXELS)))


@torch.inference_mode()
def log_likelihood_estimates(model, images, k, batch_size, generator=None, progress=iter, labels=None):
    """log p^(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), for every image: (N, 1, 28, 28) -> (N,).

    Burda et al. (2016), eq. (8): a lower bound on log p(x) in expectation, rising to it as k grows (for a
    conditional model, on log p(x|y)). progress wraps the iterator of batches (evaluate.py passes a progress bar).
    """
    chunk = samples_per_chunk(k, batch_size, images.device)
    estimates = [
        model.iwae_bound(x, k, chunk, generator, y) for x, y in progress(labelled_batches(images, labels, batch_size))
    ]
    return torch.cat(estimates)


def iwae_nll(model, images, k, batch_size=BATCH_SIZE, generator=None, progress=iter, labels=None):
    """The test negative log-likelihood: -mean over the images of log p^(x) (above), nats per image.

    The mean is taken in float64 on the CPU: MPS has no float64, and the N estimates are a small copy.
    """
    estimates = log_likelihood_estimates(model, images, k, batch_size, generator, progress, labels)
    return -estimates.cpu().double().mean().item()


def label_log_likelihoods(model, images, k, batch_size=BATCH_SIZE, generator=None, progress=iter):
    """L_k(x|y) of a conditional model for every image and every label y = 0..9: (N, 10), float64 on the CPU.

    From them: log p(x) = log (1/10) sum_y p(x|y) under the uniform label prior, and the model as a generative
    classifier, argmax_y p(x|y) (Kingma, Rezende, Mohamed & Welling 2014, Section 3.1.2).
    """
    n = images.shape[0]
    columns = []
    for y in range(N_CLASSES):
        labels = torch.full((n,), y, dtype=torch.long, device=images.device)
        columns.append(log_likelihood_estimates(model, images, k, batch_size, generator, progress, labels))
    return torch.stack(columns, dim=1).cpu().double()


def conditional_scores(log_px_y, labels):
    """From L_k(x|y) (N, 10) and the true labels (N,): the conditional NLL -log p(x|y), the marginal NLL
    -log (1/10) sum_y p(x|y) from the same estimates (at most log 10 below the conditional one, image by image),
    and the accuracy of argmax_y L_k(x|y)."""
    labels = labels.cpu()
    conditional = log_px_y.gather(1, labels[:, None])[:, 0]  # (N,)
    marginal = torch.logsumexp(log_px_y, dim=1) - math.log(N_CLASSES)  # (N,)
    return {
        "test_nll": -conditional.mean().item(),
        "test_nll_marginal": -marginal.mean().item(),
        "classifier_accuracy": (log_px_y.argmax(dim=1) == labels).double().mean().item(),
    }


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


# --------------------------------------------------------------------------------------------- exact, for d = 2
# With a 2-D latent, log p(x) = log ∫ p(x|z) p(z) dz is an integral over the plane that a grid computes to any
# accuracy: the number that the ELBO and L_k bound from below. q(z|x) says where the integrand lives.

GRID_POINTS = 201  # per axis
GRID_HALF_WIDTH = 8.0  # q's standard deviations either way of its mean, at first
GRID_DOUBLINGS = 6  # at most, while the integrand on the border is not negligible
NEGLIGIBLE_NATS = 30.0  # the border's largest value below the peak: e^-30 ~ 1e-13 of it
GAUSS_HERMITE_NODES = 80  # per axis, for E_q[log p(x|z)]


@dataclass
class PosteriorGrid:
    """log p(x, z) on a grid over the latent plane, for one image: log_joint[i, j] at z = (z1[i], z2[j])."""

    z1: torch.Tensor  # (n,), float64, evenly spaced
    z2: torch.Tensor  # (n,)
    log_joint: torch.Tensor  # (n, n)
    border_nats: float  # how far below its peak the integrand is everywhere on the border

    def points(self):
        """The grid's z, (n * n, 2), in the order of log_joint.flatten()."""
        return grid_points(self.z1, self.z2)

    def log_weights(self):
        """The trapezoid rule's log weights on the grid, (n, n): the cell's area inside, half or a quarter of it
        on the border."""
        w1, w2 = (torch.full_like(z, (z[-1] - z[0]).item() / (len(z) - 1)) for z in (self.z1, self.z2))
        w1[[0, -1]] /= 2
        w2[[0, -1]] /= 2
        return w1.log()[:, None] + w2.log()[None, :]

    @property
    def log_px(self):
        """log p(x) = log ∫ p(x, z) dz by the trapezoid rule (exponentially accurate for a smooth integrand that
        vanishes at the border)."""
        return torch.logsumexp((self.log_joint + self.log_weights()).flatten(), 0).item()

    @property
    def log_posterior(self):
        """log p(z|x) = log p(x, z) - log p(x) on the grid, (n, n): a density, it integrates to 1."""
        return self.log_joint - self.log_px

    def kl_from(self, mu, logvar):
        """KL(q || p(z|x)) = E_q[log q(z|x) - log p(z|x)] on the grid, for q = N(mu, diag(exp(logvar))), mu and
        logvar (2,): the gap between the ELBO and log p(x) (Kingma & Welling 2014, eq. (1))."""
        log_q = diag_normal_log_prob(self.points(), mu.double(), logvar.double()).reshape(self.log_joint.shape)
        q = torch.exp(log_q + self.log_weights())  # q's mass at each point
        return (q * (log_q - self.log_posterior)).sum().item()


@torch.inference_mode()
def posterior_grid(model, x, points=GRID_POINTS, y=None):
    """log p(x, z) = log p(x|z) + log p(z) on a points x points grid for one image x (1, 28, 28) of a model with
    a 2-D latent. The grid is centred on the mean of q(z|x) and spans GRID_HALF_WIDTH of its standard
    deviations either way; it doubles its span until the integrand on its border is NEGLIGIBLE_NATS below its
    peak (at most GRID_DOUBLINGS times; border_nats says how far below it is). y: the image's label (a 0-dim
    tensor), for a conditional model: the integral is then log p(x|y)."""
    if model.config.latent_dim != 2:
        raise ValueError(f"the quadrature is over a 2-D latent; this model's is {model.config.latent_dim}-D")
    y = None if y is None else y.reshape(1)
    mu, logvar = (t[0].double() for t in model.encode(x[None], y))  # (2,) each
    half_width = GRID_HALF_WIDTH * torch.exp(0.5 * logvar)
    for _ in range(GRID_DOUBLINGS + 1):
        z1, z2 = (
            torch.linspace(-1, 1, points, dtype=torch.float64, device=x.device) * h + m
            for m, h in zip(mu, half_width, strict=True)
        )
        z = grid_points(z1, z2)  # (n * n, 2)
        log_joint = (log_likelihood_at(model, x, z, y) + std_normal_log_prob(z)).reshape(points, points)
        border = torch.cat([log_joint[[0, -1]].flatten(), log_joint[:, [0, -1]].flatten()]).max()
        border_nats = (log_joint.max() - border).item()
        if border_nats >= NEGLIGIBLE_NATS:
            break
        half_width = 2 * half_width
    return PosteriorGrid(z1, z2, log_joint, border_nats)


def grid_points(z1, z2):
    """The points of the grid z1 x z2, (n1 * n2, 2), row-major: (z1[i], z2[j]) at i * n2 + j."""
    return torch.stack(torch.meshgrid(z1, z2, indexing="ij"), dim=-1).reshape(-1, 2)


def log_likelihood_at(model, x, z, y=None):
    """log p(x|z) (or p(x|z, y), y of shape (1,)) for one image x (1, 28, 28) at the points z (M, d), in float64,
    decoded in blocks of block_elements: (M,)."""
    rows = max(1, block_elements(x.device) // N_PIXELS)
    dtype = next(model.parameters()).dtype
    return torch.cat([model.log_px_z(x[None], part[:, None].to(dtype), y)[:, 0].double() for part in z.split(rows)])


def exact_log_likelihood(model, images, points=GRID_POINTS, labels=None):
    """log p(x) by quadrature (posterior_grid) for every image, and how far below its peak the integrand is on
    each grid's border: two float64 tensors (N,) on the CPU."""
    labels = [None] * len(images) if labels is None else labels
    grids = [posterior_grid(model, x, points, y) for x, y in zip(images, labels, strict=True)]
    return torch.tensor([g.log_px for g in grids], dtype=torch.float64), torch.tensor([g.border_nats for g in grids])


@torch.inference_mode()
def exact_elbo(model, images, nodes=GAUSS_HERMITE_NODES, labels=None):
    """ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) for every image (N, 1, 28, 28) of a 2-D model, with no
    sampling: the expectation by nodes x nodes Gauss-Hermite quadrature under q, the KL in closed form. (N,)"""
    t, w = np.polynomial.hermite.hermgauss(nodes)  # ∫ e^(-t^2) f(t) dt ~ sum_i w_i f(t_i)
    t = torch.tensor(t, device=images.device)
    eps = math.sqrt(2) * torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)  # (nodes^2, 2)
    weights = torch.tensor(np.outer(w, w).reshape(-1) / math.pi, device=images.device)  # (nodes^2,), sum 1
    mu, logvar = (t.double() for t in model.encode(images, labels))  # (N, 2) each
    ys = [None] * len(images) if labels is None else labels[:, None]  # (N, 1)
    expected = [
        (weights * log_likelihood_at(model, x, m + torch.exp(0.5 * lv) * eps, y)).sum()
        for x, m, lv, y in zip(images, mu, logvar, ys, strict=True)
    ]
    return torch.stack(expected) - kl_std_normal(mu, logvar)
