"""The variational autoencoder: q(z|x), p(x|z), the ELBO and the importance-weighted bound; torch only, no I/O.

Notation follows Kingma & Welling (2014), "Auto-Encoding Variational Bayes" (AEVB): x is an image in [0, 1]^784,
z in R^d a latent code with prior p(z) = N(0, I), q(z|x) = N(mu, diag(exp(logvar))) the encoder, p(x|z) the
decoder, given by per-pixel logits. Every log-density is summed over pixels / latent dims, per example, in nats.
"""

import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 28 * 28
N_CLASSES = 10  # the digits: the labels y of a conditional model
LOG_2PI = math.log(2 * math.pi)

ARCHS = ("mlp", "conv")
ACTIVATIONS = ("relu", "tanh")
LIKELIHOODS = ("bernoulli", "cb")
OBJECTIVES = ("elbo", "iwae")
ESTIMATORS = ("pathwise", "score")


def setting(default, help, **meaning):
    """A config field with its command-line help, and what its values may be: choices, or a range (at_least=,
    above=) that comes from what the field means. The config checks its values; the scripts read the help."""
    return field(default=default, metadata={"help": help, **meaning})


@dataclass(kw_only=True)  # built by name only: no two fields can be swapped by position
class VAEConfig:
    """The networks and the likelihood; every field is a flag of train.py (latent_dim: --latent-dim)."""

    latent_dim: int = setting(2, "d, the size of z", at_least=1)
    arch: str = setting("mlp", "mlp, or conv: two stride-2 convolutions, mirrored in the decoder", choices=ARCHS)
    hidden_dims: tuple[int, ...] = setting(
        (512, 256),
        "comma-separated widths, e.g. 400 or 200,200 (the decoder mirrors them); for conv, the dense "
        "layers after the convolutions",
        at_least=1,
    )
    activation: str = setting("relu", "the hidden layers' nonlinearity", choices=ACTIVATIONS)
    likelihood: str = setting("bernoulli", "p(x|z): bernoulli, or cb (continuous Bernoulli)", choices=LIKELIHOODS)
    conditional: bool = setting(
        False, "condition on the digit: q(z|x, y) and p(x|z, y), the one-hot label beside the image and the code"
    )

    def __post_init__(self):
        self.hidden_dims = tuple(self.hidden_dims)  # a checkpoint stores the config as a plain dict: a list
        check_fields(self)


def check_fields(config):
    """Raise ValueError, naming the field, where a field holds a value its meaning excludes: a choice it does not
    offer, or a number outside its range (NaN and infinity are outside every range)."""
    for f in fields(config):
        value, meaning = getattr(config, f.name), f.metadata
        if "choices" in meaning and value not in meaning["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(meaning['choices'])}, got {value!r}")
        if value == ():
            raise ValueError(f"{f.name} needs one or more values")
        for number in value if isinstance(value, tuple) else [] if value is None else [value]:  # None: all
            if "at_least" in meaning and not (math.isfinite(number) and number >= meaning["at_least"]):
                raise ValueError(f"{f.name} must be a number >= {meaning['at_least']}, got {value!r}")
            if "above" in meaning and not (math.isfinite(number) and number > meaning["above"]):
                raise ValueError(f"{f.name} must be a number > {meaning['above']}, got {value!r}")


# --------------------------------------------------------------------------------------------- densities


def kl_std_normal(mu, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)), AEVB Appendix B: -1/2 sum(1 + logvar - mu^2 - exp(logvar))."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)  # (...,)


def bernoulli_log_prob(logits, x):
    """log Bernoulli(x | sigmoid(logits)) summed over pixels; x may be any value in [0, 1]."""
    return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(-3).sum(-1)


# Taylor series of log C at logit 0: log 2 + l^2/12 - 7 l^4/1440 + 31 l^6/90720 - 127 l^8/4838400 + O(l^10).
_CB_LOG_NORM_SERIES = (math.log(2.0), 1 / 12, -7 / 1440, 31 / 90720, -127 / 4838400)
_CB_LOG_NORM_SERIES_BELOW = 0.1  # truncation error there: 73/34214400 * 0.1^10 ~ 2e-16, below float64 rounding


def cb_log_norm(logits):
    """log C(lambda), the log-normalizer of the continuous Bernoulli, lambda = sigmoid(logits).

    Loaiza-Ganem & Cunningham (2019), eq. (2): C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) = l / tanh(l / 2), so
    for a = |l|, log C = softplus(-a) - log(-expm1(-a) / a): exact for every a > 0, and -> log|l| as |l| -> inf,
    where torch.distributions.ContinuousBernoulli saturates. Near 0, where that is 0/0, a Taylor series.
    """
    a = logits.abs()
    small = a < _CB_LOG_NORM_SERIES_BELOW
    a_safe = torch.where(small, torch.ones_like(a), a)  # keeps the unused branch (and its gradient) finite
    exact = F.softplus(-a_safe) - torch.log(-torch.expm1(-a_safe) / a_safe)
    return torch.where(small, _even_series(_CB_LOG_NORM_SERIES, a), exact)


