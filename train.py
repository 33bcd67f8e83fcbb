"""Fit the VAE to MNIST: `python train.py` (see --help). Writes <out-dir>/ckpt.pt and <out-dir>/log.jsonl."""

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    # Ctrl-C while the imports below load torch: one line and exit status 130, as later on (cli.script takes over)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(print("\ninterrupted (Ctrl-C)", file=sys.stderr) or 130))

import torch
from PIL import Image
from tqdm import tqdm

from checkpoints import (
    FRAMES_DIR,
    LOG_FILE,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    verify_checksums,
)
from cli import (
    add_config_args,
    add_device_arg,
    config_from_args,
    fail,
    interrupted,
    non_negative_int,
    parse,
    script,
)
from data import PIXELS, labelled_batches, load_test_set, load_train_set, resolve_pixels
from files import PathError, check_output_dir, output_dir, path_advice, path_problem, write_atomic
from manifold import frame
from model import ESTIMATORS, OBJECTIVES, VAE, VAEConfig, check_choices, setting
from scoring import mean_neg_elbo, mean_neg_iwae_bound

SCHEDULES = ("constant", "iwae")


@dataclass(kw_only=True)  # built by name only: no two fields can be swapped by position
class TrainConfig:
    """How the model is fitted; every field is a flag (batch_size: --batch-size). A resumed run keeps its
    checkpoint's settings, except the fields marked on_resume, which the flags set anew."""

    epochs: int = setting(30, "total epochs (with --resume, the total to reach)", on_resume=True)
    batch_size: int = setting(128, "images per step")
    lr: float = setting(1e-3, "Adam's learning rate (the initial one with --schedule iwae)")
    schedule: str = setting(
        "constant",
        "iwae: Burda et al.'s lr 1e-3 * 10^(-i/7) for 3^i epochs, i = 0..7 (3280 epochs), and Adam eps 1e-4",
        choices=SCHEDULES,
    )
    pixels: str = setting(
        "auto",
        "what the model sees: binary (x ~ Bernoulli(k/255), drawn anew each use), dequantized "
        "((k + u)/256, u ~ U[0, 1) drawn anew each use) or grey (k/255); auto: binary for bernoulli, "
        "dequantized for cb",
        choices=PIXELS,
    )
    objective: str = setting("elbo", "elbo, or iwae: the k-sample bound L_k (Burda et al. 2016)", choices=OBJECTIVES)
    k: int = setting(1, "samples z ~ q(z|x) per training image")
    estimator: str = setting(
        "pathwise",
        "the encoder's gradient: pathwise (reparameterization), or score (score function, leave-one-out "
        "baseline for k >= 2)",
        choices=ESTIMATORS,
    )
    beta: float = setting(1.0, "weight of the KL term (1: the ELBO; --objective elbo only)")
    kl_warmup: int = setting(
        0,
        "KL warm-up: the KL term's weight rises linearly, step by step, from 0 to --beta over the first N epochs "
        "(Sønderby et al. 2016; --objective elbo only); 0: none",
        type=non_negative_int,
    )
    seed: int = setting(1, "seeds the run (the scored data and noise have fixed seeds of their own)", type=int)
    limit: int | None = setting(None, "use only the first N training and test images")
    compile: bool = setting(False, "torch.compile the training step (same numbers)", on_resume=True)
    frames: bool = setting(
        False,
        f"keep a frame a epoch in <out-dir>/{FRAMES_DIR}/ (visualize.py makes plots/training.gif)",
        on_resume=True,
    )
    data_dir: str = setting("data", "where MNIST/raw/ is", on_resume=True)
    out_dir: str = setting("out", "where ckpt.pt and log.jsonl go", on_resume=True)

    def __post_init__(self):
        check_choices(self)
        if self.objective == "iwae" and self.beta != 1:
            raise ValueError(f"--beta {self.beta:g} weighs the ELBO's KL term; L_k has none (use --objective elbo)")
        if self.objective == "iwae" and self.kl_warmup:
            raise ValueError("--kl-warmup ramps the ELBO's KL term; L_k has none (use --objective elbo)")


RESUMABLE = [f.name for f in fields(TrainConfig) if f.metadata.get("on_resume")]


