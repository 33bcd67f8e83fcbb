"""Files written whole, and what to say when the system refuses a path.

Every output (checkpoint, log rewrite, figure, JSON results, a verified MNIST file) goes through write_atomic,
so that a failure at any moment leaves the older file whole. A path the scripts write into is checked before
their expensive work; a refusal is a PathError whose message names the path, the reason and what to do.
"""

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path

PNG_DPI = 120  # every figure in plots/


class PathError(Exception):
    """An output path cannot be written; the message names it and says what to do."""


# What to do about an output path the system refuses, by errno; for anything else, another path.
PATH_ADVICE = {
    errno.ENOSPC: "free some disk space or choose another {flag}",
    errno.EDQUOT: "free some of your disk quota or choose another {flag}",
    errno.EACCES: "make it writable for you or choose another {flag}",
    errno.EPERM: "make it writable for you or choose another {flag}",
    errno.EROFS: "it is on a read-only file system: choose another {flag}",
    errno.ENOTDIR: "part of that path is a file, not a folder: choose another {flag}",
    errno.ENOENT: "no folder can be made there: choose another {flag}",
}


def path_advice(e, flag):
    """What to do about the OSError e met writing into the path given by `flag`."""
    return PATH_ADVICE.get(e.errno, "choose another {flag}").format(flag=flag)


def path_problem(flag, path, e):
    """The PathError for the OSError e met writing into `path`, given by `flag`."""
    return PathError(f"{flag} {path}: cannot write there ({e.strerror or e}); {path_advice(e, flag)}")


def check_output_dir(path, flag):
    """Create the folder `path` (given by `flag`) if need be, and check that files can be written into it: a
    bad --out-dir or --plots-dir stops the script at once, not after its expensive work. Returns the folders it
    made, outermost first. Raises PathError."""
    path = Path(path)
    made = [folder for folder in (path, *path.parents) if not folder.exists()][::-1]
    try:
        if path.exists() and not path.is_dir():
            raise PathError(f"{flag} {path} is a file, not a folder; give a folder (a new one is created)")
        path.mkdir(parents=True, exist_ok=True)
        probe_write(path)
    except OSError as e:
        raise path_problem(flag, path, e) from e
    return made


@contextlib.contextmanager
def output_dir(path, flag):
    """check_output_dir, for a block that prepares what goes into the folder (loads the data): if the block
    fails (bad data, Ctrl-C), the folders check_output_dir made are removed again, so that a failed start
    leaves no empty folder behind."""
    made = check_output_dir(path, flag)
    try:
        yield
    except BaseException:
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # no longer empty: what is in it stays
                folder.rmdir()
        raise


def check_output_file(path, flag):
    """Check that the file `path` (given by `flag`) can be written: it is not a folder, and its folder exists and
    takes new files. `path` itself is not touched: write_json replaces it at the end. Raises PathError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise PathError(f"{flag} {path} is a folder; give a file name, such as {path / 'results.json'}")
        if not path.parent.is_dir():
            what = "is a file, not a folder" if path.parent.exists() else "does not exist; create it or"
            raise PathError(f"{flag} {path}: its folder {path.parent} {what}; choose another path")
        probe_write(path.parent)
    except OSError as e:
        raise path_problem(flag, path, e) from e


def probe_write(folder):
    """Write a nameless file of one block into `folder`: what the system refuses now, it would refuse later."""
    with tempfile.TemporaryFile(dir=folder) as f:
        f.write(bytes(4096))
        f.flush()


def write_atomic(path, write):
    """Call write(file) to write `path` atomically: a failure at any moment (a full disk, Ctrl-C, a kill) leaves
    either the old file or the new one, whole."""
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


def write_json(path, obj, flag):
    """Write `obj` as JSON into `path` (given by `flag`), atomically; a failure is a PathError."""
    try:
        write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))
    except OSError as e:
        raise path_problem(flag, path, e) from e


def write_png(fig, path, flag="--plots-dir"):
    """Write a matplotlib Figure as a PNG, atomically: a failed write (a full disk) leaves an older figure there
    whole. Raises PathError."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=PNG_DPI, bbox_inches="tight"))
    except OSError as e:
        raise PathError(f"could not write {path} ({e.strerror or e}); {path_advice(e, flag)}") from e
