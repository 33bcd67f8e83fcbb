"""The explorer (explorer.py, docs/explorer.js) in headless Chromium, driven by selenium: the page's numbers are
model.py's and scoring.py's within its weights' precision, its pointer, pen and buttons work, the committed page
is what explorer.py writes, and opens from disk without an error, the same checkpoint gives the same bytes, a
model the page cannot draw is refused in one line. Without Chromium and its driver the browser tests skip."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import explorer
from checkpoints import load_checkpoint
from data import load_test_set
from model import N_CLASSES, std_normal_log_prob
from scoring import exact_elbo

COMMITTED = explorer.DOCS / "explorer.html"
# The tolerances of docs/explorer.md. The page's weights are int16 multiples of a scale per row (an error of at most
# 1/65534 of the row's largest weight), its heads' weights and all biases float32, and it computes in float64: on
# the default model that moves E[x|z] by at most 6.5e-4, mu and logvar by 3e-4, the ELBO by 0.03 nats and log p(x)
# by 0.01 (measured). The small models here stay much closer; a wrong layer, bias or formula does not.
PROBABILITY_TOL = 1e-3
CODE_TOL = 2e-3  # mu and logvar
NATS_TOL = 0.05  # the ELBO and log p(x); their difference, the gap, within twice this
SHOWN = 0.005  # the page shows nats to two decimals

RUNS = {  # tiny runs (conftest.TINY and these flags), epochs; the first and last are shared with other modules
    "plain": (("--latent-dim", "2", "--batch-size", "64", "--limit", "2048"), 3),  # test_exact's
    "cb-tanh": (("--likelihood", "cb", "--activation", "tanh", "--hidden-dims", "32,16"), 1),  # two hidden layers
    "conditional": (("--conditional", "--frames", "--latent-dim", "2"), 2),  # test_conditional's
}
CONV = ("--arch", "conv", "--hidden-dims", "32", "--latent-dim", "4", "--limit", "512", "--batch-size", "128")
POSTERIOR = "const done = arguments[1]; explorer.posterior(arguments[0]).then(done)"
DECODED = "return document.getElementById('decoded').toDataURL()"  # the image of E[x|z] the page shows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("the browser tests need Chromium and its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with webdriver.Chrome(service=Service(driver), options=options) as b:
        b.set_script_timeout(300)
        yield b


@pytest.fixture(scope="module")
def made(tiny_run, data_dir, tmp_path_factory, one_thread_for_the_module):
    """made(name): a page written by explorer.py from the tiny run RUNS[name], its model, and the run's first 20
    test images as scored, with their labels (each made once, when first asked for)."""
    pages = {}

    def make(name):
        if name not in pages:
            flags, epochs = RUNS[name]
            checkpoint, out = tiny_run(*flags, epochs=epochs) / "ckpt.pt", tmp_path_factory.mktemp(name) / "page.html"
            explorer.main(["--checkpoint", str(checkpoint), "--out", str(out)])
            state, model = load_checkpoint(checkpoint)
            pages[name] = (out, model, *load_test_set(data_dir, state["train_config"]["pixels"], "cpu", 20))
        return pages[name]

    return make


def open_page(browser, path):
    """Open the page from disk and wait for its script; returns the console's errors."""
    browser.get(Path(path).as_uri())
    WebDriverWait(browser, 60).until(lambda b: b.execute_script("return Boolean(window.explorer?.ready)"))
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


@torch.inference_mode()
def grid_log_px(model, x, z1, z2):
    """log p(x) by the trapezoid rule on the grid z1 x z2 the page used, with model.py's log p(x|z) + log p(z)."""
    z1, z2 = torch.tensor(z1, dtype=torch.float64), torch.tensor(z2, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(z1, z2, indexing="ij"), -1).reshape(-1, 2)
    log_joint = model.log_px_z(x.reshape(1, 1, 28, 28), z[:, None].float())[:, 0].double() + std_normal_log_prob(z)
    w1, w2 = (torch.full_like(a, ((a[-1] - a[0]) / (len(a) - 1)).item()) for a in (z1, z2))
    w1[[0, -1]] /= 2
    w2[[0, -1]] /= 2
    return torch.logsumexp(log_joint + (w1.log()[:, None] + w2.log()[None, :]).flatten(), 0).item()


