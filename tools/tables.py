"""The results of README.md and docs/, written from the JSON files that measured them: `python tools/tables.py`
rewrites every table (and every sentence that quotes their numbers) between `<!-- table NAME -->` and
`<!-- end of table -->`; `--check` changes nothing and exits with status 1, naming what is not what its files give.

The files are the --json output of evaluate.py, bench.py and gradient_variance.py under results/ (and pretrained/),
each with its made_by (the command, the machine, the wall time), and the log.jsonl of the IWAE-protocol run.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED, PROTOCOL_LOG = "pretrained/iwae-protocol-vae.json", "results/iwae-protocol-log.jsonl"
PAPER, REPRODUCTION = 86.76, 86.35  # Burda et al. (2016), Table 1, VAE with k = 1; nbip/IWAE (TensorFlow 2)
NOT_SCORED = "not yet scored on all 10000 test images"  # a row whose results file is not in the repository yet


class Missing(Exception):
    """A table's file is not in the repository yet: the table, or its row, says so."""


def load(name):
    """A results file by its name, or any file by its path; a log (.jsonl) as its records."""
    path = ROOT / name if "/" in name else ROOT / "results" / f"{name}.json"
    if not path.exists():
        raise Missing(path.relative_to(ROOT))
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def trained(r):
    """The sum of the epochs' times in the run's log (a shipped file has no log)."""
    return duration(r["train_seconds"]) if "train_seconds" in r else "—"


def nll(r):
    """-L_5000, and where there is one the exact value, on the images it was computed on if not all."""
    assert r["n_images"] == 10000 and r["k"] == 5000, f"not all 10000 test images at k = 5000: {r['made_by']}"
    if "test_nll_exact" not in r:
        return f"{r['test_nll']:.2f}"
    where = "" if r["exact_n_images"] == r["n_images"] else f" (first {r['exact_n_images']})"
    return f"{r['test_nll']:.2f}; exact: **{r['test_nll_exact']:.2f}**{where}"


def bits(r):
    eight = f"; **{r['bits_per_dim_8bit']:.3f}** for the 8-bit images" if "bits_per_dim_8bit" in r else ""
    return f"{r['bits_per_dim']:.4f}{eight}"


def epochs(r):
    return r["epoch"] if r["epoch"] == r["train_config"]["epochs"] else f"{r['epoch']} of {r['train_config']['epochs']}"


def networks(r):
    c = r["model_config"]
    return f"784-{'-'.join(map(str, c['hidden_dims']))} {'ReLU' if c['activation'] == 'relu' else 'tanh'}"


def cells(name, formats, missing=None):
    """The cells of file `name`, each format a format string of its keys or a function of it. A missing file fails
    its table, or where a row may wait for it, its cells are `missing` and dashes."""
    try:
        r = load(name)
    except Missing:
        if missing is None:
            raise
        return [missing, *["—"] * (len(formats) - 1)]
    return [f(r) if callable(f) else f.format_map(r) for f in formats]


ELBO, NLL, UNITS = "{test_neg_elbo:.2f}", "{test_nll:.2f}", "{active_units} / {model_config[latent_dim]}"
RESULTS = {  # file: (the model, what the literature reports)
    "examples": (
        "1. pytorch/examples: Bernoulli on k/255 pixels, 784-400-20 ReLU, batch 128",
        "“test loss” ≈ 105.5 after 10 epochs (not a likelihood)",
    ),
    SHIPPED: (
        "2. IWAE protocol: Bernoulli, binarized, 784-200-200-50 tanh, batch 20, their schedule "
        "([weights](pretrained/README.md))",
        f"{PAPER} after 3280 epochs (Burda et al. 2016, Table 1, VAE, k = 1); {REPRODUCTION} (nbip/IWAE)",
    ),
    "iwae-30": ("3. the same, its first 30 epochs", ""),
    "iwae-k50": (
        "4. IWAE objective, k = 50, networks and schedule of 2.",
        "84.78 after 3280 epochs (Burda et al. 2016, Table 1, IWAE, k = 50)",
    ),
    "cb-grey": ("5. continuous Bernoulli on k/255 pixels (`--pixels grey`), networks and schedule of 2.", "—"),
    "cb-deq": (
        "6. continuous Bernoulli on dequantized pixels, networks and schedule of 2.",
        "RealNVP 1.06, Glow 1.05, FFJORD 0.99 bits/dim (8-bit MNIST)",
    ),
    "default": ("7. default `python train.py`: Bernoulli, binarized, 2-D latent, 784-512-256 ReLU", "—"),
    "cb-2d": ("8. continuous Bernoulli on dequantized pixels, 2-D latent, networks of 7.", "—"),
    "cb-2d-grey": ("9. continuous Bernoulli on k/255 pixels (`--pixels grey`), networks of 7.", "—"),
}


