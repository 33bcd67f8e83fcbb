"""The measures every script reports, in nats per image over a split, each drawn from a fixed seed so that every
epoch, run and script scores on the very same numbers: the -ELBO, the importance-weighted bound -L_k, the active
units and k-NN accuracy of the posterior means, and, for a 2-D latent, log p(x) itself by quadrature on a grid.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

from data import ELBO_NOISE_SEED, labelled_batches
from model import N_CLASSES, N_PIXELS, diag_normal_log_prob, kl_std_normal, log_likelihood, std_normal_log_prob

# Burda et al. (2016), Section 5.2: unit u is active if A_u = Cov_x(E_{q(z|x)}[z_u]) > 10^-2.
ACTIVE_UNIT_THRESHOLD = 1e-2
N_NEIGHBORS = 15
# At most this many elements in one block of work (one chunk of importance samples' decoder output, one block of
# the k-NN distances), whatever k and the batch size. CPU: 2^22 float32 = 16 MiB, under glibc's 32 MiB mmap
# threshold, so the memory is reused, not mapped and zeroed anew. GPU: 256 MiB, few large kernels, not many small.
BLOCK_ELEMENTS = 2**22
DEVICE_BLOCK_ELEMENTS = 2**26
BATCH_SIZE = 500  # test images per batch of the importance-sampled bound


@torch.inference_mode()
def mean_neg_elbo(model, images, batch_size=1000, labels=None):
    """Mean -ELBO (Kingma & Welling 2014, eq. (10)) over `images` and its terms (recon, kl): train.py's loss, its z
    drawn from ELBO_NOISE_SEED, not the training stream. 0-dim tensors on the images' device (no host sync).
    labels (N,): what a conditional model needs (an unconditional one ignores them), here and below."""
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
    """Mean -L_k over `images`, its samples drawn from ELBO_NOISE_SEED (a 0-dim tensor)."""
    generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)
    return -log_likelihood_estimates(model, images, k, batch_size, generator, labels=labels).mean()


@torch.inference_mode()
def posterior_means(model, images, batch_size=1000, labels=None):
    """E_q[z|x] = mu(x) for every image, in batches: (N, 1, 28, 28) -> (N, latent_dim)."""
    return torch.cat([model.encode(x, y)[0] for x, y in labelled_batches(images, labels, batch_size)])


def block_elements(device):
    return BLOCK_ELEMENTS if torch.device(device).type == "cpu" else DEVICE_BLOCK_ELEMENTS


def samples_per_chunk(k, batch_size, device="cpu"):
    """How many of the k importance samples to draw at once for a batch of images on `device`."""
    return max(1, min(k, block_elements(device) // (batch_size * N_PIXELS)))


@torch.inference_mode()
def log_likelihood_estimates(model, images, k, batch_size, generator=None, progress=iter, labels=None):
    """log p^(x) = log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x), for every image: (N, 1, 28, 28) -> (N,).
    Burda et al. (2016), eq. (8): a lower bound on log p(x) (log p(x|y) if conditional) in expectation, rising to
    it with k. progress wraps the iterator of batches (evaluate.py's progress bar)."""
    chunk = samples_per_chunk(k, batch_size, images.device)
    estimates = [
        model.iwae_bound(x, k, chunk, generator, y) for x, y in progress(labelled_batches(images, labels, batch_size))
    ]
    return torch.cat(estimates)


def iwae_nll(model, images, k, batch_size=BATCH_SIZE, generator=None, progress=iter, labels=None):
    """The test NLL, -mean of log p^(x) (above); the mean in float64 on the CPU, as MPS has no float64."""
    estimates = log_likelihood_estimates(model, images, k, batch_size, generator, progress, labels)
    return -estimates.cpu().double().mean().item()


def label_log_likelihoods(model, images, k, batch_size=BATCH_SIZE, generator=None, progress=iter):
    """L_k(x|y) of a conditional model for every image and label y = 0..9: (N, 10), float64 on the CPU."""
    columns = [
        log_likelihood_estimates(model, images, k, batch_size, generator, progress, y.expand(len(images)))
        for y in torch.arange(N_CLASSES, device=images.device)
    ]
    return torch.stack(columns, dim=1).cpu().double()


def conditional_scores(log_px_y, labels):
    """From L_k(x|y) (N, 10) and the true labels (N,): the NLL -log p(x|y); the marginal NLL -log (1/10) sum_y
    p(x|y) under the uniform label prior (at most log 10 above the conditional one, far below it where another
    label explains x better); and the accuracy of the generative classifier argmax_y L_k(x|y) (Kingma, Rezende,
    Mohamed & Welling 2014, Section 3.1.2)."""
    labels = labels.cpu()
    conditional = log_px_y.gather(1, labels[:, None])[:, 0]  # (N,)
    marginal = torch.logsumexp(log_px_y, dim=1) - math.log(N_CLASSES)  # (N,)
    return {
        "test_nll": -conditional.mean().item(),
        "test_nll_marginal": -marginal.mean().item(),
        "classifier_accuracy": (log_px_y.argmax(dim=1) == labels).double().mean().item(),
    }


def active_units(means):
    """Number of latent dims u with Cov_x(E_q[z_u|x]) > 10^-2 over the means (N, d) (Burda et al. 2016, 5.2)."""
    return int((means.var(dim=0, correction=0) > ACTIVE_UNIT_THRESHOLD).sum())


def knn_accuracy(queries, query_labels, reference, reference_labels, n_neighbors=N_NEIGHBORS):
    """Fraction of queries (Q, d) whose label is the majority label (ties: the smallest) of their n_neighbors
    nearest reference points (R, d), the (Q, R) distances in blocks (as Loaiza-Ganem & Cunningham 2019 use it)."""
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
    """The NLL of a density of dequantized x = (k + u)/256 as a bound on the 8-bit images' -log P(k), bits per
    pixel: -log P(k) <= -E_u log p((k + u)/256) + 784 log 256 (Theis, van den Oord & Bethge 2016, Section 3.1)."""
    return bits_per_dim(nll + N_PIXELS * math.log(256))


# --------------------------------------------------------------------------------------------- exact, for d = 2
# With a 2-D latent, log p(x) = log ∫ p(x|z) p(z) dz, which the ELBO and L_k bound, is a grid's sum to any accuracy.
# A scan of the prior's box finds where the integrand lives (p(z|x) may have modes q(z|x) never sees), q sets the
# first spacing, and the grid is refined until the integral no longer depends on it.

SCAN_HALF_WIDTH = 8.0  # the scan covers [-8, 8]^2: outside it p(z) is below e^-32 of its peak
SCAN_SPACING = 0.05  # a mode of standard deviation s shows at most (0.025 / s)^2 nats below its peak: 6 for s = 0.01
NEGLIGIBLE_NATS = 30.0  # the grid's border is this far below its peak: e^-30 ~ 1e-13 of it
SCAN_NATS = 35.0  # the grid covers every point of the scan this close to the peak: 5 more for what falls between
GRID_HALF_WIDTH = 8.0  # the grid covers at least q's mean +- this many of its standard deviations
GRID_SPACING = 0.5  # q's standard deviations between the grid's points, at first
GRID_DOUBLINGS = 6  # at most, along an axis whose border is not yet NEGLIGIBLE_NATS below the peak
RESOLUTION_NATS = 0.01  # the grid and every other point of it give integrals this close, or it is refined...
MAX_POINTS = 1025**2  # ...while it would have no more points (resolution_nats then says how close they came)
GAUSS_HERMITE_NODES = 80  # per axis, for E_q[log p(x|z)]


@dataclass
class PosteriorGrid:
    """log p(x, z) on a grid over the latent plane, for one image: log_joint[i, j] at z = (z1[i], z2[j])."""

    z1: torch.Tensor  # (n1,), float64, evenly spaced, n1 odd
    z2: torch.Tensor  # (n2,)
    log_joint: torch.Tensor  # (n1, n2)
    border_nats: float = math.nan  # how far below its peak the integrand is everywhere on the border
    resolution_nats: float = math.nan  # |log_px - log_px on every other point|, a bound on the rule's error

    def log_weights(self):
        """The trapezoid rule's log weights, (n1, n2): a cell's area inside, half or a quarter of it on the border."""
        w1, w2 = (torch.full_like(z, (z[-1] - z[0]).item() / (len(z) - 1)) for z in (self.z1, self.z2))
        w1[[0, -1]] /= 2
        w2[[0, -1]] /= 2
        return w1.log()[:, None] + w2.log()[None, :]

    @property
    def log_px(self):
        """log p(x) by the trapezoid rule: exponentially accurate where the integrand is smooth and vanishes at the
        border; a ReLU decoder's kinks make its error fall as the spacing squared."""
        return torch.logsumexp((self.log_joint + self.log_weights()).flatten(), 0).item()

    @property
    def log_posterior(self):
        """log p(z|x) = log p(x, z) - log p(x) on the grid, (n1, n2)."""
        return self.log_joint - self.log_px

    def kl_from(self, mu, logvar):
        """KL(q || p(z|x)) on the grid for q = N(mu, diag(exp(logvar))), mu and logvar (2,): the gap between the
        ELBO and log p(x) (Kingma & Welling 2014, eq. (1))."""
        z = grid_points(self.z1, self.z2)  # (n1 * n2, 2), in the order of log_joint.flatten()
        log_q = diag_normal_log_prob(z, mu.double(), logvar.double()).reshape(self.log_joint.shape)
        q = torch.exp(log_q + self.log_weights())  # q's mass at each point
        return (q * (log_q - self.log_posterior)).sum().item()


@torch.inference_mode()
def scan_prior(model, images, labels=None):
    """Per image, the box (lo, hi), each (N, 2), holding the points of the scan (a grid over [-SCAN_HALF_WIDTH,
    SCAN_HALF_WIDTH]^2, SCAN_SPACING apart) where log p(x, z) is within SCAN_NATS of its peak, and a spacing more.
    One decoder pass serves every image: a (continuous) Bernoulli's log p(x|z) = x . l + log p(0|z), linear in x."""
    if model.config.latent_dim != 2:
        raise ValueError(f"the quadrature is over a 2-D latent; this model's is {model.config.latent_dim}-D")
    axis = torch.arange(-SCAN_HALF_WIDTH, SCAN_HALF_WIDTH + SCAN_SPACING / 2, SCAN_SPACING, dtype=torch.float64)
    z, x, dtype = grid_points(axis, axis).to(images.device), images.flatten(1), next(model.parameters()).dtype
    mu = model.encode(images, labels)[0]  # the peak is near q's mean, mostly: few points pass a first threshold
    peak = (model.log_px_z(images, mu[None], labels)[0] + std_normal_log_prob(mu)).double()  # (N,)
    lo, hi = (torch.full((len(x), 2), s * math.inf, dtype=torch.float64, device=x.device) for s in (1, -1))
    groups = labels.unique() if model.config.conditional else [None]  # a conditional decoder, label by label
    for y in groups:
        mine = torch.arange(len(x), device=x.device) if y is None else (labels == y).nonzero()[:, 0]
        found = []
        for part in z.split(max(1, block_elements(x.device) // max(len(mine), N_PIXELS))):
            logits = model.decode(part.to(dtype), None if y is None else y.expand(len(part)))  # (C, 1, 28, 28)
            log_p0 = log_likelihood(logits, torch.zeros_like(logits), model.config.likelihood)
            log_joint = (x[mine] @ logits.flatten(1).T + log_p0 + std_normal_log_prob(part)).double()  # (n, C)
            peak[mine] = torch.maximum(peak[mine], log_joint.max(1).values)
            i, j = (log_joint >= peak[mine, None] - SCAN_NATS).nonzero(as_tuple=True)
            found.append((mine[i], part[j], log_joint[i, j]))
        i, near, value = (torch.cat(t) for t in zip(*found, strict=True))
        keep = value >= peak[i] - SCAN_NATS  # against the final peak: an earlier, lower one let more through
        lo.scatter_reduce_(0, i[keep, None].expand(-1, 2), near[keep], "amin")
        hi.scatter_reduce_(0, i[keep, None].expand(-1, 2), near[keep], "amax")
    return lo - SCAN_SPACING, hi + SCAN_SPACING


@torch.inference_mode()
def posterior_grid(model, x, y=None, box=None):
    """The refined grid for one image x (1, 28, 28) of a 2-D model (y, a 0-dim label, makes it log p(x|y)): over
    the scan's box (or `box`) and q's mean +- GRID_HALF_WIDTH of its standard deviations, GRID_SPACING of them
    apart; an axis whose border is not NEGLIGIBLE_NATS below the peak doubles its span, GRID_DOUBLINGS times at most."""
    y = None if y is None else y.reshape(1)
    lo, hi = (b[0] for b in scan_prior(model, x[None], y)) if box is None else box
    mu, logvar = (t[0].double() for t in model.encode(x[None], y))  # (2,) each
    spacing, reach = GRID_SPACING * torch.exp(0.5 * logvar), GRID_HALF_WIDTH * torch.exp(0.5 * logvar)
    lo, hi = torch.minimum(lo, mu - reach), torch.maximum(hi, mu + reach)
    for _ in range(GRID_DOUBLINGS + 1):
        n = (2 * torch.ceil((hi - lo) / (2 * spacing)) + 1).clamp(max=math.isqrt(MAX_POINTS)).long().tolist()
        z1, z2 = axes(lo, hi, n)
        log_joint = log_joint_at(model, x, grid_points(z1, z2), y).reshape(n)
        below = log_joint.max() - torch.stack([log_joint[[0, -1]].max(), log_joint[:, [0, -1]].max()])  # per axis
        wide = below < NEGLIGIBLE_NATS
        if not wide.any():
            break
        centre, half = (lo + hi) / 2, (hi - lo) / 2
        lo, hi = torch.where(wide, centre - 2 * half, lo), torch.where(wide, centre + 2 * half, hi)
    return refined(model, x, PosteriorGrid(z1, z2, log_joint, below.min().item()), y)


def refined(model, x, grid, y=None):
    """The grid, its spacing halved (only the new points decoded) until its log_px agrees with that on every
    other point within RESOLUTION_NATS or it would exceed MAX_POINTS."""
    while True:
        z1, z2, log_joint = grid.z1, grid.z2, grid.log_joint
        grid.resolution_nats = abs(grid.log_px - PosteriorGrid(z1[::2], z2[::2], log_joint[::2, ::2]).log_px)
        if grid.resolution_nats <= RESOLUTION_NATS or (2 * len(z1) - 1) * (2 * len(z2) - 1) > MAX_POINTS:
            return grid
        z1, z2 = (torch.linspace(z[0], z[-1], 2 * len(z) - 1, dtype=torch.float64, device=z.device) for z in (z1, z2))
        new = torch.ones(len(z1), len(z2), dtype=torch.bool, device=z1.device)
        new[::2, ::2] = False  # the old points
        log_joint = log_joint.new_empty(new.shape).masked_scatter_(~new, log_joint)
        log_joint[new] = log_joint_at(model, x, grid_points(z1, z2)[new.flatten()], y)
        grid = PosteriorGrid(z1, z2, log_joint, grid.border_nats)


@torch.inference_mode()
def check_grid(model, x, grid, y=None, half_width=10.0, points=201):
    """A second grid for the same integral, placed by neither the scan nor q: around the mean of p(z|x) on
    `grid`, half_width of its standard deviations either way, points per axis at first (then refined)."""
    y = None if y is None else y.reshape(1)
    p = torch.exp(grid.log_posterior + grid.log_weights())[..., None]  # the posterior's mass at each point
    z = grid_points(grid.z1, grid.z2).reshape(*p.shape[:2], 2)
    mean = (p * z).sum((0, 1))
    sd = (p * (z - mean) ** 2).sum((0, 1)).sqrt()
    z1, z2 = axes(mean - half_width * sd, mean + half_width * sd, (points, points))
    log_joint = log_joint_at(model, x, grid_points(z1, z2), y).reshape(points, points)
    return refined(model, x, PosteriorGrid(z1, z2, log_joint), y)


def posterior_grids(model, images, labels=None, progress=iter):
    """posterior_grid for every image (N, 1, 28, 28), with one scan for them all; progress wraps the images."""
    lo, hi = scan_prior(model, images, labels)
    labels = [None] * len(images) if labels is None else labels
    rows = progress(zip(images, labels, lo, hi, strict=True))
    return [posterior_grid(model, x, y, box) for x, y, *box in rows]


def axes(lo, hi, n):
    """n[a] points evenly spaced from lo[a] to hi[a] (float64, on lo's device), for each axis a."""
    return (torch.linspace(a, b, k, dtype=torch.float64, device=lo.device) for a, b, k in zip(lo, hi, n, strict=True))


def grid_points(z1, z2):
    """The points of the grid z1 x z2, (n1 * n2, 2), row-major: (z1[i], z2[j]) at i * n2 + j."""
    return torch.stack(torch.meshgrid(z1, z2, indexing="ij"), dim=-1).reshape(-1, 2)


def log_likelihood_at(model, x, z, y=None):
    """log p(x|z) (or p(x|z, y), y (1,)) for one image x (1, 28, 28) at the points z (M, d), float64: (M,)."""
    rows = max(1, block_elements(x.device) // N_PIXELS)
    dtype = next(model.parameters()).dtype
    return torch.cat([model.log_px_z(x[None], part[:, None].to(dtype), y)[:, 0].double() for part in z.split(rows)])


def log_joint_at(model, x, z, y=None):
    return log_likelihood_at(model, x, z, y) + std_normal_log_prob(z)


@torch.inference_mode()
def exact_elbo(model, images, nodes=GAUSS_HERMITE_NODES, labels=None):
    """ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)) for every image (N, 1, 28, 28) of a 2-D model: (N,), the
    expectation by nodes x nodes Gauss-Hermite quadrature under q, the KL in closed form."""
    t, w = np.polynomial.hermite.hermgauss(nodes)  # ∫ e^(-t^2) f(t) dt ~ sum_i w_i f(t_i)
    t = torch.tensor(t, device=images.device)
    eps = math.sqrt(2) * grid_points(t, t)  # (nodes^2, 2)
    weights = torch.tensor(np.outer(w, w).reshape(-1) / math.pi, device=images.device)  # (nodes^2,), sum 1
    mu, logvar = (t.double() for t in model.encode(images, labels))  # (N, 2) each
    ys = [None] * len(images) if labels is None else labels[:, None]  # (N, 1)
    expected = [
        (weights * log_likelihood_at(model, x, m + torch.exp(0.5 * lv) * eps, y)).sum()
        for x, m, lv, y in zip(images, mu, logvar, ys, strict=True)
    ]
    return torch.stack(expected) - kl_std_normal(mu, logvar)
