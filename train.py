"""Fit the VAE to MNIST: `python train.py` (see --help). Writes <out-dir>/ckpt.pt and <out-dir>/log.jsonl."""

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from checkpoints import (
    CHECKPOINT_KEYS,
    CKPT_FILE,
    FRAMES_DIR,
    LOG_FILE,
    CheckpointError,
    load_checkpoint,
    read_log,
    save_checkpoint,
)
from cli import add_config_args, add_device_arg, config_from_args, fail, interrupted, parse, script
from data import PIXELS, labelled_batches, load_test_set, load_train_set, resolve_pixels
from files import write_atomic
from manifold import frame
from model import ESTIMATORS, OBJECTIVES, VAE, VAEConfig, check_fields, setting
from scoring import mean_neg_elbo, mean_neg_iwae_bound

SCHEDULES = ("constant", "iwae")
CHECK_EVERY = 50  # steps between two looks at the losses for a NaN: a look waits for the device


@dataclass(kw_only=True)  # built by name only: no two fields can be swapped by position
class TrainConfig:
    """How the model is fitted; every field is a flag (batch_size: --batch-size). A resumed run keeps its
    checkpoint's settings, except the fields marked on_resume, which the flags set anew."""

    epochs: int = setting(30, "total epochs (with --resume, the total to reach)", at_least=1, on_resume=True)
    batch_size: int = setting(128, "images per step", at_least=1)
    lr: float = setting(1e-3, "Adam's learning rate (the initial one with --schedule iwae)", above=0)
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
    k: int = setting(1, "samples z ~ q(z|x) per training image", at_least=1)
    estimator: str = setting(
        "pathwise",
        "the encoder's gradient: pathwise (reparameterization), or score (score function, leave-one-out "
        "baseline for k >= 2)",
        choices=ESTIMATORS,
    )
    beta: float = setting(1.0, "weight of the KL term (1: the ELBO; 0: no KL term; --objective elbo only)", at_least=0)
    kl_warmup: int = setting(
        0,
        "KL warm-up: the KL term's weight rises linearly, step by step, from 0 to --beta over the first N epochs "
        "(Sønderby et al. 2016; --objective elbo only); 0: none",
        at_least=0,
    )
    seed: int = setting(1, "seeds the run (the scored data and noise have fixed seeds of their own)")
    limit: int | None = setting(None, "use only the first N training and test images", at_least=1)
    compile: bool = setting(False, "torch.compile the loss, forward and backward (same numbers)", on_resume=True)
    frames: bool = setting(
        False,
        f"keep a frame a epoch in <out-dir>/{FRAMES_DIR}/ (visualize.py makes plots/training.gif)",
        on_resume=True,
    )
    data_dir: str = setting("data", "where MNIST/raw/ is", on_resume=True)
    out_dir: str = setting("out", "where ckpt.pt and log.jsonl go", on_resume=True)

    def __post_init__(self):
        check_fields(self)
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
    def dir(self):
        return Path(self.config.out_dir)


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite: args are the epoch and its 1-based step (None: the test pass)."""


def build_parser():
    p = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__)
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
    run.add_argument(
        "--export",
        metavar="PATH",
        help="write the model of the run in --out-dir to PATH, weights and configs only (what pretrained/ holds), "
        "and stop",
    )
    add_device_arg(run)
    return p


@script
def main(argv=None):
    parser = build_parser()
    args, device = parse(parser, argv)
    model_config, config = config_from_args(VAEConfig, args, parser), config_from_args(TrainConfig, args, parser)
    if args.export:
        return export(Path(args.out_dir) / CKPT_FILE, args.export)
    if args.resume:
        run = resume_run(args.out_dir, device, {name: getattr(config, name) for name in RESUMABLE})
    else:
        run = start_run(model_config, config, device, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"device: {device}; model: {run.model.config} ({n_params:,} parameters); "
        f"training: {run.train_images.shape[0]} images, pixels {run.config.pixels}, train loss {bound_name(run.config)}"
    )
    try:
        for epoch in range(run.epoch + 1, run.config.epochs + 1):
            train_epoch(run, epoch)
    except KeyboardInterrupt:
        interrupted(f"interrupted during epoch {run.epoch + 1}: {kept(run)}")
    except NonFiniteLoss as e:
        epoch, step = e.args
        fail(
            f"the loss became NaN or infinite at {f'step {step} of' if step else 'the test pass of'} epoch {epoch} "
            f"({kept(run)}); the learning rate (--lr {run.config.lr}) is likely too high for this model"
        )
    print(f"saved {run.dir / CKPT_FILE} (epoch {run.epoch}) and {run.dir / LOG_FILE}")


def kept(run):
    """What a stopped run leaves on disk."""
    if not run.epoch:
        return "no epoch had finished, no checkpoint was written"
    return f"{run.dir / CKPT_FILE} still holds epoch {run.epoch}; continue with --resume"


# --------------------------------------------------------------------------------------------- the loop


def train_epoch(run, epoch):
    """One epoch: the learning rate, a pass over the shuffled training images, the test ELBO, the log line and the
    checkpoint."""
    config, model, optimizer = run.config, run.model, run.optimizer
    start = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, epoch)
    n, n_steps = run.train_images.shape[0], math.ceil(run.train_images.shape[0] / config.batch_size)
    kl_weight = kl_weights(config, epoch, n_steps).to(run.device)  # (n_steps,): beta, or rising to it (warm-up)
    loss_fn = compiled(model.loss) if config.compile else model.loss
    losses = torch.empty(n_steps, device=run.device)  # read back every CHECK_EVERY steps only: no wait per step
    model.train()
    batches = labelled_batches(
        run.train_images, run.train_labels, config.batch_size, shuffle=True, pixels=config.pixels
    )
    bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", total=n_steps, leave=False, unit="step")
    for i, (x, y) in enumerate(bar):
        loss = loss_fn(x, y, config.objective, config.k, config.estimator, kl_weight[i])
        optimizer.zero_grad(set_to_none=True)
        loss.surrogate.backward()
        optimizer.step()
        losses[i] = loss.neg_bound.mean()
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == n_steps:
            finite = torch.isfinite(losses[: i + 1])
            if not finite.all():
                raise NonFiniteLoss(epoch, int((~finite).nonzero()[0]) + 1)
    sizes = torch.full((n_steps,), float(config.batch_size), device=run.device)
    sizes[-1] = n - config.batch_size * (n_steps - 1)  # the last batch holds the rest
    model.eval()
    test_loss, test_recon, test_kl = mean_neg_elbo(model, run.test_images, labels=run.test_labels)
    record = {
        "epoch": epoch,
        "train_bound": bound_name(config),
        "train_loss": ((losses * sizes).sum() / n).item(),  # the mean over the images
        "test_loss": test_loss.item(),
        "test_recon": test_recon.item(),
        "test_kl": test_kl.item(),
    }
    if config.objective == "iwae":  # the bound it trains, on the test set too
        bound = mean_neg_iwae_bound(model, run.test_images, config.k, labels=run.test_labels)
        record[f"test_neg_l{config.k}"] = bound.item()
    if not all(math.isfinite(v) for v in record.values() if isinstance(v, float)):
        raise NonFiniteLoss(epoch, None)
    if config.objective == "elbo":
        record["kl_weight"] = kl_weight[-1].item()
    record.update(lr=learning_rate(config, epoch), seconds=time.perf_counter() - start)
    save_epoch(run, record)
    tqdm.write(
        f"epoch {epoch:4d}/{config.epochs}  train {record['train_bound']} {record['train_loss']:8.3f}  test "
        f"{record['test_loss']:8.3f} (recon {record['test_recon']:8.3f} + kl {record['test_kl']:6.3f})  "
        f"{record['seconds']:6.1f} s"
    )


def compiled(loss):
    # Inductor otherwise draws random numbers with its own generator: with fallback_random the compiled loss draws
    # the very eps (and binarizations) of the plain one, so a seed gives the same run either way.
    torch._inductor.config.fallback_random = True
    return torch.compile(loss, dynamic=False)  # static shapes: the last, smaller batch gets its own graph


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


def kl_weights(config, epoch, n_steps):
    """The KL term's weight at each of the n_steps steps of epoch (1-based), (n_steps,): --beta, or with
    --kl-warmup N, beta * t / (N n_steps) at the run's t-th step, rising linearly to beta by the end of epoch N
    (Sønderby et al. 2016; Bowman et al. 2016). A function of the step alone, so that a resumed run goes on
    where it stopped."""
    if not config.kl_warmup:
        return torch.full((n_steps,), config.beta)
    t = (epoch - 1) * n_steps + torch.arange(1, n_steps + 1, dtype=torch.float64)  # the run's steps
    return (config.beta * torch.clamp(t / (config.kl_warmup * n_steps), max=1.0)).float()


def bound_name(config):
    """What the training loss is, as the log names it."""
    if config.objective == "iwae":
        return f"-L_{config.k}"
    if config.kl_warmup:
        return "recon + kl_weight KL"  # the log's kl_weight: the weight at the epoch's end
    return "-ELBO" if config.beta == 1 else f"recon + {config.beta:g} KL"


def make_optimizer(model, config):
    # Burda et al. use Adam with eps = 1e-4 (Section 5); elsewhere PyTorch's defaults, as in pytorch/examples.
    eps = 1e-4 if config.schedule == "iwae" else 1e-8
    # The fused kernel updates every parameter in one pass instead of a dozen ops per tensor: same arithmetic.
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(model.parameters(), lr=config.lr, eps=eps, fused=fused)


# --------------------------------------------------------------------------------------------- a run's files


def start_run(model_config, config, device, overwrite=False):
    """A new run of these configs; an existing run in config.out_dir is replaced only with overwrite."""
    out = Path(config.out_dir)
    if (out / CKPT_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"{out / CKPT_FILE} already exists; pass --resume to continue that run, --overwrite to replace it, "
            "or another --out-dir"
        )
    config = replace(config, pixels=resolve_pixels(config.pixels, model_config.likelihood))  # saved as it is meant
    torch.manual_seed(config.seed)
    data = load_data(config, device)
    model = VAE(model_config).to(device)
    model.init_output_bias(data[0].mean(0))
    out.mkdir(parents=True, exist_ok=True)
    for old in (out / CKPT_FILE, out / LOG_FILE):  # --overwrite: the old run goes now, all of it
        old.unlink(missing_ok=True)
    if (out / FRAMES_DIR).exists():
        shutil.rmtree(out / FRAMES_DIR)
    return Run(config, model, make_optimizer(model, config), *data, 0, device)


def resume_run(out_dir, device, settings=None):
    """The run in out_dir as its checkpoint left it: model, optimizer, epoch and random state. settings: new
    values of the fields that may change on resume (RESUMABLE), by name, such as {"epochs": 50}. Whatever is wrong
    with the checkpoint is found before the data is loaded."""
    path = Path(out_dir) / CKPT_FILE
    try:
        state, model = load_checkpoint(path, device)
        if "optimizer" not in state and "rng" not in state:  # such as pretrained/'s: a model to use, not a run
            raise CheckpointError(
                f"{path} holds a model's weights only, no optimizer or random-number state; evaluate or draw it, "
                "or train a new run"
            )
        # What the run is stays as it was; where the data is and how long to run may change.
        config = saved_config(state, path, **{"out_dir": str(out_dir), **(settings or {})})
        optimizer = make_optimizer(model, config)
        try:
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"the optimizer or random-number state in {path} is missing or does not fit ({type(e).__name__}: "
                f"{str(e).splitlines()[0]})"
            ) from e
    except CheckpointError as e:
        raise CheckpointError(f"cannot resume: {e}") from e
    epoch = int(state["epoch"])
    print(f"resuming {path} after epoch {epoch} (its model and training settings are kept)")
    run = Run(config, model, optimizer, *load_data(config, device), epoch, device)
    # A stop after an epoch's log line (or frame) but before its checkpoint: the resumed run writes them anew.
    lines = "".join(json.dumps(record) + "\n" for record in read_log(run.dir / LOG_FILE) if record["epoch"] <= epoch)
    write_atomic(run.dir / LOG_FILE, lambda f: f.write(lines.encode()))
    for frame_path in (run.dir / FRAMES_DIR).glob("*.png"):
        if int(frame_path.stem) > epoch:
            frame_path.unlink()
    return run


def load_data(config, device):
    """train images, train labels, test images, test labels, as Run holds them."""
    return (
        *load_train_set(config.data_dir, device, config.limit),
        *load_test_set(config.data_dir, config.pixels, device, config.limit),
    )


def save_epoch(run, record):
    """Append the epoch's log line (and frame), then replace the checkpoint, atomically."""
    # The log line goes first: a crash before the checkpoint is replaced leaves a line past the checkpoint's epoch,
    # which --resume drops before running that epoch again.
    with open(run.dir / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.config.frames:
        (run.dir / FRAMES_DIR).mkdir(exist_ok=True)
        image = Image.fromarray(frame(run.model, run.test_images))
        write_atomic(run.dir / FRAMES_DIR / f"{record['epoch']:04d}.png", lambda f: image.save(f, format="PNG"))
    state = {
        "model": run.model.state_dict(),
        "model_config": asdict(run.model.config),
        "train_config": asdict(run.config),
        "epoch": record["epoch"],
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(run.device),
    }
    save_checkpoint(run.dir / CKPT_FILE, state)
    run.epoch = record["epoch"]


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


def saved_config(state, path, **changes):
    """The checkpoint's TrainConfig, with `changes`."""
    try:
        return TrainConfig(**{**state["train_config"], **changes})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} was written by another version of this code ({e})") from e


def export(ckpt_path, path):
    """Write the model of the checkpoint at ckpt_path to `path` with its configs and epoch only: no optimizer or
    random-number state, and the folders set to their defaults (data, out), which a reader's clone has."""
    state, _ = load_checkpoint(ckpt_path)
    config = saved_config(state, ckpt_path, data_dir=TrainConfig.data_dir, out_dir=TrainConfig.out_dir)
    shipped = {**state, "train_config": asdict(config)}
    save_checkpoint(path, {key: shipped[key] for key in CHECKPOINT_KEYS})
    print(f"wrote {path}: epoch {state['epoch']} of {ckpt_path}, weights and configs only")


if __name__ == "__main__":
    main()