def page_elbo(model, x, labels=None):
    return exact_elbo(model, x.reshape(-1, 1, 28, 28), nodes=explorer.HERMITE_NODES, labels=labels)


def number(browser, element_id):
    return float(browser.find_element(By.ID, element_id).text)


@pytest.mark.parametrize("name", ["plain", "cb-tanh"])
def test_the_page_computes_what_pytorch_does(browser, made, tiny_run, tmp_path, name):
    path, model, x, _ = made(name)
    flags, epochs = RUNS[name]
    explorer.main(["--checkpoint", str(tiny_run(*flags, epochs=epochs) / "ckpt.pt"), "--out", str(tmp_path / "p.html")])
    assert (tmp_path / "p.html").read_bytes() == path.read_bytes()  # the same checkpoint, the same page
    assert (tmp_path / explorer.SCRIPT.name).read_bytes() == explorer.SCRIPT.read_bytes()  # written beside it
    assert open_page(browser, path) == []
    z = 3 * torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    probabilities = browser.execute_script("return arguments[0].map((z) => explorer.decode(z))", z.tolist())
    with torch.inference_mode():
        expected = model.mean(model.decode(z)).reshape(100, -1)
        mu, logvar = model.encode(x)
    assert (torch.tensor(probabilities) - expected).abs().max() < PROBABILITY_TOL
    images = x.reshape(20, -1).tolist()
    codes = browser.execute_script("return arguments[0].map((x) => explorer.encode(x))", images)
    assert (torch.tensor([c["mu"] for c in codes]) - mu).abs().max() < CODE_TOL
    assert (torch.tensor([c["logvar"] for c in codes]) - logvar).abs().max() < CODE_TOL
    bounds = browser.execute_script("return arguments[0].map((x) => explorer.elbo(x).elbo)", images[:5])
    assert (torch.tensor(bounds, dtype=torch.float64) - page_elbo(model, x[:5])).abs().max() < NATS_TOL
    for image in x[:5]:
        grid = browser.execute_async_script(POSTERIOR, image.flatten().tolist())
        assert grid["borderNats"] >= 30
        assert grid["logpx"] == pytest.approx(grid_log_px(model, image, grid["z1"], grid["z2"]), abs=NATS_TOL)


def ink(browser, canvas_id, colour):
    """How many opaque pixels of a 300 x 300 canvas have a colour that `colour` (JavaScript on r, g, b) picks out."""
    return browser.execute_script(
        f"const d = document.getElementById('{canvas_id}').getContext('2d').getImageData(0, 0, 300, 300).data;"
        f"let n = 0; for (let k = 0; k < d.length; k += 4) {{ const [r, g, b] = d.slice(k, k + 3);"
        f" if (d[k + 3] === 255 && {colour}) n++; }} return n;"
    )


def test_the_pointer_the_pen_and_the_posterior_button(browser, made):
    path, model, _, _ = made("plain")
    open_page(browser, path)
    plane, images = browser.find_element(By.ID, "plane"), [browser.execute_script(DECODED)]
    for dx, dy in [(-100, 60), (120, -80)]:
        ActionChains(browser).move_to_element_with_offset(plane, dx, dy).perform()
        images.append(browser.execute_script(DECODED))
        z1, z2, log_pz = map(float, re.findall(r"-?\d+\.\d+", browser.find_element(By.ID, "pointer").text))
        assert log_pz == pytest.approx(-0.5 * (z1**2 + z2**2) - math.log(2 * math.pi), abs=0.02)  # shown rounded
    assert len(set(images)) == 3  # each move draws another E[x|z]

    assert ink(browser, "zoom", "r < 30 && g < 30 && b < 30") == 0  # no q yet: nothing drawn in black
    draw = browser.find_element(By.ID, "draw")
    pen = ActionChains(browser).move_to_element_with_offset(draw, -60, -70).click_and_hold()
    for dx, dy in [(30, 0), (30, 0), (30, 5), (-10, 30), (-15, 40), (-15, 40)]:
        pen.move_by_offset(dx, dy)
    pen.release().perform()
    drawing = torch.tensor(browser.execute_script("return explorer.drawing()"), dtype=torch.float32)
    assert set(drawing.tolist()) == {0.0, 1.0} and drawing.sum() > 20  # binary, and a stroke's worth
    assert ink(browser, "zoom", "r < 30 && g < 30 && b < 30") > 150  # q's 1- and 2-sd ellipses, in black
    neg_elbo = number(browser, "neg-elbo-value")
    assert neg_elbo == pytest.approx(number(browser, "recon-value") + number(browser, "kl-value"), abs=2 * SHOWN)
    elbo = page_elbo(model, drawing).item()
    assert -neg_elbo == pytest.approx(elbo, abs=NATS_TOL + SHOWN)

    browser.find_element(By.ID, "posterior").click()
    WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.ID, "gap-value"))
    grid = browser.execute_script("return explorer.grid()")
    gap = number(browser, "gap-value")
    assert gap >= 0
    assert gap == pytest.approx(grid_log_px(model, drawing, grid["z1"], grid["z2"]) - elbo, abs=2 * NATS_TOL + SHOWN)
    assert ink(browser, "zoom", "b > g + 40") > 100  # p(z|x): the heat map, in purple


