"""The results of README.md and docs/, written from the JSON files that measured them: `python tools/tables.py`
rewrites every table (and every sentence that quotes their numbers) between its markers; `--check` changes
nothing and exits with status 1, naming what is not what its files give (tests/test_tables.py runs it).

The files are the --json output of evaluate.py, bench.py and gradient_variance.py, committed under results/ (and
pretrained/), each with how it was made (made_by: the command, the machine, the wall time), and the log.jsonl of
the IWAE-protocol run. In a page, a table stands between `<!-- table NAME -->` and `<!-- end of table -->`.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IWAE = "784-200-200-50 tanh, batch 20"
PAPER, REPRODUCTION = 86.76, 86.35  # Burda et al. (2016), Table 1, VAE with k = 1; nbip/IWAE (TensorFlow 2)


NOT_SCORED = "not yet scored on all 10000 test images"  # a row whose results file is not in the repository yet


class Missing(Exception):
    """A table's file is not in the repository yet: the table, or its row, says so."""


def read(path):
    if not path.exists():
        raise Missing(path.relative_to(ROOT))
    return path.read_text()


def load(name):
    return json.loads(read(ROOT / name if "/" in name else ROOT / "results" / f"{name}.json"))


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def units(r):
    return f"{r['active_units']} / {r['model_config']['latent_dim']}"


def nll(r):
    """-L_k, and where there is one the exact value, on the images it was computed on if not all."""
    cell = f"{r['test_nll']:.2f}"
    if "test_nll_exact" in r:
        where = "" if r["exact_n_images"] == r["n_images"] else f" (first {r['exact_n_images']})"
        cell += f"; exact: **{r['test_nll_exact']:.2f}**{where}"
    return cell


def bits(r):
    cell = f"{r['bits_per_dim']:.4f}"
    return cell + (f"; **{r['bits_per_dim_8bit']:.3f}** for the 8-bit images" if "bits_per_dim_8bit" in r else "")


def epochs(r):
    return r["epoch"] if r["epoch"] == r["train_config"]["epochs"] else f"{r['epoch']} of {r['train_config']['epochs']}"


def trained(r):
    """The training time, the sum of the epochs' times in the run's log (a shipped file has no log)."""
    return duration(r["train_seconds"]) if "train_seconds" in r else "—"


