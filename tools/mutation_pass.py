"""Deliberate bugs, one at a time, against the tests: `python tools/mutation_pass.py [ID ...] [--full]`.

Each mutant below is one small change to one source file: a bug that a test should catch. For each, the
repository's files are copied into a scratch folder (the work tree itself is never changed), the change is
made there, and the mutant's tests run with `pytest -x`: KILLED if a test fails, SURVIVED if they all pass.
--full runs the whole suite for each mutant instead of its own tests (slow: about two minutes a mutant).
--list prints the catalogue. Those marked `issue` are the bugs of issue 12; the others are the mutation pass
over model.py, data.py and train.py. A survivor is either a test to write or, as `note` says, a change
that no test can see (same numbers, or behaviour outside what tests can reach).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BEHAVIOUR = "tests/test_behaviour.py"
TRAIN = "tests/test_train.py"
EVALUATE = "tests/test_evaluate.py"
MODEL = "tests/test_model.py"
DATA = "tests/test_data.py"
DEVICES = "tests/test_devices.py"
VISUALIZE = "tests/test_visualize.py"
RELIABILITY = "tests/test_reliability.py"


ESTIMATOR_TESTS = (
    "model.loss's score-function estimator (no path through z, leave-one-out baseline) has no test yet: the "
    "objective / estimator tests of model.py, written beside issue 12, are to cover it"
)


@dataclass
class Mutant:
    id: str
    file: str
    old: str
    new: str
    tests: list = field(default_factory=list)
    issue: bool = False
    note: str = ""


MUTANTS = [
    # --- issue 12: the training loop
    Mutant("no-shuffle", "train.py", "shuffle=True, pixels=pixels", "shuffle=False, pixels=pixels", [BEHAVIOUR], True),
    Mutant("no-binarize", "train.py", "shuffle=True, pixels=pixels", 'shuffle=True, pixels="grey"', [BEHAVIOUR], True),
    Mutant(
        "last-batch-weighted-full",
        "train.py",
        "    weights[-1] = n - batch_size * (n_steps - 1)\n",
        "",
        [BEHAVIOUR],
        True,
    ),
    Mutant(
        "mean-of-batch-means", "train.py", "return (losses * weights).sum() / n", "return losses.mean()", [BEHAVIOUR]
    ),
    # --- issue 12: scoring
    Mutant("test-kl-twice", "evaluate.py", "kl_sum += kl.sum()", "kl_sum += 2 * kl.sum()", [TRAIN], True),
    Mutant(
        "test-loss-kl-twice",
        "evaluate.py",
        "return (recon_sum + kl_sum) / n,",
        "return (recon_sum + 2 * kl_sum) / n,",
        [TRAIN],
        True,
    ),
    Mutant(
        "test-elbo-training-noise",
        "evaluate.py",
        "    generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)\n    recon_sum",
        "    generator = None\n    recon_sum",
        [BEHAVIOUR],
        True,
    ),
    Mutant(
        "knn-reference-grey",
        "evaluate.py",
        "return load_scored_split(data_dir, True, pixels, device)",
        'return load_scored_split(data_dir, True, "grey", device)',
        [EVALUATE],
        True,
    ),
    Mutant(
        "knn-reference-fresh-draw",
        "evaluate.py",
        "return load_scored_split(data_dir, True, pixels, device)",
        'images, labels = load_scored_split(data_dir, True, "grey", device)\n'
        '    return __import__("data").present(images, pixels), labels',
        [EVALUATE],
        True,
    ),
    Mutant(
        "knn-reference-test-split",
        "evaluate.py",
        "return load_scored_split(data_dir, True, pixels, device)",
        "return load_scored_split(data_dir, False, pixels, device)",
        [EVALUATE],
    ),
    Mutant(
        "posterior-means-are-logvar", "evaluate.py", "model.encode(x)[0] for x", "model.encode(x)[1] for x", [EVALUATE]
    ),
    # --- issue 12: optimizer and schedule
    Mutant(
        "adam-eps-1e-8",
        "train.py",
        'eps = 1e-4 if config.schedule == "iwae" else 1e-8',
        "eps = 1e-8",
        [BEHAVIOUR],
        True,
    ),
    Mutant("lr-decays-on", "train.py", "while epoch > end and stage < 7:", "while epoch > end:", [BEHAVIOUR], True),
    # --- issue 12: the figures
    Mutant(
        "figures-cb-as-lambda",
        "visualize.py",
        "return model.mean(model.decode(z))",
        "return torch.sigmoid(model.decode(z))",
        [BEHAVIOUR],
        True,
    ),
    Mutant(
        "reconstructions-cb-as-lambda",
        "visualize.py",
        "recon = model.mean(reconstruct(model, x))",
        "recon = torch.sigmoid(reconstruct(model, x))",
        [BEHAVIOUR],
        True,
    ),
    Mutant(
        "compare-cb-mean-as-lambda",
        "visualize.py",
        "torch.sigmoid(cb_prior), cb_model.mean(cb_prior)]",
        "torch.sigmoid(cb_prior), torch.sigmoid(cb_prior)]",
        [BEHAVIOUR],
        True,
    ),
    # --- issue 12: bench
    Mutant("gemm-no-backward", "bench.py", "            if training:\n", "            if False:\n", [BEHAVIOUR], True),
    Mutant(
        "gemm-no-input-grads", "bench.py", "                if layer > 0:\n", "                if False:\n", [BEHAVIOUR]
    ),
    # --- issue 12: devices
    Mutant(
        "load-onto-device",
        "utils.py",
        'map_location="cpu", weights_only=True',
        "map_location=device, weights_only=True",
        [DEVICES],
        True,
    ),
    Mutant(
        "mps-rng-not-saved",
        "train.py",
        'if device.type in ("cuda", "mps"):\n        state',
        'if device.type in ("cuda",):\n        state',
        [DEVICES],
        True,
    ),
    Mutant("double-on-device", "evaluate.py", "-estimates.cpu().double()", "-estimates.double()", [DEVICES], True),
    Mutant(
        "cpu-blocks-on-gpu",
        "evaluate.py",
        'return BLOCK_ELEMENTS if torch.device(device).type == "cpu" else DEVICE_BLOCK_ELEMENTS',
        "return BLOCK_ELEMENTS",
        [DEVICES],
        True,
    ),
    # --- mutation pass: model.py
    Mutant("kl-half", "model.py", "return 0.5 * (mu.pow(2)", "return 1.0 * (mu.pow(2)", [MODEL]),
    Mutant("kl-logvar-sign", "model.py", "logvar.exp() - 1.0 - logvar", "logvar.exp() - 1.0 + logvar", [MODEL]),
    Mutant(
        "bce-sign",
        "model.py",
        "return -F.binary_cross_entropy_with_logits",
        "return F.binary_cross_entropy_with_logits",
        [MODEL],
    ),
    Mutant(
        "cb-norm-sign",
        "model.py",
        "bernoulli_log_prob(logits, x) + cb_log_norm",
        "bernoulli_log_prob(logits, x) - cb_log_norm",
        [MODEL],
    ),
    Mutant("cb-series-wide", "model.py", "_CB_LOG_NORM_SERIES_BELOW = 0.1", "_CB_LOG_NORM_SERIES_BELOW = 1.0", [MODEL]),
    Mutant("cb-mean-series-narrow", "model.py", "_CB_MEAN_SERIES_BELOW = 1.0", "_CB_MEAN_SERIES_BELOW = 1e-3", [MODEL]),
    Mutant(
        "reparam-sigma",
        "model.py",
        "return mu + torch.exp(0.5 * logvar) * eps",
        "return mu + torch.exp(logvar) * eps",
        [MODEL],
    ),
    Mutant(
        "prior-log2pi",
        "model.py",
        "return -0.5 * (z.pow(2) + LOG_2PI)",
        "return -0.5 * (z.pow(2) - LOG_2PI)",
        [MODEL, EVALUATE],
    ),
    Mutant(
        "q-precision",
        "model.py",
        "(z - mu).pow(2) * torch.exp(-logvar)",
        "(z - mu).pow(2) * torch.exp(logvar)",
        [MODEL, EVALUATE],
    ),
    Mutant(
        "iwae-no-log-k",
        "model.py",
        "return torch.logsumexp(torch.stack(parts), dim=0) - math.log(k)",
        "return torch.logsumexp(torch.stack(parts), dim=0)",
        [EVALUATE],
    ),
    Mutant(
        "output-bias-clamp",
        "model.py",
        "p = pixel_mean.clamp(0.001, 0.999)",
        "p = pixel_mean.clamp(1e-6, 1 - 1e-6)",
        [MODEL],
    ),
    Mutant(
        "no-output-bias-init", "train.py", "    model.init_output_bias(train_images.mean(0))\n", "", [BEHAVIOUR, TRAIN]
    ),
    Mutant(
        "cb-shown-as-lambda",
        "model.py",
        'return torch.sigmoid(logits) if self.config.likelihood == "bernoulli" else cb_mean(logits)',
        "return torch.sigmoid(logits)",
        [MODEL],
    ),
    Mutant(
        "beta-ignored",
        "model.py",
        "neg_bound = -total(f) + beta * kl_std_normal(mu, logvar)",
        "neg_bound = -total(f) + kl_std_normal(mu, logvar)",
        [MODEL],
    ),
    Mutant(
        "score-not-detached",
        "model.py",
        "            z = z.detach()  # no path",
        "            z = z  # no path",
        [MODEL],
        note=ESTIMATOR_TESTS,
    ),
    Mutant(
        "loo-divisor",
        "model.py",
        "others_mean = (f.sum(0) - f) / (k - 1)",
        "others_mean = (f.sum(0) - f) / k",
        [MODEL],
        note=ESTIMATOR_TESTS,
    ),
    Mutant(
        "no-hidden-activation",
        "model.py",
        "layers += [nn.Linear(n_in, n_out), activation()]",
        "layers += [nn.Linear(n_in, n_out)]",
        [MODEL, BEHAVIOUR],
    ),
    Mutant(
        "logvar-is-mu",
        "model.py",
        "return self.to_mu(h), self.to_logvar(h)",
        "return self.to_mu(h), self.to_mu(h)",
        [MODEL],
    ),
    Mutant(
        "latent-dim-zero-ok", "model.py", "if self.latent_dim < 1:", "if self.latent_dim < 0:", [MODEL, RELIABILITY]
    ),
    # --- mutation pass: data.py
    Mutant(
        "static-binarization",
        "data.py",
        "return torch.bernoulli(images, generator=generator)",
        "return (images > 0.5).float()",
        [DATA],
    ),
    Mutant(
        "dequantize-255",
        "data.py",
        "return ((images * 255).round_() + u) / 256",
        "return ((images * 255).round_() + u) / 255",
        [BEHAVIOUR, DATA],
    ),
    Mutant(
        "dequantize-no-round",
        "data.py",
        "return ((images * 255).round_() + u) / 256",
        "return ((images * 255) + u) / 256",
        [BEHAVIOUR, DATA],
        note="k/255*255 is exactly k in float32 (test_data checks it): the rounding is a safeguard with no effect",
    ),
    Mutant(
        "scored-split-global-rng",
        "data.py",
        "images = present(images, pixels, torch.Generator().manual_seed(SCORED_SPLIT_SEED))",
        "images = present(images, pixels)",
        [DATA],
    ),
    Mutant(
        "scored-split-limit-first",
        "data.py",
        "    images, labels = load_mnist(data_dir, train=train)\n    images = present(",
        "    images, labels = load_mnist(data_dir, train=train, limit=limit)\n    images = present(",
        [DATA, EVALUATE],
        note="the CPU generator draws pixel after pixel, so the first N images presented alone get the very numbers "
        "they get in the whole split (which test_data checks): presenting it all first is a safeguard",
    ),
    Mutant(
        "batches-drop-last",
        "data.py",
        "for start in range(0, n, batch_size):",
        "for start in range(0, n - batch_size + 1, batch_size):",
        [DATA],
    ),
    Mutant("pixels-div-256", "data.py", ".float().div_(255)", ".float().div_(256)", [DATA]),
    Mutant(
        "md5-not-checked-on-raw",
        "data.py",
        "        if _md5(raw.read_bytes()) == MNIST_MD5[name]:\n",
        "        if True:\n",
        [DATA],
    ),
    Mutant(
        "fetched-not-verified",
        "data.py",
        "if source_file.exists() and _md5(data := source_file.read_bytes()) == MNIST_MD5[name]:",
        "if source_file.exists() and (data := source_file.read_bytes()):",
        [DATA],
    ),
    Mutant(
        "write-not-atomic",
        "data.py",
        "    tmp.write_bytes(data)\n    os.replace(tmp, path)\n",
        "    path.write_bytes(data)\n",
        [DATA],
        note="only a crash in mid-write shows it; the checkpoint's atomic write is tested that way, this one is not",
    ),
    Mutant(
        "socket-timeout-kept",
        "data.py",
        "        socket.setdefaulttimeout(previous)\n",
        "        pass\n",
        [DATA],
        note="only matters after a real download, which the tests never do (no network in tests)",
    ),
    Mutant(
        "cb-default-grey",
        "data.py",
        'DEFAULT_PIXELS = {"bernoulli": "binary", "cb": "dequantized"}',
        'DEFAULT_PIXELS = {"bernoulli": "binary", "cb": "grey"}',
        [DATA, BEHAVIOUR],
    ),
    # --- mutation pass: train.py
    Mutant("no-zero-grad", "train.py", "        optimizer.zero_grad(set_to_none=True)\n", "", [BEHAVIOUR]),
    Mutant(
        "lr-stage-sevenths",
        "train.py",
        "return config.lr * 10 ** (-stage / 7)",
        "return config.lr * 10 ** (-stage / 8)",
        [TRAIN, BEHAVIOUR],
    ),
    Mutant("lr-stage-length", "train.py", "end += 3**stage", "end += 3**stage + 1", [TRAIN]),
    Mutant(
        "lr-previous-epoch",
        "train.py",
        'group["lr"] = learning_rate(config, epoch)',
        'group["lr"] = learning_rate(config, epoch - 1)',
        [BEHAVIOUR, TRAIN],
    ),
    Mutant(
        "one-epoch-short",
        "train.py",
        "for epoch in range(run.epoch + 1, run.config.epochs + 1):",
        "for epoch in range(run.epoch + 1, run.config.epochs):",
        [TRAIN],
    ),
    Mutant(
        "rng-not-restored",
        "train.py",
        '        set_rng_state(state["rng"], device)\n',
        '        state["rng"]\n',
        [RELIABILITY],
    ),
    Mutant(
        "resume-keeps-log-of-epoch",
        "train.py",
        'if json.loads(line)["epoch"] <= epoch:',
        'if json.loads(line)["epoch"] < epoch:',
        [RELIABILITY],
    ),
    Mutant(
        "nan-not-checked", "train.py", "            if not finite.all():\n", "            if False:\n", [RELIABILITY]
    ),
    Mutant(
        "nan-check-late",
        "train.py",
        "def train_epoch(step, images, batch_size, pixels, progress=None, check_every=50):",
        "def train_epoch(step, images, batch_size, pixels, progress=None, check_every=10**9):",
        [RELIABILITY],
        note="the last step checks every step not yet checked: a NaN is still found and named by its step, "
        "only an epoch's compute later (a cost, not a wrong result)",
    ),
    Mutant(
        "not-fused",
        "train.py",
        'fused = next(model.parameters()).device.type in ("cpu", "cuda")',
        "fused = False",
        [BEHAVIOUR, TRAIN],
        note="the same arithmetic (the fused kernel is a speed option), up to rounding",
    ),
    Mutant(
        "resume-reseeds",
        "train.py",
        "    torch.manual_seed(config.seed)\n    train_images, test_images = load_data(config, device)\n    opt",
        "    train_images, test_images = load_data(config, device)\n    opt",
        [RELIABILITY],
        note="the saved random state replaces the seeded one a few lines later: no effect",
    ),
    Mutant(
        "no-eval-mode",
        "train.py",
        "    model.eval()\n    test_loss, test_recon, test_kl = mean_neg_elbo",
        "    test_loss, test_recon, test_kl = mean_neg_elbo",
        [TRAIN, BEHAVIOUR],
        note="the model has no dropout or batch norm: train and eval mode compute the same",
    ),
    Mutant(
        "beta-for-iwae-allowed",
        "train.py",
        'if self.objective == "iwae" and self.beta != 1:',
        "if False:",
        [BEHAVIOUR],
    ),
]


def scratch_copy(destination):
    """The repository's files (tracked, and untracked but not ignored) and its MNIST files, copied."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    shutil.copytree(ROOT / "data" / "MNIST" / "raw", destination / "data" / "MNIST" / "raw")


