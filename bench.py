"""Training speed, measured side by side in one process: `python bench.py --device cpu --json bench.json`.

Per epoch (60000 training images, then the 10000 test images), three loops on the same model and batch size:
  ours      train.py's epoch itself (train.train_epoch): data on the device, fused Adam, no sync per step;
  baseline  pytorch/examples' vae loop: a DataLoader over torchvision's MNIST, one .item() per step;
  bound     the epoch's matrix products alone (Linear layers, forward and backward, at their exact shapes),
            at the rate torch.mm reaches on this machine now: what the epoch would take if only its GEMMs cost.
Also the throughput of evaluate.py's k-sample importance-weighted estimator.
"""

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision.transforms import ToTensor

import train
from cli import (
    add_config_args,
    add_device_arg,
    add_json_arg,
    config_from_args,
    machine,
    parse,
    positive_int,
    script,
    write_results,
)
from data import PIXELS
from model import VAE, VAEConfig
from scoring import iwae_nll

# pytorch/examples' vae: 784-400-20, ReLU, Bernoulli likelihood on the k/255 pixels, Adam 1e-3, batch 128.
EXAMPLES_CONFIG = VAEConfig(latent_dim=20, arch="mlp", hidden_dims=(400,), activation="relu", likelihood="bernoulli")
TEST_BATCH_SIZE = 1000  # scoring.mean_neg_elbo's default


def timed(fn, device):
    """fn()'s wall time, the work it queued on the device included."""
    synchronize = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------- the loops


def baseline_epoch(model, optimizer, train_loader, test_loader, device):
    """pytorch/examples/vae/main.py's train() and test(), with this repo's model and loss."""
    model.train()
    train_loss = 0.0
    for x, _ in train_loader:
        x = x.to(device)
        optimizer.zero_grad()
        loss = model.loss(x).surrogate
        loss.backward()
        train_loss += loss.item() * x.shape[0]
        optimizer.step()
    model.eval()
    test_loss = 0.0
    with torch.no_grad():
        for x, _ in test_loader:
            loss = model.loss(x.to(device)).surrogate
            test_loss += loss.item() * x.shape[0]
    return train_loss / len(train_loader.dataset), test_loss / len(test_loader.dataset)


# --------------------------------------------------------------------------------------------- GEMM bound


def gemm_plan(model, n_train, n_test, batch_size):
    """The matrix products of one epoch, as [(m, k, n, transposed operand, repeats)], in autograd's layouts.

    A Linear layer (weight W: n_out x n_in) on a batch of B does, forward, x @ W.T (B x n_in)(n_in x n_out);
    backward, the weight gradient gy.T @ x (n_out x B)(B x n_in) and, except in the first layer, whose input
    needs no gradient, the input gradient gy @ W (B x n_out)(n_out x n_in). The test pass does the forward
    products only.
    """
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    plan = []
    for batch, count, training in (
        *[(b, c, True) for b, c in batch_counts(n_train, batch_size)],
        *[(b, c, False) for b, c in batch_counts(n_test, TEST_BATCH_SIZE)],
    ):
        for layer, (n_in, n_out) in enumerate(shapes):
            plan.append((batch, n_in, n_out, "b", count))  # x @ W.T
            if training:
                plan.append((n_out, batch, n_in, "a", count))  # gy.T @ x
                if layer > 0:
                    plan.append((batch, n_out, n_in, "", count))  # gy @ W
    return plan


def gemm_epoch(plan, device):
    """A function that runs every product of the plan, operands allocated once and outputs written in place:
    an epoch's GEMMs and nothing else. Also returns their FLOPs."""
    operands = {}
    for m, k, n, transposed, _ in plan:
        if (m, k, n, transposed) not in operands:
            a = torch.randn(k, m, device=device).T if transposed == "a" else torch.randn(m, k, device=device)
            b = torch.randn(n, k, device=device).T if transposed == "b" else torch.randn(k, n, device=device)
            operands[(m, k, n, transposed)] = (a, b, torch.empty(m, n, device=device))

    def epoch():
        for m, k, n, transposed, repeats in plan:
            a, b, out = operands[(m, k, n, transposed)]
            for _ in range(repeats):
                torch.mm(a, b, out=out)

    return epoch, sum(2 * m * k * n * repeats for m, k, n, _, repeats in plan)


def batch_counts(n, batch_size):
    """[(batch size, how many batches of it)] for one pass over n images."""
    full, rest = divmod(n, batch_size)
    return [(batch_size, full)] + ([(rest, 1)] if rest else [])


# --------------------------------------------------------------------------------------------- main


def build_parser():
    p = argparse.ArgumentParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(p, VAEConfig, "model", defaults=EXAMPLES_CONFIG)
    add_device_arg(p)
    p.add_argument("--epochs", type=positive_int, default=3, help="timed epochs of each, after one warm-up epoch")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--pixels", choices=PIXELS, default="grey", help="grey: the k/255 pixels, as pytorch/examples")
    p.add_argument("--compile", action="store_true", help="torch.compile our training step")
    p.add_argument("--eval-k", type=positive_int, default=5000, help="importance samples for the evaluation timing")
    p.add_argument("--eval-images", type=positive_int, default=100, help="test images for the evaluation timing")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N train and test images")
    add_json_arg(p)
    return p