RESULTS = {  # file: (the model, what the literature reports)
    "examples": (
        "1. pytorch/examples: Bernoulli on k/255 pixels, 784-400-20 ReLU, batch 128",
        "“test loss” ≈ 105.5 after 10 epochs (not a likelihood)",
    ),
    "pretrained/iwae-protocol-vae.json": (
        f"2. IWAE protocol: Bernoulli, binarized, {IWAE}, their schedule ([weights](pretrained/README.md))",
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
    """Rows of the results table: the models scored by evaluate.py --k 5000 on all 10000 test images."""
    header = ["model", "epochs", "training time", "test −ELBO", "test NLL, −L_5000", "bits/dim", "active units"]
    header += ["15-NN accuracy", "literature"]
    rows = []
    for name in names:
        model, literature = RESULTS[name]
        model = model.replace("](", f"]({link}")
        try:
            r = load(name)
        except Missing:
            rows.append([model, NOT_SCORED, *["—"] * (len(header) - 3), literature])
            continue
        assert r["n_images"] == 10000 and r["k"] == 5000, f"{name}: not all 10000 test images at k = 5000"
        cells = [model, epochs(r), trained(r), f"{r['test_neg_elbo']:.2f}", nll(r)]
        rows.append([*cells, bits(r), units(r), f"{r['knn_accuracy']:.3f}", literature])
    return header, rows


def headline():
    """The README's sentence on row 2: how far it is from the paper's number."""
    r = load("pretrained/iwae-protocol-vae.json")
    gap = r["test_nll"] - PAPER
    where = f"{gap:.2f} nats short of" if gap > 0 else f"{-gap:.2f} nats below"
    return (
        f"Row 2 is the model of Burda et al. (2016) after epoch {r['epoch']} of their 3280, and its −L_5000 of "
        f"**{r['test_nll']:.2f}** is {where} the paper's {PAPER} (an independent TensorFlow 2 reproduction, "
        f"nbip/IWAE, reports {REPRODUCTION}). "
        + ("It does not reach 86.76. " if gap > 0 else "It reaches 86.76. ")
        + later()
        + "Where the original code departs from the paper's text (its Adam uses β1 = 0.99 and second moments "
        "initialised at 1, and it rounds the learning rates to one decimal), this repository follows the text: "
        "Adam with β1 = 0.9 and eps = 1e-4, and the learning rate 1e-3 · 10^(−i/7) for 3^i epochs."
    )


def later():
    """The run of row 2 went on past the shipped epoch: its last scored epoch, whose weights are not shipped."""
    try:
        r = load("iwae-protocol-e2186")
    except Missing:
        return ""
    gap = r["test_nll"] - PAPER
    return (
        f"The same run scored {r['test_nll']:.2f} at epoch {r['epoch']}, halfway through the last stage, "
        f"{abs(gap):.2f} nats {'above' if gap > 0 else 'below'} the paper's; those weights are not shipped "
        "([the run along its schedule](docs/results.md#the-iwae-protocol-along-its-schedule)). "
    )


def protocol_log():
    return {r["epoch"]: r for r in map(json.loads, read(ROOT / "results" / "iwae-protocol-log.jsonl").splitlines())}


def schedule_sentence():
    log = protocol_log()
    last = log[max(log)]
    return (
        f"The log ends at epoch {last['epoch']} of 3280, at a test −ELBO of {last['test_loss']:.2f} "
        f"(reconstruction {last['test_recon']:.2f} + KL {last['test_kl']:.2f}): the run stopped there, and its "
        "checkpoints after epoch 1093 were not kept, so the epoch-2186 model is scored but not shipped. Re-running "
        "the command reproduces it, at the log's median of "
        f"{statistics.median(r['seconds'] for r in log.values()):.1f} s an epoch (one thread, other work beside it)."
    )


def schedule():
    """The IWAE-protocol run at the ends of its schedule's stages: the log's test -ELBO, evaluate.py's the rest."""
    log, shipped = protocol_log(), load("pretrained/iwae-protocol-vae.json")
    rows = []
    # The stages last 3^i epochs, i = 0..7, so they end at 1, 4, ..., 1093, 3280; 2186 is halfway through the last.
    stage_ends = [1, 4, 13, 40, 121, 364, 1093, 3280]
    for end in sorted([*stage_ends, 2186]):
        if end not in log:
            continue
        where = f"end of stage {stage_ends.index(end) + 1}" if end in stage_ends else "halfway through stage 8"
        cells = [f"{end} ({where})", f"{log[end]['lr']:.2e}", f"{log[end]['test_loss']:.2f}"]
        try:  # the shipped weights are the stage end's of their epoch (docs/results.md)
            r = shipped if end == shipped["epoch"] else load(f"iwae-protocol-e{end}")
        except Missing:
            r = None
        rows.append([*cells, *([f"{r['test_nll']:.2f}", units(r), f"{r['knn_accuracy']:.4f}"] if r else ["—"] * 3)])
    return ["epoch", "learning rate", "test −ELBO", "test NLL, −L_5000", "active units", "15-NN accuracy"], rows


def bench():
    r = load("bench-cpu")
    rows = [
        ["ours (`train.py`'s epoch)", r["seconds_per_epoch"], r["images_per_s"]],
        [
            "baseline (pytorch/examples: DataLoader, `.item()` per step)",
            r["baseline_seconds_per_epoch"],
            r["baseline_images_per_s"],
        ],
        [
            f"GEMM bound ({r['gemm_gflop_per_epoch']:.0f} GFLOP at the measured {r['gemm_gflop_per_s']:.0f} GFLOP/s)",
            r["gemm_bound_seconds_per_epoch"],
            r["gemm_bound_images_per_s"],
        ],
    ]
    header = [f"per epoch ({r['n_train']} train + {r['n_test']} test images)", "s/epoch", "images/s"]
    return header, [[name, f"{s:.2f}", f"{n:.0f}"] for name, s, n in rows]


def pretrained():
    r = load("pretrained/iwae-protocol-vae.json")
    header = ["epoch", "test −ELBO", "reconstruction + KL", "test NLL, −L_5000", "bits/dim", "active units"]
    cells = [r["epoch"], f"{r['test_neg_elbo']:.2f}", f"{r['test_recon']:.2f} + {r['test_kl']:.2f}"]
    cells += [f"**{r['test_nll']:.2f}**", f"{r['bits_per_dim']:.4f}", units(r), f"{r['knn_accuracy']:.4f}"]
    return [*header, "15-NN accuracy", "evaluate.py's wall time"], [[*cells, duration(r["made_by"]["wall_seconds"])]]


def bench_sentence():
    r = load("bench-cpu")
    return (
        f"Our epoch is {r['speedup']:.2f} times as fast as the baseline's, at {r['gemm_bound_fraction']:.2f} of the "
        f"GEMM bound; −L_5000 scores {r['eval_images_per_s']:.1f} test images a second for this model."
    )


def networks(r):
    c = r["model_config"]
    return f"784-{'-'.join(map(str, c['hidden_dims']))} {'ReLU' if c['activation'] == 'relu' else 'tanh'}"


def conditional():
    header = ["latent d", "networks", "training time", "test −ELBO", "−log p(x\\|y), k = 5000"]
    header += ["−log p(x), k = 100 a label", "classifier accuracy", "active units", "15-NN accuracy of z"]
    rows = []
    for d in (2, 4, 8, 20):
        try:
            r = load(f"c-d{d}")
        except Missing:
            rows.append([d, NOT_SCORED, *["—"] * (len(header) - 2)])
            continue
        cells = [d, networks(r), trained(r), f"{r['test_neg_elbo']:.2f}"]
        cells += [f"{r['test_nll']:.2f}", f"{r['test_nll_marginal']:.2f}", f"{r['classifier_accuracy']:.4f}"]
        rows.append([*cells, units(r), f"{r['knn_accuracy']:.3f}"])
    return header, rows


def twins():
    """The 20-D conditional model against its unconditional twin."""
    header = ["784-400-20 ReLU, 30 epochs", "test −ELBO", "−log p(x\\|y)", "−log p(x)", "classifier accuracy"]
    c, u = load("c-d20"), load("d20")
    return header, [
        [
            "conditional",
            f"{c['test_neg_elbo']:.2f}",
            f"{c['test_nll']:.2f}",
            f"**{c['test_nll_marginal']:.2f}**",
            f"{c['classifier_accuracy']:.4f}",
        ],
        ["unconditional", f"{u['test_neg_elbo']:.2f}", "—", f"**{u['test_nll']:.2f}**", "—"],
    ]


def warmup():
    header = ["50-D, 100 epochs", "training time", "test −ELBO", "KL", "−log p(x), k = 5000", "active units"]
    rows = []
    for name, label in (("iwae-arch", "no warm-up"), ("iwae-arch-warmup", "30-epoch warm-up")):
        r = load(name)
        cells = [label, trained(r), f"{r['test_neg_elbo']:.2f}", f"{r['test_kl']:.2f}", f"{r['test_nll']:.2f}"]
        rows.append([*cells, units(r), f"{r['knn_accuracy']:.4f}"])
    return [*header, "15-NN accuracy of z"], rows


def fitting():
    """The three ways of fitting 784-400-20: the encoder gradient's variance beside the pathwise one's (trained
    model, at the run's objective and k), and evaluate.py's numbers; each cell as far as it is measured."""
    rows = []
    for name, objective, estimator, k in (
        ("d20", "elbo", "pathwise", 1),
        ("ways-score", "elbo", "score", 5),
        ("ways-iwae", "iwae", "pathwise", 5),
    ):
        row = [objective.upper(), estimator + (", leave-one-out" if estimator == "score" else ""), k]
        try:
            v = load(f"gradient-variance-{objective}")["trained"]
            ratio = v[estimator][str(k)]["variance"] / v["pathwise"][str(k)]["variance"]
            row.append(f"{ratio:.0f}" if ratio > 1.5 else "1")
        except Missing:
            row.append("not yet measured")
        try:
            r = load(name)
            row += [f"{r['test_neg_elbo']:.2f}", f"{r['test_nll']:.2f}", trained(r)]
        except Missing:
            row += [NOT_SCORED, "—", "—"]
        rows.append(row)
    header = ["objective", "estimator", "k", "encoder-gradient variance / pathwise's", "test −ELBO"]
    return [*header, "test NLL, −L_5000", "training time"], rows


def per_image():
    """The per-image study: how far L_5000 and L_50000 fall below log p(x), by how well q fits (its KL from the
    posterior is log p(x) - ELBO), and how well a second grid agrees with the first."""
    images = load("default-per-image")["images"]
    far = [i for i in images if i["kl_q_posterior"] > 20]
    groups = {
        f"{len(far)} with KL(q ‖ p(z\\|x)) > 20 nats": far,
        f"the other {len(images) - len(far)}": [i for i in images if i not in far],
        f"all {len(images)}": images,
    }
    rows = []
    for name, group in groups.items():

        def spread(values):
            return f"{sum(values) / len(values):.2f} ({min(values):.2f} to {max(values):.2f})"

        check = max(abs(i["log_px"] - i["log_px_check"]) for i in group)
        gaps = [spread([i["log_px"] - i[f"l_{k}"] for i in group]) for k in (5000, 50000)]
        rows.append([name, spread([i["kl_q_posterior"] for i in group]), *gaps, f"{check:.3f}"])
    header = ["test images", "KL(q ‖ p(z\\|x)): mean (range)", "log p(x) − L_5000", "log p(x) − L_50000"]
    return [*header, "largest \\|log p(x) − the second grid's\\|"], rows


def variance():
    """gradient_variance.py's measurements: the score function's variance over the pathwise one's, and each one's
    signal-to-noise ratio, by k, on the trained model and at initialisation."""
    rows = []
    for objective in ("elbo", "iwae"):
        r = load(f"gradient-variance-{objective}")
        ks = sorted(r["trained"]["pathwise"], key=int)
        for which in ("trained", "initial"):
            cells = r[which]
            ratio = [f"{cells['score'][k]['variance'] / cells['pathwise'][k]['variance']:.3g}" for k in ks]
            rows.append([objective.upper(), which, "variance, score / pathwise", *ratio])
            for estimator in ("pathwise", "score"):
                rows.append(["", "", f"SNR, {estimator}", *[f"{cells[estimator][k]['snr']:.3f}" for k in ks]])
    return ["objective", "model", "", *[f"k = {k}" for k in ks]], rows


def exact():
    """How well the 2-D models' grids resolved log p(x): the worst border margin and the worst change of log p(x)
    when every other point of a grid is dropped, over the images scored exactly."""
    header = ["2-D model", "images", "exact −log p(x)", "least border margin (nats)", "largest resolution (nats)"]
    rows = []
    for name in ("default", "cb-2d", "cb-2d-grey"):
        r = load(name)
        cells = [RESULTS[name][0].split(":")[0], f"first {r['exact_n_images']}", f"{r['test_nll_exact']:.2f}"]
        rows.append([*cells, f"{r['exact_border_nats']:.1f}", f"{r['exact_resolution_nats']:.3f}"])
    return header, rows


def side_by_side():
    b, c = load("default"), load("cb-2d")
    return ["", "Bernoulli, binarized (the default)", "continuous Bernoulli, dequantized"], [
        [
            "test −ELBO",
            f"{b['test_neg_elbo']:.2f} (binary images)",
            f"{c['test_neg_elbo']:.2f} (a density on [0, 1]^784)",
        ],
        ["test KL", f"{b['test_kl']:.2f}", f"{c['test_kl']:.2f}"],
        ["active units", units(b), units(c)],
        ["15-NN accuracy of the code", f"**{b['knn_accuracy']:.3f}**", f"{c['knn_accuracy']:.3f}"],
    ]


TABLES = {
    "headline": lambda: results(["default", "pretrained/iwae-protocol-vae.json", "examples", "cb-deq"]),
    "headline-sentence": headline,
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


MARKERS = re.compile(r"(<!-- table (\S+) -->\n)(.*?)(<!-- end of table -->)", re.S)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table is not its files'")
    args = p.parse_args(argv)
    stale = []
    for page in [ROOT / "README.md", ROOT / "pretrained" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        new = MARKERS.sub(lambda m: m[1] + markdown(m[2]) + "\n" + m[4], text)
        if new != text:
            stale += [f"{page.relative_to(ROOT)}: {m[2]}" for m in MARKERS.finditer(text) if m[0] not in new]
            if not args.check:
                page.write_text(new)
    if stale:
        print(("not what their files give: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
