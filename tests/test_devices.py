"""CUDA and MPS without a GPU: --resume and evaluate.py checked on stand-in devices.

No test here needs a GPU. The meta device stands in for an accelerator: tensors there have shapes and dtypes
but no data, so every operation is checked for where it puts its result. StandInAccelerator adds what MPS
enforces (no float64 on the device) and lets numbers come back to the host (as zeros). The CUDA and MPS
random-number generators are replaced by fakes that take, as torch's do, only a CPU ByteTensor.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

import bench
import scoring
import train
from checkpoints import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

META = torch.device("meta")


class StandInAccelerator(TorchFunctionMode):
    """Run with tensors on the meta device as if it were a GPU without float64 (MPS): every torch call that makes
    a float64 tensor off the CPU raises, as on MPS; a copy to the host gives zeros, and a number read from the
    device (.item(), int()) gives 0. A function mode, so that it also sees what runs under inference_mode."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.device == META:
            if name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
                return 0
            if name == "cpu" or (name == "to" and to_the_host(args, kwargs)):
                return torch.zeros(source.shape, dtype=source.dtype)
        out = func(*args, **kwargs)
        for tensor in out if isinstance(out, tuple) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64 and tensor.device.type != "cpu":
                raise TypeError(f"{name} makes a float64 tensor on {tensor.device}: MPS has no float64")
        return out


def to_the_host(args, kwargs):
    """Whether a Tensor.to call moves its tensor to the CPU (the device given by name or among the arguments)."""
    device = kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
    return device is not None and torch.device(device).type == "cpu"


def test_the_stand_in_refuses_float64_on_the_device():
    with StandInAccelerator():
        with pytest.raises(TypeError, match="float64"):
            torch.zeros(3, device=META).double()
        assert torch.zeros(3, device=META).cpu().double().mean().item() == 0.0  # on the host it is fine


@pytest.mark.parametrize("likelihood", ["bernoulli", "cb"])
def test_evaluation_makes_no_float64_on_the_device(make_vae, likelihood):
    """evaluate.py's measures (and bench's evaluation throughput) keep the device in float32: MPS has no float64.
    The importance-sampled NLL is averaged in float64 on the host."""
    model = make_vae(likelihood=likelihood, latent_dim=4, hidden_dims=(32,), activation="relu").to(META)
    images = torch.rand(20, 1, 28, 28, device=META)
    labels = torch.zeros(20, dtype=torch.long, device=META)
    with StandInAccelerator():
        nll = scoring.iwae_nll(model, images, k=7, batch_size=8)
        means = scoring.posterior_means(model, images, batch_size=8)
        assert means.device == META and means.dtype == torch.float32
        scoring.active_units(means)
        scoring.knn_accuracy(means, labels, means, labels)
        bench.eval_throughput(model, images, 7, META)
    assert isinstance(nll, float)


# --------------------------------------------------------------------------------------------- --resume


@pytest.fixture
def run(run_copy):
    """A private copy of the finished 1-epoch tiny run."""
    return run_copy()


@pytest.fixture
def fake_generator(monkeypatch):
    """fake_generator(kind): torch.cuda's or torch.mps's generator replaced by a fake that takes, as torch's does,
    only a CPU ByteTensor; returns the states it was set to."""

    def install(kind):
        restored = []

        def set_rng_state(new_state, *args, **kwargs):
            if new_state.device.type != "cpu" or new_state.dtype != torch.uint8:
                raise TypeError("RNG state must be a torch.ByteTensor")
            restored.append(new_state.clone())

        backend = getattr(torch, kind)
        monkeypatch.setattr(backend, "get_rng_state", lambda *args, **kwargs: torch.arange(40, dtype=torch.uint8))
        monkeypatch.setattr(backend, "set_rng_state", set_rng_state)
        return restored

    return install


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_device_random_state_is_saved_and_restored(run, fake_generator, kind):
    """A run on CUDA or MPS saves its device generator's state beside the CPU's, and --resume restores both:
    loaded onto the device (the meta device standing in), the states still reach torch as CPU ByteTensors."""
    restored = fake_generator(kind)
    device, device_state = torch.device(kind), torch.arange(40, dtype=torch.uint8)

    state = torch.load(run / "ckpt.pt", weights_only=True)
    state["rng"] = train.rng_state(device)
    assert torch.equal(state["rng"][kind], device_state), f"the {kind} generator's state is not saved"
    save_checkpoint(run / "ckpt.pt", state)

    loaded, _ = load_checkpoint(run / "ckpt.pt", META)
    torch.manual_seed(12345)
    train.set_rng_state(loaded["rng"], device)
    assert len(restored) == 1 and torch.equal(restored[0], device_state)
    assert torch.equal(torch.get_rng_state(), state["rng"]["cpu"])


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_a_checkpoint_written_on_the_cpu_resumes_on_an_accelerator(run, monkeypatch, fake_generator, kind):
    """train.resume_run with --device cuda / mps (the meta device holding the model and data): the model, the
    optimizer's moments and the data move to the device; the saved random state, the CPU's generator only, comes
    back as a CPU ByteTensor and is restored, and the device's generator is left as it is."""
    restored = fake_generator(kind)
    real_load_checkpoint, real_load_data = train.load_checkpoint, train.load_data
    monkeypatch.setattr(train, "load_checkpoint", lambda path, device: real_load_checkpoint(path, META))
    monkeypatch.setattr(train, "load_data", lambda config, device: real_load_data(config, META))
    saved = torch.load(run / "ckpt.pt", weights_only=True)
    assert set(saved["rng"]) == {"cpu"}
    torch.manual_seed(12345)  # anything but the saved state
    resumed = train.resume_run(run, torch.device(kind), {"epochs": 2})
    assert resumed.epoch == 1 and resumed.device.type == kind
    assert torch.equal(torch.get_rng_state(), saved["rng"]["cpu"]) and restored == []
    assert {p.device for p in resumed.model.parameters()} == {META}
    assert resumed.train_images.device == META and resumed.test_images.device == META
    moments = [s[key] for s in resumed.optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.device for m in moments} == {META}


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_a_checkpoint_written_on_an_accelerator_resumes_on_the_cpu(run, fake_generator, kind):
    """The reverse: a random state with the device's generator beside the CPU's resumes on the CPU, which
    restores its own and trains on."""
    fake_generator(kind)
    state = torch.load(run / "ckpt.pt", weights_only=True)
    state["rng"] = train.rng_state(torch.device(kind))  # as a run on that device saves it
    save_checkpoint(run / "ckpt.pt", state)
    torch.manual_seed(12345)
    resumed = train.resume_run(run, torch.device("cpu"), {"epochs": 2})
    assert torch.equal(torch.get_rng_state(), state["rng"]["cpu"])
    train.train_epoch(resumed, 2)
    assert resumed.epoch == 2