@dataclass
class Run:
    """A run in the making: its settings, model, optimizer, data, and the last epoch saved (0: none)."""

    config: TrainConfig
    model: VAE
    optimizer: torch.optim.Optimizer
    train_images: torch.Tensor  # (N, 1, 28, 28), grey levels; each batch is presented anew
    train_labels: torch.Tensor  # (N,), the digits (a conditional model's y)
    test_images: torch.Tensor  # (M, 1, 28, 28), presented once with a fixed seed
    test_labels: torch.Tensor  # (M,)
    epoch: int
    device: torch.device

    @property
    def ckpt_path(self):
        return checkpoint_path(self.config.out_dir)

    @property
    def log_path(self):
        return self.ckpt_path.with_name(LOG_FILE)

    @property
    def frames_dir(self):
        return self.ckpt_path.with_name(FRAMES_DIR)

    def kept(self):
        """What is on disk, for a message about a stop."""
        return f"{self.ckpt_path} still holds epoch {self.epoch}" if self.epoch else "no checkpoint was written"


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; args[0] is the 1-based step of the epoch, or None for the test pass."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__)
    add_config_args(p, VAEConfig, "model")
    add_config_args(p, TrainConfig, "training")
    run = p.add_argument_group("run")
    kept = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE)
    run.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run in --out-dir up to --epochs in all; its settings come from its checkpoint "
        f"(only {kept} and --device apply)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace an existing run in --out-dir")
    add_device_arg(run)
    return p


@script
def main(argv=None):
    parser = build_parser()
    args, device = parse(parser, argv)
    if args.resume:
        run = resume_run(args.out_dir, device, {name: getattr(args, name) for name in RESUMABLE})
    else:
        try:
            model_config, config = config_from_args(VAEConfig, args), config_from_args(TrainConfig, args)
        except ValueError as e:
            parser.error(str(e))
        run = start_run(model_config, config, device, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"device: {device}; model: {run.model.config} ({n_params:,} parameters); "
        f"training: {run.train_images.shape[0]} images, pixels {run.config.pixels}, train loss {bound_name(run.config)}"
    )
    try:
        fit(run)
    except KeyboardInterrupt:
        kept = f"{run.ckpt_path} holds epoch {run.epoch}; continue with --resume"
        interrupted(f"interrupted during epoch {run.epoch + 1}: {kept if run.epoch else 'no epoch had finished'}.")
    except NonFiniteLoss as e:
        where = f"step {e.args[0]} of" if e.args[0] is not None else "the test pass of"
        fail(
            f"the loss became NaN or infinite at {where} epoch {run.epoch + 1} ({run.kept()}); the learning rate "
            f"(--lr {run.config.lr}) is likely too high for this model, or --beta / the data is off"
        )
    except OSError as e:  # writing the log or the checkpoint, e.g. a full disk; the old checkpoint stays whole
        fail(
            f"could not save epoch {run.epoch + 1} in {run.config.out_dir}: {e.strerror or e} ({run.kept()}); "
            f"{path_advice(e, '--out-dir')}"
        )
    print(f"saved {run.ckpt_path} (epoch {run.epoch}) and {run.log_path}")


def start_run(model_config, config, device, overwrite=False):
    """A new run of these configs; an existing run in config.out_dir is replaced only with overwrite."""
    ckpt_path = checkpoint_path(config.out_dir)
    if ckpt_path.exists() and not overwrite:
        raise PathError(
            f"{ckpt_path} already exists; pass --resume to continue that run, --overwrite to replace it, "
            "or another --out-dir"
        )
    config = replace(config, pixels=resolve_pixels(config.pixels, model_config.likelihood))  # saved as it is meant
    with output_dir(config.out_dir, "--out-dir"):  # checked before the data: a typo costs a second, not an epoch
        torch.manual_seed(config.seed)
        data = load_data(config, device)
    model = VAE(model_config).to(device)
    model.init_output_bias(data[0].mean(0))
    run = Run(config, model, make_optimizer(model, config), *data, 0, device)
    try:  # --overwrite: the old run goes now, checkpoint and log
        run.ckpt_path.unlink(missing_ok=True)
        run.log_path.unlink(missing_ok=True)
    except OSError as e:
        raise path_problem("--out-dir", config.out_dir, e) from e
    return run


