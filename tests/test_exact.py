"""The exact log-likelihood of a 2-D model (scoring.posterior_grid), against what it must equal: a constant
integrand's known integral, stand-in decoders whose p(x) is known in closed form (a posterior with a second mode
that q never sees, a posterior sharper than q), an independent brute-force quadrature with torch.distributions,
the ELBO plus KL(q || p(z|x)) computed by other code, and the importance-weighted bounds, which rise towards it.
And the notebook, which calls these functions and must not re-define what the modules provide."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

import evaluate
import scoring
from checkpoints import load_checkpoint
from data import load_test_set
from model import VAE, VAEConfig, diag_normal_log_prob, log_likelihood, std_normal_log_prob

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_run, data_dir, one_thread_for_the_module):
    """A 2-D Bernoulli model trained for 3 epochs on 2048 images (shared: read-only), its first 20 test images
    as scored, and their posterior grids."""
    out = tiny_run("--latent-dim", "2", "--batch-size", "64", "--limit", "2048", epochs=3)
    state, model = load_checkpoint(out / "ckpt.pt")
    x, _ = load_test_set(data_dir, state["train_config"]["pixels"], "cpu", 20)
    return out, model, x, [scoring.posterior_grid(model, image) for image in x]


def log_prior(z):
    return Independent(Normal(torch.zeros(2, dtype=torch.float64), 1.0), 1).log_prob(z)


@torch.inference_mode()
def brute_force_log_px(model, image, half_width=5.0, n=401):
    """log p(x) by the trapezoid rule on a fixed grid over [-5, 5]^2 with torch.distributions."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (n * n, 2)
    weights = torch.full((n,), 2 * half_width / (n - 1), dtype=torch.float64)
    weights[[0, -1]] /= 2
    log_w = (weights.log()[:, None] + weights.log()[None, :]).reshape(-1)
    parts = z.split(8192)
    log_px_z = [Independent(Bernoulli(logits=model.decode(p.float()).double()), 3).log_prob(image) for p in parts]
    return torch.logsumexp(torch.cat(log_px_z) + log_prior(z) + log_w, 0).item()


