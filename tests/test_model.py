"""model.py against independent references: mpmath at 50 digits, Gauss-Legendre quadrature, torch.distributions.

The densities are checked to a few ulp where the module promises exactness; the loss and the importance weights of
the VAE are recomputed with torch.distributions on the same draws.
"""

import json
import math
from dataclasses import asdict
from functools import cache

import mpmath
import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal, kl_divergence

import model
from model import VAE, VAEConfig, bernoulli_log_prob, cb_log_norm, cb_log_prob, cb_mean, kl_std_normal

pytestmark = pytest.mark.usefixtures("one_thread")

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
EPS = {F64: torch.finfo(F64).eps, F32: torch.finfo(F32).eps}  # 2^-52, 2^-23
BOUND = {F64: 1e-14, F32: 1e-6}  # the relative error of a value: a few ulp


def gen(seed):
    return torch.Generator().manual_seed(seed)


def both_signs(*values):
    return [s * v for v in values for s in (1, -1)]


# --------------------------------------------------------------------------------------------- mpmath references
# Each is a function of the logit as the float the torch code sees (a float32 logit is rounded to float32 first).


def _mp_density(l):
    """x -> lambda^x (1 - lambda)^(1 - x), lambda = sigmoid(l) computed in mpmath from the logit."""
    lam = 1 / (1 + mpmath.exp(-mpmath.mpf(l)))
    return lambda x: lam**x * (1 - lam) ** (1 - x)


def _mp_log_norm_closed(l):
    """log C = log|l| - log tanh(|l| / 2), log 2 at l = 0."""
    return mpmath.log(2) if l == 0 else mpmath.log(abs(l)) - mpmath.log(mpmath.tanh(abs(l) / 2))


@cache
def ref_log_norm_quad(l):
    """log C(lambda) = -log int_0^1 lambda^x (1 - lambda)^(1 - x) dx, by numerical integration."""
    with mpmath.workdps(50):
        return -mpmath.log(mpmath.quad(_mp_density(l), [0, 1]))


@cache
def ref_log_norm_closed(l):
    with mpmath.workdps(50):
        return _mp_log_norm_closed(mpmath.mpf(l))


@cache
def ref_log_norm_derivative(l):
    with mpmath.workdps(50):
        return mpmath.diff(_mp_log_norm_closed, mpmath.mpf(l))


@cache
def ref_cb_mean(l):
    """E[x] = int x p(x) dx / int p(x) dx, by numerical integration."""
    with mpmath.workdps(50):
        density = _mp_density(l)
        return mpmath.quad(lambda x: x * density(x), [0, 1]) / mpmath.quad(density, [0, 1])


def rel_err(value, reference):
    return float(abs((mpmath.mpf(value) - reference) / reference))


NEAR = both_signs(1e-8, 1e-3, 0.05, 0.0999, 0.1, 0.1001, 0.2, 0.3, 0.5, 1.0, 2.5, 7.0, 15.0, 20.0, 30.0, 40.0)
FAR = both_signs(100.0, 1e3, 1e4, 1e8)


# --------------------------------------------------------------------------------------------- Gaussians


def test_gaussian_closed_forms_match_torch_distributions():
    g = gen(0)
    mu = torch.randn(64, 7, generator=g, dtype=F64) * 10
    logvar = torch.empty(64, 7, dtype=F64).uniform_(-30, 30, generator=g)
    mu[0], logvar[0] = 0.0, 0.0  # KL = 0 exactly
    mu[1, :3] = torch.tensor([100.0, -100.0, 1e-8], dtype=F64)
    logvar[1, :3] = torch.tensor([-40.0, 40.0, 1e-6], dtype=F64)
    kl = kl_std_normal(mu, logvar)
    reference = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl, reference, rtol=1e-12, atol=1e-12)
    assert kl.shape == (64,) and kl[0].item() == 0.0 and (kl >= 0).all()
    z = torch.randn(4, 3, 5, generator=gen(6), dtype=F64) * 3
    torch.testing.assert_close(model.std_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-13, atol=0)


# --------------------------------------------------------------------------------------------- cb_log_norm


@DTYPES
def test_cb_log_norm_matches_mpmath(dtype):
    """A few ulp everywhere: near 0 (the series), on both sides of its threshold 0.1, and far out, where
    log C -> log|l| (torch.distributions.ContinuousBernoulli saturates there: about 2.769 for |l| >= 16 in float32)."""
    logits = torch.tensor(NEAR + FAR, dtype=dtype)
    values = cb_log_norm(logits)
    assert values.dtype == dtype and torch.equal(values, cb_log_norm(-logits))
    for l, value in zip(logits.tolist(), values.tolist(), strict=True):
        reference = ref_log_norm_quad(l) if abs(l) <= 40 else ref_log_norm_closed(l)
        assert rel_err(value, reference) < BOUND[dtype], (l, value)
    assert cb_log_norm(torch.zeros(3, dtype=dtype)).tolist() == [float(torch.tensor(math.log(2), dtype=dtype))] * 3