def resume_run(out_dir, device, settings=None):
    """The run in out_dir as its checkpoint left it: model, optimizer, epoch and random state. settings: new
    values of the fields that may change on resume (RESUMABLE), by name, such as {"epochs": 50}."""
    ckpt_path = checkpoint_path(out_dir)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PathError(f"cannot resume: --out-dir {out_dir} is a file, not a folder; give the run's folder")
    try:
        state, model = load_checkpoint(ckpt_path, device)
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from e
    try:  # what the run is stays as it was; where the data is and how fast to run may change
        config = TrainConfig(**{**state["train_config"], "out_dir": str(out_dir), **(settings or {})})
        epoch = int(state["epoch"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume: {ckpt_path} has no usable train_config / epoch ({e})") from e
    print(f"resuming {ckpt_path} after epoch {epoch} (its model and training settings are kept)")
    check_output_dir(ckpt_path.parent, "--out-dir")
    torch.manual_seed(config.seed)
    optimizer = restore_training_state(state, ckpt_path, model, config, device)
    data = load_data(config, device)  # last: whatever is wrong above costs no loading time
    run = Run(config, model, optimizer, *data, epoch, device)
    drop_what_is_past(run, epoch)
    return run


def restore_training_state(state, ckpt_path, model, config, device):
    """The optimizer of the checkpoint's run, and its random-number generators restored; CheckpointError if either
    is missing, does not fit, or is not the bytes that were saved."""
    if "optimizer" not in state and "rng" not in state:  # such as pretrained/'s: a model to use, not a run
        raise CheckpointError(
            f"cannot resume: {ckpt_path} holds a model's weights only, no optimizer or random-number state; "
            "evaluate or draw it, or train a new run"
        )
    optimizer = make_optimizer(model, config)
    try:
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], device)
        verify_checksums(state, ckpt_path, ["optimizer", "rng"])  # they fit; are they the bytes that were saved?
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"cannot resume: the optimizer / random state in {ckpt_path} is missing or does not fit "
            f"({type(e).__name__}: {e})"
        ) from e
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from e
    return optimizer


def drop_what_is_past(run, epoch):
    """The log lines and frames of epochs after the checkpoint's (a stop between them and the checkpoint's
    save): the resumed run writes them anew."""
    try:
        keep_log_until(run.log_path, epoch)
        for frame_path in run.frames_dir.glob("*.png"):
            if int(frame_path.stem) > epoch:
                frame_path.unlink()
    except OSError as e:  # rewriting the log, e.g. on a disk that just filled up
        raise path_problem("--out-dir", run.config.out_dir, e) from e


def load_data(config, device):
    """train images, train labels, test images, test labels, as Run holds them."""
    return (
        *load_train_set(config.data_dir, device, config.limit),
        *load_test_set(config.data_dir, config.pixels, device, config.limit),
    )


def make_optimizer(model, config):
    # Burda et al. use Adam with eps = 1e-4 (Section 5); elsewhere PyTorch's defaults, as in pytorch/examples.
    eps = 1e-4 if config.schedule == "iwae" else 1e-8
    # The fused kernel updates every parameter in one pass instead of a dozen ops per tensor: same arithmetic.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=config.lr, eps=eps, fused=fused)


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


def bound_name(config):
    """What the training loss is, as the log names it."""
    if config.objective == "iwae":
        return f"-L_{config.k}"
    if config.kl_warmup:
        return "recon + kl_weight KL"  # the log's kl_weight: the weight at the epoch's end
    return "-ELBO" if config.beta == 1 else f"recon + {config.beta:g} KL"


# --------------------------------------------------------------------------------------------- the loop


def fit(run):
    """Epochs run.epoch + 1 .. config.epochs, each saved as it ends (run.epoch: the last saved). A stop (Ctrl-C,
    NonFiniteLoss, an OSError while saving) leaves on disk the checkpoint of the last saved epoch."""
    step = make_train_step(run.model, run.optimizer, run.config)
    for epoch in range(run.epoch + 1, run.config.epochs + 1):
        save_epoch(run, run_epoch(run, step, epoch))


def make_train_step(model, optimizer, config):
    """One optimisation step on a batch x and its labels y, with the KL term's weight kl_weight (a 0-dim tensor);
    returns the loss as a device tensor (no host synchronisation)."""

    def step(x, y, kl_weight):
        surrogate, neg_bound = model.loss(x, config.objective, config.k, config.estimator, kl_weight, y=y)
        optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        optimizer.step()
        return neg_bound.mean()

    if not config.compile:
        return step
    # Inductor otherwise draws random numbers with its own generator: with fallback_random the compiled
    # step draws the very eps (and binarizations) of the plain one, so a seed gives the same run either way.
    torch._inductor.config.fallback_random = True
    return torch.compile(step, dynamic=False)  # static shapes: the last, smaller batch gets its own graph


def kl_weights(config, epoch, n_steps):
    """The KL term's weight at each of the n_steps steps of epoch (1-based), (n_steps,): --beta, or with
    --kl-warmup N, beta * t / (N n_steps) at the run's t-th step, rising linearly to beta by the end of epoch N
    (Sønderby et al. 2016; Bowman et al. 2016). A function of the step alone, so that a resumed run goes on
    where it stopped."""
    if not config.kl_warmup:
        return torch.full((n_steps,), config.beta)
    t = (epoch - 1) * n_steps + torch.arange(1, n_steps + 1, dtype=torch.float64)  # the run's steps
    return (config.beta * torch.clamp(t / (config.kl_warmup * n_steps), max=1.0)).float()


