"""The model in a browser: `python explorer.py --checkpoint out/ckpt.pt` writes docs/explorer.html (see --help).

A static page for a model with a 2-D latent and MLP networks: the test images' posterior means on the latent
plane, E[x|z] under the pointer, a digit drawn by hand with its q(z|x), reconstruction and ELBO, and the true
posterior p(z|x) on a grid with log p(x). The page embeds the weights (int16 with a scale per row; biases float32)
and runs the networks in docs/explorer.js, which is written beside it; nothing is fetched, so that it opens from
disk (file://). The same checkpoint gives the same page, byte for byte. What it shows, and how exactly:
docs/explorer.md.
"""

import argparse
import base64
import json
from pathlib import Path

import numpy as np
import torch

from checkpoints import CheckpointError
from cli import add_model_args, load_model, script
from data import load_test_set
from files import write_atomic
from model import N_CLASSES
from scoring import posterior_means

DOCS = Path(__file__).resolve().parent / "docs"
TEMPLATE = DOCS / "explorer.template.html"
SCRIPT = DOCS / "explorer.js"  # the page's code, loaded by <script src>: copied beside a page written elsewhere
PLACEHOLDER = "{{MODEL}}"
SCATTER_EVERY = 5  # every 5th test image: 2000 posterior means on the plane, the same ones for every model
HERMITE_NODES = 20  # per axis, for the page's ELBO: 400 decoder passes, not exact_elbo's 6400 (docs/explorer.md)
INT16_MAX = 32767
MARGIN = 0.05  # of the means' range on each side of the plane, as matplotlib's axes in plots/latent_scatter.png


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--out", default="docs/explorer.html", help="the page to write (default: %(default)s)")
    return p


@script
def main(argv=None):
    args = build_parser().parse_args(argv)
    state, model, data_dir = load_model(args, "cpu")
    c = model.config
    if c.arch != "mlp" or c.latent_dim != 2:
        what = "convolutional networks" if c.arch != "mlp" else f"a {c.latent_dim}-D latent"
        raise CheckpointError(
            f"{args.checkpoint}: the explorer draws models with a 2-D latent and MLP networks; this one has {what}"
        )
    images, labels = load_test_set(data_dir, state["train_config"]["pixels"], "cpu")  # as the model was scored
    html = page(payload(model, state, images, labels))
    out = Path(args.out)
    write_atomic(out, lambda f: f.write(html.encode("utf-8")))
    if out.resolve().parent != SCRIPT.parent:
        write_atomic(out.with_name(SCRIPT.name), lambda f: f.write(SCRIPT.read_bytes()))
    print(f"wrote {out} ({len(html) / 2**20:.2f} MiB) for {args.checkpoint} (epoch {state['epoch']})")


def encoded(array, dtype):
    """A tensor's values as little-endian bytes of `dtype` (rounded to nearest, as numpy does), in base64."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def linear(layer, exact=False):
    """One nn.Linear, W row-major (n_out, n_in) as PyTorch stores it: each row as int16 multiples of its own scale,
    max |w| / 32767 (float32), or, exact, in float32; the bias in float32. docs/explorer.md: why not float16."""
    w, b = layer.weight.detach().cpu().double().numpy(), layer.bias.detach().cpu().numpy()
    out = {"n_in": w.shape[1], "n_out": w.shape[0], "b": encoded(b, "<f4")}
    if exact:
        return {**out, "w": encoded(w, "<f4")}
    scale = (np.abs(w).max(1, keepdims=True) / INT16_MAX).astype("<f4")
    scale[scale == 0] = 1  # a row of zeros
    w16 = np.rint(w / scale.astype(np.float64)).clip(-INT16_MAX, INT16_MAX)
    return {**out, "w": encoded(w16, "<i2"), "scale": encoded(scale, "<f4")}


def linears(stack):
    return [linear(layer) for layer in stack if isinstance(layer, torch.nn.Linear)]


def plane_limits(mu):
    """The plane's square window: the means' range with MARGIN either side, the shorter side widened around its
    centre (the scatter plot's equal aspect). [z1_lo, z1_hi, z2_lo, z2_hi], rounded for a stable page."""
    lo, hi = mu.min(0).values, mu.max(0).values
    centre, half = (lo + hi) / 2, ((hi - lo) * (0.5 + MARGIN)).max()
    return [round(v.item(), 4) for v in (centre[0] - half, centre[0] + half, centre[1] - half, centre[1] + half)]


@torch.inference_mode()
def payload(model, state, images, labels):
    """Everything the page needs, as JSON: the model's config and weights, the plane with the posterior means of
    the test images, one test image of each digit (as the model was scored on them), and the quadrature nodes."""
    c = model.config
    mu = posterior_means(model, images, labels=labels).double()  # (N, 2); a conditional model's q(z|x, y)
    shown = [int((labels == d).nonzero()[0]) for d in range(N_CLASSES)]  # the first test image of each digit
    t, w = np.polynomial.hermite.hermgauss(HERMITE_NODES)  # as scoring.exact_elbo: ∫ e^(-t^2) f(t) dt
    config = {"hidden_dims": list(c.hidden_dims), "activation": c.activation, "likelihood": c.likelihood}
    config |= {"conditional": c.conditional, "pixels": state["train_config"]["pixels"], "epoch": state["epoch"]}
    return {
        "config": config,
        "encoder": linears(model.encoder),
        "to_mu": linear(model.to_mu, exact=True),  # the ELBO is most sensitive to these: 2 x hidden[-1] weights
        "to_logvar": linear(model.to_logvar, exact=True),
        "decoder": linears(model.decoder),
        "to_logits": linear(model.to_logits),
        "plane": plane_limits(mu),
        "means": encoded(mu[::SCATTER_EVERY].numpy(), "<f2"),  # (2000, 2), z1 z2 interleaved
        "labels": encoded(labels[::SCATTER_EVERY].numpy(), "u1"),
        "images": encoded((images[shown] * 255).round().numpy(), "u1"),  # (10, 784): exact for binary pixels
        "image_labels": labels[shown].tolist(),
        "hermite": {"t": t.tolist(), "w": w.tolist()},
    }


def page(data):
    """The page: the template with the payload in its JSON <script> (no "</" can end that early)."""
    text = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return TEMPLATE.read_text(encoding="utf-8").replace(PLACEHOLDER, text)


if __name__ == "__main__":
    main()