@torch.inference_mode()
def test_a_decoder_that_ignores_z_integrates_the_prior_to_one(make_vae):
    """p(x|z) = p(x) for every z, with q far from the prior (mu = 3, sigma = 0.1): the grid, wherever q puts it,
    must integrate N(0, I) to 1, so log p(x) is the decoder's log-likelihood itself, to the quadrature's accuracy."""
    model = make_vae(latent_dim=2)
    for p in (*model.decoder.parameters(), model.to_logits.weight, model.to_mu.weight, model.to_logvar.weight):
        p.zero_()
    model.to_logits.bias.copy_(torch.linspace(-4, 4, 784))
    model.to_mu.bias.fill_(3.0)
    model.to_logvar.bias.fill_(2 * math.log(0.1))
    logits = model.to_logits.bias.reshape(1, 28, 28).double()
    for image in torch.bernoulli(torch.full((3, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1)):
        grid = scoring.posterior_grid(model, image)
        assert grid.border_nats >= scoring.NEGLIGIBLE_NATS and grid.resolution_nats <= scoring.RESOLUTION_NATS
        own = model.log_px_z(image[None], torch.zeros(1, 1, 2)).item()  # the same at every z
        assert grid.log_px == pytest.approx(own, abs=1e-9)  # the prior, integrated, is 1
        expected = Independent(Bernoulli(logits=logits), 3).log_prob(image.double()).item()
        assert own == pytest.approx(expected, abs=1e-3)  # float32 logits, summed over 784 pixels


def test_the_grid_agrees_with_an_independent_brute_force_quadrature(trained):
    _, model, x, grids = trained
    assert grids[0].log_px == pytest.approx(brute_force_log_px(model, x[0]), abs=1e-3)
    assert (model.encode(x[:1])[0].abs() < 3).all()  # the posterior lies well inside the reference's box


def test_a_grid_that_starts_too_narrow_widens_along_both_axes_until_the_border_is_negligible(trained, monkeypatch):
    _, model, x, grids = trained
    mu, logvar = (t[0].double() for t in model.encode(x[:1]))
    monkeypatch.setattr(scoring, "GRID_HALF_WIDTH", 0.5)  # half a standard deviation of q: far too narrow
    narrow = scoring.posterior_grid(model, x[0], box=(mu, mu))  # and no scan to place it
    assert narrow.border_nats >= scoring.NEGLIGIBLE_NATS
    spans = torch.stack([narrow.z1[-1] - narrow.z1[0], narrow.z2[-1] - narrow.z2[0]])
    assert (spans > 8 * torch.exp(0.5 * logvar)).all(), spans  # 16 times its first span, on each axis
    assert narrow.log_px == pytest.approx(grids[0].log_px, abs=scoring.RESOLUTION_NATS)


def test_the_grid_holds_log_p_x_z_at_its_points_after_refining(trained, monkeypatch):
    """log_joint[i, j] is log p(x|z) + log p(z) at (z1[i], z2[j]), computed here with torch.distributions, on a
    grid with a different number of points per axis, refined twice (its old points kept, not decoded again)."""
    _, model, x, _ = trained
    mu = model.encode(x[:1])[0][0].double()
    box = (mu - torch.tensor([0.5, 0.3]), mu + torch.tensor([0.5, 0.3]))
    monkeypatch.setattr(scoring, "GRID_HALF_WIDTH", 0.0)  # the grid is the box: no window around q...
    monkeypatch.setattr(scoring, "NEGLIGIBLE_NATS", 0.0)  # ...and no widening
    monkeypatch.setattr(scoring, "RESOLUTION_NATS", math.inf)  # no refining
    first = scoring.posterior_grid(model, x[0], box=box)
    n1, n2 = (4 * (len(z) - 1) + 1 for z in (first.z1, first.z2))  # two refinements
    monkeypatch.setattr(scoring, "RESOLUTION_NATS", 0.0)  # refine while it may: twice
    monkeypatch.setattr(scoring, "MAX_POINTS", n1 * n2)
    grid = scoring.posterior_grid(model, x[0], box=box)
    assert grid.log_joint.shape == (n1, n2) and n1 != n2
    torch.testing.assert_close(grid.log_joint[::4, ::4], first.log_joint, rtol=0, atol=0)  # the same points
    z = torch.stack(torch.meshgrid(grid.z1, grid.z2, indexing="ij"), -1)  # (n1, n2, 2)
    with torch.no_grad():
        expected = Independent(Bernoulli(logits=model.decode(z.float()).double()), 3).log_prob(x[0].double())
    torch.testing.assert_close(grid.log_joint, expected + log_prior(z), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- known integrals


class MixtureDecoder(VAE):
    """A stand-in 2-D model for IMAGE (its first pixel on, the others off) with p(x, z) = sum_k w_k N(z; m_k,
    s_k^2 I), so that p(x) = sum_k w_k: the first pixel's logit is that of p(x|z) = p(x, z) / p(z) (at most 1
    where the test uses it), every other pixel's is -40 (off with probability 1 - 4e-18). q(z|x) is N(q_mean,
    q_sd^2 I) whatever x is."""

    def __init__(self, modes, q_mean, q_sd):
        super().__init__(VAEConfig(latent_dim=2, hidden_dims=(4,)))
        self.modes, self.q_mean, self.q_sd = modes, torch.tensor(q_mean), q_sd

    def encode(self, x, y=None):
        return self.q_mean.expand(len(x), 2), torch.full((len(x), 2), 2 * math.log(self.q_sd))

    def log_px_z_of_image(self, z):
        """log p(IMAGE|z) = log sum_k w_k N(z; m_k, s_k^2 I) - log N(z; 0, I), float64: (...)."""
        z = z.double()
        terms = [
            math.log(w) + diag_normal_log_prob(z, torch.tensor(m), torch.tensor(2 * math.log(s)))
            for w, m, s in self.modes
        ]
        return torch.logsumexp(torch.stack(terms), 0) - std_normal_log_prob(z)

    def decode(self, z, y=None):
        log_p = self.log_px_z_of_image(z)
        logits = torch.full((*z.shape[:-1], 1, 28, 28), -40.0, dtype=torch.float64)
        logits[..., 0, 0, 0] = log_p - torch.log(-torch.expm1(log_p))  # the logit of p = e^log_p
        return logits.to(z.dtype)

    def closed_form(self):
        """log p(IMAGE) = log sum_k w_k, and the other pixels' log-probability of being off (~ -3e-15)."""
        z = scoring.grid_points(*(torch.linspace(-8, 8, 401, dtype=torch.float64),) * 2)
        assert self.log_px_z_of_image(z).max() < 0  # p(x|z) <= 1: a Bernoulli's probability
        off = 783 * math.log1p(-torch.sigmoid(torch.tensor(-40.0, dtype=torch.float64)).item())
        return math.log(sum(w for w, _, _ in self.modes)) + off


IMAGE = torch.zeros(1, 28, 28).index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(0)), torch.tensor(1.0))