def results(names, link=""):
    header = ["model", "epochs", "training time", "test −ELBO", "test NLL, −L_5000", "bits/dim", "active units"]
    formats = [epochs, trained, ELBO, nll, bits, UNITS, "{knn_accuracy:.3f}"]
    rows = [[RESULTS[n][0].replace("](", f"]({link}"), *cells(n, formats, NOT_SCORED), RESULTS[n][1]] for n in names]
    return [*header, "15-NN accuracy", "literature"], rows


def headline():
    """The README's sentence on row 2: how far it is from the paper's number, and how far the same run went on."""
    r, later = load(SHIPPED), load("iwae-protocol-e2186")
    gap, later_gap = r["test_nll"] - PAPER, later["test_nll"] - PAPER
    where = f"{gap:.2f} nats short of" if gap > 0 else f"{-gap:.2f} nats below"
    return (
        f"Row 2 is the model of Burda et al. (2016) after epoch {r['epoch']} of their 3280, and its −L_5000 of "
        f"**{r['test_nll']:.2f}** is {where} the paper's {PAPER} (an independent TensorFlow 2 reproduction, "
        f"nbip/IWAE, reports {REPRODUCTION}). It {'does not reach' if gap > 0 else 'reaches'} {PAPER}. "
        f"The same run scored {later['test_nll']:.2f} at epoch {later['epoch']}, halfway through the last stage, "
        f"{abs(later_gap):.2f} nats {'above' if later_gap > 0 else 'below'} the paper's; those weights are not "
        "shipped ([the run along its schedule](docs/results.md#the-iwae-protocol-along-its-schedule)). "
        "Where the original code departs from the paper's text (its Adam uses β1 = 0.99 and second moments "
        "initialised at 1, and it rounds the learning rates to one decimal), this repository follows the text: "
        "Adam with β1 = 0.9 and eps = 1e-4, and the learning rate 1e-3 · 10^(−i/7) for 3^i epochs."
    )


def default_sentence():
    """The README's sentence on `python train.py`'s model: its test -ELBO and its training time."""
    r = load("default")
    return (
        "Its test −ELBO is {test_neg_elbo:.2f} nats per image (row 7 of the results below); its {epoch} epochs took "
        "{trained} on one thread of the machine that scored it ({made_by[machine]}), whose other core trained "
        "another model (the sum of the epoch times in its log, `train_seconds` in `results/default.json`). These "
        "are its other figures, committed in `plots/`:"
    ).format_map({**r, "trained": trained(r)})


def evaluate_sentence():
    """The README's sentence on `python evaluate.py` with no flags, on that model."""
    r = load("default")
    return (
        "On the default model, with no flags, it took {wall} on {made_by[threads]} threads of that machine, with "
        "nothing else running (`made_by` in `results/default.json`), most of it for k = 5000 on all {n_images} "
        "test images; the exact likelihood is computed on the first {exact_n_images}. `--exact-images 0` skips the "
        "exact pass, and `--limit N` scores the first N test images."
    ).format_map({**r, "wall": duration(r["made_by"]["wall_seconds"])})


def schedule_sentence():
    log = {r["epoch"]: r for r in load(PROTOCOL_LOG)}
    return (
        "The log ends at epoch {epoch} of 3280, at a test −ELBO of {test_loss:.2f} (reconstruction {test_recon:.2f} "
        "+ KL {test_kl:.2f}): the run stopped there, and its checkpoints after epoch 1093 were not kept, so the "
        "epoch-2186 model is scored but not shipped. Re-running the command reproduces it, at the log's median of "
        "{median:.1f} s an epoch (one thread, other work beside it)."
    ).format_map({**log[max(log)], "median": statistics.median(r["seconds"] for r in log.values())})


def schedule():
    """The IWAE-protocol run at the ends of its schedule's stages: the log's test -ELBO, evaluate.py's the rest."""
    log, shipped = {r["epoch"]: r for r in load(PROTOCOL_LOG)}, load(SHIPPED)["epoch"]
    # The stages last 3^i epochs, i = 0..7, so they end at 1, 4, ..., 1093, 3280; 2186 is halfway through the last.
    ends = [1, 4, 13, 40, 121, 364, 1093, 3280]
    rows = []
    for end in [end for end in sorted([*ends, 2186]) if end in log]:
        where = f"end of stage {ends.index(end) + 1}" if end in ends else "halfway through stage 8"
        rows.append([f"{end} ({where})", f"{log[end]['lr']:.2e}", f"{log[end]['test_loss']:.2f}"])
        name = SHIPPED if end == shipped else f"iwae-protocol-e{end}"  # the shipped weights are their epoch's
        rows[-1] += cells(name, [NLL, UNITS, "{knn_accuracy:.4f}"], "—")
    return ["epoch", "learning rate", "test −ELBO", "test NLL, −L_5000", "active units", "15-NN accuracy"], rows


