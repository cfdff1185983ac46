"""Files written whole or not at all: data caches, generated datasets and benchmark reports.

The content goes to a temporary file in the target's folder, which is renamed over the target once complete
(``os.replace`` is atomic within one filesystem). A reader never sees half a file, and an interrupted or failed
write leaves the previous file as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomically(
    path: str | Path,
    write: Callable[[IO], Any],
    binary: bool = False,
    newline: str | None = None,
    durable: bool = False,
) -> None:
    """Calls ``write(handle)`` on a temporary file beside ``path`` (opened ``"wb"`` or ``"w"`` with ``newline``),
    then renames it over ``path``. On any error the temporary file is removed, ``path`` is left untouched and
    the error propagates. Missing parent folders are created. ``durable`` flushes the content to disk before the
    rename, so that a machine crash cannot leave ``path`` renamed but empty (worth it for large caches, not for
    thousands of small files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w", newline=None if binary else newline) as file:
            write(file)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomically(path: str | Path, value: Any, indent: int = 2) -> None:
    """``value`` as indented JSON with a final newline, written atomically."""
    text = json.dumps(value, indent=indent) + "\n"
    write_atomically(path, lambda file: file.write(text))


def check_writable_folder(folder: str | Path, what: str, fix: str) -> Path:
    """Create ``folder`` if needed and write (then remove) a file in it, so that a folder a run cannot write is
    found before the work that would go there. Raises ValueError naming ``what`` the folder is for and ``fix``."""
    folder = Path(folder).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ValueError(f"the {what} folder {folder} cannot be written ({error.strerror or error}); {fix}") from None
    return folder