@pytest.mark.parametrize(
    "ours, theirs",
    [(cb_log_norm, lambda cb: cb._cont_bern_log_norm()), (cb_mean, lambda cb: cb.mean)],
    ids=["C", "mean"],
)
def test_cb_agrees_with_torch_distributions_where_it_is_accurate(ours, theirs):
    """float64, 0.2 <= |l| <= 10."""
    l = torch.cat([torch.linspace(-10, -0.2, 300, dtype=F64), torch.linspace(0.2, 10, 300, dtype=F64)])
    torch.testing.assert_close(ours(l), theirs(ContinuousBernoulli(logits=l)), rtol=1e-9, atol=1e-12)


GRAD_POINTS = [0.0, 1e-8, 0.05, 0.0999, 0.1, 0.1001, 0.3, 0.5, 1.0, 3.0, 20.0, 100.0, 1e4]


@DTYPES
def test_cb_log_norm_gradient_matches_mpmath(dtype):
    """d/dl log C = 1/l - 1/sinh(l): exactly 0 at l = 0, odd, and against mpmath.diff of the exact function.

    Tolerances, from how the gradient is computed. Closed-form branch (|l| >= 0.1): for a = |l| it is
    -sigmoid(-a) - 1/expm1(a) + 1/a, terms that cancel near 0.1 (sizes ~10, result ~a/6): a few ulp of the sum
    of their sizes. Series branch (|l| < 0.1): a few ulp relative in float32; in float64 the truncated series'
    derivative is off by up to 10 * 73/34214400 * 0.1^9 ~ 2.1e-14 (absolute) at the threshold.
    """
    eps = EPS[dtype]
    l = torch.tensor(both_signs(*GRAD_POINTS), dtype=dtype, requires_grad=True)
    cb_log_norm(l).sum().backward()
    assert l.grad[0].item() == 0.0 and l.grad[1].item() == 0.0  # both signs of 0
    torch.testing.assert_close(l.grad[0::2], -l.grad[1::2], rtol=0, atol=0)  # odd: log C is even
    for x, g in zip(l.tolist()[2:], l.grad.tolist()[2:], strict=True):
        ref = ref_log_norm_derivative(x)
        err, a = abs(mpmath.mpf(g) - ref), abs(x)
        if a >= model._CB_LOG_NORM_SERIES_BELOW:
            term_sizes = math.exp(-a) / (1 + math.exp(-a)) + math.exp(-a) / -math.expm1(-a) + 1 / a
            assert err < 4 * eps * term_sizes, (x, g, ref)
        else:
            assert err < (3e-14 if dtype == F64 else 8 * eps * abs(ref)), (x, g, ref)


