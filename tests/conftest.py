import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts are top-level modules: `import model`, `import train`

DATA_DIR = ROOT / "data"


@pytest.fixture(scope="session")
def data_dir():
    """The real MNIST files, verified once per session (.ci/run places them under data/MNIST/raw/)."""
    from data import ensure_mnist

    ensure_mnist(DATA_DIR)
    return DATA_DIR
