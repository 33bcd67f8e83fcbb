"""What the test modules share: the real MNIST files, one intra-op thread, tiny training runs trained once per
session, small seeded models, no network, no progress bars, and the helpers that run a script's main and read
its stderr as a terminal shows it.

No test module imports another: what they have in common is here, as fixtures.
"""

import hashlib
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts are top-level modules: `import model`, `import train`

DATA_DIR = ROOT / "data"

# The tiny run: 128 images in 4 steps of 32, one hidden layer of 32, on the CPU. A test's own flags come after
# these, and override them (argparse keeps the last value of a flag).
TINY = ("--limit", "128", "--batch-size", "32", "--hidden-dims", "32", "--device", "cpu")

# The small model of make_vae, unless a test says otherwise.
SMALL_VAE = {"latent_dim": 2, "hidden_dims": (16,), "activation": "tanh", "likelihood": "bernoulli"}


@contextmanager
def intra_op_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread: the models under test are tiny, and on a loaded 2-core machine a second thread
    costs more in hand-offs than it brings; runs compared with each other then also use the same kernels."""
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_for_the_module():
    """one_thread for a module's own module-scoped fixtures (work done once for all of its tests)."""
    with intra_op_threads(1):
        yield


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


# --------------------------------------------------------------------------------------------- progress bars


class QuietTqdm(tqdm):
    """No progress bars: a bar another test left open makes the next ones redraw over several lines."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


@pytest.fixture(scope="session", autouse=True)
def no_progress_bars():
    """train.py's and evaluate.py's bars are off for the whole session, module-scoped fixtures included."""
    import evaluate
    import train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "tqdm", QuietTqdm)
        patch.setattr(evaluate, "tqdm", QuietTqdm)
        yield


# --------------------------------------------------------------------------------------------- no network


@pytest.fixture
def offline(monkeypatch):
    """No network: both of data.py's fetchers fail at once, with "<source>: no network in this test". Returns
    the sources asked, in order ("torchvision", then "npm")."""
    import data

    calls = []

    def fetcher(source):
        def fetch(into):
            calls.append(source)
            raise RuntimeError(f"{source}: no network in this test")

        return fetch

    monkeypatch.setattr(data, "_fetch_torchvision", fetcher("torchvision"))
    monkeypatch.setattr(data, "_fetch_npm", fetcher("npm"))
    return calls


# --------------------------------------------------------------------------------------------- tiny runs


def _contents(folder):
    """{path inside a run's folder: sha256 of the file, or None for a folder}."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(Path(folder).rglob("*"))
    }


