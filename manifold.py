"""The latent plane the figures show, and the images the decoder draws on it: the manifold of Kingma & Welling
(2014, Fig. 4), and, for a conditional model, the class grid. visualize.py draws them; train.py --frames keeps
one frame per epoch for visualize.py's training film.
"""

import numpy as np
import torch

from data import PRIOR_SAMPLE_SEED
from model import N_CLASSES
from scoring import posterior_means

MANIFOLD_SIDE = 20  # Kingma & Welling (2014), Fig. 4: a 20 x 20 grid


def manifold_grid(side):
    """(side, side, 2) points in standard-normal coordinates, laid out as the image will be: the Gaussian
    quantiles of the probabilities (i + 0.5) / side (Kingma & Welling 2014, Fig. 4; the half step keeps
    z = +-inf out). Column c holds the c-th in the first coordinate; row r the (side-1-r)-th in the second, so
    that the second grows upwards, as in the latent scatter plot."""
    a = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(side, dtype=torch.float32) + 0.5) / side)
    first, second = torch.meshgrid(a, a.flip(0), indexing="xy")  # each (side, side): [row, column]
    return torch.stack([first, second], dim=-1)  # (side, side, 2)


def latent_plane(mu):
    """Where the 2-D figures live: (center (d,), directions (2, d) orthonormal, scales (2,)), and
    z = center + (coords * scales) @ directions.

    With latent_dim = 2 this is the latent space itself, in prior units, as in the paper. Above 2 it is the
    plane of the two leading principal directions of the posterior means mu (N, d) and their standard
    deviations along each, so that the grid's quantiles cover the region the data occupies (the aggregate
    posterior need not have unit variance). Each direction's sign is fixed (largest component positive) so
    that the figures do not flip between runs or devices.
    """
    d = mu.shape[1]
    if d == 2:
        return torch.zeros(2, device=mu.device), torch.eye(2, device=mu.device), torch.ones(2, device=mu.device)
    center = mu.mean(0)  # (d,)
    _, s, vh = torch.linalg.svd(mu - center, full_matrices=False)  # PCA; vh: (min(N, d), d)
    directions = vh[:2]  # (2, d)
    largest = directions.gather(1, directions.abs().argmax(1, keepdim=True))  # (2, 1)
    return center, directions * largest.sign(), s[:2] / (mu.shape[0] - 1) ** 0.5


@torch.inference_mode()
def decode_means(model, z, y=None):
    """E[x|z] (or E[x|z, y]) for each z: (..., d) -> (..., 1, 28, 28)."""
    return model.mean(model.decode(z, y))


def prior_z(n, latent_dim, device):
    """n draws z ~ N(0, I) from PRIOR_SAMPLE_SEED: the same z for every model of this latent_dim."""
    generator = torch.Generator(device=device).manual_seed(PRIOR_SAMPLE_SEED)
    return torch.randn(n, latent_dim, generator=generator, device=device)


def manifold_images(model, plane):
    """E[x|z] at the MANIFOLD_SIDE^2 points of the grid on the plane: (400, 1, 28, 28), row-major as drawn."""
    center, directions, scales = plane
    coords = manifold_grid(MANIFOLD_SIDE).to(center.device)  # (20, 20, 2), standard-normal quantiles
    z = center + (coords * scales) @ directions  # (20, 20, d)
    return decode_means(model, z.reshape(-1, z.shape[-1]))


def class_grid_images(model):
    """A conditional model's E[x|z, y]: row y for the digit y, column j for the j-th of ten shared z ~ p(z):
    (100, 1, 28, 28), row-major."""
    device = next(model.parameters()).device
    z = prior_z(N_CLASSES, model.config.latent_dim, device).expand(N_CLASSES, -1, -1)  # (10 rows, 10 z, d)
    y = torch.arange(N_CLASSES, device=device)[:, None].expand(-1, N_CLASSES)  # (10, 10): the row's digit
    return decode_means(model, z, y).reshape(-1, 1, 28, 28)


def frame(model, test_images):
    """One frame of the training film, as 8-bit grey levels: the manifold (on the latent plane of the test
    images' posterior means), or a conditional model's class grid. (560, 560) or (280, 280) uint8."""
    if model.config.conditional:
        images, side = class_grid_images(model), N_CLASSES
    else:
        images, side = manifold_images(model, latent_plane(posterior_means(model, test_images))), MANIFOLD_SIDE
    return np.rint(tile(images, side, side) * 255).astype(np.uint8)


def tile(images, rows, cols):
    """(rows * cols, 1, 28, 28) images, row-major -> one (rows * 28, cols * 28) array, tiles touching."""
    h, w = images.shape[-2:]
    grid = images.reshape(rows, cols, h, w).permute(0, 2, 1, 3)  # (rows, 28, cols, 28)
    return grid.reshape(rows * h, cols * w).float().cpu().numpy()
