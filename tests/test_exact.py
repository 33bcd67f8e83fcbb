"""The exact log-likelihood of a 2-D model (scoring.posterior_grid), against what it must equal: a constant
integrand's known integral, an independent brute-force quadrature with torch.distributions, the ELBO plus
KL(q || p(z|x)) computed by other code, and the importance-weighted bounds, which rise towards it. And the
notebook, which calls these functions and must not re-define what the modules provide."""

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

ROOT = Path(__file__).resolve().parent.parent
TRAINED_2D = ("--latent-dim", "2", "--batch-size", "64", "--limit", "2048")  # after conftest's TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tiny_run, data_dir):
    """A 2-D Bernoulli model trained for 3 epochs on 2048 images (shared: read-only), and its first 20 test
    images as scored."""
    out = tiny_run(*TRAINED_2D, epochs=3)
    state, model = load_checkpoint(out / "ckpt.pt")
    x, _ = load_test_set(data_dir, state["train_config"]["pixels"], "cpu", 20)
    return out, model, x


@torch.inference_mode()
def brute_force_log_px(model, x, half_width=5.0, n=401):
    """log p(x) by the trapezoid rule on a fixed grid over [-5, 5]^2 with torch.distributions: (B,)."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # (n * n, 2)
    weights = torch.full((n,), 2 * half_width / (n - 1), dtype=torch.float64)
    weights[[0, -1]] /= 2
    log_w = (weights.log()[:, None] + weights.log()[None, :]).reshape(-1)
    prior = Independent(Normal(torch.zeros(2, dtype=torch.float64), 1.0), 1).log_prob(z)
    out = []
    for image in x:
        log_px_z = torch.cat(
            [
                Independent(Bernoulli(logits=model.decode(part.float()).double()), 3).log_prob(image)
                for part in z.split(8192)
            ]
        )
        out.append(torch.logsumexp(log_px_z + prior + log_w, 0))
    return torch.stack(out)


@pytest.fixture
def constant_decoder(make_vae):
    """A 2-D model whose decoder's logits do not depend on z, with q far from the prior (mu = 3, sigma = 0.1)."""
    model = make_vae(latent_dim=2)
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.zero_()
        model.to_logits.weight.zero_()
        model.to_logits.bias.copy_(torch.linspace(-4, 4, 784))
        model.to_mu.weight.zero_()
        model.to_mu.bias.fill_(3.0)
        model.to_logvar.weight.zero_()
        model.to_logvar.bias.fill_(2 * math.log(0.1))
    x = torch.bernoulli(torch.full((3, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(1))
    logits = model.to_logits.bias.reshape(1, 28, 28).double()
    log_px = torch.stack([Independent(Bernoulli(logits=logits), 3).log_prob(image.double()) for image in x])
    return model.eval(), x, log_px


@torch.inference_mode()
def test_a_decoder_that_ignores_z_integrates_the_prior_to_one(constant_decoder):
    """p(x|z) = p(x) for every z: the grid, wherever q puts it, must integrate N(0, I) to 1, so log p(x) is
    the decoder's log-likelihood itself, to the quadrature's accuracy."""
    model, x, log_px = constant_decoder
    for image, expected in zip(x, log_px, strict=True):
        grid = scoring.posterior_grid(model, image)
        assert grid.border_nats >= scoring.NEGLIGIBLE_NATS
        own = model.log_px_z(image[None], torch.zeros(1, 1, 2)).item()  # the same at every z
        assert grid.log_px == pytest.approx(own, abs=1e-9)  # the prior, integrated, is 1
        assert own == pytest.approx(expected.item(), abs=1e-3)  # float32 logits, summed over 784 pixels


def test_the_grid_agrees_with_an_independent_brute_force_quadrature(trained):
    _, model, x = trained
    ours = torch.tensor([scoring.posterior_grid(model, image).log_px for image in x[:1]], dtype=torch.float64)
    reference = brute_force_log_px(model, x[:1])
    assert (ours - reference).abs().max() < 1e-3, (ours, reference)
    assert (model.encode(x[:1])[0].abs() < 3).all()  # the posterior lies well inside the reference's box


def test_a_grid_that_starts_too_narrow_widens_until_the_border_is_negligible(trained, monkeypatch):
    _, model, x = trained
    wide = scoring.posterior_grid(model, x[0])
    monkeypatch.setattr(scoring, "GRID_HALF_WIDTH", 0.5)  # half a standard deviation of q: far too narrow
    narrow = scoring.posterior_grid(model, x[0])
    assert narrow.border_nats >= scoring.NEGLIGIBLE_NATS
    assert narrow.z1[-1] - narrow.z1[0] > 8 * math.exp(0.5 * model.encode(x[:1])[1][0, 0].item())
    assert narrow.log_px == pytest.approx(wide.log_px, abs=1e-3)


def test_elbo_plus_kl_to_the_posterior_is_log_px(trained):
    """log p(x) = ELBO(x) + KL(q(z|x) || p(z|x)) (Kingma & Welling 2014, eq. (1)), each side by its own code:
    the ELBO by Gauss-Hermite under q with the closed-form KL, the other two on the posterior grid."""
    _, model, x = trained
    grids = [scoring.posterior_grid(model, image) for image in x]
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
    standard_error = sampled.std(0) / math.sqrt(repeats)
    assert ((sampled.mean(0) - elbo).abs() < 5 * standard_error).all()


def test_the_bounds_rise_with_k_towards_the_exact_log_px(trained):
    """Burda et al. (2016), Theorem 1: ELBO = L_1 <= L_k <= L_(k+1) <= log p(x), L_k -> log p(x); on the mean over
    20 test images, each L_k averaged over independent draws, compared within their standard errors."""
    _, model, x = trained
    log_px = torch.tensor([scoring.posterior_grid(model, image).log_px for image in x], dtype=torch.float64).mean()
    generator = torch.Generator().manual_seed(0)
    means, errors = [], []
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


def test_evaluate_reports_the_exact_nll_of_a_2d_model(trained, tmp_path):
    out, _, _ = trained
    argv = ["--checkpoint", str(out / "ckpt.pt"), "--k", "100", "--limit", "30", "--exact-images", "10"]
    results = evaluate.main([*argv, "--device", "cpu", "--json", str(tmp_path / "eval.json")])
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["test_nll_exact"] == results["test_nll_exact"] and written["exact_n_images"] == 10
    assert written["exact_border_nats"] >= scoring.NEGLIGIBLE_NATS
    # -L_k >= -log p(x): the importance-sampled NLL on the same 10 images lies above the exact one
    state, model = load_checkpoint(out / "ckpt.pt")
    x, _ = load_test_set(state["train_config"]["data_dir"], state["train_config"]["pixels"], "cpu", 10)
    log_px = torch.tensor([scoring.posterior_grid(model, image).log_px for image in x], dtype=torch.float64).mean()
    assert written["test_nll_exact"] == pytest.approx(-log_px.item(), abs=1e-9)
    sampled = scoring.iwae_nll(model, x, 100, generator=torch.Generator().manual_seed(0))
    assert sampled > written["test_nll_exact"]


def test_evaluate_reports_no_exact_nll_above_two_dimensions(tiny_run):
    out = tiny_run("--latent-dim", "3")
    results = evaluate.main(["--checkpoint", str(out / "ckpt.pt"), "--k", "2", "--limit", "10", "--device", "cpu"])
    assert "test_nll_exact" not in results and "exact_n_images" not in results
    with pytest.raises(ValueError, match="2-D latent"):
        scoring.posterior_grid(load_checkpoint(out / "ckpt.pt")[1], torch.zeros(1, 28, 28))


# --------------------------------------------------------------------------------------------- the notebook


def notebook_code():
    cells = json.loads((ROOT / "VAE.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def defined_names(tree):
    """Names of the functions and classes defined anywhere in a syntax tree."""
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def test_the_notebook_defines_nothing_the_modules_provide():
    notebook = defined_names(ast.parse(notebook_code()))
    modules = set()
    for path in ROOT.glob("*.py"):
        modules |= defined_names(ast.parse(path.read_text()))
    assert {"VAE", "reparameterize", "cb_log_norm", "kl_std_normal", "posterior_grid"} <= modules
    assert not notebook & modules, notebook & modules
    assert "class VAE" not in notebook_code() and "def reparameterize" not in notebook_code()


def test_the_notebook_runs_quick_under_ci_and_writes_into_an_ignored_folder():
    code = notebook_code()
    assert 'os.environ.get("CI") == "true"' in code
    run_dir = ast.literal_eval(code.split("RUN_DIR = ", 1)[1].split()[0])
    assert run_dir.split("/")[0] + "/" in (ROOT / ".gitignore").read_text().split()
    assert "plots" not in run_dir


def test_the_committed_notebook_holds_the_outputs_of_a_full_run():
    cells = [c for c in json.loads((ROOT / "VAE.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] for c in cells), "a code cell without outputs: run the README's notebook command"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), "the outputs are not those of one run, top to bottom"
    first = "".join("".join(o["text"]) for o in cells[0]["outputs"] if o["output_type"] == "stream")
    assert "quick: False" in first, "the committed outputs are those of a quick (CI) run"
