"""Deliberate bugs, one at a time, against the tests: `python tools/mutation_pass.py [ID ...] [--full]`.

Each mutant below is one small change to one function, method, class or module-level assignment of a
top-level module, named by its module and qualified name (`train.train_epoch`, `model.VAE.loss`,
`model._CB_LOG_NORM_SERIES_BELOW`, `train.TrainConfig.__post_init__`) and found with `ast`. The change is an
(old, new) replacement in the target's canonical text, `ast.unparse` of its node, which no reformatting of
the file changes: comments are gone, strings are in single quotes, numbers as Python prints them
(`--show TARGET` prints that text, to write a mutant against). `old` must occur exactly once there, else the
mutant is STALE. For each mutant, the repository's files (tracked, and untracked but not ignored) and its
MNIST files are copied into a scratch folder (the work tree itself is never changed); there the target's
lines, decorators included, are replaced by the mutated text, indented as the target was, and the mutant's
tests run with `pytest -x`: KILLED if a test fails, SURVIVED if they all pass.

--full runs the whole suite for each mutant instead of its own tests (slow: a few minutes a mutant); --group
picks the mutants of one part of the code (see --list); --check only applies every mutant, to find the
STALE ones, and runs no test. A survivor is either a test to write or, as its `note` says, a change that no
test can see (the same numbers, or behaviour outside what tests can reach). The exit status is 1 if a
mutant is STALE or survives without a note.
"""

import argparse
import ast
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
DATA = "tests/test_data.py"
DEVICES = "tests/test_devices.py"
EVALUATE = "tests/test_evaluate.py"
FITTING = "tests/test_fitting.py"
MODEL = "tests/test_model.py"
PATHS = "tests/test_paths.py"
RELIABILITY = "tests/test_reliability.py"
TRAIN = "tests/test_train.py"
VISUALIZE = "tests/test_visualize.py"
CONDITIONAL = "tests/test_conditional.py"
EXACT = "tests/test_exact.py"
PRETRAINED = "tests/test_pretrained.py"


@dataclass
class Mutant:
    id: str
    target: str  # module.qualified_name: a function, method, class or module-level assignment
    old: str  # in the target's canonical text (--show), exactly once
    new: str
    tests: list = field(default_factory=list)
    group: str = ""  # loop, scoring, optimizer, figures, bench, devices, model, data, train, conditional, exact
    note: str = ""  # why it survives: a change that no test can see


