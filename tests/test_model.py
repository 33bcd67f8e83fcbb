"""model.py against independent references: mpmath at 50 digits, torch.distributions, closed forms.

The densities are checked to a few ulp where the brief of the module promises exactness; the networks are
checked for shapes, for the flow of gradients through the reparameterization, and for the ELBO / IWAE
weights being the quantities of the papers, recomputed here with torch.distributions.
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
from model import (
    VAE,
    VAEConfig,
    bernoulli_log_prob,
    cb_log_norm,
    cb_log_prob,
    cb_mean,
    kl_std_normal,
    log_likelihood,
    std_normal_log_prob,
)

F64, F32 = torch.float64, torch.float32


pytestmark = pytest.mark.usefixtures("one_thread")


EPS = {F64: torch.finfo(F64).eps, F32: torch.finfo(F32).eps}  # 2^-52, 2^-23

# ---------------------------------------------------------------------------------------------
# High-precision references (mpmath, 50 digits). Every reference is a function of the logit as a
# float, i.e. of the exact input the torch code sees (a float32 logit is first rounded to float32).
# ---------------------------------------------------------------------------------------------

MP_DPS = 50


def _mp_lambda(l):
    """lambda = sigmoid(l), computed in mpmath from the logit (never from a rounded lambda)."""
    return 1 / (1 + mpmath.exp(-mpmath.mpf(l)))


@cache
def ref_log_norm_quad(l):
    """log C(lambda) = -log int_0^1 lambda^x (1 - lambda)^(1 - x) dx, by numerical integration."""
    with mpmath.workdps(MP_DPS):
        lam = _mp_lambda(l)
        integral = mpmath.quad(lambda x: lam**x * (1 - lam) ** (1 - x), [0, 1])
        return -mpmath.log(integral)


def _mp_log_norm_closed(l):
    """log C = log|l| - log tanh(|l| / 2), log 2 at l = 0 (mpmath numbers in, out)."""
    a = abs(l)
    if a == 0:
        return mpmath.log(2)
    return mpmath.log(a) - mpmath.log(mpmath.tanh(a / 2))


@cache
def ref_log_norm_closed(l):
    with mpmath.workdps(MP_DPS):
        return _mp_log_norm_closed(mpmath.mpf(l))


@cache
def ref_log_norm_derivative(l):
    """d/dl log C(sigmoid(l)), numerically differentiated in mpmath at 50 digits."""
    with mpmath.workdps(MP_DPS):
        return mpmath.diff(_mp_log_norm_closed, mpmath.mpf(l))


@cache
def ref_cb_mean(l):
    """E[x] = int x p(x) dx / int p(x) dx, p(x) = lambda^x (1 - lambda)^(1 - x), by integration."""
    with mpmath.workdps(MP_DPS):
        lam = _mp_lambda(l)
        density = lambda x: lam**x * (1 - lam) ** (1 - x)  # noqa: E731
        return mpmath.quad(lambda x: x * density(x), [0, 1]) / mpmath.quad(density, [0, 1])


def rel_err(value, reference):
    return float(abs((mpmath.mpf(float(value)) - reference) / reference))


def as_input(l, dtype):
    """The float the torch code actually receives for the logit l in `dtype`."""
    return float(torch.tensor(l, dtype=dtype))


NEAR = [1e-8, 1e-3, 0.05, 0.0999, 0.1, 0.1001, 0.2, 0.3, 0.5, 1.0, 2.5, 7.0, 15.0, 20.0, 30.0, 40.0]
NEAR_LOGITS = [s * v for v in NEAR for s in (1, -1)]
FAR_LOGITS = [s * v for v in (100.0, 1e3, 1e4, 1e8) for s in (1, -1)]


def test_reference_quadrature_agrees_with_closed_form():
    """The two mpmath references agree far beyond float64, so either can be trusted."""
    for l in NEAR_LOGITS + [0.0]:
        assert abs(ref_log_norm_quad(l) - ref_log_norm_closed(l)) < mpmath.mpf(10) ** -30, l


# ---------------------------------------------------------------------------------------------
# kl_std_normal
# ---------------------------------------------------------------------------------------------


def test_kl_std_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 7, generator=g, dtype=F64) * 10
    logvar = torch.empty(64, 7, dtype=F64).uniform_(-30, 30, generator=g)
    mu[0], logvar[0] = 0.0, 0.0  # KL = 0 exactly
    mu[1, :3] = torch.tensor([100.0, -100.0, 1e-8], dtype=F64)
    logvar[1, :3] = torch.tensor([-40.0, 40.0, 1e-6], dtype=F64)
    ours = kl_std_normal(mu, logvar)
    ref = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    assert ours.shape == (64,)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert ours[0].item() == 0.0
    assert (ours >= 0).all()


# ---------------------------------------------------------------------------------------------
# cb_log_norm: value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_cb_log_norm_matches_mpmath_integral(dtype):
    """A few ulp everywhere: near 0 (series), at the series threshold 0.1 on both sides, and far out."""
    logits = [as_input(l, dtype) for l in NEAR_LOGITS]
    values = cb_log_norm(torch.tensor(logits, dtype=dtype))
    assert values.dtype == dtype
    worst = max((rel_err(v, ref_log_norm_quad(l)), l) for v, l in zip(values.tolist(), logits, strict=True))
    bound = 1e-14 if dtype == F64 else 1e-6
    assert worst[0] < bound, f"relative error {worst[0]:.3g} at logit {worst[1]!r}"
    assert cb_log_norm(torch.zeros(3, dtype=dtype)).tolist() == [float(torch.tensor(math.log(2), dtype=dtype))] * 3


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_cb_log_norm_far_logits_match_closed_form(dtype):
    """|l| >> 1: log C -> log|l| (no saturation, no overflow)."""
    logits = [as_input(l, dtype) for l in FAR_LOGITS]
    values = cb_log_norm(torch.tensor(logits, dtype=dtype))
    bound = 1e-14 if dtype == F64 else 1e-6
    for v, l in zip(values.tolist(), logits, strict=True):
        assert rel_err(v, ref_log_norm_closed(l)) < bound, l


def test_cb_log_norm_does_not_saturate_in_float32():
    """At l = -30 the exact value is log 30 - log tanh 15 = 3.40119738166...; ours has it in float32.

    (torch.distributions.ContinuousBernoulli clamps lambda to [eps, 1 - eps] in float32, and for
    |logit| >= 16 returns about 2.769 instead: that is the saturation this implementation avoids.)
    """
    value = cb_log_norm(torch.tensor(-30.0, dtype=F32)).item()
    assert abs(value - 3.4011973816621555) < 4e-7
    assert abs(value - math.log(30)) < 4e-7
    assert cb_log_norm(torch.tensor(30.0, dtype=F32)).item() == value


def test_cb_log_norm_agrees_with_torch_for_moderate_logits():
    """Where torch.distributions is accurate (float64, 0.2 <= |l| <= 10)."""
    l = torch.cat([torch.linspace(-10, -0.2, 300, dtype=F64), torch.linspace(0.2, 10, 300, dtype=F64)])
    ref = ContinuousBernoulli(logits=l)._cont_bern_log_norm()
    torch.testing.assert_close(cb_log_norm(l), ref, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# cb_log_norm: gradient
# ---------------------------------------------------------------------------------------------

GRAD_POINTS = [0.0, 1e-8, 0.05, 0.0999, 0.1, 0.1001, 0.3, 0.5, 1.0, 3.0, 20.0, 100.0, 1e4]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_cb_log_norm_gradient_finite_everywhere(dtype):
    l = torch.tensor([s * v for v in GRAD_POINTS for s in (1, -1)], dtype=dtype, requires_grad=True)
    cb_log_norm(l).sum().backward()
    assert torch.isfinite(l.grad).all(), l.grad
    assert l.grad[0].item() == 0.0 and l.grad[1].item() == 0.0  # d/dl log C = 0 at l = 0 (both signs of 0)
    # odd derivative of an even function
    torch.testing.assert_close(l.grad[0::2], -l.grad[1::2], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_cb_log_norm_gradient_matches_mpmath(dtype):
    """d/dl log C = 1/l - 1/sinh(l), against mpmath.diff of the exact function.

    Tolerances, from how the gradient is computed. Closed-form branch (|l| >= 0.1): for a = |l| it is
    -sigmoid(-a) - 1/expm1(a) + 1/a, a sum of terms that cancel near 0.1 (sizes ~10, result ~a/6), so its
    rounding error is a few ulp of the sum of the terms' sizes. Series branch (|l| < 0.1): a few ulp
    relative in float32; in float64 the truncated series' derivative is off by up to
    10 * 73/34214400 * 0.1^9 ~ 2.1e-14 (absolute) at the threshold, which dominates rounding there.
    """
    eps = EPS[dtype]
    points = [as_input(s * v, dtype) for v in GRAD_POINTS[1:] for s in (1, -1)]
    l = torch.tensor(points, dtype=dtype, requires_grad=True)
    cb_log_norm(l).sum().backward()
    for x, g in zip(points, l.grad.tolist(), strict=True):
        ref = ref_log_norm_derivative(x)
        err = abs(mpmath.mpf(g) - ref)
        a = abs(x)
        if a >= model._CB_LOG_NORM_SERIES_BELOW:
            term_sizes = math.exp(-a) / (1 + math.exp(-a)) + math.exp(-a) / -math.expm1(-a) + 1 / a
            assert err < 4 * eps * term_sizes, (x, g, ref)
        elif dtype == F64:
            assert err < 3e-14, (x, g, ref)
        else:
            assert err < 8 * eps * abs(ref), (x, g, ref)


@pytest.mark.parametrize("point", [0.0, 0.05, 0.0999, 0.0999999, 0.1000001, 0.1001, 0.7, 6.0])
def test_cb_log_norm_gradcheck(point):
    l = torch.tensor([point, -point], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cb_log_norm, (l,), eps=1e-6, atol=1e-9, rtol=1e-6)
    # At exactly 0 autograd's second derivative is 0, not 1/6: the series is in |l|^2, and autograd takes the
    # derivative of |l| there as sign(0) = 0.
    if point != 0.0:
        assert torch.autograd.gradgradcheck(cb_log_norm, (l,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# cb_log_prob: a normalized density
# ---------------------------------------------------------------------------------------------

# Gauss-Legendre on [0, 1]: exact for polynomials of degree < 2n; the CB density lambda^x (1-lambda)^(1-x)
# is C (1 - lambda) e^(l x), entire, so n = 64 nodes integrate it to rounding for |l| <= 40.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)
GL_X = torch.tensor((_GL_NODES + 1) / 2, dtype=F64)
GL_W = torch.tensor(_GL_WEIGHTS / 2, dtype=F64)
DENSITY_LOGITS = [0.0, 1e-6, 1e-3, 0.0999, 0.1, 0.3, 1.0, 5.0, 20.0, 40.0]


def _one_pixel_log_prob(l, x):
    """cb_log_prob for a 1-pixel 'image' per point: shape (N, 1, 1, 1) -> (N,)."""
    x = x.reshape(-1, 1, 1, 1)
    return cb_log_prob(torch.full_like(x, l), x)


def test_gauss_legendre_reference_is_exact_on_exponentials():
    for l in (-40.0, -3.0, 0.5, 40.0):
        integral = (GL_W * torch.exp(l * GL_X)).sum().item()
        assert abs(integral / math.expm1(l) * l - 1) < 1e-13


@pytest.mark.parametrize("l", [0.0] + [s * v for v in DENSITY_LOGITS[1:] for s in (1, -1)])
def test_cb_log_prob_integrates_to_one(l):
    density = torch.exp(_one_pixel_log_prob(l, GL_X))
    assert abs((GL_W * density).sum().item() - 1) < 1e-13


def test_bernoulli_part_alone_is_not_normalized():
    """Guards the test above: without log C the integral is 1/C != 1."""
    l = 3.0
    x = GL_X.reshape(-1, 1, 1, 1)
    integral = (GL_W * torch.exp(bernoulli_log_prob(torch.full_like(x, l), x))).sum().item()
    assert abs(integral - math.exp(-float(ref_log_norm_closed(l)))) < 1e-13
    assert abs(integral - 1) > 0.1


def test_cb_log_prob_matches_torch_per_pixel_sum():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 1, 28, 28, generator=g, dtype=F64) * 3
    logits[logits.abs() < 0.2] = 0.5  # keep torch's Taylor region out of it
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=F64)
    ref = ContinuousBernoulli(logits=logits).log_prob(x).sum((-3, -2, -1))
    ours = cb_log_prob(logits, x)
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# cb_mean
# ---------------------------------------------------------------------------------------------

MEAN_LOGITS = [0.0] + [s * v for v in (1e-6, 1e-3, 0.5, 0.999, 1.0, 1.001, 3.0, 30.0) for s in (1, -1)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_cb_mean_matches_mpmath(dtype):
    logits = [as_input(l, dtype) for l in MEAN_LOGITS]
    means = cb_mean(torch.tensor(logits, dtype=dtype))
    bound = 1e-14 if dtype == F64 else 1e-6
    for v, l in zip(means.tolist(), logits, strict=True):
        assert rel_err(v, ref_cb_mean(l)) < bound, (l, v, ref_cb_mean(l))
    assert means[0].item() == 0.5


def test_cb_mean_far_logits_and_symmetry():
    l = torch.tensor([50.0, 1e3, 1e8, 0.37, 2.0], dtype=F64)
    m = cb_mean(l)
    torch.testing.assert_close(m + cb_mean(-l), torch.ones_like(l), rtol=0, atol=2 * EPS[F64])
    # 1 / (1 - e^-l) - 1/l with e^-l negligible
    torch.testing.assert_close(m[:3], 1 - 1 / l[:3], rtol=EPS[F64], atol=0)
    assert torch.isfinite(cb_mean(torch.tensor([-1e30, 1e30], dtype=F32))).all()


def test_cb_mean_agrees_with_torch_for_moderate_logits():
    l = torch.cat([torch.linspace(-10, -0.2, 300, dtype=F64), torch.linspace(0.2, 10, 300, dtype=F64)])
    torch.testing.assert_close(cb_mean(l), ContinuousBernoulli(logits=l).mean, rtol=1e-9, atol=1e-12)


def test_cb_mean_gradcheck_across_series_threshold():
    l = torch.tensor([0.0, 0.3, 0.9999999, 1.0000001, -0.9999, -1.2, 4.0], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(cb_mean, (l,), eps=1e-6, atol=1e-9, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# bernoulli_log_prob, log_likelihood, std_normal_log_prob
# ---------------------------------------------------------------------------------------------


def test_bernoulli_log_prob_matches_torch_for_binary_x():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 1, 28, 28, generator=g, dtype=F64) * 8
    x = torch.bernoulli(torch.full_like(logits, 0.3), generator=g)
    ours = bernoulli_log_prob(logits, x)
    ref = Bernoulli(logits=logits).log_prob(x).sum((-3, -2, -1))
    assert ours.shape == (2, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-10)


def test_bernoulli_log_prob_for_grayscale_x():
    """Defined for x in [0, 1] too: x log sigmoid(l) + (1 - x) log sigmoid(-l), summed."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 1, 28, 28, generator=g, dtype=F64) * 8
    x = torch.rand(3, 1, 28, 28, generator=g, dtype=F64)
    ref = (x * torch.nn.functional.logsigmoid(logits) + (1 - x) * torch.nn.functional.logsigmoid(-logits)).sum(
        (-3, -2, -1)
    )
    torch.testing.assert_close(bernoulli_log_prob(logits, x), ref, rtol=1e-12, atol=1e-10)