def test_a_second_mode_behind_a_deep_valley_that_q_never_sees_is_found():
    """q sits on the smaller of two posterior modes, 3.9 apart; the other holds 99% of p(x) and peaks 3 nats
    higher, behind a valley hundreds of nats deep: a grid around q alone, widened until its border is 30 nats
    below its peak, never reaches it. The scan does, and log p(x) is right to 0.01 nats."""
    model = MixtureDecoder([(1e-6, (1.0, -1.0), 0.05), (1e-4, (-1.5, 2.0), 0.1)], (1.0, -1.0), 0.05).eval()
    truth = model.closed_form()
    grid = scoring.posterior_grid(model, IMAGE)
    assert grid.log_px == pytest.approx(truth, abs=0.01)
    assert grid.border_nats >= scoring.NEGLIGIBLE_NATS and grid.resolution_nats <= scoring.RESOLUTION_NATS
    around_q = scoring.posterior_grid(model, IMAGE, box=(model.q_mean.double(),) * 2)  # no scan: the old grid
    assert around_q.log_px == pytest.approx(math.log(1e-6), abs=0.01)  # it sees the small mode only
    assert around_q.log_px < truth - 4


def test_a_posterior_sharper_than_q_is_refined_until_resolved_or_reported(monkeypatch):
    """A posterior of standard deviation 0.01 under a q of 0.3: the first grid, 0.15 apart, falls between its
    peaks; halving its points changes its integral by nats, so it is refined until log p(x) is right to 0.01
    nats. Where refining may not go on (MAX_POINTS), resolution_nats reports how far it is from resolved."""
    model = MixtureDecoder([(5e-5, (0.3, -0.2), 0.01)], (0.3, -0.2), 0.3).eval()
    truth = model.closed_form()
    grid = scoring.posterior_grid(model, IMAGE)
    assert grid.log_px == pytest.approx(truth, abs=0.01) and grid.resolution_nats <= scoring.RESOLUTION_NATS
    spacing = (grid.z1[1] - grid.z1[0]).item()
    assert spacing < scoring.GRID_SPACING * 0.3 / 8  # refined at least three times
    monkeypatch.setattr(scoring, "MAX_POINTS", 50**2)  # the first grid, and no refining
    coarse = scoring.posterior_grid(model, IMAGE)
    assert coarse.z1[1] - coarse.z1[0] > 4 * spacing
    assert coarse.resolution_nats > 1 and abs(coarse.log_px - truth) > 0.01  # reported: far from resolved