class TinyRuns:
    """tiny_run(*flags, epochs=1): the out dir of a finished train.py run of TINY and then `flags`, trained once
    per session (two spellings of the same settings share one run) on one intra-op thread, so that its numbers
    do not depend on the thread count. It is shared, so read-only: a test that changes a run works on a copy
    (run_copy). A new run is trained when first asked for; ask before patching anything that training uses
    (or from a module-scoped fixture).

    tiny_run.argv(out_dir, *flags, epochs=1): that run's command line, for a test that runs train.main itself;
    tiny_run.train(out_dir, *flags, epochs=1): train it now, into out_dir (a test that watches the training).
    """

    def __init__(self, tmp_path_factory, data_dir):
        self.tmp_path_factory, self.data_dir = tmp_path_factory, data_dir
        self.runs = {}  # settings -> (out dir, its contents when trained)

    def argv(self, out_dir, *flags, epochs=1):
        argv = [*TINY, "--epochs", epochs, "--data-dir", self.data_dir, "--out-dir", out_dir, *flags]
        return [str(a) for a in argv]

    def train(self, out_dir, *flags, epochs=1):
        import train

        with intra_op_threads(1):
            train.main(self.argv(out_dir, *flags, epochs=epochs))
        return Path(out_dir)

    def __call__(self, *flags, epochs=1):
        import train

        settings = vars(train.build_parser().parse_args(self.argv("", *flags, epochs=epochs)))
        key = tuple(sorted((name, value) for name, value in settings.items() if name != "out_dir"))
        if key not in self.runs:
            out = self.train(self.tmp_path_factory.mktemp("tiny-run") / "run", *flags, epochs=epochs)
            self.runs[key] = out, _contents(out)
        out, contents = self.runs[key]
        self.check_unchanged(out, contents)
        return out

    @staticmethod
    def check_unchanged(out, contents):
        if _contents(out) != contents:
            pytest.fail(f"a test changed the shared run {out}: copy it first (run_copy)", pytrace=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """tiny_run(*flags, epochs=1): a finished tiny run's out dir, trained once per session, read-only (TinyRuns);
    also tiny_run.argv(out_dir, *flags, epochs=1) and tiny_run.train(out_dir, *flags, epochs=1)."""
    runs = TinyRuns(tmp_path_factory, data_dir)
    yield runs
    for out, contents in runs.runs.values():  # the last test to change a shared run is caught here
        runs.check_unchanged(out, contents)


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """run_copy(*flags, epochs=1, name="run"): a private copy of tiny_run(*flags, epochs=epochs), in tmp_path."""

    def copy(*flags, epochs=1, name="run"):
        return Path(shutil.copytree(tiny_run(*flags, epochs=epochs), tmp_path / name))

    return copy


# --------------------------------------------------------------------------------------------- small models


@pytest.fixture(scope="session")
def make_vae():
    """make_vae(seed=0, spread=False, **config): a small untrained VAE in eval mode, its weights drawn after
    torch.manual_seed(seed), of VAEConfig(**config) with SMALL_VAE's values for the fields not given. With
    spread=True, an MLP's output bias is spread over -6..6 (a random permutation of 784 evenly spaced logits),
    where a CB's mean and its lambda differ by up to 0.16."""
    from model import VAE, VAEConfig

    def make(seed=0, spread=False, **config):
        torch.manual_seed(seed)
        model = VAE(VAEConfig(**{**SMALL_VAE, **config}))
        if spread:
            with torch.no_grad():
                model.to_logits.bias.copy_(torch.linspace(-6, 6, 784)[torch.randperm(784)])
        return model.eval()

    return make


# --------------------------------------------------------------------------------------------- running scripts


def shown_lines(err):
    """What a terminal would show of stderr: per line, the text after the last carriage return."""
    lines = (line.rsplit("\r", 1)[-1] for line in err.split("\n"))
    return [line for line in lines if line.strip()]


def the_error(lines, *needles):
    """The one `error:` line of stderr (argparse adds its usage lines above it); it names every needle."""
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, lines
    assert all(line.startswith(("usage:", " ")) for line in lines if line not in errors), lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def only_error(lines, *needles):
    """stderr is exactly one line, `error: ...`, naming every needle (no usage: not a flag problem)."""
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return the_error(lines, *needles)


class Scripts:
    """A script's main run in-process, and what it printed, as a terminal shows it."""

    shown_lines = staticmethod(shown_lines)
    the_error = staticmethod(the_error)
    only_error = staticmethod(only_error)

    def __init__(self, capsys):
        self.capsys = capsys

    def run(self, main, *argv):
        """main(argv) -> (exit code, stdout, shown stderr lines); a traceback on stderr fails the test."""
        self.capsys.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except KeyboardInterrupt:  # left alone, it would stop pytest itself
            pytest.fail("Ctrl-C escaped main: a user would see a traceback")
        out, err = self.capsys.readouterr()
        assert "Traceback" not in err
        return code, out, shown_lines(err)


@pytest.fixture
def scripts(capsys):
    """scripts.run(main, *argv) -> (exit code, stdout, shown stderr lines); scripts.shown_lines(stderr),
    scripts.the_error(lines, *needles), scripts.only_error(lines, *needles)."""
    return Scripts(capsys)
