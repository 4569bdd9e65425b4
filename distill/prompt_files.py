"""Prompt files: ``.txt`` (one prompt per line), ``.jsonl`` / ``.csv`` / ``.parquet`` with a caption column.

The caption column is ``column`` when given, else the first of :data:`CAPTION_COLUMNS` the file has.
Parquet needs ``pyarrow``; without it the error says so. Prompts are text, small next to their
embeddings (1M COCO-style captions are ~60 MB); for sets whose encoded form must not sit in memory,
use ``distill encode-prompts`` (sharded, memory-mapped: :mod:`distill.shards`).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from distill.models.errors import ToolkitError

CAPTION_COLUMNS = ("caption", "prompt", "text", "captions", "prompts")
FORMATS = ".txt, .jsonl, .csv or .parquet"


def _pick_column(columns, path: Path, column: str | None) -> str:
    if column is not None:
        if column not in columns:
            raise ToolkitError(f"{path} has no column {column!r} (columns: {', '.join(map(str, columns))})")
        return column
    for name in CAPTION_COLUMNS:
        if name in columns:
            return name
    raise ToolkitError(f"{path} has no caption column: expected one of {', '.join(CAPTION_COLUMNS)} "
                       f"(columns: {', '.join(map(str, columns))})")


def _jsonl(path: Path, column: str | None) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ToolkitError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if isinstance(record, str):
                prompts.append(record)
                continue
            if not isinstance(record, dict):
                raise ToolkitError(f"{path}:{number}: expected a JSON object with a caption field")
            prompts.append(str(record[_pick_column(list(record), path, column)]))
    return prompts


def _csv(path: Path, column: str | None) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        name = _pick_column(reader.fieldnames or [], path, column)
        return [row[name] or "" for row in reader]


def _parquet(path: Path, column: str | None) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ToolkitError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it to .jsonl / .csv / "
                           f".txt") from None
    schema = pq.read_schema(path)
    name = _pick_column(schema.names, path, column)
    return [str(v) if v is not None else "" for v in pq.read_table(path, columns=[name]).column(name).to_pylist()]


def read_prompts(path: str | Path, column: str | None = None) -> list[str]:
    """Prompts of a prompt file, in file order, blank ones dropped. Raises ToolkitError for user errors."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"prompt file not found: {path} ({FORMATS})")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        prompts = _jsonl(path, column)
    elif suffix == ".csv":
        prompts = _csv(path, column)
    elif suffix == ".parquet":
        prompts = _parquet(path, column)
    elif suffix in (".txt", ""):
        prompts = path.read_text(encoding="utf-8").splitlines()
    else:
        raise ToolkitError(f"unknown prompt file type {path.suffix!r} for {path}; expected {FORMATS}")
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ToolkitError(f"prompt file {path} has no prompts")
    return prompts
