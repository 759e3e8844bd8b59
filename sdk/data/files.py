"""Load a user's labelled text file (CSV or JSON Lines) into a TextDataset."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsb.data.dataset import TextDataset
from fedsb.errors import DataError

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".json-lines")
UNKNOWN_GROUP = "unknown"


@dataclass(frozen=True)
class _Row:
    """One parsed record and its 1-based line (where a CSV record ends), for error messages."""

    line: int
    values: dict[str, Any]


def load_file(
    path: str | None, *, text_column: str, label_column: str, group_column: str | None
) -> TextDataset:
    """Read `path` (.csv, .jsonl or .json-lines) into a dataset; rows with blank text are dropped.

    String labels are mapped to ids in sorted order; integer labels (or CSV labels that all parse
    as integers) are mapped in numeric order, so labels 0..K-1 keep their values.
    """
    file = _check_path(path)
    content = _read_text(file)
    suffix = file.suffix.lower()
    rows = _csv_rows(file, content) if suffix in CSV_SUFFIXES else _jsonl_rows(file, content)
    if not rows:
        raise DataError(f"{file}: the file has no records; expected at least one labelled row.")
    columns = [text_column, label_column] + ([group_column] if group_column else [])
    for row in rows:
        _check_columns(file, row, columns)
    kept = [row for row in rows if _text_of(file, row, text_column)]
    if not kept:
        raise DataError(
            f"{file}: every value of column {text_column!r} is blank; expected text to classify. "
            "Check text_column."
        )
    label_ids, label_names = _map_labels(file, kept, label_column)
    groups = None
    if group_column:
        groups = [_group_of(row.values[group_column]) for row in kept]
    return TextDataset(
        texts=[_text_of(file, row, text_column) for row in kept],
        labels=label_ids,
        label_names=label_names,
        groups=groups,
        name=f"file:{file.name}",
    )


def _check_path(path: str | None) -> Path:
    """Return the path as a Path once it names an existing file with a known extension."""
    if path is None:
        raise DataError(
            "load_dataset('file') needs path=...; got path=None. "
            "Pass the path of a .csv or .jsonl file."
        )
    file = Path(path)
    if not file.exists():
        raise DataError(
            f"file not found: {str(file)!r}. Check the path (relative to {Path.cwd()})."
        )
    if not file.is_file():
        raise DataError(f"{str(file)!r} is not a regular file; expected a .csv or .jsonl file.")
    suffix = file.suffix.lower()
    if suffix not in CSV_SUFFIXES + JSONL_SUFFIXES:
        known = ", ".join(CSV_SUFFIXES + JSONL_SUFFIXES)
        raise DataError(
            f"{file}: unknown extension {suffix or '(none)'!r}; expected one of {known}. "
            "Rename the file or convert it."
        )
    return file


def _read_text(file: Path) -> str:
    """Read the whole file as UTF-8 (a BOM is ignored); fail on empty or undecodable files."""
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not valid UTF-8 ({exc}); re-save the file as UTF-8.") from exc
    if not content.strip():
        raise DataError(f"{file}: the file is empty; expected a header row or JSON records.")
    return content


def _csv_rows(file: Path, content: str) -> list[_Row]:
    """Parse CSV with a header row into records."""
    reader = csv.DictReader(io.StringIO(content, newline=""))
    rows: list[_Row] = []
    try:
        for record in reader:
            rows.append(_Row(line=reader.line_num, values=dict(record)))
    except csv.Error as exc:
        raise DataError(f"{file}: bad CSV near line {reader.line_num}: {exc}.") from exc
    if reader.fieldnames is None:
        raise DataError(f"{file}: the file is empty; expected a header row.")
    return rows


def _jsonl_rows(file: Path, content: str) -> list[_Row]:
    """Parse JSON Lines (one object per non-blank line) into records."""
    rows: list[_Row] = []
    for number, text in enumerate(content.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{file}: bad JSON on line {number}: {exc.msg} (column {exc.colno}); "
                "expected one JSON object per line."
            ) from exc
        if not isinstance(record, dict):
            raise DataError(
                f"{file}: line {number} holds a JSON {type(record).__name__}; "
                'expected a JSON object such as {"text": ..., "label": ...}.'
            )
        rows.append(_Row(line=number, values=record))
    return rows


def _check_columns(file: Path, row: _Row, columns: list[str]) -> None:
    """Fail naming the missing column and the columns that are present."""
    for column in columns:
        if column not in row.values or row.values[column] is None:
            present = ", ".join(repr(c) for c in row.values if c is not None) or "(none)"
            raise DataError(
                f"{file}: missing column {column!r} on line {row.line}; columns present: {present}. "
                "Pass text_column=/label_column=/group_column= to match the file."
            )


def _text_of(file: Path, row: _Row, column: str) -> str:
    """The stripped text of a row; non-string text is an error."""
    value = row.values[column]
    if not isinstance(value, str):
        raise DataError(
            f"{file}: column {column!r} on line {row.line} is {type(value).__name__} {value!r}; "
            "expected a string."
        )
    return value.strip()


def _map_labels(file: Path, rows: list[_Row], column: str) -> tuple[list[int], list[str]]:
    """Turn raw labels (all strings or all integers) into ids 0..K-1 and their names."""
    raw = [_label_of(file, row, column) for row in rows]
    if all(isinstance(v, int) for v in raw) or all(_is_int_text(v) for v in raw):
        values: list[int | str] = [int(v) for v in raw]
    elif any(isinstance(v, int) for v in raw):
        raise DataError(
            f"{file}: column {column!r} mixes integer and string labels; "
            "expected all integers or all strings."
        )
    else:
        values = list(raw)
    ordered = sorted(set(values))
    ids = {value: i for i, value in enumerate(ordered)}
    return [ids[v] for v in values], [str(v) for v in ordered]


def _label_of(file: Path, row: _Row, column: str) -> int | str:
    """One raw label: a non-empty string or an integer (booleans and floats are rejected)."""
    value = row.values[column]
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DataError(
        f"{file}: label {value!r} in column {column!r} on line {row.line} is not usable; "
        "expected a non-empty string or an integer."
    )


def _is_int_text(value: int | str) -> bool:
    """True for strings such as '3' or '-1' that spell an integer."""
    if not isinstance(value, str):
        return False
    try:
        int(value)
    except ValueError:
        return False
    return True


def _group_of(value: Any) -> str:
    """A group name as a string; blanks become 'unknown'."""
    text = str(value).strip()
    return text or UNKNOWN_GROUP
