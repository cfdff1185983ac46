"""Where the text datamodule's documents come from: the embedded standard-library corpus, local files
(txt, jsonl, parquet) or a Hugging Face ``datasets`` name and config.

Every source yields the documents of a split as strings. A split a source does not have (the standard
library has none; local files may lack ``val`` or ``test``) is carved out of ``train`` by a hash of each
document's key, so the split is the same on every machine and every run, and ``train`` then leaves those
documents out.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

SPLITS = ("train", "val", "test")
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
LOCAL_FILES_HELP = (
    "pass local files instead: data_files: {train: path/train.txt, val: path/valid.txt, test: path/test.txt} "
    "(each a file, a folder, a glob or a list; .txt/.raw/.tokens one document per line, .jsonl/.parquet one per "
    "record's text_field; a missing val or test split is carved out of train)"
)


def holdout_split(key: str, holdout_permille: int) -> str:
    """``"val"``, ``"test"`` or ``"train"`` for a document key: sha256 bucket < p, < 2p, or the rest (per mille)."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 1000
    if bucket < holdout_permille:
        return "val"
    if bucket < 2 * holdout_permille:
        return "test"
    return "train"


def _strip_newline(text: str) -> str:
    """The EOS that follows every document stands in for a final newline."""
    return text[:-1] if text.endswith("\n") else text