@pytest.mark.parametrize(
    "f, points",
    [
        (cb_log_norm, [0.0, 0.05, 0.0999, 0.0999999, 0.1000001, 0.1001, 0.7, 6.0]),
        (cb_mean, [0.0, 0.3, 0.9999999, 1.0000001, 1.2, 4.0]),
    ],
    ids=["log_norm", "mean"],
)
def test_gradcheck_across_the_series_thresholds(f, points):
    l = torch.tensor(both_signs(*points), dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (l,), eps=1e-6, atol=1e-9, rtol=1e-6)
    if f is cb_log_norm:  # not at 0, where autograd's second derivative is 0, not 1/6: the series is in |l|^2,
        l = torch.tensor(both_signs(*points[1:]), dtype=F64, requires_grad=True)  # and d|l|/dl = sign(0) = 0 there
        assert torch.autograd.gradgradcheck(f, (l,), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------- cb_log_prob

# Gauss-Legendre on [0, 1]: exact for polynomials of degree < 2n; the CB density lambda^x (1-lambda)^(1-x)
# is C (1 - lambda) e^(l x), entire, so n = 64 nodes integrate it to rounding for |l| <= 40.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)
GL_X, GL_W = torch.tensor((_GL_NODES + 1) / 2, dtype=F64), torch.tensor(_GL_WEIGHTS / 2, dtype=F64)


def integral(log_prob, l):
    """int_0^1 exp(log_prob(l, x)) dx, for a one-pixel image x per node."""
    x = GL_X.reshape(-1, 1, 1, 1)
    return (GL_W * torch.exp(log_prob(torch.full_like(x, l), x))).sum().item()


def test_the_references_agree_and_see_a_missing_normalizer():
    """mpmath's integral and closed form agree far beyond float64; Gauss-Legendre is exact on exponentials, and
    without log C it gives 1/C, not 1."""
    for l in NEAR + [0.0]:
        assert abs(ref_log_norm_quad(l) - ref_log_norm_closed(l)) < mpmath.mpf(10) ** -30, l
    for l in (-40.0, -3.0, 0.5, 40.0):
        assert abs(integral(lambda logits, x: (logits * x).flatten(), l) / math.expm1(l) * l - 1) < 1e-13
    unnormalized = integral(bernoulli_log_prob, 3.0)
    assert abs(unnormalized - math.exp(-float(ref_log_norm_closed(3.0)))) < 1e-13 and abs(unnormalized - 1) > 0.1


@pytest.mark.parametrize("l", [0.0, *both_signs(1e-6, 1e-3, 0.0999, 0.1, 0.3, 1.0, 5.0, 20.0, 40.0)])
def test_cb_log_prob_integrates_to_one(l):
    assert abs(integral(cb_log_prob, l) - 1) < 1e-13


def test_cb_log_prob_matches_torch_per_pixel_sum():
    g = gen(2)
    logits = torch.randn(3, 1, 28, 28, generator=g, dtype=F64) * 3
    logits[logits.abs() < 0.2] = 0.5  # keep torch's Taylor region out of it
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=F64)
    reference = ContinuousBernoulli(logits=logits).log_prob(x).sum((-3, -2, -1))
    torch.testing.assert_close(cb_log_prob(logits, x), reference, rtol=1e-10, atol=1e-9)


# --------------------------------------------------------------------------------------------- cb_mean, Bernoulli


@DTYPES
def test_cb_mean_matches_mpmath(dtype):
    logits = torch.tensor([0.0, *both_signs(1e-6, 1e-3, 0.5, 0.999, 1.0, 1.001, 3.0, 30.0)], dtype=dtype)
    means = cb_mean(logits)
    for l, mean in zip(logits.tolist(), means.tolist(), strict=True):
        assert rel_err(mean, ref_cb_mean(l)) < BOUND[dtype], (l, mean, ref_cb_mean(l))
    assert means[0].item() == 0.5


def test_cb_mean_far_logits_and_symmetry():
    l = torch.tensor([50.0, 1e3, 1e8, 0.37, 2.0], dtype=F64)
    m = cb_mean(l)
    torch.testing.assert_close(m + cb_mean(-l), torch.ones_like(l), rtol=0, atol=2 * EPS[F64])
    torch.testing.assert_close(m[:3], 1 - 1 / l[:3], rtol=EPS[F64], atol=0)  # 1 / (1 - e^-l) - 1/l, e^-l negligible
    assert torch.isfinite(cb_mean(torch.tensor([-1e30, 1e30], dtype=F32))).all()


def test_bernoulli_log_prob_for_binary_and_grey_x():
    """x log sigmoid(l) + (1 - x) log sigmoid(-l), summed over pixels: for binary x, Bernoulli's log_prob."""
    g = gen(3)
    logits = torch.randn(2, 4, 1, 28, 28, generator=g, dtype=F64) * 8
    x = torch.rand(2, 4, 1, 28, 28, generator=g, dtype=F64)
    x[0] = x[0].bernoulli(generator=g)
    ours = bernoulli_log_prob(logits, x)
    log_sigmoid = torch.nn.functional.logsigmoid
    reference = (x * log_sigmoid(logits) + (1 - x) * log_sigmoid(-logits)).sum((-3, -2, -1))
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-10)
    binary = Bernoulli(logits=logits[0]).log_prob(x[0]).sum((-3, -2, -1))
    torch.testing.assert_close(ours[0], binary, rtol=1e-12, atol=1e-10)


# --------------------------------------------------------------------------------------------- VAEConfig


def test_config_validation_names_the_field():
    bad = {"arch": "resnet", "activation": "gelu", "likelihood": "gaussian", "latent_dim": 0, "hidden_dims": (64, 0)}
    for field, value in [*bad.items(), ("latent_dim", -3), ("hidden_dims", ())]:
        with pytest.raises(ValueError, match=field):
            VAEConfig(**{field: value})


def test_config_survives_a_checkpoints_json():
    """A checkpoint stores the config as a plain dict: hidden_dims comes back from JSON a list, made a tuple again."""
    config = VAEConfig(latent_dim=5, arch="conv", hidden_dims=(300, 100), activation="tanh", likelihood="bernoulli")
    assert VAEConfig(**json.loads(json.dumps(asdict(config)))) == config