@script
def main(argv=None):
    parser = build_parser()
    args, device = parse(parser, argv)
    config = config_from_args(VAEConfig, args, parser)
    if config.arch == "conv":  # its convolutions are no matrix products of the plan's kind
        parser.error("--arch conv: the GEMM bound counts the products of Linear layers only; bench.py times MLPs")
    if config.conditional:
        parser.error("--conditional: bench.py times the unconditional model, as pytorch/examples' loop has it")
    print(f"device: {device} ({machine(device)}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as out_dir:  # where our epochs save their log and checkpoint, as train.py's
        train_config = train.TrainConfig(
            epochs=args.epochs + 1,
            batch_size=args.batch_size,
            pixels=args.pixels,
            compile=args.compile,
            limit=args.limit,
            data_dir=args.data_dir,
            out_dir=out_dir,
        )
        run = train.start_run(config, train_config, device)
        print(f"model: {config}, batch {args.batch_size}, pixels: {run.config.pixels}")
        runs, epoch_flops = make_runs(run)
        seconds = interleaved_seconds(runs, args.epochs, device)
    test_images = run.test_images[: args.eval_images]
    eval_images_per_s = eval_throughput(run.model, test_images, args.eval_k, device)
    n_train, n_test = run.train_images.shape[0], run.test_images.shape[0]
    results = summarize(args, device, config, n_train, n_test, seconds, epoch_flops)
    results["eval_images_per_s"] = eval_images_per_s
    print_table(results)
    write_results(args.json, results, args, device)
    return results


def make_runs(run):
    """The three epochs to time, as functions: ours, the baseline and the GEMM bound; and the epoch's FLOPs."""
    device, (n_train, n_test) = run.device, (run.train_images.shape[0], run.test_images.shape[0])
    epochs = iter(range(1, run.config.epochs + 1))
    run_ours = lambda: train.train_epoch(run, next(epochs))  # noqa: E731  (the very function train.py runs)
    # Baseline: pytorch/examples' loop, on a model of the same configuration with the same loss.
    baseline_model = VAE(run.model.config).to(device)
    optimizer = torch.optim.Adam(baseline_model.parameters(), lr=1e-3)
    loader_kwargs = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    train_loader, test_loader = (
        DataLoader(
            Subset(torchvision.datasets.MNIST(run.config.data_dir, train=split, transform=ToTensor()), range(n)),
            batch_size=run.config.batch_size,
            shuffle=split,
            **loader_kwargs,
        )
        for split, n in ((True, n_train), (False, n_test))
    )
    run_baseline = lambda: baseline_epoch(baseline_model, optimizer, train_loader, test_loader, device)  # noqa: E731
    run_gemms, epoch_flops = gemm_epoch(gemm_plan(run.model, n_train, n_test, run.config.batch_size), device)
    return {"ours": run_ours, "baseline": run_baseline, "bound": run_gemms}, epoch_flops


def interleaved_seconds(runs, epochs, device):
    """One warm-up epoch of each (compilation included), then `epochs` rounds of the runs in turn, so that a
    slow spell of the machine hits them alike. Returns each run's epoch times."""
    seconds = {name: [] for name in runs}
    for round_ in range(epochs + 1):
        for name, run in runs.items():
            elapsed = timed(run, device)
            if round_ > 0:
                seconds[name].append(elapsed)
    return seconds


def summarize(args, device, config, n_train, n_test, seconds, epoch_flops):
    """The results, each loop by its fastest epoch, the least disturbed one."""
    ours_s, baseline_s, bound_s = (min(seconds[name]) for name in ("ours", "baseline", "bound"))
    return {
        "device": str(device),
        "device_name": machine(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_config": {**asdict(config), "hidden_dims": list(config.hidden_dims)},
        "batch_size": args.batch_size,
        "n_train": n_train,
        "n_test": n_test,
        "compile": args.compile,
        "epochs_timed": args.epochs,
        "seconds_each_epoch": seconds,
        "seconds_per_epoch": ours_s,
        "baseline_seconds_per_epoch": baseline_s,
        "gemm_bound_seconds_per_epoch": bound_s,
        "images_per_s": n_train / ours_s,
        "baseline_images_per_s": n_train / baseline_s,
        "gemm_bound_images_per_s": n_train / bound_s,
        "speedup": baseline_s / ours_s,
        "gemm_bound_fraction": bound_s / ours_s,
        "gemm_gflop_per_epoch": epoch_flops / 1e9,
        "gemm_gflop_per_s": epoch_flops / bound_s / 1e9,
        "eval_k": args.eval_k,
    }


def eval_throughput(model, images, k, device):
    """Test images per second of the k-sample importance-weighted bound (evaluate.py's estimator)."""
    model.eval()
    return images.shape[0] / timed(lambda: iwae_nll(model, images, k), device)


def print_table(r):
    rows = [
        ("ours (train.py's loop)", r["seconds_per_epoch"], r["images_per_s"]),
        ("baseline (DataLoader, .item() per step)", r["baseline_seconds_per_epoch"], r["baseline_images_per_s"]),
        ("GEMM bound (matmul FLOPs / measured rate)", r["gemm_bound_seconds_per_epoch"], r["gemm_bound_images_per_s"]),
    ]
    header = f"per epoch ({r['n_train']} train + {r['n_test']} test images)"
    print(f"\n{header:44s} {'s/epoch':>8s} {'images/s':>10s}")
    for name, seconds, images_per_s in rows:
        print(f"{name:44s} {seconds:8.3f} {images_per_s:10.0f}")
    print(
        f"speedup over baseline: {r['speedup']:.2f}x;  fraction of GEMM bound: {r['gemm_bound_fraction']:.2f} "
        f"({r['gemm_gflop_per_epoch']:.0f} GFLOP at {r['gemm_gflop_per_s']:.0f} GFLOP/s)"
    )
    print(f"evaluation, k={r['eval_k']}: {r['eval_images_per_s']:.1f} test images/s")


if __name__ == "__main__":
    main()
