"""The records of a data set by position, whatever holds them: a JSON-lines, CSV or Parquet file,
or a Hugging Face `datasets` data set (a `save_to_disk` directory, or `load_dataset` on a hub name
or local files). A record is a dict of columns; these readers know nothing about prompts.

Memory stays flat however large the data: JSON lines are indexed once by byte offsets and read
record by record; Parquet keeps an index of its row groups and reads the group of the record
asked for (only the columns the task reads; the last two groups are cached, so write large files
with row groups of ~10k rows); `datasets` memory-maps its Arrow files. A CSV file (rows may span
lines) is read whole.

`open_records(path, ...)` picks the reader: `hf:NAME` -> `datasets.load_dataset`, a directory ->
`datasets.load_from_disk`, else the file's suffix (.jsonl / .json, .csv, .parquet).
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Records(Protocol):
    path: str  # where the records come from, for messages

    def __len__(self) -> int: ...

    def __getitem__(self, row: int) -> dict[str, Any]: ...


def open_records(path: str, columns: Sequence[str], split: str = "train", subset: str = "") -> Records:
    """The records at `path`; `columns`: those the task reads (a columnar source checks them now and
    reads no others); `split`: which part of a data set with splits ("train": the only part of one
    without); `subset`: load_dataset's configuration name (hf:NAME only)."""
    if path.startswith("hf:"):
        records: Records = HFRecords(path, _load_dataset(path[3:], split, subset), columns)
    elif Path(path).is_dir():
        records = HFRecords(path, _load_from_disk(path, split), columns)
    elif not Path(path).is_file():
        raise ValueError(f"data set {path!r} does not exist; check task.options.path")
    elif split != "train":
        raise _one_split(path, split)
    elif path.endswith((".jsonl", ".json")):
        records = JsonLines(path)
    elif path.endswith(".csv"):
        records = CsvRows(path)
    elif path.endswith(".parquet"):
        records = ParquetRows(path, columns)
    else:
        raise ValueError(
            f"data set file {path!r}: expected .jsonl, .csv or .parquet, a `datasets` save_to_disk "
            "directory, or hf:NAME for datasets.load_dataset"
        )
    if len(records) == 0:
        raise ValueError(f"data set {path!r} has no records")
    return records


def check_columns(path: str, where: str, columns: Iterable[str], has: Iterable[str]) -> None:
    """Refuse a source without a column the task reads, naming the columns it does have."""
    missing = [c for c in columns if c not in has]
    if missing:
        raise ValueError(
            f"{path}, {where}: no column {missing} (it has {sorted(has)}); set the task options "
            "prompt / messages / answer to the columns that hold them"
        )


class JsonLines:
    def __init__(self, path: str):
        self.path = path
        self._offsets: list[int] = []
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, row: int) -> dict[str, Any]:
        with open(self.path, "rb") as f:
            f.seek(self._offsets[row])
            line = f.readline()
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{self.path}, record {row}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{self.path}, record {row}: expected a JSON object per line")
        return record


class CsvRows:
    def __init__(self, path: str):
        self.path = path
        with open(path, newline="") as f:
            self._rows = list(csv.DictReader(f))

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self._rows[row]


class ParquetRows:
    """A Parquet file read one row group at a time (the task's columns only)."""

    def __init__(self, path: str, columns: Sequence[str]):
        pq = _require("pyarrow.parquet", "pyarrow")
        self.path, self.columns = path, list(columns)
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        check_columns(path, "schema", self.columns, self._file.schema_arrow.names)
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._starts = np.cumsum([0, *sizes])  # group g holds rows [starts[g], starts[g + 1])
        self._groups: dict[int, Any] = {}  # the last groups read (pyarrow tables), oldest first

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, row: int) -> dict[str, Any]:
        group = int(np.searchsorted(self._starts, row, side="right")) - 1
        table = self._groups.pop(group, None)
        if table is None:
            table = self._file.read_row_group(group, columns=self.columns)
            if len(self._groups) >= 2:
                del self._groups[next(iter(self._groups))]
        self._groups[group] = table  # most recent last
        return table.slice(row - int(self._starts[group]), 1).to_pylist()[0]


class HFRecords:
    """A `datasets.Dataset` (memory-mapped Arrow), the task's columns only."""

    def __init__(self, path: str, data: Any, columns: Sequence[str]):
        self.path = path
        check_columns(path, "features", columns, data.column_names)
        self._data = data.select_columns(list(columns))

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self._data[row]


def _load_from_disk(path: str, split: str) -> Any:
    datasets = _require("datasets", "datasets")
    if not (Path(path) / "dataset_info.json").is_file() and not (Path(path) / "dataset_dict.json").is_file():
        raise ValueError(
            f"data set {path!r} is a directory but not one `datasets` save_to_disk wrote (no "
            "dataset_info.json or dataset_dict.json); point task.options.path at a file, or use "
            f"hf:{path} to load the data files in it with datasets.load_dataset"
        )
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(
                f"data set {path!r} has no split {split!r} (it has {sorted(data)}); set task.options.split "
                "(or eval_split, for held-out prompts) to one of them"
            )
        data = data[split]
    elif split != "train":
        raise _one_split(path, split)
    return data


def _one_split(path: str, split: str) -> ValueError:
    return ValueError(
        f"data set {path!r} has no splits, so split {split!r} names nothing in it; splits are for a "
        "saved DatasetDict or hf:NAME. Unset split / eval_split, or hold prompts out with eval_path or "
        "eval_fraction"
    )


def _load_dataset(name: str, split: str, subset: str) -> Any:
    """datasets.load_dataset on a hub name or a local directory; a local file is read by the
    builder of its suffix (load_dataset takes no single file otherwise)."""
    datasets = _require("datasets", "datasets")
    builders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    local = Path(name)
    if local.is_file():
        if local.suffix not in builders:
            raise ValueError(f"data set hf:{name}: a local file must end in {sorted(builders)}")
        return datasets.load_dataset(builders[local.suffix], data_files=str(local), split=split)
    return datasets.load_dataset(name, subset or None, split=split)


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"reading this data set needs {package}, which is not installed; install the data extra: "
            'pip install -e ".[data]"'
        ) from None
