"""What the pages print comes from the repository: the results tables are what tools/tables.py writes from the
committed files, and the flags and keys docs/reliability.md lists are those the code has and writes."""

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


@pytest.fixture
def pages(tmp_path, monkeypatch):
    """A copy of the pages and their files, which tables.py reads and rewrites in place of the repository's."""
    for part in ("README.md", "docs", "results", "pretrained"):
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy)(ROOT / part, tmp_path / part)
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    return tmp_path


def test_every_table_is_what_its_files_give_and_stale_when_a_number_changes(pages, capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().out
    r = json.loads((pages / "results" / "default.json").read_text())
    (pages / "results" / "default.json").write_text(json.dumps({**r, "test_neg_elbo": r["test_neg_elbo"] + 0.01}))
    assert tables.main(["--check"]) == 1 and "README.md: headline" in capsys.readouterr().out
    tables.main([])  # rewritten, the pages hold the new number
    assert tables.main(["--check"]) == 0 and f"{r['test_neg_elbo'] + 0.01:.2f}" in (pages / "README.md").read_text()


def test_a_file_not_in_the_repository_leaves_its_row_or_table_saying_so_and_no_number(pages):
    cb_deq = json.loads((pages / "results" / "cb-deq.json").read_text())
    (pages / "results" / "cb-deq.json").unlink()
    (pages / "results" / "bench-cpu.json").unlink()
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
    written = set()
    for flags in ([], ["--likelihood", "cb"], ["--conditional"]):  # exact, 8-bit and classifier keys
        argv = ["--checkpoint", str(tiny_run(*flags) / "ckpt.pt"), "--k", "2", "--limit", "16", "--exact-images", "2"]
        written |= evaluate.main(argv).keys()
    assert listed("evaluate") == written
    for path in [*(ROOT / "results").glob("*.json"), *(ROOT / "pretrained").glob("*.json")]:
        r = json.loads(path.read_text())  # made_by: what cli.write_results adds to every file
        assert "test_neg_elbo" not in r or r.keys() - {"made_by"} <= written