def _even_series(coefficients, l):
    """sum_n coefficients[n] l^(2n), by Horner's rule in l^2."""
    l2, series = l * l, torch.zeros_like(l)
    for coefficient in reversed(coefficients):
        series = series * l2 + coefficient
    return series


def cb_log_prob(logits, x):
    """log CB(x | lambda) = x log lambda + (1 - x) log(1 - lambda) + log C(lambda), summed over pixels."""
    return bernoulli_log_prob(logits, x) + cb_log_norm(logits).flatten(-3).sum(-1)


# The continuous-Bernoulli mean is 1 / (1 - e^-l) - 1 / l (CB paper, eq. (4), in logits); near l = 0 both
# terms blow up and cancel, so there it is 1/2 + sum_n B_2n l^(2n-1) / (2n)! (B_2n the Bernoulli numbers).
# With terms up to l^21 the truncation error below |l| = 1 is under 2e-19.
_CB_MEAN_SERIES = (
    1 / 12,
    -1 / 720,
    1 / 30240,
    -1 / 1209600,
    1 / 47900160,
    -691 / 1307674368000,
    1 / 74724249600,
    -3617 / 10670622842880000,
    43867 / 5109094217170944000,
    -174611 / 802857662698291200000,
    77683 / 14101100039391805440000,
)
_CB_MEAN_SERIES_BELOW = 1.0


def cb_mean(logits):
    """E[x] under CB(lambda = sigmoid(logits)): what a continuous-Bernoulli decoder predicts for a pixel."""
    small = logits.abs() < _CB_MEAN_SERIES_BELOW
    l_safe = torch.where(small, torch.ones_like(logits), logits)
    exact = -1.0 / torch.expm1(-l_safe) - 1.0 / l_safe
    return torch.where(small, 0.5 + logits * _even_series(_CB_MEAN_SERIES, logits), exact)


def log_likelihood(logits, x, likelihood):
    """log p(x|z) for the decoder's logits, per example: (..., 1, 28, 28) -> (...)."""
    if likelihood == "bernoulli":
        return bernoulli_log_prob(logits, x)
    if likelihood == "cb":
        return cb_log_prob(logits, x)
    raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")


def std_normal_log_prob(z):
    """log N(z | 0, I), summed over the last dim."""
    return -0.5 * (z.pow(2) + LOG_2PI).sum(-1)


