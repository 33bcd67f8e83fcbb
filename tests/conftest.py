import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts are top-level modules: `import model`, `import train`

DATA_DIR = ROOT / "data"


@pytest.fixture
def one_thread():
    """One intra-op thread: the models under test are tiny, and on a loaded 2-core machine a second thread
    costs more in hand-offs than it brings; runs compared with each other then also use the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir():
    """The real MNIST files, verified once per session (.ci/run places them under data/MNIST/raw/). A test that
    needs them fails, saying so, where they cannot be had: it is never skipped."""
    from data import DataError, ensure_mnist

    try:
        ensure_mnist(DATA_DIR)
    except DataError as e:
        pytest.fail(f"this test needs the MNIST files in {DATA_DIR / 'MNIST' / 'raw'}: {e}", pytrace=False)
    return DATA_DIR