MUTANTS = [
    # --- the training loop: what each epoch feeds the model and what it logs
    Mutant(
        "no-shuffle",
        "train.train_epoch",
        "shuffle=True, pixels=pixels",
        "shuffle=False, pixels=pixels",
        [BEHAVIOUR],
        "loop",
    ),
    Mutant(
        "no-binarize",
        "train.train_epoch",
        "shuffle=True, pixels=pixels",
        "shuffle=True, pixels='grey'",
        [BEHAVIOUR],
        "loop",
    ),
    Mutant(
        "last-batch-weighted-full",
        "train.train_epoch",
        "    weights[-1] = n - batch_size * (n_steps - 1)\n",
        "",
        [BEHAVIOUR],
        "loop",
    ),
    Mutant(
        "mean-of-batch-means",
        "train.train_epoch",
        "return (losses * weights).sum() / n",
        "return losses.mean()",
        [BEHAVIOUR],
        "loop",
    ),
    # --- scoring: the test ELBO, the k-NN reference, the posterior means
    Mutant(
        "test-kl-twice", "scoring.mean_neg_elbo", "kl_sum += kl.sum()", "kl_sum += 2 * kl.sum()", [TRAIN], "scoring"
    ),
    Mutant(
        "test-loss-kl-twice",
        "scoring.mean_neg_elbo",
        "return ((recon_sum + kl_sum) / n,",
        "return ((recon_sum + 2 * kl_sum) / n,",
        [TRAIN],
        "scoring",
    ),
    Mutant(
        "test-elbo-training-noise",
        "scoring.mean_neg_elbo",
        "generator = torch.Generator(device=images.device).manual_seed(ELBO_NOISE_SEED)",
        "generator = None",
        [BEHAVIOUR],
        "scoring",
    ),
    Mutant(
        "knn-reference-grey",
        "data.load_reference_set",
        "return load_scored_split(data_dir, True, pixels, device)",
        "return load_scored_split(data_dir, True, 'grey', device)",
        [EVALUATE],
        "scoring",
    ),
    Mutant(
        "knn-reference-fresh-draw",
        "data.load_reference_set",
        "return load_scored_split(data_dir, True, pixels, device)",
        "images, labels = load_scored_split(data_dir, True, 'grey', device)\n"
        "    return (present(images, pixels), labels)",
        [EVALUATE],
        "scoring",
    ),
    Mutant(
        "knn-reference-test-split",
        "data.load_reference_set",
        "return load_scored_split(data_dir, True, pixels, device)",
        "return load_scored_split(data_dir, False, pixels, device)",
        [EVALUATE],
        "scoring",
    ),
    Mutant(
        "posterior-means-are-logvar",
        "scoring.posterior_means",
        "model.encode(x, y)[0] for x, y",
        "model.encode(x, y)[1] for x, y",
        [EVALUATE],
        "scoring",
    ),
    # --- the optimizer and the learning-rate schedule
    Mutant(
        "adam-eps-1e-8",
        "train.make_optimizer",
        "eps = 0.0001 if config.schedule == 'iwae' else 1e-08",
        "eps = 1e-08",
        [BEHAVIOUR],
        "optimizer",
    ),
    Mutant(
        "lr-decays-on",
        "train.learning_rate",
        "while epoch > end and stage < 7:",
        "while epoch > end:",
        [BEHAVIOUR],
        "optimizer",
    ),
    # --- the figures: a CB decoder's images are its mean, not lambda
    Mutant(
        "figures-cb-as-lambda",
        "manifold.decode_means",
        "return model.mean(model.decode(z, y))",
        "return torch.sigmoid(model.decode(z, y))",
        [BEHAVIOUR],
        "figures",
    ),
    Mutant(
        "reconstructions-cb-as-lambda",
        "visualize.reconstructions_figure",
        "recon = model.mean(reconstruct(",
        "recon = torch.sigmoid(reconstruct(",
        [BEHAVIOUR],
        "figures",
    ),
    Mutant(
        "compare-cb-mean-as-lambda",
        "visualize.compare_figure",
        "torch.sigmoid(cb_prior), cb_model.mean(cb_prior)]",
        "torch.sigmoid(cb_prior), torch.sigmoid(cb_prior)]",
        [BEHAVIOUR],
        "figures",
    ),
    # --- bench.py's GEMM bound
    Mutant("gemm-no-backward", "bench.gemm_plan", "if training:", "if False:", [BEHAVIOUR], "bench"),
    Mutant("gemm-no-input-grads", "bench.gemm_plan", "if layer > 0:", "if False:", [BEHAVIOUR], "bench"),
    # --- devices: what must stay on the CPU, what must not be float64, how large the blocks are
    Mutant(
        "load-onto-device",
        "checkpoints._read_checkpoint",
        "map_location='cpu'",
        # _read_checkpoint has no device of its own: the bug reads its caller's (load_checkpoint's)
        "map_location=__import__('sys')._getframe(1).f_locals['device']",
        [DEVICES],
        "devices",
    ),
    Mutant(
        "mps-rng-not-saved",
        "train.rng_state",
        "if device.type in ('cuda', 'mps'):",
        "if device.type in ('cuda',):",
        [DEVICES],
        "devices",
    ),
    Mutant(
        "double-on-device",
        "scoring.iwae_nll",
        "-estimates.cpu().double()",
        "-estimates.double()",
        [DEVICES],
        "devices",
    ),
    Mutant(
        "cpu-blocks-on-gpu",
        "scoring.block_elements",
        "return BLOCK_ELEMENTS if torch.device(device).type == 'cpu' else DEVICE_BLOCK_ELEMENTS",
        "return BLOCK_ELEMENTS",
        [DEVICES],
        "devices",
    ),
    # --- model.py
    Mutant("kl-half", "model.kl_std_normal", "return 0.5 * (mu.pow(2)", "return 1.0 * (mu.pow(2)", [MODEL], "model"),
    Mutant(
        "kl-logvar-sign",
        "model.kl_std_normal",
        "logvar.exp() - 1.0 - logvar",
        "logvar.exp() - 1.0 + logvar",
        [MODEL],
        "model",
    ),
    Mutant(
        "bce-sign",
        "model.bernoulli_log_prob",
        "return -F.binary_cross_entropy_with_logits",
        "return F.binary_cross_entropy_with_logits",
        [MODEL],
        "model",
    ),
    Mutant(
        "cb-norm-sign",
        "model.cb_log_prob",
        "bernoulli_log_prob(logits, x) + cb_log_norm",
        "bernoulli_log_prob(logits, x) - cb_log_norm",
        [MODEL],
        "model",
    ),
    Mutant(
        "cb-series-wide",
        "model._CB_LOG_NORM_SERIES_BELOW",
        "_CB_LOG_NORM_SERIES_BELOW = 0.1",
        "_CB_LOG_NORM_SERIES_BELOW = 1.0",
        [MODEL],
        "model",
    ),
    Mutant(
        "cb-mean-series-narrow",
        "model._CB_MEAN_SERIES_BELOW",
        "_CB_MEAN_SERIES_BELOW = 1.0",
        "_CB_MEAN_SERIES_BELOW = 0.001",
        [MODEL],
        "model",
    ),
    Mutant(
        "reparam-sigma",
        "model.VAE.reparameterize",
        "return mu + torch.exp(0.5 * logvar) * eps",
        "return mu + torch.exp(logvar) * eps",
        [MODEL],
        "model",
    ),
    Mutant(
        "prior-log2pi",
        "model.std_normal_log_prob",
        "return -0.5 * (z.pow(2) + LOG_2PI)",
        "return -0.5 * (z.pow(2) - LOG_2PI)",
        [MODEL, EVALUATE],
        "model",
    ),
    Mutant(
        "q-precision",
        "model.diag_normal_log_prob",
        "(z - mu).pow(2) * torch.exp(-logvar)",
        "(z - mu).pow(2) * torch.exp(logvar)",
        [MODEL, EVALUATE],
        "model",
    ),
    Mutant(
        "iwae-no-log-k",
        "model.log_mean_exp",
        "return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])",
        "return torch.logsumexp(log_w, 0)",
        [EVALUATE],
        "model",
    ),
    Mutant(
        "output-bias-clamp",
        "model.VAE.init_output_bias",
        "p = pixel_mean.clamp(0.001, 0.999)",
        "p = pixel_mean.clamp(1e-06, 1 - 1e-06)",
        [MODEL],
        "model",
    ),
    Mutant(
        "cb-shown-as-lambda",
        "model.VAE.mean",
        "return torch.sigmoid(logits) if self.config.likelihood == 'bernoulli' else cb_mean(logits)",
        "return torch.sigmoid(logits)",
        [MODEL],
        "model",
    ),
    Mutant(
        "beta-ignored",
        "model.VAE.loss",
        "neg_bound = -total(f) + beta * kl_std_normal(mu, logvar)",
        "neg_bound = -total(f) + kl_std_normal(mu, logvar)",
        [MODEL],
        "model",
    ),
    Mutant("score-not-detached", "model.VAE.loss", "z = z.detach()", "z = z", [FITTING], "model"),
    Mutant(
        "loo-divisor",
        "model.leave_one_out",
        "others_mean = (f.sum(0) - f) / (k - 1)",
        "others_mean = (f.sum(0) - f) / k",
        [FITTING],
        "model",
    ),
    Mutant(
        "no-hidden-activation",
        "model._mlp",
        "layers += [nn.Linear(n_in, n_out), activation()]",
        "layers += [nn.Linear(n_in, n_out)]",
        [MODEL, BEHAVIOUR],
        "model",
    ),
    Mutant(
        "logvar-is-mu",
        "model.VAE.encode",
        "return (self.to_mu(h), self.to_logvar(h))",
        "return (self.to_mu(h), self.to_mu(h))",
        [MODEL],
        "model",
    ),
    Mutant(
        "latent-dim-zero-ok",
        "model.VAEConfig.__post_init__",
        "if self.latent_dim < 1:",
        "if self.latent_dim < 0:",
        [MODEL, RELIABILITY],
        "model",
    ),
    # --- data.py and files.py
    Mutant(
        "static-binarization",
        "data.present",
        "return torch.bernoulli(images, generator=generator)",
        "return (images > 0.5).float()",
        [DATA],
        "data",
    ),
    Mutant(
        "dequantize-255",
        "data.present",
        "return ((images * 255).round_() + u) / 256",
        "return ((images * 255).round_() + u) / 255",
        [BEHAVIOUR, DATA],
        "data",
    ),
    Mutant(
        "dequantize-no-round",
        "data.present",
        "return ((images * 255).round_() + u) / 256",
        "return (images * 255 + u) / 256",
        [BEHAVIOUR, DATA],
        "data",
        note="k/255*255 is exactly k in float32 (test_data checks it): the rounding is a safeguard with no effect",
    ),
    Mutant(
        "scored-split-global-rng",
        "data.load_scored_split",
        "images = present(images, pixels, torch.Generator().manual_seed(SCORED_SPLIT_SEED))",
        "images = present(images, pixels)",
        [DATA],
        "data",
    ),
    Mutant(
        "scored-split-limit-first",
        "data.load_scored_split",
        "images, labels = load_mnist(data_dir, train=train)",
        "images, labels = load_mnist(data_dir, train=train, limit=limit)",
        [DATA, EVALUATE],
        "data",
        note="the CPU generator draws pixel after pixel, so the first N images presented alone get the very numbers "
        "they get in the whole split (which test_data checks): presenting it all first is a safeguard",
    ),
    Mutant(
        "batches-drop-last",
        "data.labelled_batches",
        "for start in range(0, n, batch_size):",
        "for start in range(0, n - batch_size + 1, batch_size):",
        [DATA],
        "data",
    ),
    Mutant("pixels-div-256", "data.load_mnist", ".float().div_(255)", ".float().div_(256)", [DATA], "data"),
    Mutant(
        "md5-not-checked-on-raw",
        "data._check_file",
        "if _md5(raw.read_bytes()) == MNIST_MD5[name]:",
        "if True:",
        [DATA],
        "data",
    ),
    Mutant(
        "fetched-not-verified",
        "data._ensure_files",
        "if source_file.exists() and _md5((data := source_file.read_bytes())) == MNIST_MD5[name]:",
        "if source_file.exists() and (data := source_file.read_bytes()):",
        [DATA],
        "data",
    ),
    Mutant(
        "write-not-atomic",
        "files.write_atomic",
        "with open(tmp, 'wb') as f:\n            write(f)\n            f.flush()\n            os.fsync(f.fileno())\n"
        "        os.replace(tmp, path)\n",
        "with open(path, 'wb') as f:\n            write(f)\n            f.flush()\n            os.fsync(f.fileno())\n",
        [PATHS],
        "data",
    ),
    Mutant(
        "socket-timeout-kept",
        "data._fetch_torchvision",
        "socket.setdefaulttimeout(previous)",
        "pass",
        [DATA],
        "data",
        note="only matters after a real download, which the tests never do (no network in tests)",
    ),
    Mutant(
        "cb-default-grey",
        "data.DEFAULT_PIXELS",
        "'cb': 'dequantized'",
        "'cb': 'grey'",
        [DATA, BEHAVIOUR],
        "data",
    ),
    # --- train.py
    Mutant(
        "no-zero-grad",
        "train.make_train_step",
        "        optimizer.zero_grad(set_to_none=True)\n",
        "",
        [BEHAVIOUR],
        "train",
    ),
    Mutant(
        "lr-stage-sevenths",
        "train.learning_rate",
        "return config.lr * 10 ** (-stage / 7)",
        "return config.lr * 10 ** (-stage / 8)",
        [TRAIN, BEHAVIOUR],
        "train",
    ),
    Mutant("lr-stage-length", "train.learning_rate", "end += 3 ** stage", "end += 3 ** stage + 1", [TRAIN], "train"),
    Mutant(
        "lr-previous-epoch",
        "train.run_epoch",
        "group['lr'] = learning_rate(config, epoch)",
        "group['lr'] = learning_rate(config, epoch - 1)",
        [BEHAVIOUR, TRAIN],
        "train",
    ),
    Mutant(
        "one-epoch-short",
        "train.fit",
        "for epoch in range(run.epoch + 1, run.config.epochs + 1):",
        "for epoch in range(run.epoch + 1, run.config.epochs):",
        [TRAIN],
        "train",
    ),
    Mutant(
        "no-output-bias-init",
        "train.start_run",
        "    model.init_output_bias(data[0].mean(0))\n",
        "",
        [BEHAVIOUR, TRAIN],
        "train",
    ),
    Mutant(
        "weights-only-resume-unnamed",
        "train.restore_training_state",
        "if 'optimizer' not in state and 'rng' not in state:",
        "if False:",
        [PRETRAINED],
        "train",
    ),
    Mutant(
        "rng-not-restored",
        "train.restore_training_state",
        "set_rng_state(state['rng'], device)",
        "state['rng']",
        [RELIABILITY],
        "train",
    ),
    Mutant(
        "resume-keeps-log-of-epoch",
        "train.keep_log_until",
        "if json.loads(line)['epoch'] <= epoch:",
        "if json.loads(line)['epoch'] < epoch:",
        [RELIABILITY],
        "train",
    ),
    Mutant("nan-not-checked", "train.train_epoch", "if not finite.all():", "if False:", [RELIABILITY], "train"),
    Mutant(
        "nan-check-late",
        "train.train_epoch",
        "check_every=50",
        "check_every=10 ** 9",
        [RELIABILITY],
        "train",
        note="the last step checks every step not yet checked: a NaN is still found and named by its step, "
        "only an epoch's compute later (a cost, not a wrong result)",
    ),
    Mutant(
        "not-fused",
        "train.make_optimizer",
        "fused = next(model.parameters()).device.type in ('cpu', 'cuda')",
        "fused = False",
        [BEHAVIOUR, TRAIN],
        "train",
        note="the same arithmetic (the fused kernel is a speed option), up to rounding",
    ),
    Mutant(
        "resume-reseeds",
        "train.resume_run",
        "    torch.manual_seed(config.seed)\n",
        "",
        [RELIABILITY],
        "train",
        note="the saved random state replaces the seeded one a few lines later, and nothing draws in between: "
        "no effect",
    ),
    Mutant(
        "no-eval-mode",
        "train.run_epoch",
        "    model.eval()\n",
        "",
        [TRAIN, BEHAVIOUR],
        "train",
        note="the model has no dropout or batch norm: train and eval mode compute the same",
    ),
    Mutant(
        "beta-for-iwae-allowed",
        "train.TrainConfig.__post_init__",
        "if self.objective == 'iwae' and self.beta != 1:",
        "if False:",
        [BEHAVIOUR],
        "train",
    ),
    # --- where a run stops, resumes and starts: devices, Ctrl-C, paths
    Mutant(
        "resume-needs-the-device-state",
        "train.set_rng_state",
        "if device.type in ('cuda', 'mps') and device.type in state:",
        "if device.type in ('cuda', 'mps'):",
        [DEVICES],
        "devices",
    ),
    Mutant(
        "figures-from-grey-levels",
        "visualize.plot_all",
        "load_test_set(data_dir, state['train_config']['pixels'], device, limit=None)",
        "load_test_set(data_dir, 'grey', device, limit=None)",
        [VISUALIZE],
        "figures",
    ),
    Mutant(
        "ctrl-c-while-importing-torch",
        "train",
        "signal.signal(signal.SIGINT, lambda *_: sys.exit(print('\\ninterrupted (Ctrl-C)', file=sys.stderr) or 130))",
        "pass",
        [PATHS],
        "train",
    ),
    Mutant(
        "ignored-ctrl-c-taken-back",
        "cli.script",
        "if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:",
        "if True:",
        [PATHS],
        "train",
    ),
    Mutant("empty-out-dir-left", "files.output_dir", "folder.rmdir()", "pass", [PATHS], "data"),
    Mutant(
        "resume-from-a-file-unnamed",
        "train.resume_run",
        "if Path(out_dir).exists() and (not Path(out_dir).is_dir()):",
        "if False:",
        [PATHS],
        "train",
    ),
    Mutant("bench-times-conv", "bench.main", "if config.arch == 'conv':", "if False:", [TRAIN], "bench"),
    # --- the conditional VAE, KL warm-up, the film; the exact likelihood of a 2-D model
    Mutant(
        "label-ignored",
        "model.VAE.with_label",
        "torch.cat([h, one_hot.expand(*h.shape[:-1], N_CLASSES)], dim=-1)",
        "torch.cat([h, 0 * one_hot.expand(*h.shape[:-1], N_CLASSES)], dim=-1)",
        [CONDITIONAL],
        "conditional",
    ),
    Mutant(
        "labels-not-shuffled",
        "data.labelled_batches",
        "None if labels is None else labels[index]",
        "None if labels is None else labels[start:start + batch_size]",
        [CONDITIONAL],
        "conditional",
    ),
    Mutant(
        "marginal-is-a-mean",
        "scoring.conditional_scores",
        "torch.logsumexp(log_px_y, dim=1) - math.log(N_CLASSES)",
        "log_px_y.mean(dim=1)",
        [CONDITIONAL],
        "conditional",
    ),
    Mutant(
        "warm-up-a-step-late",
        "train.kl_weights",
        "torch.arange(1, n_steps + 1, dtype=torch.float64)",
        "torch.arange(n_steps, dtype=torch.float64)",
        [CONDITIONAL],
        "conditional",
    ),
    Mutant(
        "frames-kept-past-the-checkpoint",
        "train.drop_what_is_past",
        "if int(frame_path.stem) > epoch:",
        "if int(frame_path.stem) > epoch + 1:",
        [CONDITIONAL],
        "conditional",
    ),
    Mutant(
        "grid-not-widened",
        "scoring.posterior_grid",
        "lo, hi = (torch.where(wide, centre - 2 * half, lo), torch.where(wide, centre + 2 * half, hi))",
        "break",
        [EXACT],
        "exact",
    ),
    Mutant(
        "grid-widened-along-one-axis",
        "scoring.posterior_grid",
        "wide = below < NEGLIGIBLE_NATS",
        "wide = (below < NEGLIGIBLE_NATS) & torch.tensor([True, False])",
        [EXACT],
        "exact",
    ),
    Mutant(
        "scan-finds-nothing",
        "scoring.scan_prior",
        "return (lo - SCAN_SPACING, hi + SCAN_SPACING)",
        "return (lo + math.inf, hi - math.inf)",
        [EXACT],
        "exact",
    ),
    Mutant(
        "scan-without-x",
        "scoring.scan_prior",
        "x[mine] @ logits.flatten(1).T + log_p0",
        "0 * x[mine] @ logits.flatten(1).T + log_p0",
        [EXACT],
        "exact",
    ),
    Mutant(
        "scan-keeps-what-a-lower-peak-let-through",
        "scoring.scan_prior",
        "keep = value >= peak[i] - SCAN_NATS",
        "keep = value > -math.inf",
        [EXACT],
        "exact",
        note="the same integral on a larger grid: only the time it takes changes",
    ),
    Mutant(
        "grid-not-refined",
        "scoring.refined",
        "if grid.resolution_nats <= RESOLUTION_NATS or",
        "if True or",
        [EXACT],
        "exact",
    ),
    Mutant(
        "resolution-against-itself",
        "scoring.refined",
        "PosteriorGrid(z1[::2], z2[::2], log_joint[::2, ::2]).log_px",
        "PosteriorGrid(z1, z2, log_joint).log_px",
        [EXACT],
        "exact",
    ),
    Mutant(
        "refined-points-misplaced",
        "scoring.refined",
        "new[::2, ::2] = False",
        "new[1::2, 1::2] = False",
        [EXACT],
        "exact",
    ),
    Mutant(
        "best-border-reported",
        "evaluate.score_exactly",
        "min((g.border_nats for g in grids))",
        "max((g.border_nats for g in grids))",
        [EXACT],
        "exact",
    ),
    Mutant(
        "best-resolution-reported",
        "evaluate.score_exactly",
        "max((g.resolution_nats for g in grids))",
        "min((g.resolution_nats for g in grids))",
        [EXACT],
        "exact",
    ),
    Mutant(
        "exact-images-0-not-skipped",
        "evaluate.main",
        "args.exact_images > 0",
        "args.exact_images >= 0",
        [EXACT],
        "exact",
    ),
    Mutant(
        "trapezoid-spacing",
        "scoring.PosteriorGrid.log_weights",
        "(z[-1] - z[0]).item() / (len(z) - 1)",
        "(z[-1] - z[0]).item() / len(z)",
        [EXACT],
        "exact",
    ),
    Mutant(
        "kl-on-the-joint",
        "scoring.PosteriorGrid.kl_from",
        "(log_q - self.log_posterior)",
        "(log_q - self.log_joint)",
        [EXACT],
        "exact",
    ),
]


