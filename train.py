"""Fit the VAE to MNIST: `python train.py` (see --help). Writes <out-dir>/ckpt.pt and <out-dir>/log.jsonl."""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from data import BINARIZE_CHOICES, DataError, batches, load_test_set, load_train_set, resolve_binarize
from model import ACTIVATIONS, ARCHS, LIKELIHOODS, VAE, VAEConfig
from utils import (
    CheckpointError,
    add_device_arg,
    fail,
    int_list,
    load_checkpoint,
    pick_device,
    positive_float,
    positive_int,
    save_checkpoint,
    test_elbo,
)

SCHEDULES = ("constant", "iwae")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "constant"  # "iwae": Burda et al.'s lr 1e-3 * 10^(-i/7) for 3^i epochs, i = 0..7
    binarize: str = "auto"  # "auto" | "none" | "dynamic"
    beta: float = 1.0  # weight of the KL term; 1 is the ELBO
    seed: int = 1
    limit: int | None = None  # use only the first N training and test images
    compile: bool = False
    data_dir: str = "data"
    out_dir: str = "out"


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; args[0] is the 1-based step of the epoch, or None for the test pass."""


def learning_rate(config, epoch):
    """lr for epoch (1-based). The IWAE schedule (Burda et al. 2016, Section 5): stage i = 0..7 lasts 3^i epochs
    at 1e-3 * 10^(-i/7), 3280 epochs in all; past the last stage the lr stays at the last value."""
    if config.schedule == "constant":
        return config.lr
    stage, end = 0, 1
    while epoch > end and stage < 7:
        stage += 1
        end += 3**stage
    return config.lr * 10 ** (-stage / 7)


def make_optimizer(model, config):
    # Burda et al. use Adam with eps = 1e-4 (Section 5); elsewhere PyTorch's defaults, as in pytorch/examples.
    eps = 1e-4 if config.schedule == "iwae" else 1e-8
    # The fused kernel updates all parameters in one pass instead of a dozen ops per tensor: the same
    # arithmetic, and on the pytorch/examples model on a 2-core CPU a whole step went from 8.7 to 4.9 ms.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=config.lr, eps=eps, fused=fused)


def make_train_step(model, optimizer, beta, compile=False):
    """One optimisation step on a batch; returns the loss as a device tensor (no host synchronisation)."""

    def step(x):
        loss, _, _ = model.loss(x, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    if not compile:
        return step
    # Inductor otherwise draws random numbers with its own generator: with fallback_random the compiled
    # step draws the very eps (and binarizations) of the plain one, so a seed gives the same run either way.
    torch._inductor.config.fallback_random = True
    return torch.compile(step, dynamic=False)  # static shapes: the last, smaller batch gets its own graph


def train_epoch(step, images, batch_size, dynamic_binarize, progress=None, check_every=50):
    """One pass over the shuffled training images; returns the mean training loss (nats per image).

    Each step's loss is written into a tensor on the device; it is read back only every `check_every`
    steps, to stop at the first non-finite loss (NonFiniteLoss(step)) without a host synchronisation
    per step.
    """
    n = images.shape[0]
    n_steps = math.ceil(n / batch_size)
    losses = torch.empty(n_steps, device=images.device)
    checked = 0
    for i, x in enumerate(batches(images, batch_size, shuffle=True, dynamic_binarize=dynamic_binarize)):
        losses[i] = step(x)
        if (i + 1) % check_every == 0 or i + 1 == n_steps:
            finite = torch.isfinite(losses[checked : i + 1])
            if not finite.all():
                raise NonFiniteLoss(checked + 1 + int((~finite).nonzero()[0]))  # 1-based step
            checked = i + 1
        if progress is not None:
            progress.update(1)
    # Every batch holds batch_size images but the last, which holds the rest.
    weights = torch.full((n_steps,), float(batch_size), device=images.device)
    weights[-1] = n - batch_size * (n_steps - 1)
    return (losses * weights).sum() / n


def build_parser():
    defaults, model_defaults = TrainConfig(), VAEConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p, model_defaults)
    p.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="total epochs (with --resume too)")
    p.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    p.add_argument("--lr", type=positive_float, default=defaults.lr, help="Adam's learning rate (the initial one)")
    p.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                   help="iwae: Burda et al.'s lr decay, 3280 epochs in 8 stages, Adam eps 1e-4")  # fmt: skip
    p.add_argument("--binarize", choices=BINARIZE_CHOICES, default=defaults.binarize,
                   help="auto: dynamic for bernoulli, none for cb")  # fmt: skip
    p.add_argument("--beta", type=positive_float, default=defaults.beta, help="KL weight (1 = the ELBO)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--limit", type=positive_int, default=None, help="use only the first N train and test images")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--data-dir", default=defaults.data_dir)
    p.add_argument("--out-dir", default=defaults.out_dir)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir up to --epochs in all; the run's settings come from its "
                        "checkpoint (only --epochs, --data-dir, --device and --compile apply)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    add_device_arg(p)
    return p


def add_model_args(p, defaults):
    p.add_argument("--latent-dim", type=positive_int, default=defaults.latent_dim)
    p.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    p.add_argument("--hidden-dims", type=int_list, default=defaults.hidden_dims,
                   help="comma-separated widths, e.g. 400 or 200,200")  # fmt: skip
    p.add_argument("--activation", choices=ACTIVATIONS, default=defaults.activation)
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=defaults.likelihood,
                   help="bernoulli, or cb: continuous Bernoulli")  # fmt: skip


def model_config_from_args(args):
    return VAEConfig(args.latent_dim, args.arch, args.hidden_dims, args.activation, args.likelihood)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device, parser)
    out_dir = Path(args.out_dir)
    ckpt_path, log_path = out_dir / "ckpt.pt", out_dir / "log.jsonl"

    if args.resume:
        try:
            state, model = load_checkpoint(ckpt_path, device)
        except CheckpointError as e:
            fail(f"cannot resume: {e}")
        model_config = model.config
        try:  # what the run is stays as it was; where the data is and how fast to run may change
            config = TrainConfig(**{**state["train_config"], "epochs": args.epochs, "out_dir": args.out_dir,
                                    "data_dir": args.data_dir, "compile": args.compile})
            start_epoch = int(state["epoch"])
        except (TypeError, ValueError) as e:
            fail(f"cannot resume: {ckpt_path} has no usable train_config / epoch ({e})")
        print(f"resuming {ckpt_path} after epoch {start_epoch} (its model and training settings are kept)")
    else:
        if ckpt_path.exists() and not args.overwrite:
            fail(f"{ckpt_path} already exists; pass --resume to continue that run, --overwrite to replace it, "
                 f"or another --out-dir")  # fmt: skip
        model_config = model_config_from_args(args)
        config = TrainConfig(
            args.epochs, args.batch_size, args.lr, args.schedule, args.binarize, args.beta, args.seed,
            args.limit, args.compile, args.data_dir, args.out_dir,
        )  # fmt: skip
        model, state, start_epoch = None, None, 0

    torch.manual_seed(config.seed)
    try:
        train_images, _ = load_train_set(config.data_dir, device, config.limit)
        test_images, _ = load_test_set(config.data_dir, config.binarize, model_config.likelihood, device, config.limit)
    except DataError as e:
        fail(str(e))
    dynamic = resolve_binarize(config.binarize, model_config.likelihood) == "dynamic"

    if model is None:
        model = VAE(model_config).to(device)
        model.init_output_bias(train_images.mean(0))
    model.train()
    optimizer = make_optimizer(model, config)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["cpu"])
            if device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            fail(f"cannot resume: the optimizer / random state in {ckpt_path} is missing or does not fit "
                 f"({type(e).__name__}: {e})")  # fmt: skip
    step = make_train_step(model, optimizer, config.beta, config.compile)

    out_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # --overwrite: the old run's checkpoint goes now, with its log, so the two never mix
        ckpt_path.unlink(missing_ok=True)
    keep_log_until(log_path, start_epoch)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {device}; model: {model_config} ({n_params:,} parameters); "
          f"training data: {train_images.shape[0]} images, binarize: {'dynamic' if dynamic else 'none'}")  # fmt: skip

    n_steps = math.ceil(train_images.shape[0] / config.batch_size)
    epoch = saved = start_epoch  # the epoch running, and the one the checkpoint on disk holds
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, epoch)
            with tqdm(total=n_steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, unit="step") as bar:
                model.train()
                train_loss = train_epoch(step, train_images, config.batch_size, dynamic, bar)
            model.eval()
            test_loss, test_recon, test_kl = test_elbo(model, test_images)
            record = {
                "epoch": epoch,
                "train_loss": train_loss.item(),
                "test_loss": test_loss.item(),
                "test_recon": test_recon.item(),
                "test_kl": test_kl.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - start,
            }
            if not math.isfinite(record["test_loss"]):
                raise NonFiniteLoss(None)
            # The log line goes first: a crash before the checkpoint is replaced leaves a line past the
            # checkpoint's epoch, which --resume drops (keep_log_until) before running that epoch again.
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            rng = {"cpu": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state()
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(),
                "model_config": asdict(model_config),
                "train_config": asdict(config),
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "rng": rng,
            })  # fmt: skip
            saved = epoch
            tqdm.write(
                f"epoch {epoch:4d}/{config.epochs}  train {record['train_loss']:8.3f}  test {record['test_loss']:8.3f} "
                f"(recon {record['test_recon']:8.3f} + kl {record['test_kl']:6.3f})  {record['seconds']:6.1f} s"
            )
    except KeyboardInterrupt:
        kept = f"{ckpt_path} holds epoch {saved}; continue with --resume" if saved else "no epoch had finished"
        print(f"\ninterrupted during epoch {epoch}: {kept}.", file=sys.stderr)
        sys.exit(130)
    except NonFiniteLoss as e:
        where = f"step {e.args[0]} of epoch {epoch}" if e.args[0] is not None else f"the test pass of epoch {epoch}"
        kept = f"{ckpt_path} still holds epoch {saved}" if saved else "no checkpoint was written"
        fail(f"the loss became NaN or infinite at {where} ({kept}); the learning rate (--lr {config.lr}) is "
             f"likely too high for this model, or --beta / the data is off")  # fmt: skip
    except OSError as e:  # writing the log or the checkpoint, e.g. a full disk; the old checkpoint stays whole
        kept = f"{ckpt_path} still holds epoch {saved}" if saved else "no checkpoint was written"
        fail(f"could not save epoch {epoch}: {e} ({kept})")
    print(f"saved {ckpt_path} (epoch {saved}) and {log_path}")


def keep_log_until(log_path, epoch):
    """Keep the log lines of epochs <= epoch (a new run: none), so that a resumed log has no duplicates."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a crash in mid-write, or no record at all
    tmp = log_path.with_name(log_path.name + ".tmp")  # replaced whole, so a crash here loses no line
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(log_path)


if __name__ == "__main__":
    main()