def test_log_likelihood_dispatch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 1, 28, 28, generator=g, dtype=F64)
    x = torch.rand(2, 1, 28, 28, generator=g, dtype=F64)
    assert torch.equal(log_likelihood(logits, x, "bernoulli"), bernoulli_log_prob(logits, x))
    assert torch.equal(log_likelihood(logits, x, "cb"), cb_log_prob(logits, x))
    assert not torch.allclose(log_likelihood(logits, x, "bernoulli"), log_likelihood(logits, x, "cb"))
    with pytest.raises(ValueError, match="likelihood"):
        log_likelihood(logits, x, "gaussian")


def test_std_normal_log_prob():
    z = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(6), dtype=F64) * 3
    torch.testing.assert_close(std_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------------------------
# VAEConfig
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("arch", {"arch": "resnet"}),
        ("activation", {"activation": "gelu"}),
        ("likelihood", {"likelihood": "gaussian"}),
        ("latent_dim", {"latent_dim": 0}),
        ("latent_dim", {"latent_dim": -3}),
        ("hidden_dims", {"hidden_dims": ()}),
        ("hidden_dims", {"hidden_dims": (64, 0)}),
    ],
)
def test_config_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        VAEConfig(**kwargs)


def test_config_round_trip():
    config = VAEConfig(latent_dim=5, arch="conv", hidden_dims=(300, 100), activation="tanh", likelihood="bernoulli")
    assert VAEConfig(**asdict(config)) == config
    through_json = VAEConfig(**json.loads(json.dumps(asdict(config))))  # what a checkpoint does to tuples
    assert isinstance(json.loads(json.dumps(asdict(config)))["hidden_dims"], list)
    assert through_json == config
    assert through_json.hidden_dims == (300, 100) and isinstance(through_json.hidden_dims, tuple)


