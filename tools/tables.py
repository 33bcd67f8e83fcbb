"""The results tables of README.md and docs/, written from the JSON files that measured them: `python
tools/tables.py` rewrites every table between its markers; `--check` changes nothing and exits with status 1,
naming each table that is not what its files give (tests/test_tables.py runs it).

A table's files are the --json output of evaluate.py, bench.py and gradient_variance.py, and the log.jsonl of a
run, all committed under results/ (and pretrained/); each says how it was made (made_by: the command, the
machine, the wall time). In a page a table stands between `<!-- table NAME -->` and `<!-- end of table -->`.
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IWAE = "784-200-200-50 tanh, batch 20, the IWAE schedule"


def load(name):
    path = ROOT / name if "/" in name else ROOT / "results" / f"{name}.json"
    return json.loads(path.read_text())


def log(name):
    return [json.loads(line) for line in (ROOT / "results" / f"{name}.jsonl").read_text().splitlines()]


def duration(seconds):
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def units(r):
    return f"{r['active_units']} / {r['model_config']['latent_dim']}"


def nll(r):
    """-L_k, and where there is one the exact value, on the images they were computed on."""
    cell = f"{r['test_nll']:.2f}"
    if "test_nll_exact" in r:
        cell += f"; exact: **{r['test_nll_exact']:.2f}** (first {r['exact_n_images']})"
    return cell


def bits(r):
    cell = f"{r['bits_per_dim']:.4f}"
    return cell + (f"; **{r['bits_per_dim_8bit']:.3f}** for the 8-bit images" if "bits_per_dim_8bit" in r else "")


def scored(name, model, literature=""):
    """A row of the results table: a model scored by evaluate.py --k 5000 on all 10000 test images."""
    r = load(name)
    assert r["n_images"] == 10000 and r["k"] == 5000, name
    epochs = (
        f"{r['epoch']} of {r['train_config']['epochs']}" if r["epoch"] < r["train_config"]["epochs"] else r["epoch"]
    )
    cells = [model, epochs, duration(r["train_seconds"]), f"{r['test_neg_elbo']:.2f}", nll(r), bits(r)]
    return [*cells, units(r), f"{r['knn_accuracy']:.3f}", literature]


RESULTS_HEADER = [
    "model",
    "epochs",
    "training time",
    "test −ELBO",
    "test NLL, −L_5000",
    "bits/dim",
    "active units",
    "15-NN accuracy",
    "literature",
]
RESULTS_ROWS = {
    "examples": (
        "1. pytorch/examples: Bernoulli on k/255 pixels, 784-400-20 ReLU, batch 128",
        "“test loss” ≈ 105.5 after 10 epochs (not a likelihood)",
    ),
    "pretrained/iwae-protocol-vae.json": (
        f"2. IWAE protocol: Bernoulli, binarized, {IWAE} ([weights](pretrained/README.md))",
        "86.76 after 3280 epochs (Burda et al. 2016, Table 1, VAE, k = 1)",
    ),
    "iwae-30": ("3. the same, its first 30 epochs", ""),
    "iwae-k50": (
        "4. IWAE objective, k = 50, networks and schedule of 2.",
        "84.78 after 3280 epochs (Burda et al. 2016, Table 1, IWAE, k = 50)",
    ),
    "cb-grey": (
        "5. continuous Bernoulli on k/255 pixels (`--pixels grey`), networks and schedule of 2.",
        "— (a density on [0, 1]^784)",
    ),
    "cb-deq": (
        "6. continuous Bernoulli on dequantized pixels, networks and schedule of 2.",
        "RealNVP 1.06, Glow 1.05, FFJORD 0.99 bits/dim (8-bit MNIST)",
    ),
    "default": ("7. default `python train.py`: Bernoulli, binarized, 2-D latent, 784-512-256 ReLU", "—"),
    "cb-2d": ("8. continuous Bernoulli on dequantized pixels, 2-D latent, networks of 7.", "—"),
    "cb-2d-grey": ("9. continuous Bernoulli on k/255 pixels (`--pixels grey`), networks of 7.", "—"),
}


def results(names):
    return RESULTS_HEADER, [scored(name, *RESULTS_ROWS[name]) for name in names]


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
    return ["per epoch (60000 train + 10000 test images)", "s/epoch", "images/s"], [
        [name, f"{s:.2f}", f"{n:.0f}"] for name, s, n in rows
    ]


def conditional():
    header = [
        "latent d",
        "networks",
        "training time",
        "test −ELBO",
        "−log p(x\\|y)",
        "−log p(x)",
        "classifier accuracy",
        "active units",
        "15-NN accuracy of z",
    ]
    rows = []
    for name in ("c-d2", "c-d4", "c-d8", "c-d20"):
        r = load(name)
        c = r["model_config"]
        nets = f"784-{'-'.join(map(str, c['hidden_dims']))} {'ReLU' if c['activation'] == 'relu' else 'tanh'}"
        rows.append(
            [
                c["latent_dim"],
                nets,
                duration(r["train_seconds"]),
                f"{r['test_neg_elbo']:.2f}",
                f"{r['test_nll']:.2f}",
                f"{r['test_nll_marginal']:.2f}",
                f"{r['classifier_accuracy']:.4f}",
                units(r),
                f"{r['knn_accuracy']:.3f}",
            ]
        )
    return header, rows


TABLES = {
    "results": lambda: results(list(RESULTS_ROWS)),
    "headline": lambda: results(["default", "pretrained/iwae-protocol-vae.json", "examples", "cb-deq"]),
    "bench": bench,
    "conditional": conditional,
}


def markdown(header, rows):
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


MARKERS = re.compile(r"(<!-- table (\S+) -->\n)(.*?)(<!-- end of table -->)", re.S)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table is not its files'")
    args = p.parse_args(argv)
    stale = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        new = MARKERS.sub(lambda m: m[1] + markdown(*TABLES[m[2]]()) + "\n" + m[4], text)
        if new != text:
            stale += [f"{page.relative_to(ROOT)}: {m[2]}" for m in MARKERS.finditer(text) if m[0] not in new]
            if not args.check:
                page.write_text(new)
    if stale:
        print(("not what their files give: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