def test_a_conditional_page_decodes_the_chosen_digit_and_classifies_a_drawing(browser, made):
    path, model, x, labels = made("conditional")
    assert open_page(browser, path) == []
    z, plane, drawn = torch.tensor([[0.5, -1.0]]), browser.find_element(By.ID, "plane"), []
    for y in (3, 7):
        probabilities = browser.execute_script("return explorer.decode(arguments[0], arguments[1])", z[0].tolist(), y)
        with torch.inference_mode():
            expected = model.mean(model.decode(z, torch.tensor([y]))).flatten()
        assert (torch.tensor(probabilities) - expected).abs().max() < PROBABILITY_TOL
        # the selector: the same point of the plane, decoded with another label, is another image
        browser.find_elements(By.CSS_SELECTOR, ".legend button")[y].click()
        ActionChains(browser).move_to_element_with_offset(plane, 30, 30).perform()
        drawn.append(browser.execute_script(DECODED))
    assert drawn[0] != drawn[1] and "y = 7" in browser.find_element(By.ID, "decoded-title").text
    # p(y|x) from the ELBO under each label, as the page says; and its ten bars once a test image is loaded
    p = browser.execute_async_script("explorer.classify(arguments[0]).then(arguments[1])", x[0].flatten().tolist())
    bounds = page_elbo(model, x[0].expand(N_CLASSES, -1, -1, -1), labels=torch.arange(N_CLASSES))
    expected = torch.softmax(bounds, 0)
    kept = expected > 1e-6
    assert (torch.tensor(p, dtype=torch.float64)[kept].log() - expected[kept].log()).abs().max() < 2 * NATS_TOL
    browser.find_element(By.ID, "test-image").click()
    WebDriverWait(browser, 60).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#classes div")) == N_CLASSES)
    shares = [float(row.text.split()[-1].rstrip("%")) for row in browser.find_elements(By.CSS_SELECTOR, "#classes div")]
    assert sum(shares) == pytest.approx(100, abs=0.5)


def test_the_committed_page_is_what_explorer_py_writes_and_opens_from_disk(browser):
    html = COMMITTED.read_text(encoding="utf-8")
    embedded = json.loads(re.search(r'<script id="model" type="application/json">(.*?)</script>', html).group(1))
    assert explorer.page(embedded) == html  # today's template around its model: regenerated, it would not change
    config = embedded["config"]
    assert (config["hidden_dims"], config["activation"], config["likelihood"]) == ([512, 256], "relu", "bernoulli")
    assert not config["conditional"] and config["epoch"] == 30  # the default model, `python train.py`
    assert len(html.encode()) + explorer.SCRIPT.stat().st_size < 3_000_000
    assert open_page(browser, COMMITTED) == []
    assert len(browser.execute_script("return explorer.decode([0, 0])")) == 784


@pytest.mark.parametrize("flags, says", [(("--latent-dim", "3"), "a 3-D latent"), (CONV, "convolutional")])
def test_a_model_the_page_cannot_draw_is_refused_in_one_line(tiny_run, scripts, tmp_path, flags, says):
    out = tmp_path / "page.html"
    code, _, err = scripts.run(explorer.main, "--checkpoint", tiny_run(*flags) / "ckpt.pt", "--out", out)
    assert code == 1 and not out.exists()
    scripts.only_error(err, "2-D latent and MLP networks", says)