# ---------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------

D = 3
# The VAEs of these tests (make_vae(**ARCH[arch], likelihood=...).double()): a 3-D latent, ReLU, and
# hidden layers of 32 and 16 for the MLP, a dense layer of 16 after the convolutions.
ARCH = {
    "mlp": {"arch": "mlp", "latent_dim": D, "hidden_dims": (32, 16), "activation": "relu"},
    "conv": {"arch": "conv", "latent_dim": D, "hidden_dims": (16,), "activation": "relu"},
}


def make_x(likelihood, batch=4, seed=7):
    x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed + 1)) if likelihood == "bernoulli" else x


def gen(seed):
    return torch.Generator().manual_seed(seed)


ARCH_LIK = [(a, lk) for a in ("mlp", "conv") for lk in ("bernoulli", "cb")]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_shapes(make_vae, arch):
    vae = make_vae(**ARCH[arch], likelihood="cb").double()
    x = make_x("cb", batch=5)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (5, D)
    z = torch.randn(5, D, generator=gen(0), dtype=F64)
    assert vae.decode(z).shape == (5, 1, 28, 28)
    zk = torch.randn(2, 5, D, generator=gen(1), dtype=F64)
    logits_k = vae.decode(zk)
    assert logits_k.shape == (2, 5, 1, 28, 28)
    for i in range(2):  # leading dims are just a batch
        torch.testing.assert_close(logits_k[i], vae.decode(zk[i]), rtol=1e-12, atol=1e-12)
    # each example is encoded on its own
    mu0, logvar0 = vae.encode(x[2:3])
    torch.testing.assert_close(mu0[0], mu[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logvar0[0], logvar[2], rtol=1e-12, atol=1e-12)


def test_sample_is_decode_of_prior_draws(make_vae):
    vae = make_vae(**ARCH["mlp"], likelihood="cb").double()
    samples = vae.sample(6, generator=gen(11))
    assert samples.shape == (6, 1, 28, 28)
    z = torch.randn(6, D, generator=gen(11), dtype=F64)
    torch.testing.assert_close(samples, vae.decode(z), rtol=0, atol=0)


def test_mean_per_likelihood(make_vae):
    logits = torch.randn(2, 1, 28, 28, generator=gen(12), dtype=F64) * 4
    bernoulli, cb = (make_vae(**ARCH["mlp"], likelihood=likelihood).double() for likelihood in ("bernoulli", "cb"))
    torch.testing.assert_close(bernoulli.mean(logits), torch.sigmoid(logits), rtol=0, atol=0)
    torch.testing.assert_close(cb.mean(logits), cb_mean(logits), rtol=0, atol=0)


def test_reparameterize_is_mu_plus_sigma_eps():
    mu = torch.randn(4, D, generator=gen(13), dtype=F64, requires_grad=True)
    logvar = torch.randn(4, D, generator=gen(14), dtype=F64, requires_grad=True)
    z = VAE.reparameterize(mu, logvar, generator=gen(99))
    eps = torch.randn(4, D, generator=gen(99), dtype=F64)
    torch.testing.assert_close(z, mu + torch.exp(logvar / 2) * eps, rtol=1e-15, atol=0)
    # z is differentiable in mu and logvar: dz/dmu = 1, dz/dlogvar = sigma * eps / 2
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu), rtol=0, atol=0)
    torch.testing.assert_close(logvar.grad, torch.exp(logvar.detach() / 2) * eps / 2, rtol=1e-14, atol=0)