# --------------------------------------------------------------------------------------------- targets


class TargetError(Exception):
    """A target that cannot be found (or is not one node) in its module."""


def module_path(root, module):
    """The file of a module of the repository: `train` -> <root>/train.py, `a.b` -> <root>/a/b.py."""
    return Path(root, *module.split(".")).with_suffix(".py")


def split_target(target, root=ROOT):
    """'model.VAE.loss' -> ('model', ['VAE', 'loss']): the longest prefix that names a module file of `root`;
    'train' -> ('train', []): the whole module (for what no name holds, such as an `if` at its top)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        if module_path(root, ".".join(parts[:cut])).is_file():
            return ".".join(parts[:cut]), parts[cut:]
    raise TargetError(f"{target}: no module of the repository holds it (give module.name)")


def _defines(node, name):
    """Whether the statement `node` defines `name` (def, class, or an assignment to it)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    return False


def find_node(tree, names, target):
    """The one statement of the module `tree` that the qualified name `names` (['VAE', 'loss']) defines; the
    module itself for no names."""
    body, node = tree.body, tree
    for depth, name in enumerate(names):
        found = [n for n in body if _defines(n, name)]
        if len(found) != 1:
            where = ".".join(names[:depth]) or "the module"
            raise TargetError(f"{target}: {name!r} is defined {len(found)} times in {where}, not once")
        node = found[0]
        if depth < len(names) - 1:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                raise TargetError(f"{target}: {name!r} is not a class or function, so it holds no {names[depth + 1]!r}")
            body = node.body
    return node


