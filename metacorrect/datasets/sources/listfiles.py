"""Reading the list and label files of image-folder sources; every error names the file and line."""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from metacorrect.datasets.contract import DataError


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    return path


def lines(path: Path, fields: int, skip_header: bool = False, sep: str | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-empty line; a line with another number of fields is an error."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if skip_header and number == 1:
                continue
            text = line.strip()
            if not text:
                continue
            parts = text.split(sep) if sep else text.split()
            if len(parts) != fields:
                raise DataError(f"{path}:{number}: expected {fields} field(s), got {len(parts)}: {text[:80]!r}")
            yield number, [p.strip() for p in parts]


def parse_label(path: Path, number: int, text: str, num_classes: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(f"{path}:{number}: label {text!r} is not an integer") from None
    if not 0 <= value < num_classes:
        raise DataError(f"{path}:{number}: label {value} outside [0, {num_classes})")
    return value


def files_checksum(paths: list[Path], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for p in paths:
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