def test_reparameterize_samples_q():
    """Statistically: z ~ N(mu, exp(logvar)) (generous 5-sigma bounds on 20000 draws)."""
    n = 20000
    mu = torch.tensor([1.5, -3.0], dtype=F64).expand(n, 2)
    logvar = torch.tensor([0.0, 2.0 * math.log(0.2)], dtype=F64).expand(n, 2)
    z = VAE.reparameterize(mu, logvar, generator=gen(15))
    sigma = torch.tensor([1.0, 0.2], dtype=F64)
    assert ((z.mean(0) - mu[0]).abs() < 5 * sigma / math.sqrt(n)).all()
    assert ((z.std(0) / sigma - 1).abs() < 5 / math.sqrt(2 * n)).all()


@pytest.mark.parametrize("arch, likelihood", ARCH_LIK)
def test_gradients_reach_every_parameter(make_vae, arch, likelihood):
    vae = make_vae(**ARCH[arch], likelihood=likelihood).double()
    x = make_x(likelihood)
    # With beta = 0 (the reconstruction term alone) the encoder learns only via z = mu + sigma * eps.
    for beta in (0.0, 1.0):
        vae.zero_grad()
        vae.loss(x, beta=beta, generator=gen(3)).surrogate.backward()
        for name, p in vae.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (beta, name)