def pretrained():
    header = ["epoch", "test −ELBO", "reconstruction + KL", "test NLL, −L_5000", "bits/dim", "active units"]
    formats = ["{epoch}", ELBO, "{test_recon:.2f} + {test_kl:.2f}", "**{test_nll:.2f}**", "{bits_per_dim:.4f}"]
    formats += [UNITS, "{knn_accuracy:.4f}", lambda r: duration(r["made_by"]["wall_seconds"])]
    return [*header, "15-NN accuracy", "evaluate.py's wall time"], [cells(SHIPPED, formats)]


def bench():
    rows = {  # each row's label, and the prefix of its keys
        "ours (`train.py`'s epoch)": "",
        "baseline (pytorch/examples: DataLoader, `.item()` per step)": "baseline_",
        "GEMM bound ({gemm_gflop_per_epoch:.0f} GFLOP at the measured {gemm_gflop_per_s:.0f} GFLOP/s)": "gemm_bound_",
    }
    header = ["per epoch ({n_train} train + {n_test} test images)", "s/epoch", "images/s"]
    rows = [[label, f"{{{p}seconds_per_epoch:.2f}}", f"{{{p}images_per_s:.0f}}"] for label, p in rows.items()]
    return cells("bench-cpu", header), [cells("bench-cpu", row) for row in rows]


def bench_sentence():
    return (
        "Our epoch is {speedup:.2f} times as fast as the baseline's, at {gemm_bound_fraction:.2f} of the GEMM bound; "
        "−L_5000 scores {eval_images_per_s:.1f} test images a second for this model."
    ).format_map(load("bench-cpu"))


def conditional():
    header = ["latent d", "networks", "training time", "test −ELBO", "−log p(x\\|y), k = 5000"]
    header += ["−log p(x), k = 100 a label", "classifier accuracy", "active units", "15-NN accuracy of z"]
    formats = [networks, trained, ELBO, NLL, "{test_nll_marginal:.2f}", "{classifier_accuracy:.4f}"]
    formats += [UNITS, "{knn_accuracy:.3f}"]
    return header, [[d, *cells(f"c-d{d}", formats, NOT_SCORED)] for d in (2, 4, 8, 20)]


def twins():
    header = ["784-400-20 ReLU, 30 epochs", "test −ELBO", "−log p(x\\|y)", "−log p(x)", "classifier accuracy"]
    formats = [ELBO, NLL, "**{test_nll_marginal:.2f}**", "{classifier_accuracy:.4f}"]
    return header, [
        ["conditional", *cells("c-d20", formats)],
        ["unconditional", *cells("d20", [ELBO, "—", "**{test_nll:.2f}**", "—"])],
    ]


def warmup():
    header = ["50-D, 100 epochs", "training time", "test −ELBO", "KL", "−log p(x), k = 5000", "active units"]
    formats = [trained, ELBO, "{test_kl:.2f}", NLL, UNITS, "{knn_accuracy:.4f}"]
    rows = {"no warm-up": "iwae-arch", "30-epoch warm-up": "iwae-arch-warmup"}
    return [*header, "15-NN accuracy of z"], [[label, *cells(name, formats)] for label, name in rows.items()]


def fitting():
    """The encoder gradient's variance is the trained model's, at the run's objective and k."""
    rows = []
    for name, objective, estimator, k in [
        ("d20", "ELBO", "pathwise", 1),
        ("ways-score", "ELBO", "score, leave-one-out", 5),
        ("ways-iwae", "IWAE", "pathwise", 5),
    ]:
        v = load(f"gradient-variance-{objective.lower()}")["trained"]
        ratio = v[estimator.split(",")[0]][str(k)]["variance"] / v["pathwise"][str(k)]["variance"]
        rows.append([objective, estimator, k, f"{ratio:.0f}", *cells(name, [ELBO, NLL, trained], NOT_SCORED)])
    header = ["objective", "estimator", "k", "encoder-gradient variance / pathwise's", "test −ELBO"]
    return [*header, "test NLL, −L_5000", "training time"], rows