def run(mutant, tests, timeout):
    """(verdict, seconds, the first failing test) for one mutant, in a scratch copy of the repository."""
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        scratch = Path(tmp)
        scratch_copy(scratch)
        path = scratch / mutant.file
        text = path.read_text()
        if text.count(mutant.old) != 1:
            return f"STALE (the text to change occurs {text.count(mutant.old)} times)", 0.0, ""
        path.write_text(text.replace(mutant.old, mutant.new))
        start = time.perf_counter()
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return "KILLED (timeout)", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        failed = re.search(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
        if done.returncode == 0:
            return "SURVIVED", seconds, ""
        return "KILLED", seconds, failed.group(1) if failed else f"pytest exit {done.returncode}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ids", nargs="*", help="only these mutants (default: all)")
    p.add_argument("--issue", action="store_true", help="only the bugs of issue 12")
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutant")
    p.add_argument("--list", action="store_true", help="print the catalogue and stop")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant (default: %(default)s)")
    args = p.parse_args(argv)
    known = {m.id for m in MUTANTS}
    if unknown := set(args.ids) - known:
        p.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if (not args.ids or m.id in args.ids) and (m.issue or not args.issue)]
    if args.list:
        for m in chosen:
            print(f"{m.id:28s} {m.file:12s} {'issue' if m.issue else '':6s} {' '.join(m.tests)}")
        return
    survivors = []
    for m in chosen:
        verdict, seconds, failed = run(m, [] if args.full else m.tests, args.timeout)
        print(f"{m.id:28s} {m.file:12s} {verdict:10s} {seconds:6.1f} s  {failed}", flush=True)
        if not verdict.startswith("KILLED"):
            survivors.append(m)
    if survivors:
        print("\nsurvived:")
        for m in survivors:
            print(f"  {m.id}: {m.note or '(no note: a missing test?)'}")
    sys.exit(1 if any(not m.note for m in survivors) else 0)


if __name__ == "__main__":
    main()