# --------------------------------------------------------------------------------------------- the VAE

D = 3
# The VAEs of these tests (make_vae(**ARCH[arch], likelihood=...).double()): a 3-D latent, ReLU, and
# hidden layers of 32 and 16 for the MLP, a dense layer of 16 after the convolutions.
ARCH = {
    "mlp": {"arch": "mlp", "latent_dim": D, "hidden_dims": (32, 16), "activation": "relu"},
    "conv": {"arch": "conv", "latent_dim": D, "hidden_dims": (16,), "activation": "relu"},
}
ARCH_LIK = [(a, lk) for a in ("mlp", "conv") for lk in ("bernoulli", "cb")]


def make_x(likelihood, batch=4, seed=7):
    x = torch.rand(batch, 1, 28, 28, generator=gen(seed), dtype=F64)
    return torch.bernoulli(x, generator=gen(seed + 1)) if likelihood == "bernoulli" else x


@torch.no_grad()
def with_torch_distributions(vae, x, k, seed):
    """log p(x|z), log p(z), log q(z|x), each (k, B), and KL(q(z|x) || p(z)) (B,), by torch.distributions, for
    z_i = mu + sigma * eps_i with the eps drawn as the model draws them from a generator seeded with seed."""
    mu, logvar = vae.encode(x)
    q, prior = Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)
    z = mu + q.scale * torch.randn((k, *mu.shape), generator=gen(seed), dtype=F64)
    logits = vae.decode(z)
    pixel = Bernoulli(logits=logits) if vae.config.likelihood == "bernoulli" else ContinuousBernoulli(logits=logits)
    log_px_z = pixel.log_prob(x.expand_as(logits)).sum((-3, -2, -1))
    return log_px_z, prior.log_prob(z).sum(-1), q.log_prob(z).sum(-1), kl_divergence(q, prior).sum(-1)


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_shapes_and_that_examples_are_independent(make_vae, arch):
    vae, x = make_vae(**ARCH[arch], likelihood="cb").double(), make_x("cb", batch=5)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, D)
    z = torch.randn(2, 5, D, generator=gen(1), dtype=F64)
    logits = vae.decode(z)
    assert logits.shape == (2, 5, 1, 28, 28)
    for i in range(2):  # leading dims are just a batch
        torch.testing.assert_close(logits[i], vae.decode(z[i]), rtol=1e-12, atol=1e-12)
    for ours, alone in zip((mu, logvar), vae.encode(x[2:3]), strict=True):  # each example is encoded on its own
        torch.testing.assert_close(alone[0], ours[2], rtol=1e-12, atol=1e-12)


def test_samples_are_prior_draws_decoded_and_the_mean_is_the_likelihoods(make_vae):
    bernoulli, cb = (make_vae(**ARCH["mlp"], likelihood=likelihood).double() for likelihood in ("bernoulli", "cb"))
    samples = cb.sample(6, generator=gen(11))
    assert torch.equal(samples, cb.decode(torch.randn(6, D, generator=gen(11), dtype=F64)))
    assert torch.equal(bernoulli.mean(samples), torch.sigmoid(samples))
    assert torch.equal(cb.mean(samples), cb_mean(samples))


def test_reparameterize_is_mu_plus_sigma_eps():
    mu = torch.randn(4, D, generator=gen(13), dtype=F64, requires_grad=True)
    logvar = torch.randn(4, D, generator=gen(14), dtype=F64, requires_grad=True)
    z = VAE.reparameterize(mu, logvar, generator=gen(99))
    eps = torch.randn(4, D, generator=gen(99), dtype=F64)
    torch.testing.assert_close(z, mu + torch.exp(logvar / 2) * eps, rtol=1e-15, atol=0)
    z.sum().backward()  # z is differentiable in mu and logvar: dz/dmu = 1, dz/dlogvar = sigma * eps / 2
    torch.testing.assert_close(mu.grad, torch.ones_like(mu), rtol=0, atol=0)
    torch.testing.assert_close(logvar.grad, torch.exp(logvar.detach() / 2) * eps / 2, rtol=1e-14, atol=0)


@pytest.mark.parametrize("arch, likelihood", ARCH_LIK)
def test_gradients_reach_every_parameter(make_vae, arch, likelihood):
    vae, x = make_vae(**ARCH[arch], likelihood=likelihood).double(), make_x(likelihood)
    # With beta = 0 (the reconstruction term alone) the encoder learns only via z = mu + sigma * eps.
    for beta in (0.0, 1.0):
        vae.zero_grad()
        vae.loss(x, beta=beta, generator=gen(3)).surrogate.backward()
        for name, p in vae.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (beta, name)