@pytest.mark.parametrize("likelihood", ["bernoulli", "cb"])
def test_the_scan_may_score_every_image_at_once_because_log_p_x_given_z_is_linear_in_x(likelihood):
    """scoring.scan_prior's shortcut: log p(x|z) = x . l + log p(0|z) (a likelihood without it would need
    another scan)."""
    generator = torch.Generator().manual_seed(0)
    logits = 8 * torch.randn(5, 1, 28, 28, dtype=torch.float64, generator=generator)
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64, generator=generator)
    linear = (x * logits).flatten(1).sum(1) + log_likelihood(logits, torch.zeros_like(x), likelihood)
    torch.testing.assert_close(linear, log_likelihood(logits, x, likelihood), rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------------------------- the bounds


def test_elbo_plus_kl_to_the_posterior_is_log_px(trained):
    """log p(x) = ELBO(x) + KL(q(z|x) || p(z|x)) (Kingma & Welling 2014, eq. (1)), each side by its own code:
    the ELBO by Gauss-Hermite under q with the closed-form KL, the other two on the posterior grid."""
    _, model, x, grids = trained
    log_px = torch.tensor([g.log_px for g in grids], dtype=torch.float64)
    with torch.no_grad():
        mu, logvar = model.encode(x)
    kl = torch.tensor([g.kl_from(m, lv) for g, m, lv in zip(grids, mu, logvar, strict=True)], dtype=torch.float64)
    elbo = scoring.exact_elbo(model, x)
    assert (kl > 0.05).all()  # q is not the posterior: the identity has a gap to account for
    assert (elbo + kl - log_px).abs().max() < 0.01
    # and the ELBO is what the model's one-sample estimator estimates, within its noise
    repeats = 400
    loss = model.loss(x.repeat(repeats, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    sampled = -(loss.recon + loss.kl).reshape(repeats, -1).double()
    assert ((sampled.mean(0) - elbo).abs() < 5 * sampled.std(0) / math.sqrt(repeats)).all()


def test_the_bounds_rise_with_k_towards_the_exact_log_px(trained):
    """Burda et al. (2016), Theorem 1: ELBO = L_1 <= L_k <= L_(k+1) <= log p(x), L_k -> log p(x); on the mean over
    20 test images, each L_k averaged over independent draws, compared within their standard errors."""
    _, model, x, grids = trained
    log_px = torch.tensor([g.log_px for g in grids], dtype=torch.float64).mean()
    generator, means, errors = torch.Generator().manual_seed(0), [], []
    for k, repeats in ((1, 100), (10, 40), (100, 10), (1000, 3), (5000, 2), (50000, 1)):
        draws = torch.stack(
            [scoring.log_likelihood_estimates(model, x, k, 20, generator).double().mean() for _ in range(repeats)]
        )
        means.append(draws.mean())
        # one draw at k = 50000: its noise is at most that of k = 5000, the bound's spread falling with k
        errors.append(draws.std() / math.sqrt(repeats) if repeats > 1 else errors[-1])
    for mean, error in zip(means, errors, strict=True):
        assert mean <= log_px + 4 * error + 1e-3
    for i in range(len(means) - 1):
        assert means[i] < means[i + 1] + 4 * math.hypot(errors[i], errors[i + 1])
    assert means[1] - means[0] > 4 * math.hypot(errors[0], errors[1])  # the bound does tighten
    assert log_px - means[0] > 0.1 and log_px - means[-1] < 0.1


# --------------------------------------------------------------------------------------------- evaluate.py


def test_evaluate_reports_the_exact_nll_of_its_worst_grid_and_a_record_per_image(trained, tmp_path):
    """The mean exact -log p(x), and the worst of the grids: the least border margin, the largest change on
    halving. With --per-image, for each of the --exact-images, log p(x) and its check by a second grid, the ELBO
    and KL(q || p(z|x)) (which add up to log p(x)), the bounds L_5000 and L_50000, and the command that made them."""
    out, model, x, _ = trained
    run = ["--checkpoint", str(out / "ckpt.pt"), "--device", "cpu", "--limit", "30", "--exact-images"]
    results = evaluate.main([*run, "10", "--k", "100", "--json", str(tmp_path / "eval.json")])
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["test_nll_exact"] == results["test_nll_exact"] and written["exact_n_images"] == 10
    grids = scoring.posterior_grids(model, x[:10])
    assert written["test_nll_exact"] == pytest.approx(-sum(g.log_px for g in grids) / 10, abs=1e-9)
    assert written["exact_border_nats"] == min(g.border_nats for g in grids) >= scoring.NEGLIGIBLE_NATS
    assert written["exact_resolution_nats"] == max(g.resolution_nats for g in grids) <= scoring.RESOLUTION_NATS
    assert len({round(g.border_nats, 6) for g in grids}) > 1  # the min and the max differ here
    # -L_k >= -log p(x): the importance-sampled NLL on the same 10 images lies above the exact one
    assert scoring.iwae_nll(model, x[:10], 100, generator=torch.Generator().manual_seed(0)) > written["test_nll_exact"]

    evaluate.main([*run, "3", "--k", "10", "--per-image", str(tmp_path / "per.json")])
    made_by, records = (json.loads((tmp_path / "per.json").read_text())[key] for key in ("made_by", "images"))
    assert made_by["command"].startswith("python evaluate.py --checkpoint") and made_by["wall_seconds"] > 0
    assert {"machine", "threads", "torch"} <= made_by.keys()
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["label"] for r in records] == load_test_set(ROOT / "data", "binary", "cpu", 3)[1].tolist()
    for r, g in zip(records, scoring.posterior_grids(model, x[:3]), strict=True):
        assert r["log_px"] == pytest.approx(g.log_px, abs=1e-9)
        assert r["log_px_check"] == pytest.approx(r["log_px"], abs=2 * scoring.RESOLUTION_NATS)
        assert r["elbo"] + r["kl_q_posterior"] == pytest.approx(r["log_px"], abs=0.01)
        assert r["elbo"] < r["l_5000"] and r["elbo"] < r["l_50000"]


def test_evaluate_reports_no_exact_nll_above_two_dimensions_or_when_told_not_to(tiny_run, trained):
    out = tiny_run("--latent-dim", "3")
    results = evaluate.main(["--checkpoint", str(out / "ckpt.pt"), "--k", "2", "--limit", "10", "--device", "cpu"])
    assert "test_nll_exact" not in results and "exact_n_images" not in results
    argv = ["--checkpoint", str(trained[0] / "ckpt.pt"), "--k", "2", "--limit", "10", "--exact-images", "0"]
    assert not {k for k in evaluate.main([*argv, "--device", "cpu"]) if "exact" in k}
    with pytest.raises(ValueError, match="2-D latent"):
        scoring.posterior_grid(load_checkpoint(out / "ckpt.pt")[1], torch.zeros(1, 28, 28))


# --------------------------------------------------------------------------------------------- the notebook


def notebook_cells():
    return [c for c in json.loads((ROOT / "VAE.ipynb").read_text())["cells"] if c["cell_type"] == "code"]


def defined_names(code):
    """Names of the functions and classes defined anywhere in the code."""
    nodes = ast.walk(ast.parse(code))
    return {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_the_notebook_defines_nothing_the_modules_provide_and_runs_quick_into_an_ignored_folder():
    code = "\n".join("".join(c["source"]) for c in notebook_cells())
    modules = set().union(*(defined_names(path.read_text()) for path in ROOT.glob("*.py")))
    assert {"VAE", "reparameterize", "cb_log_norm", "kl_std_normal", "posterior_grid"} <= modules
    assert not defined_names(code) & modules, defined_names(code) & modules
    assert "class VAE" not in code and "def reparameterize" not in code
    assert 'os.environ.get("VAE_NOTEBOOK") != "full"' in code  # quick unless asked for in full
    run_dir = ast.literal_eval(code.split("RUN_DIR = ", 1)[1].split()[0])
    assert run_dir.split("/")[0] + "/" in (ROOT / ".gitignore").read_text().split() and "plots" not in run_dir


def test_the_committed_notebook_holds_the_outputs_of_a_full_run():
    cells = notebook_cells()
    assert all(c["outputs"] for c in cells), "a code cell without outputs: run the README's notebook command"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), "the outputs are not those of one run, top to bottom"
    first = "".join("".join(o["text"]) for o in cells[0]["outputs"] if o["output_type"] == "stream")
    assert "quick: False" in first, "the committed outputs are those of a quick run"
