"""Documents from ``--data`` sources, one text each, in a fixed order (for :mod:`mecefo.tokenizing`).

What a document is, by source (a directory is walked in sorted path order, sources in the order given):

* a text file (any suffix not named below): its whole UTF-8 text;
* a JSON Lines file (``.jsonl``): the ``--text-field`` of each record (one JSON object per line);
* a Parquet file (``.parquet``): the ``--text-field`` column of each row, read a row group at a time;
* an Arrow file (``.arrow``, IPC stream or file format; ``datasets`` writes the stream format): the
  ``--text-field`` column of each row, a record batch at a time;
* a ``datasets`` ``save_to_disk`` directory (``state.json`` + ``dataset_info.json``, or a DatasetDict's
  ``dataset_dict.json``: its ``train`` split, or its only one): the ``--text-field`` of each row,
  loaded with ``datasets.load_from_disk`` (local files only).

Records whose text is empty or null are not documents. Readers yield ``None`` for them, so that a
progress count of records stays true. pyarrow and datasets are imported only when a source needs
them (``pip install 'mecefo_kernels[data]'``).

Bad input is a one-line ``ValueError`` naming the file (and the line of a JSON Lines file); a
``--text-field`` the records lack is a :class:`ConfigError` on ``text_field`` naming the fields that exist.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

TEXT, JSONL, PARQUET, ARROW, DATASET = "text", "jsonl", "parquet", "arrow", "dataset"
_SUFFIX_KINDS = {".jsonl": JSONL, ".parquet": PARQUET, ".arrow": ARROW}
DATASET_ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class Source:
    """One file (or ``save_to_disk`` directory) of documents."""

    kind: str  # TEXT, JSONL, PARQUET, ARROW or DATASET
    path: Path

    def stamp(self) -> str:
        """Path, size and modification time of every file it reads: what the corpus cache key holds."""
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return "|".join(f"{self.kind}:{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def is_dataset_dir(path: Path) -> bool:
    """A directory ``datasets``' ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def find_sources(sources: list[str]) -> list[Source]:
    """The document sources under ``sources`` (files and directories), each file classified by suffix."""
    found: list[Source] = []
    for src in sources:
        path = Path(src)
        if path.is_dir() and is_dataset_dir(path):
            found.append(Source(DATASET, path))
        elif path.is_dir():
            inside = []
            for root, dirs, files in os.walk(path):
                here = Path(root)
                for d in [d for d in dirs if is_dataset_dir(here / d)]:
                    dirs.remove(d)  # a dataset inside the tree is one source, its .arrow files not separate ones
                    inside.append(Source(DATASET, here / d))
                inside.extend(_file_source(here / name) for name in files)
            found.extend(sorted(inside, key=lambda s: str(s.path)))  # not the file system's order
        elif path.is_file():
            found.append(_file_source(path))
        else:
            raise FileNotFoundError(f"--data {src!r}: no such file or directory")
    if not found:
        raise ValueError(f"--data {' '.join(sources)}: no files found")
    return found


def _file_source(path: Path) -> Source:
    return Source(_SUFFIX_KINDS.get(path.suffix.lower(), TEXT), path)


def check_sources(sources: list[Source], text_field: str) -> int | None:
    """Open every source once before tokenising (a corrupt Parquet file, a missing column fail now, not an
    hour in); the number of records when every source knows it, else None."""
    total = 0
    for src in sources:
        if src.kind == TEXT:
            total += 1
        elif src.kind == PARQUET:
            pf = _parquet_file(src.path)
            _check_column(src.path, pf.schema_arrow, text_field)
            total += pf.metadata.num_rows
        elif src.kind == ARROW:
            with _arrow_reader(src.path) as (reader, rows):
                _check_column(src.path, reader.schema, text_field)
            total = None if rows is None or total is None else total + rows
        elif src.kind == DATASET:
            ds = _load_dataset(src.path)
            if text_field not in ds.column_names:
                raise _missing_field(text_field, str(src.path), ds.column_names)
            total = None if total is None else total + len(ds)
        else:
            total = None  # JSON Lines: known once read
    return total


def iter_records(sources: list[Source], text_field: str) -> Iterator[str | None]:
    """Each record's text in order (``None`` for an empty or null one)."""
    readers = {TEXT: _text_file, JSONL: _jsonl, PARQUET: _parquet, ARROW: _arrow, DATASET: _dataset}
    for src in sources:
        yield from readers[src.kind](src.path, text_field)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _missing_field(field: str, where: str, present) -> ConfigError:
    return ConfigError("text_field", f"--text-field {field!r}: no such field in {where} (its fields: "
                                     f"{', '.join(map(str, present)) or 'none'})")