def locate(target, root=ROOT):
    """(path, source text, node) of a target `module.qualified_name` in the files under `root`."""
    module, names = split_target(target, root)
    path = module_path(root, module)
    source = path.read_text()
    return path, source, find_node(ast.parse(source), names, target)


def canonical(node):
    """The target's text as `ast.unparse` writes it: the same whatever the file's formatting."""
    return ast.unparse(node)


def first_line(node):
    """The node's first line (1-based), its decorators included."""
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


def mutated_source(mutant, root=ROOT):
    """(path, the module's text with the mutant applied), or raise TargetError saying why it is STALE."""
    path, source, node = locate(mutant.target, root)
    text = canonical(node)
    count = text.count(mutant.old)
    if count != 1:
        raise TargetError(f"the text to change occurs {count} times in {mutant.target} (see --show)")
    new_text = text.replace(mutant.old, mutant.new)
    try:
        new_node = ast.parse(new_text).body
    except SyntaxError as e:
        raise TargetError(f"the mutated {mutant.target} does not parse: {e.msg}, line {e.lineno}") from None
    if [ast.dump(n) for n in new_node] == [ast.dump(n) for n in ast.parse(text).body]:
        raise TargetError(f"the mutation changes nothing in {mutant.target}")
    if isinstance(node, ast.Module):  # the whole module: its canonical text is the new file
        return path, new_text + "\n"
    lines = source.splitlines(keepends=True)
    start, end = first_line(node) - 1, node.end_lineno  # the node's lines: lines[start:end]
    indent = lines[start][: node.col_offset]  # whitespace (ast's offsets count UTF-8 bytes)
    after = lines[end - 1].encode()[node.end_col_offset :].decode()
    if indent.strip() or after.strip()[:1] not in ("", "#"):
        raise TargetError(f"{mutant.target} shares its lines with other statements: it cannot be replaced")
    return path, "".join(lines[:start]) + indented(new_text, indent) + "\n" + "".join(lines[end:])