def per_image():
    images = load("default-per-image")["images"]
    far = [i for i in images if i["kl_q_posterior"] > 20]
    groups = {
        f"{len(far)} with KL(q ‖ p(z\\|x)) > 20 nats": far,
        f"the other {len(images) - len(far)}": [i for i in images if i not in far],
        f"all {len(images)}": images,
    }
    rows = []
    for name, group in groups.items():
        kl = [i["kl_q_posterior"] for i in group]
        gaps = [[i["log_px"] - i[f"l_{k}"] for i in group] for k in (5000, 50000)]
        spreads = [f"{sum(v) / len(v):.2f} ({min(v):.2f} to {max(v):.2f})" for v in [kl, *gaps]]
        rows.append([name, *spreads, f"{max(abs(i['log_px'] - i['log_px_check']) for i in group):.3f}"])
    header = ["test images", "KL(q ‖ p(z\\|x)): mean (range)", "log p(x) − L_5000", "log p(x) − L_50000"]
    return [*header, "largest \\|log p(x) − the second grid's\\|"], rows


def variance():
    rows = []
    for objective in ("elbo", "iwae"):
        r = load(f"gradient-variance-{objective}")
        ks = sorted(r["trained"]["pathwise"], key=int)
        for which in ("trained", "initial"):
            v = r[which]  # {estimator: {k: noise summary}}
            ratio = [f"{v['score'][k]['variance'] / v['pathwise'][k]['variance']:.3g}" for k in ks]
            rows.append([objective.upper(), which, "variance, score / pathwise", *ratio])
            for estimator in ("pathwise", "score"):
                rows.append(["", "", f"SNR, {estimator}", *[f"{v[estimator][k]['snr']:.3f}" for k in ks]])
    return ["objective", "model", "", *[f"k = {k}" for k in ks]], rows


def exact():
    header = ["2-D model", "images", "exact −log p(x)", "least border margin (nats)", "largest resolution (nats)"]
    formats = ["first {exact_n_images}", "{test_nll_exact:.2f}", "{exact_border_nats:.1f}"]
    formats += ["{exact_resolution_nats:.3f}"]
    return header, [[RESULTS[n][0].split(":")[0], *cells(n, formats)] for n in ("default", "cb-2d", "cb-2d-grey")]


def side_by_side():
    rows = [  # each quantity, and its format in the default model's file and in the 2-D dequantized one's
        ["test −ELBO", ELBO + " (binary images)", ELBO + " (a density on [0, 1]^784)"],
        ["test KL", "{test_kl:.2f}", "{test_kl:.2f}"],
        ["active units", UNITS, UNITS],
        ["15-NN accuracy of the code", "**{knn_accuracy:.3f}**", "{knn_accuracy:.3f}"],
    ]
    header = ["", "Bernoulli, binarized (the default)", "continuous Bernoulli, dequantized"]
    return header, [[name, *cells("default", [b]), *cells("cb-2d", [c])] for name, b, c in rows]


TABLES = {
    "headline": lambda: results(["default", SHIPPED, "examples", "cb-deq"]),
    "headline-sentence": headline,
    "default-sentence": default_sentence,
    "evaluate-sentence": evaluate_sentence,
    "pretrained": pretrained,
    "results": lambda: results(list(RESULTS), link="../"),
    "schedule": schedule,
    "schedule-sentence": schedule_sentence,
    "bench": bench,
    "bench-sentence": bench_sentence,
    "conditional": conditional,
    "twins": twins,
    "warmup": warmup,
    "fitting": fitting,
    "side-by-side": side_by_side,
    "exact": exact,
    "per-image": per_image,
    "variance": variance,
}


def markdown(name):
    """A table as Markdown, or a sentence as it is."""
    try:
        made = TABLES[name]()
    except Missing as missing:
        return f"*Not yet measured: this comes from `{missing}`, which is not yet in the repository.*"
    if isinstance(made, str):
        return made
    header, rows = made
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table is not its files'")
    args = p.parse_args(argv)
    markers, stale = re.compile(r"(<!-- table (\S+) -->\n)(.*?)(<!-- end of table -->)", re.S), []
    for page in [ROOT / "README.md", ROOT / "pretrained" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        new = markers.sub(lambda m: m[1] + markdown(m[2]) + "\n" + m[4], text)
        if new != text:
            stale += [f"{page.relative_to(ROOT)}: {m[2]}" for m in markers.finditer(text) if m[0] not in new]
            if not args.check:
                page.write_text(new)
    if stale:
        print(("not what their files give: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
