"""Files written whole: a checkpoint, a log rewrite, a figure, a JSON file or a verified MNIST file is replaced
atomically, so that a crash or a full disk at any moment leaves the older file as it was."""

import json
import os
from pathlib import Path

PNG_DPI = 120  # every figure in plots/


def write_atomic(path, write):
    """Call write(file) to write `path` atomically: written beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves no half-written file behind
        raise


def write_json(path, obj):
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_png(fig, path):
    """A matplotlib Figure as a PNG."""
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=PNG_DPI, bbox_inches="tight"))
