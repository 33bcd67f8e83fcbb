"""What the pages print comes from the repository: every results table of README.md and docs/ is what
tools/tables.py writes from its committed JSON files, and the flags and keys that docs/reliability.md lists are
those the code has and writes."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import evaluate
import train

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import tables  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_table_is_what_its_files_give(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


@pytest.fixture
def pages(tmp_path, monkeypatch):
    """A copy of the pages and their files, which tables.py reads and rewrites in place of the repository's."""
    for part in ("README.md", "docs", "results", "pretrained"):
        copy = shutil.copytree if (ROOT / part).is_dir() else shutil.copy
        copy(ROOT / part, tmp_path / part)
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    return tmp_path


def test_a_number_changed_in_a_file_makes_its_tables_stale(pages, capsys):
    path = pages / "results" / "default.json"
    r = json.loads(path.read_text())
    path.write_text(json.dumps({**r, "test_neg_elbo": r["test_neg_elbo"] + 0.01}))
    assert tables.main(["--check"]) == 1
    assert "README.md: headline" in capsys.readouterr().out
    tables.main([])  # rewritten, the pages hold the new number
    assert tables.main(["--check"]) == 0
    assert f"{r['test_neg_elbo'] + 0.01:.2f}" in (pages / "README.md").read_text()


def test_a_file_not_in_the_repository_leaves_its_row_or_table_saying_so_and_no_number(pages):
    cb_deq, bench = json.loads((pages / "results" / "cb-deq.json").read_text()), pages / "results" / "bench-cpu.json"
    (pages / "results" / "cb-deq.json").unlink()
    bench.unlink()
    tables.main([])
    (row,) = [line for line in (pages / "README.md").read_text().splitlines() if line.startswith("| 6. ")]
    assert "not yet scored on all 10000 test images" in row and f"{cb_deq['test_neg_elbo']:.2f}" not in row
    speed = (pages / "docs" / "speed.md").read_text()
    assert "*Not yet measured: this comes from `results/bench-cpu.json`" in speed and "GEMM bound (" not in speed


def listed(name):
    """The names in the first column of the key table `name` of docs/reliability.md."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    (block,) = re.findall(rf"<!-- keys {name} -->\n(.*?)<!-- end of keys -->", text, re.S)
    return {name for line in block.splitlines()[2:] for name in re.findall(r"`([^`]+)`", line.split(" | ")[0])}


def test_the_resumable_flags_listed_are_the_ones_resume_takes():
    assert listed("resumable") == {"--" + name.replace("_", "-") for name in train.RESUMABLE}


def test_the_log_keys_listed_are_the_ones_train_py_writes(tiny_run):
    written = set()
    for flags in ([], ["--objective", "iwae", "--k", "2"]):
        for record in map(json.loads, (tiny_run(*flags) / "log.jsonl").read_text().splitlines()):
            written |= {re.sub(r"\d+$", "<k>", key) for key in record}
    assert listed("log") == written


def test_the_json_keys_listed_are_the_ones_evaluate_py_writes(tiny_run):
    written = {"made_by"}  # added by cli.write_results to every file
    for flags in ([], ["--likelihood", "cb"], ["--conditional"]):  # exact, 8-bit and classifier keys
        argv = ["--checkpoint", str(tiny_run(*flags) / "ckpt.pt"), "--k", "2", "--limit", "16", "--exact-images", "2"]
        written |= evaluate.main(argv).keys()
    assert listed("evaluate") == written - {"made_by"}
    committed = [*(ROOT / "results").glob("*.json"), *(ROOT / "pretrained").glob("*.json")]
    for r in (json.loads(path.read_text()) for path in committed):
        assert "test_neg_elbo" not in r or r.keys() <= written