def diag_normal_log_prob(z, mu, logvar):
    """log N(z | mu, diag(exp(logvar))), summed over the last dim; broadcasts z (k, B, d) against (B, d)."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


# --------------------------------------------------------------------------------------------- networks


def _mlp(sizes, activation):
    """Linear layers of the given sizes, with the activation after each one (the caller adds the head)."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), activation()]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """q(z|x) and p(x|z); with config.conditional, q(z|x, y) and p(x|z, y) for integer labels y (B,), the prior
    staying N(0, I) (the M2 model of Kingma, Rezende, Mohamed & Welling 2014, with every label observed)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        act = {"relu": nn.ReLU, "tanh": nn.Tanh}[config.activation]
        hidden, d = config.hidden_dims, config.latent_dim
        n_labels = N_CLASSES if config.conditional else 0  # the one-hot label, beside the image and the code
        if config.arch == "mlp":
            self.features = nn.Flatten()  # (B, 784)
            self.encoder = _mlp((N_PIXELS + n_labels, *hidden), act)
            self.decoder = _mlp((d + n_labels, *reversed(hidden)), act)
            self.to_logits = nn.Linear(hidden[0], N_PIXELS)
        else:
            features = 64 * 7 * 7
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 4, stride=2, padding=1),  # (B, 32, 14, 14)
                act(),
                nn.Conv2d(32, 64, 4, stride=2, padding=1),  # (B, 64, 7, 7)
                act(),
                nn.Flatten(),  # (B, 3136)
            )
            self.encoder = _mlp((features + n_labels, *hidden), act)
            self.decoder = nn.Sequential(
                _mlp((d + n_labels, *reversed(hidden), features), act),
                nn.Unflatten(1, (64, 7, 7)),
                nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),  # (B, 32, 14, 14)
                act(),
            )
            self.to_logits = nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1)  # (B, 1, 28, 28)
        self.to_mu = nn.Linear(hidden[-1], d)
        self.to_logvar = nn.Linear(hidden[-1], d)

    @torch.no_grad()
    def init_output_bias(self, pixel_mean):
        """Start the decoder near the data's marginal: output bias = logit of the mean training image (1, 28, 28),
        clipped to [0.001, 0.999] as in Burda et al.'s IWAE code; the conv decoder's one bias, from its mean.
        For the continuous Bernoulli this sets lambda, not the mean: the logit whose CB mean is 0.001 is about
        -1000, a start no Adam step of 1e-3 could leave, while these stay on the Bernoulli's scale (|l| <= 6.9)."""
        p = pixel_mean.clamp(0.001, 0.999)
        if self.config.arch == "conv":
            p = p.mean()
        self.to_logits.bias.copy_(torch.logit(p).reshape(self.to_logits.bias.shape))

    def encode(self, x, y=None):
        """q(z|x) (or q(z|x, y)): (B, 1, 28, 28) -> mu, logvar, each (B, latent_dim)."""
        h = self.encoder(self.with_label(self.features(x), y))  # (B, hidden[-1])
        return self.to_mu(h), self.to_logvar(h)

    def with_label(self, h, y):
        """h (..., n) with the one-hot label beside it, (..., n + 10), for a conditional model; h itself otherwise.
        y: integer labels broadcastable to h's leading dims, or label weights (..., 10) (a morph between digits)."""
        if not self.config.conditional:
            return h
        if y is None:
            raise ValueError("a conditional VAE needs the labels y of its images")
        one_hot = y.to(h.dtype) if y.is_floating_point() else F.one_hot(y, N_CLASSES).to(h.dtype)
        return torch.cat([h, one_hot.expand(*h.shape[:-1], N_CLASSES)], dim=-1)

    @staticmethod
    def reparameterize(mu, logvar, generator=None):
        """z = mu + sigma * eps, eps ~ N(0, I) (AEVB eq. (10)): a sample of q(z|x) differentiable in mu, logvar."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z, y=None):
        """p(x|z) (or p(x|z, y)): (..., latent_dim) -> logits (..., 1, 28, 28)."""
        zy = self.with_label(z, y)  # (..., latent_dim [+ 10])
        logits = self.to_logits(self.decoder(zy.reshape(-1, zy.shape[-1])))
        return logits.reshape(*z.shape[:-1], *IMAGE_SHAPE)

    def mean(self, logits):
        """E[x|z], the image the decoder predicts (not lambda, for the continuous Bernoulli)."""
        return torch.sigmoid(logits) if self.config.likelihood == "bernoulli" else cb_mean(logits)

    def sample_posterior(self, mu, logvar, k, generator=None):
        """k reparameterized draws z_i ~ q(z|x) per image: mu, logvar (B, d) -> z (k, B, d)."""
        return self.reparameterize(mu.expand(k, *mu.shape), logvar.expand(k, *logvar.shape), generator)

    def log_px_z(self, x, z, y=None):
        """log p(x|z) for each of k codes per image: x (B, 1, 28, 28), z (k, B, d) -> (k, B)."""
        logits = self.decode(z, y)  # (k, B, 1, 28, 28)
        return log_likelihood(logits, x.expand_as(logits), self.config.likelihood)

    def log_weights(self, x, k, generator=None, posterior=None, y=None):
        """log w_i = log p(x, z_i) - log q(z_i|x), z_i ~ q(z|x), i = 1..k: (k, B) (Burda et al. 2016, eq. (8));
        posterior: (mu, logvar), if the encoder has already been run on x."""
        mu, logvar = self.encode(x, y) if posterior is None else posterior  # (B, d) each
        z = self.sample_posterior(mu, logvar, k, generator)  # (k, B, d)
        return log_weight(self.log_px_z(x, z, y), z, mu, logvar)

    def iwae_bound(self, x, k, chunk=None, generator=None, y=None):
        """log (1/k) sum_i w_i, the k-sample importance-weighted bound on log p(x), per example (B,): the ELBO at
        k = 1, rising with k towards log p(x) (Burda et al., Theorem 1), the standard estimate of it at k = 5000.
        The samples are decoded `chunk` at a time, so that the memory does not grow with k."""
        posterior = self.encode(x, y)
        chunk = chunk or k
        log_w = [self.log_weights(x, min(chunk, k - start), generator, posterior, y) for start in range(0, k, chunk)]
        return log_mean_exp(torch.cat(log_w))  # (k, B) -> (B,)

    def sample(self, n, generator=None, y=None):
        """n draws z ~ p(z), decoded to logits (n, 1, 28, 28) (with the labels y (n,) for a conditional model);
        use .mean(logits) to display them."""
        weight = self.to_mu.weight
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=weight.device, dtype=weight.dtype)
        return self.decode(z, y)

    def loss(self, x, y=None, objective="elbo", k=1, estimator="pathwise", beta=1.0, generator=None):
        """The Loss of a batch x (B, 1, 28, 28) (and labels y (B,), if conditional), with k draws z_i ~ q(z|x) per
        image: what train.py minimizes and scoring.py reports.
        objective "elbo": -ELBO = -E_q[log p(x|z)] + beta KL(q(z|x) || p(z)) (AEVB eq. (10)), the expectation the
                  mean over the k draws, the KL in closed form; beta may be a 0-dim tensor (changing by step);
                  "iwae": -L_k = -log (1/k) sum_i w_i (Burda et al. 2016, eq. (8)); k = 1: a sampled KL.
        estimator "pathwise": gradients flow through z = mu + sigma * eps (the reparameterization trick);
                  "score": z is a constant and the encoder learns through log q(z|x) (score_surrogate).
        """
        mu, logvar = self.encode(x, y)  # (B, d) each
        z = self.sample_posterior(mu, logvar, k, generator)  # (k, B, d)
        if estimator == "score":
            z = z.detach()  # no path from z back to the encoder: only the decoder learns through log p(x|z)
        log_px_z = self.log_px_z(x, z, y)  # (k, B)
        recon, kl = -mean_over_samples(log_px_z), kl_std_normal(mu, logvar)  # (B,) each
        if objective == "elbo":
            f, total = log_px_z, mean_over_samples
            neg_bound = recon + beta * kl  # the KL's gradient is exact
        else:
            f, total = log_weight(log_px_z, z, mu, logvar), log_mean_exp  # f = log w, (k, B)
            neg_bound = -total(f)
        surrogate = neg_bound
        if estimator == "score":
            log_q = diag_normal_log_prob(z, mu, logvar)  # (k, B): gradient into mu and logvar only
            surrogate = surrogate - score_surrogate(f.detach(), log_q, total)
        return Loss(surrogate.mean(), neg_bound.detach(), recon.detach(), kl.detach())


class Loss(NamedTuple):
    surrogate: torch.Tensor  # scalar: backward() on it gives the estimator; its value is -bound for pathwise only
    neg_bound: torch.Tensor  # (B,), -ELBO (or recon + beta KL) or -L_k, detached
    recon: torch.Tensor  # (B,), -E_q[log p(x|z)] estimated with the k draws, detached
    kl: torch.Tensor  # (B,), KL(q(z|x) || p(z)), detached


def score_surrogate(f, log_q, total):
    """sum_i (total(f) - b_i) log q(z_i|x), whose gradient is the score-function (REINFORCE) estimator.

    f: (k, B), the detached per-sample terms whose total(f) -> (B,) is estimated (the mean for the ELBO,
    log-mean-exp for L_k); log_q: (k, B). As E_q[grad log q] = 0, a b_i free of z_i keeps it unbiased: b_i is the
    leave-one-out baseline (Kool et al. 2019; for L_k, VIMCO's, Mnih & Rezende 2016, eq. (9)); b = 0 for k = 1.
    """
    k = f.shape[0]
    learning_signal = total(f).expand_as(f) if k == 1 else total(f) - leave_one_out(f, total)  # (k, B)
    return (learning_signal * log_q).sum(0)


def leave_one_out(f, total):
    """b_i = total(f with f_i replaced by the mean of the others), for every i: (k, B) -> (k, B)."""
    k = f.shape[0]
    others_mean = (f.sum(0) - f) / (k - 1)  # (k, B)
    eye = torch.eye(k, dtype=torch.bool, device=f.device).unsqueeze(-1)  # (k, k, 1): row i replaces f_i
    replaced = torch.where(eye, others_mean.unsqueeze(0), f.unsqueeze(0))  # (k [which i], k, B)
    return total(replaced.transpose(0, 1))  # total over dim 0 of (k, k [which i], B) -> (k, B)


def log_weight(log_px_z, z, mu, logvar):
    """log w = log p(x|z) + log p(z) - log q(z|x) for codes z (k, B, d) of q = N(mu, diag(exp(logvar))): (k, B)."""
    return log_px_z + std_normal_log_prob(z) - diag_normal_log_prob(z, mu, logvar)


def mean_over_samples(f):
    """(k, B) -> (B,): the mean of k one-sample estimates."""
    return f.mean(0)


def log_mean_exp(log_w):
    """(k, B) -> (B,): log (1/k) sum_i w_i, computed stably (the importance-weighted bound from log w)."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