@pytest.mark.parametrize("arch, likelihood", ARCH_LIK)
def test_the_loss_is_the_negative_elbo(make_vae, arch, likelihood):
    """-ELBO = -E_q[log p(x|z)] + KL(q(z|x) || p(z)), one z = mu + sigma * eps per image, recomputed with
    torch.distributions on the same eps; with beta, recon + beta KL."""
    vae = make_vae(**ARCH[arch], likelihood=likelihood).double()
    x = make_x(likelihood)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn(mu.shape, generator=gen(21), dtype=F64)
        logits = vae.decode(z)
        pixel = Bernoulli(logits=logits) if likelihood == "bernoulli" else ContinuousBernoulli(logits=logits)
        recon = -pixel.log_prob(x).sum((-3, -2, -1))
        kl = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1)
    for beta in (1.0, 0.0, 2.5):
        loss = vae.loss(x, beta=beta, generator=gen(21))
        assert loss.surrogate.shape == () and loss.surrogate.requires_grad
        assert not loss.neg_bound.requires_grad
        torch.testing.assert_close(loss.recon, recon, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(loss.kl, kl, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss.neg_bound, loss.recon + beta * loss.kl, rtol=0, atol=0)
        torch.testing.assert_close(loss.surrogate.detach(), (recon + beta * kl).mean(), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("likelihood", ["bernoulli", "cb"])
def test_init_output_bias_mlp(make_vae, likelihood):
    vae = make_vae(**ARCH["mlp"], likelihood=likelihood).double()
    pixel_mean = torch.rand(1, 28, 28, generator=gen(30), dtype=F64)
    pixel_mean[0, 0, :5] = torch.tensor([0.0, 1.0, 1e-5, 1 - 1e-5, 0.5], dtype=F64)
    vae.init_output_bias(pixel_mean)
    p = np.clip(pixel_mean.numpy().reshape(-1), 0.001, 0.999)
    expected = torch.from_numpy(np.log(p) - np.log1p(-p))
    torch.testing.assert_close(vae.to_logits.bias.detach(), expected, rtol=1e-13, atol=1e-13)
    assert vae.to_logits.bias[0].item() == pytest.approx(math.log(0.001 / 0.999), rel=1e-13)
    assert vae.to_logits.bias[1].item() == pytest.approx(math.log(0.999 / 0.001), rel=1e-13)
    # With the output weights zeroed, the decoder outputs exactly these logits for any z.
    with torch.no_grad():
        vae.to_logits.weight.zero_()
        logits = vae.decode(torch.randn(3, D, generator=gen(31), dtype=F64))
    torch.testing.assert_close(logits, expected.reshape(1, 1, 28, 28).expand(3, 1, 28, 28), rtol=1e-13, atol=1e-13)
    if likelihood == "bernoulli":  # then the predicted image is the clipped data mean
        torch.testing.assert_close(vae.mean(logits[0, 0]), torch.from_numpy(p.reshape(28, 28)), rtol=1e-12, atol=0)


def test_init_output_bias_conv_sets_the_scalar(make_vae):
    vae = make_vae(**ARCH["conv"], likelihood="bernoulli").double()
    pixel_mean = torch.rand(1, 28, 28, generator=gen(32), dtype=F64) * 0.5
    pixel_mean[0, :3] = 0.0  # clipped to 0.001 before averaging
    vae.init_output_bias(pixel_mean)
    p = float(np.clip(pixel_mean.numpy(), 0.001, 0.999).mean())
    assert vae.to_logits.bias.shape == (1,)
    assert vae.to_logits.bias.item() == pytest.approx(math.log(p / (1 - p)), rel=1e-12)
    with torch.no_grad():
        vae.to_logits.weight.zero_()
        logits = vae.decode(torch.randn(2, D, generator=gen(33), dtype=F64))
    torch.testing.assert_close(logits, torch.full_like(logits, math.log(p / (1 - p))), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch, likelihood", [("mlp", "bernoulli"), ("mlp", "cb"), ("conv", "cb")])
def test_log_weights_match_torch_distributions(make_vae, arch, likelihood):
    vae = make_vae(**ARCH[arch], likelihood=likelihood).double()
    x = make_x(likelihood, batch=3)
    k = 5
    with torch.no_grad():
        log_w = vae.log_weights(x, k, generator=gen(40))
        assert log_w.shape == (k, 3)
        mu, logvar = vae.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn((k, *mu.shape), generator=gen(40), dtype=F64)  # (k, B, d)
        logits = vae.decode(z)
        pixel = Bernoulli(logits=logits) if likelihood == "bernoulli" else ContinuousBernoulli(logits=logits)
        log_px_z = pixel.log_prob(x.expand_as(logits)).sum((-3, -2, -1))
        log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = Normal(mu, std).log_prob(z).sum(-1)
        torch.testing.assert_close(log_w, log_px_z + log_pz - log_qz, rtol=1e-10, atol=1e-8)
        # given the posterior, the same
        torch.testing.assert_close(vae.log_weights(x, k, gen(40), posterior=(mu, logvar)), log_w, rtol=0, atol=0)
        # the IWAE bound is log mean exp of these weights, and chunking only splits the draws
        iwae = vae.iwae_bound(x, k, generator=gen(40))
        torch.testing.assert_close(iwae, torch.logsumexp(log_w, 0) - math.log(k), rtol=1e-13, atol=1e-12)
        g = gen(41)
        chunks = [vae.log_weights(x, n, g, posterior=(mu, logvar)) for n in (2, 2, 1)]
        chunked_ref = torch.logsumexp(torch.cat(chunks), 0) - math.log(k)
        chunked = vae.iwae_bound(x, k, chunk=2, generator=gen(41))
        torch.testing.assert_close(chunked, chunked_ref, rtol=1e-13, atol=1e-12)