@pytest.mark.parametrize("arch, likelihood", ARCH_LIK)
def test_the_loss_is_the_negative_elbo_and_l1_the_elbo_with_a_sampled_kl(make_vae, arch, likelihood):
    """-ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)), the expectation the mean over k draws z = mu + sigma * eps;
    with beta, recon + beta KL; and -L_1 = -log p(x|z) - log p(z) + log q(z|x), on the same draw."""
    vae, x = make_vae(**ARCH[arch], likelihood=likelihood).double(), make_x(likelihood)
    for k, beta in ((1, 1.0), (1, 0.0), (4, 2.5)):
        log_px_z, _, _, kl = with_torch_distributions(vae, x, k, seed=21)
        recon = -log_px_z.mean(0)
        loss = vae.loss(x, k=k, beta=beta, generator=gen(21))
        assert loss.surrogate.shape == () and loss.surrogate.requires_grad and not loss.neg_bound.requires_grad
        torch.testing.assert_close(loss.recon, recon, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(loss.kl, kl, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss.neg_bound, loss.recon + beta * loss.kl, rtol=0, atol=0)
        torch.testing.assert_close(loss.surrogate.detach(), (recon + beta * kl).mean(), rtol=1e-10, atol=1e-8)
    log_px_z, log_pz, log_qz, _ = with_torch_distributions(vae, x, 1, seed=21)
    neg_l1 = vae.loss(x, objective="iwae", generator=gen(21)).neg_bound
    torch.testing.assert_close(neg_l1, -(log_px_z + log_pz - log_qz)[0], rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("arch, likelihood", [("mlp", "bernoulli"), ("mlp", "cb"), ("conv", "cb")])
@torch.no_grad()
def test_log_weights_and_the_iwae_bound_match_torch_distributions(make_vae, arch, likelihood):
    vae, x, k = make_vae(**ARCH[arch], likelihood=likelihood).double(), make_x(likelihood, batch=3), 5
    log_px_z, log_pz, log_qz, _ = with_torch_distributions(vae, x, k, seed=40)
    log_w = vae.log_weights(x, k, generator=gen(40))
    torch.testing.assert_close(log_w, log_px_z + log_pz - log_qz, rtol=1e-10, atol=1e-8)
    posterior = vae.encode(x)  # given the posterior, the same
    torch.testing.assert_close(vae.log_weights(x, k, gen(40), posterior=posterior), log_w, rtol=0, atol=0)
    # the IWAE bound is log mean exp of these weights, and chunking only splits the draws
    iwae = vae.iwae_bound(x, k, generator=gen(40))
    torch.testing.assert_close(iwae, torch.logsumexp(log_w, 0) - math.log(k), rtol=1e-13, atol=1e-12)
    g = gen(41)
    chunks = torch.cat([vae.log_weights(x, n, g, posterior=posterior) for n in (2, 2, 1)])
    chunked = vae.iwae_bound(x, k, chunk=2, generator=gen(41))
    torch.testing.assert_close(chunked, torch.logsumexp(chunks, 0) - math.log(k), rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("arch, likelihood", [("mlp", "bernoulli"), ("mlp", "cb"), ("conv", "bernoulli")])
@torch.no_grad()
def test_init_output_bias_is_the_logit_of_the_clipped_pixel_mean(make_vae, arch, likelihood):
    """Clipped to [0.001, 0.999]; lambda (not the mean) for a CB decoder; the conv decoder's one bias from the mean
    over pixels. With the output weights zeroed, the decoder gives these logits for any z."""
    vae = make_vae(**ARCH[arch], likelihood=likelihood).double()
    pixel_mean = torch.rand(1, 28, 28, generator=gen(30), dtype=F64)
    pixel_mean[0, 0, :5] = torch.tensor([0.0, 1.0, 1e-5, 1 - 1e-5, 0.5], dtype=F64)
    vae.init_output_bias(pixel_mean)
    vae.to_logits.weight.zero_()
    logits = vae.decode(torch.randn(3, D, generator=gen(31), dtype=F64))
    p = np.clip(pixel_mean.numpy(), 0.001, 0.999)
    p = torch.from_numpy(p.mean(keepdims=True) if arch == "conv" else p).expand(3, 1, 28, 28)
    torch.testing.assert_close(logits, torch.log(p) - torch.log1p(-p), rtol=1e-12, atol=1e-12)