class _Source:
    """Shared split logic; subclasses provide ``available_splits``, ``_keyed(split)`` and ``describe``."""

    holdout_permille: int = 10

    @property
    def available_splits(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _keyed(self, split: str, keep=None) -> Iterator[tuple[str, str]]:
        """(key, text) of every document of the source split; ``keep(key)`` may skip reading some."""
        raise NotImplementedError

    def describe(self, split: str) -> dict:
        raise NotImplementedError

    @property
    def carves(self) -> bool:
        return any(s not in self.available_splits for s in ("val", "test"))

    def documents(self, split: str) -> Iterator[str]:
        """The documents of ``split`` (one of ``SPLITS``), in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split in self.available_splits and not (split == "train" and self.carves):
            yield from (_strip_newline(text) for _, text in self._keyed(split))
            return
        base = split if split in self.available_splits else "train"
        for _, text in self._keyed(base, keep=lambda key: holdout_split(key, self.holdout_permille) == split):
            yield _strip_newline(text)


class StdlibSource(_Source):
    """The ``.py`` files of the running Python's standard library (``site-packages`` excluded), sorted by
    relative path; a document is one file, its key the relative path."""

    def __init__(self, holdout_permille: int = 10, root: str | None = None):
        self.holdout_permille = holdout_permille
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise FileNotFoundError(f"the standard library folder {self.root} does not exist")

    @property
    def available_splits(self) -> tuple[str, ...]:
        return ("train",)

    def files(self) -> list[tuple[str, Path]]:
        found = []
        for folder, subfolders, names in os.walk(self.root):
            if Path(folder) == self.root:  # third-party packages are not the standard library
                subfolders[:] = [d for d in subfolders if d not in ("site-packages", "dist-packages")]
            subfolders[:] = [d for d in subfolders if d != "__pycache__"]
            for name in names:
                if name.endswith(".py"):
                    path = Path(folder, name)
                    found.append((path.relative_to(self.root).as_posix(), path))
        return sorted(found)

    def _keyed(self, split: str, keep=None) -> Iterator[tuple[str, str]]:
        for rel, path in self.files():
            if keep is None or keep(rel):
                yield rel, path.read_bytes().decode("utf-8", errors="replace")

    def describe(self, split: str) -> dict:
        files = self.files()
        listing = hashlib.sha256("\n".join(f"{rel}:{p.stat().st_size}" for rel, p in files).encode()).hexdigest()
        return {
            "source": "stdlib",
            "root": str(self.root),
            "python": platform.python_version(),
            "files": listing[:16],
            "holdout_permille": self.holdout_permille,
            "split": split,
        }


# A text file with more undecodable bytes than this share of its characters is not text (a binary file, or
# another encoding): an error. Fewer are replaced by U+FFFD with a warning that counts them.
MAX_UNDECODABLE = 0.01
# the lone surrogates that errors="surrogateescape" decodes each undecodable byte to
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


class TextDecoding:
    """Opens a file as UTF-8 text and keeps count of the bytes that are not UTF-8, which become U+FFFD.

    A context manager around reading one file: on exit a file with NUL characters or with more than
    ``MAX_UNDECODABLE`` of its characters undecodable is a ValueError naming the file and its first bad line;
    fewer undecodable bytes are a warning with their count."""

    def __init__(self, path: Path):
        self.path, self.chars, self.replaced, self.first_bad, self.nul = path, 0, 0, None, False
        self.file = None

    def __enter__(self) -> TextDecoding:
        # text mode keeps the universal newlines; each undecodable byte becomes one lone surrogate, counted below
        self.file = self.path.open(encoding="utf-8", errors="surrogateescape")
        return self

    def clean(self, text: str, line_no: int) -> str:
        """``text`` (read from the file at ``line_no``) with its undecodable bytes replaced by U+FFFD."""
        self.chars += len(text)
        self.nul = self.nul or "\x00" in text
        text, replaced = _ESCAPED_BYTE.subn("\ufffd", text)
        if replaced:
            self.replaced += replaced
            self.first_bad = self.first_bad or line_no
        return text

    def __exit__(self, error_type, error, traceback) -> None:
        self.file.close()
        if error_type is not None:
            return
        where = f"{self.path}, line {self.first_bad}" if self.first_bad else str(self.path)
        if self.nul or self.replaced > MAX_UNDECODABLE * max(1, self.chars):
            found = f"{self.replaced} undecodable bytes" if self.replaced else "NUL characters"
            raise ValueError(
                f"{where}: not UTF-8 text ({found} in {self.chars} characters): a binary file or another encoding. "
                "Remove it from data_files, or convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            )
        if self.replaced:
            warnings.warn(
                f"{where}: {self.replaced} bytes that are not UTF-8 (in {self.chars} characters) were replaced by "
                "U+FFFD; convert the file to UTF-8 to train on its real characters",
                stacklevel=2,
            )


def read_text_documents(path: Path, whole_file: bool) -> Iterator[str]:
    """The documents of a text file: each line (its newline kept), or the whole file as one."""
    with TextDecoding(path) as decoding:
        if whole_file:
            yield decoding.clean(decoding.file.read(), 1)
        else:
            for line_no, line in enumerate(decoding.file, 1):
                yield decoding.clean(line, line_no)


def _json_record(line: str, path: Path, line_no: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}:{line_no}: not valid JSON ({error.msg}, column {error.colno}); each line of a .jsonl file must "
            'be one record like {"text": "..."}: fix or remove that line'
        ) from None


def _text_value(value, where: str, field: str) -> str:
    """A record's text: a string, or None/missing for an empty document; anything else is an error."""
    if value is None:
        return ""
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ValueError(
            f"{where}: field {field!r} holds {type(value).__name__} {shown}, not a string; store the document's text "
            "there, or set text_field to the field that holds it"
        )
    return value


def _expand(spec: str | list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in [spec] if isinstance(spec, str) else spec:
        item = str(Path(item).expanduser())
        if any(c in item for c in "*?["):
            paths.extend(Path(p) for p in sorted(glob.glob(item, recursive=True)))
        elif Path(item).is_dir():
            paths.extend(sorted(p for p in Path(item).rglob("*") if p.suffix in SUPPORTED_SUFFIXES))
        else:
            paths.append(Path(item))
    return paths


class LocalFilesSource(_Source):
    """Documents from local files: a line of a text file (``txt_document="line"``) or the whole file
    (``"file"``), a JSON-lines record's or a parquet row's ``text_field``."""

    def __init__(
        self,
        data_files: dict[str, str | list[str]],
        text_field: str = "text",
        txt_document: str = "line",
        holdout_permille: int = 10,
    ):
        unknown = sorted(set(data_files) - set(SPLITS))
        if unknown or "train" not in data_files:
            raise ValueError(f"data_files keys must include 'train' and be among {SPLITS}, got {sorted(data_files)}")
        if txt_document not in ("line", "file"):
            raise ValueError(f"txt_document must be 'line' or 'file', got {txt_document!r}")
        self.files = {split: _expand(spec) for split, spec in data_files.items()}
        for split, paths in self.files.items():
            missing = [str(p) for p in paths if not p.is_file()]
            if missing or not paths:
                what = missing or "(the pattern matched none)"
                raise FileNotFoundError(f"data_files[{split!r}] = {data_files[split]!r}: no such file(s) {what}")
            odd = [str(p) for p in paths if p.suffix not in SUPPORTED_SUFFIXES]
            if odd:
                raise ValueError(f"data_files[{split!r}] has unsupported file types {odd}; use {SUPPORTED_SUFFIXES}")
        self.text_field, self.txt_document, self.holdout_permille = text_field, txt_document, holdout_permille

    @property
    def available_splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def _keyed(self, split: str, keep=None) -> Iterator[tuple[str, str]]:
        for path in self.files[split]:
            for i, text in enumerate(self._read(path)):
                if keep is None or keep(f"{path.name}:{i}"):
                    yield f"{path.name}:{i}", text

    def _read(self, path: Path) -> Iterator[str]:
        if path.suffix in TEXT_SUFFIXES:
            yield from read_text_documents(path, whole_file=self.txt_document == "file")
        elif path.suffix in JSONL_SUFFIXES:
            with TextDecoding(path) as decoding:
                for line_no, line in enumerate(decoding.file, 1):
                    line = decoding.clean(line, line_no)
                    if line.strip():
                        yield self._field(_json_record(line, path, line_no), f"{path}:{line_no}")
        else:
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            if self.text_field not in parquet.schema_arrow.names:
                raise ValueError(f"{path} has no column {self.text_field!r}; columns: {parquet.schema_arrow.names}")
            row = 0
            for batch in parquet.iter_batches(columns=[self.text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    yield _text_value(text, f"{path}, row {row}", self.text_field)

    def _field(self, record: dict, where: str) -> str:
        if not isinstance(record, dict) or self.text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: record has no field {self.text_field!r} (has {keys}); set text_field")
        return _text_value(record[self.text_field], where, self.text_field)

    def describe(self, split: str) -> dict:
        base = split if split in self.files else "train"
        files = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.files[base]]
        return {
            "source": "files",
            "files": files,
            "carved": self.carves,
            "text_field": self.text_field,
            "txt_document": self.txt_document,
            "holdout_permille": self.holdout_permille,
            "split": split,
        }


class HubSource(_Source):
    """A Hugging Face ``datasets`` dataset; ``split_names`` maps our splits to the dataset's (None: carve)."""

    def __init__(
        self,
        name: str,
        config: str | None = None,
        split_names: dict[str, str | None] | None = None,
        text_field: str = "text",
        holdout_permille: int = 10,
    ):
        self.name, self.config, self.text_field, self.holdout_permille = name, config, text_field, holdout_permille
        self.split_names = {"train": "train", "val": "validation", "test": "test", **(split_names or {})}
        if not self.split_names.get("train"):
            raise ValueError(f"split_names must name the dataset's train split, got {self.split_names}")

    @property
    def available_splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if self.split_names.get(s))

    def _keyed(self, split: str, keep=None) -> Iterator[tuple[str, str]]:
        source_split = self.split_names[split]
        try:
            import datasets

            rows = datasets.load_dataset(self.name, self.config, split=source_split)
        except ImportError as err:
            raise ValueError("Hugging Face datasets need the datasets package (pip install hgrn2[data])") from err
        except Exception as err:  # the Hub client raises many types when offline or when a name is wrong
            raise FileNotFoundError(
                f"could not load the Hugging Face dataset {self.name!r} (config {self.config!r}, split "
                f"{source_split!r}): {type(err).__name__}: {err}. It is neither in the local datasets cache nor "
                f"reachable on the Hub. Offline, {LOCAL_FILES_HELP}"
            ) from None
        if self.text_field not in rows.column_names:
            raise ValueError(f"dataset {self.name!r} has no column {self.text_field!r}; columns: {rows.column_names}")
        i = 0
        for batch in rows.select_columns([self.text_field]).iter(batch_size=4096):  # never the whole column at once
            for text in batch[self.text_field]:
                if keep is None or keep(f"{source_split}:{i}"):
                    where = f"dataset {self.name!r}, split {source_split!r}, row {i}"
                    yield f"{source_split}:{i}", _text_value(text, where, self.text_field)
                i += 1

    def describe(self, split: str) -> dict:
        return {
            "source": "hub",
            "name": self.name,
            "config": self.config,
            "split": self.split_names.get(split),
            "carved": self.carves,
            "text_field": self.text_field,
            "holdout_permille": self.holdout_permille,
            "our_split": split,
        }