def _text_file(path: Path, text_field: str) -> Iterator[str | None]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data {path}: not UTF-8 text (byte {e.start}: {e.reason}); text files are read as "
                         "UTF-8") from None
    yield text or None


def _jsonl(path: Path, text_field: str) -> Iterator[str | None]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"--data {path}:{number}: not a JSON record ({_first_line(e)})") from None
            if not isinstance(record, dict):
                raise ValueError(f"--data {path}:{number}: a JSON {type(record).__name__}, not an object "
                                 "(one record per line)")
            if text_field not in record:
                raise _missing_field(text_field, f"{path}:{number}", record)
            yield _text_value(record[text_field], f"{path}:{number}", text_field)


def _text_value(value, where: str, text_field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise ValueError(f"--data {where}: --text-field {text_field!r} holds a {type(value).__name__}, not text")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("reading Parquet and Arrow files needs pyarrow: pip install 'mecefo_kernels[data]'") \
            from None
    return pyarrow


def _check_column(path: Path, schema, text_field: str) -> None:
    pa = _pyarrow()
    if text_field not in schema.names:
        raise _missing_field(text_field, str(path), schema.names)
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise ValueError(f"--data {path}: column {text_field!r} is {kind}, not text (--text-field names the "
                         "column of documents)")


def _parquet_file(path: Path):
    pa = _pyarrow()
    try:
        return pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"--data {path}: not a readable Parquet file ({_first_line(e)})") from None


def _parquet(path: Path, text_field: str) -> Iterator[str | None]:
    pa = _pyarrow()
    pf = _parquet_file(path)
    _check_column(path, pf.schema_arrow, text_field)
    for group in range(pf.num_row_groups):
        try:
            column = pf.read_row_group(group, columns=[text_field]).column(0)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"--data {path}: row group {group} of this Parquet file is unreadable "
                             f"({_first_line(e)})") from None
        yield from (text or None for text in column.to_pylist())


class _arrow_reader:
    """``with _arrow_reader(path) as (reader, rows)``: an IPC file (random access; ``rows`` known) or stream
    (``rows`` None) reader over a memory map."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        pa = _pyarrow()
        try:
            self.source = pa.memory_map(str(self.path))
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"--data {self.path}: not a readable Arrow file ({_first_line(e)})") from None
        try:
            reader = pa.ipc.open_file(self.source)
            return reader, sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            self.source.seek(0)
        try:
            return pa.ipc.open_stream(self.source), None
        except (pa.ArrowException, OSError) as e:
            self.source.close()
            raise ValueError(f"--data {self.path}: not an Arrow IPC file or stream ({_first_line(e)})") from None

    def __exit__(self, *exc):
        self.source.close()


def _arrow(path: Path, text_field: str) -> Iterator[str | None]:
    pa = _pyarrow()
    with _arrow_reader(path) as (reader, _):
        _check_column(path, reader.schema, text_field)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if hasattr(
            reader, "num_record_batches") else reader
        try:
            for batch in batches:
                yield from (text or None for text in batch.column(text_field).to_pylist())
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"--data {path}: unreadable Arrow record batch ({_first_line(e)})") from None


def _load_dataset(path: Path):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a local directory: nothing to fetch, ever
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a datasets save_to_disk directory needs datasets: pip install "
                          "'mecefo_kernels[data]'") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001  (whatever datasets raises, one line naming the directory)
        raise ValueError(f"--data {path}: cannot load this datasets directory ({_first_line(e)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" in loaded:
            return loaded["train"]
        if len(splits) == 1:
            return loaded[splits[0]]
        raise ValueError(f"--data {path}: a DatasetDict with splits {', '.join(splits)} and none named 'train': "
                         "save the split to train on by itself")
    return loaded


def _dataset(path: Path, text_field: str) -> Iterator[str | None]:
    ds = _load_dataset(path)
    if text_field not in ds.column_names:
        raise _missing_field(text_field, str(path), ds.column_names)
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=DATASET_ROWS_PER_BATCH):
        for value in batch[text_field]:
            yield _text_value(value, f"{path} row {row}", text_field)
            row += 1
