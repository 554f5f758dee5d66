"""Every format a data set comes in gives the same prompts: JSON lines, CSV, Parquet (read a row
group at a time), `datasets` save_to_disk directories (one data set or a dict of splits) and
load_dataset on local files; and the errors a wrong path, split or column gives."""

from __future__ import annotations

import csv
import json
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asyncflow.tasks import Example
from asyncflow.tasks.dataset import Dataset
from asyncflow.tasks.records import ParquetRows

RECORDS = [
    {
        "messages": [{"role": "user", "content": f"What is {i} plus 1?"}],
        "question": f"What is {i} plus 1?",
        "answer": f"#### {i + 1}",
        "source": "toy",  # a column the task does not read
    }
    for i in range(25)
]
EXPECTED = [Example(r["messages"], r["answer"]) for r in RECORDS]


@pytest.fixture(autouse=True)
def private_hf_cache(tmp_path, monkeypatch):
    """load_dataset caches what it builds: in the test's folder, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()


def write(fmt: str, root) -> str:
    """RECORDS in format `fmt` under `root`; returns the task's `path`."""
    if fmt in ("jsonl", "hf-file"):
        path = root / "train.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        return f"hf:{path}" if fmt == "hf-file" else str(path)
    if fmt == "csv":
        path = root / "train.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(RECORDS[0]))
            w.writeheader()
            w.writerows({**r, "messages": json.dumps(r["messages"])} for r in RECORDS)
        return str(path)
    if fmt == "parquet":
        path = root / "train.parquet"
        pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=4)  # 7 row groups
        return str(path)
    if fmt == "hf-dir":  # load_dataset on a folder of data files: one split per file name
        (root / "data").mkdir()
        (root / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
        return f"hf:{root / 'data'}"
    data = datasets.Dataset.from_list(RECORDS)
    if fmt == "saved-dict":
        data = datasets.DatasetDict({"train": data, "test": data.select(range(3))})
    data.save_to_disk(str(root / "saved"))
    return str(root / "saved")


FORMATS = ["jsonl", "csv", "parquet", "saved", "saved-dict", "hf-dir", "hf-file"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_prompts(tmp_path, fmt):
    path = write(fmt, tmp_path)
    data = Dataset(path, messages="messages", shuffle=False)
    assert [data.example(i) for i in range(25)] == EXPECTED
    assert data.example(25) == EXPECTED[0]  # the next epoch
    shuffled = Dataset(path, messages="messages", seed=3)
    assert sorted(shuffled.example(i).answer for i in range(25)) == sorted(e.answer for e in EXPECTED)
    text = Dataset(path, prompt="question", eval_fraction=0.2, shuffle=False)
    assert text.example(0) == Example("What is 0 plus 1?", "#### 1")
    assert text.eval_example(0) == Example("What is 20 plus 1?", "#### 21")  # the last 5 are held out


def test_a_split_data_set_gives_training_and_held_out_splits(tmp_path):
    path = write("saved-dict", tmp_path)
    data = Dataset(path, messages="messages", eval_split="test", shuffle=False)
    assert [data.eval_example(i) for i in range(4)] == [*EXPECTED[:3], EXPECTED[0]]
    assert {data.example(i).answer for i in range(25)} == {e.answer for e in EXPECTED}
    with pytest.raises(ValueError, match="has no split 'validation' \\(it has \\['test', 'train'\\]\\)"):
        Dataset(path, messages="messages", eval_split="validation")


def test_parquet_reads_one_row_group_at_a_time_and_only_the_tasks_columns(tmp_path):
    rows = ParquetRows(write("parquet", tmp_path), ["question", "answer"])
    assert len(rows) == 25 and rows[24] == {"question": "What is 24 plus 1?", "answer": "#### 25"}
    for i in [0, 5, 9, 13, 24, 1]:
        assert rows[i]["answer"] == f"#### {i + 1}"
        assert len(rows._groups) <= 2  # a small cache: memory is a row group or two, not the file
    assert all(t.column_names == ["question", "answer"] for t in rows._groups.values())


@pytest.mark.parametrize(
    ("fmt", "options", "message"),
    [
        ("parquet", {"prompt": "q"}, "train.parquet, schema: no column \\['q'\\] \\(it has \\['answer', "),
        (
            "saved",
            {"messages": "messages", "answer": "a"},
            "saved, features: no column \\['a'\\] \\(it has \\['answer', ",
        ),
        (
            "saved-dict",
            {"split": "dev"},
            "has no split 'dev' \\(it has \\['test', 'train'\\]\\); set task.options.split",
        ),
        ("parquet", {"eval_split": "test", "eval_fraction": 0.1}, "set one of them"),
        ("jsonl", {"max_prompt_tokens": -1}, "max_prompt_tokens -1 must be >= 0"),
        ("jsonl", {"split": "test"}, "has no splits, so split 'test' names nothing in it"),
        (
            "saved",
            {"messages": "messages", "eval_split": "test"},
            "has no splits, so split 'test' names nothing in it",
        ),
        ("parquet", {"subset": "main"}, "subset 'main' names a configuration of hf:NAME"),
    ],
)
def test_bad_columns_splits_and_options_are_refused_with_the_fix(tmp_path, fmt, options, message):
    with pytest.raises(ValueError, match=message):
        Dataset(write(fmt, tmp_path), **options)


def test_bad_paths_are_refused_with_what_is_expected(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not one `datasets` save_to_disk wrote .* use hf:"):
        Dataset(str(tmp_path / "folder"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(ValueError, match="expected .jsonl, .csv or .parquet"):
        Dataset(str(tmp_path / "d.txt"))
    with pytest.raises(ValueError, match="a local file must end in"):
        Dataset(f"hf:{tmp_path / 'd.txt'}")
    with pytest.raises(ValueError, match="does not exist; check task.options.path"):
        Dataset(str(tmp_path / "missing.parquet"))
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "answer": "1"}]).slice(0, 0), tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="has no records"):
        Dataset(str(tmp_path / "e.parquet"))


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch):
    path = write("parquet", tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(
        ImportError, match='needs pyarrow, which is not installed; .*pip install -e ".\\[data\\]"'
    ):
        Dataset(path)