def run_epoch(run, step, epoch):
    """One epoch of training and its test pass; returns the epoch's log record."""
    config, model = run.config, run.model
    start = time.perf_counter()
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, epoch)
    n_steps = math.ceil(run.train_images.shape[0] / config.batch_size)
    weights = kl_weights(config, epoch, n_steps).to(run.device)
    with tqdm(total=n_steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, unit="step") as bar:
        model.train()
        train_loss = train_epoch(
            step, run.train_images, run.train_labels, config.batch_size, config.pixels, weights, bar
        )
    model.eval()
    test_loss, test_recon, test_kl = mean_neg_elbo(model, run.test_images, labels=run.test_labels)
    record = {
        "epoch": epoch,
        "train_bound": bound_name(config),
        "train_loss": train_loss.item(),
        "test_loss": test_loss.item(),
        "test_recon": test_recon.item(),
        "test_kl": test_kl.item(),
    }
    if config.objective == "iwae":  # the bound it trains, on the test set too
        bound = mean_neg_iwae_bound(model, run.test_images, config.k, labels=run.test_labels)
        record[f"test_neg_l{config.k}"] = bound.item()
    if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
        raise NonFiniteLoss(None)
    if config.objective == "elbo":
        record["kl_weight"] = weights[-1].item()
    record.update(lr=run.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start)
    return record


def train_epoch(step, images, labels, batch_size, pixels, kl_weights, progress=None, check_every=50):
    """One pass over the shuffled training images (and their labels, which travel with them); returns the mean
    training loss (nats per image). kl_weights: the KL weight of each step (n_steps,), on the device.

    Each step's loss is written into a tensor on the device; it is read back only every `check_every`
    steps, to stop at the first non-finite loss (NonFiniteLoss(step)) without a host synchronisation
    per step.
    """
    n = images.shape[0]
    n_steps = math.ceil(n / batch_size)
    losses = torch.empty(n_steps, device=images.device)
    checked = 0
    for i, (x, y) in enumerate(labelled_batches(images, labels, batch_size, shuffle=True, pixels=pixels)):
        losses[i] = step(x, y, kl_weights[i])
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


# --------------------------------------------------------------------------------------------- saving


def save_epoch(run, record):
    """Append the epoch's log line, then replace the checkpoint (atomically)."""
    # The log line goes first: a crash before the checkpoint is replaced leaves a line past the
    # checkpoint's epoch, which --resume drops (keep_log_until) before running that epoch again.
    with open(run.log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    state = {
        "model": run.model.state_dict(),
        "model_config": asdict(run.model.config),
        "train_config": asdict(run.config),
        "epoch": record["epoch"],
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(run.device),
    }
    if run.config.frames:  # before the checkpoint, as the log line: a resume drops what is past its epoch
        save_frame(run, record["epoch"])
    save_checkpoint(run.ckpt_path, state)
    run.epoch = record["epoch"]
    test = f"test {record['test_loss']:8.3f} (recon {record['test_recon']:8.3f} + kl {record['test_kl']:6.3f})"
    tqdm.write(
        f"epoch {run.epoch:4d}/{run.config.epochs}  train {record['train_bound']} {record['train_loss']:8.3f}  "
        f"{test}  {record['seconds']:6.1f} s"
    )


def save_frame(run, epoch):
    """The epoch's frame of the training film (manifold.frame) as <out-dir>/frames/<epoch>.png, 8-bit grey."""
    run.frames_dir.mkdir(exist_ok=True)
    image = Image.fromarray(frame(run.model, run.test_images))
    write_atomic(run.frames_dir / f"{epoch:04d}.png", lambda f: image.save(f, format="PNG"))


def rng_state(device):
    """The random-number generators a run draws from: the CPU's, and the device's (CPU tensors, all)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type in ("cuda", "mps"):
        state[device.type] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type in ("cuda", "mps") and device.type in state:  # absent if the run moved devices: not exact
        getattr(torch, device.type).set_rng_state(state[device.type])


def keep_log_until(log_path, epoch):
    """Keep the log lines of epochs <= epoch, so that a resumed log has no duplicates."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line torn by a crash in mid-write, or no record at all
    write_atomic(log_path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))  # a crash loses no line


if __name__ == "__main__":
    main()