def indented(text, indent):
    """`text` with `indent` before each line, except the blank ones and those inside a multi-line string (a
    docstring, as ast.unparse writes it), which stay as they are."""
    inside = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            inside.update(range(node.lineno + 1, node.end_lineno + 1))
    lines = text.splitlines(keepends=True)
    return "".join(line if n in inside or not line.strip() else indent + line for n, line in enumerate(lines, 1))


# --------------------------------------------------------------------------------------------- running


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
        try:
            path, text = mutated_source(mutant, scratch)
        except (TargetError, OSError) as e:
            return f"STALE ({e})", 0.0, ""
        path.write_text(text)
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


def show(target):
    """Print a target's canonical text, where mutants' `old` is looked for."""
    try:
        path, _, node = locate(target)
    except (TargetError, OSError) as e:
        sys.exit(f"error: {e}")
    where = "the whole module" if isinstance(node, ast.Module) else f"lines {first_line(node)}-{node.end_lineno}"
    print(f"# {target}: {path.relative_to(ROOT)}, {where}")
    print(canonical(node))


def main(argv=None):
    groups = sorted({m.group for m in MUTANTS})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ids", nargs="*", help="only these mutants (default: all)")
    p.add_argument("--group", action="append", choices=groups, help="only the mutants of this group (repeatable)")
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutant")
    p.add_argument("--list", action="store_true", help="print the catalogue and stop")
    p.add_argument("--check", action="store_true", help="apply each mutant, run no test: report the STALE ones")
    p.add_argument("--show", metavar="TARGET", help="print a target's canonical text (module.name) and stop")
    p.add_argument("--timeout", type=int, default=900, help="seconds per mutant (default: %(default)s)")
    args = p.parse_args(argv)
    if args.show:
        return show(args.show)
    known = {m.id for m in MUTANTS}
    if unknown := set(args.ids) - known:
        p.error(f"unknown mutants: {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTANTS if (not args.ids or m.id in args.ids) and (not args.group or m.group in args.group)]
    if args.list:
        for m in chosen:
            print(f"{m.id:28s} {m.target:32s} {m.group:10s} {' '.join(m.tests)}")
        return
    if args.check:
        stale = 0
        for m in chosen:
            try:
                mutated_source(m)
                verdict = "applies"
            except (TargetError, OSError) as e:
                verdict, stale = f"STALE ({e})", stale + 1
            print(f"{m.id:28s} {m.target:32s} {verdict}")
        sys.exit(1 if stale else 0)
    unkilled = []
    for m in chosen:
        verdict, seconds, failed = run(m, [] if args.full else m.tests, args.timeout)
        print(f"{m.id:28s} {m.target:32s} {verdict:10s} {seconds:6.1f} s  {failed}", flush=True)
        if not verdict.startswith("KILLED"):
            unkilled.append((m, verdict))
    if unkilled:
        print("\nnot killed:")
        for m, verdict in unkilled:
            why = "fix the mutant (--show)" if verdict.startswith("STALE") else m.note or "(no note: a missing test?)"
            print(f"  {m.id}: {why}")
    sys.exit(1 if any(v.startswith("STALE") or not m.note for m, v in unkilled) else 0)


if __name__ == "__main__":
    main()
