"""Text sources: one reader for plain text, jsonl, parquet and Hugging Face datasets.

A `TextSource` turns a file (or a hub dataset) into a list of documents. Plain text is one corpus, or
documents cut by a `separator` (a literal such as a blank line or `<|endoftext|>`). Presets name the four
corpora the framework ships samples of; any field given next to a preset overrides it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal, Optional

from lightning_rlm.data.paths import resolve_data_path

Format = Literal["auto", "text", "jsonl", "parquet", "hf"]

PRESETS: dict[str, dict] = {
    # One corpus, no separator: split train/val by the tail of the text.
    "shakespeare": dict(path="tinyshakespeare/input.txt", format="text"),
    # Stories and paragraphs are both separated by blank lines in this sample.
    "tinystories": dict(path="tinystories/tinystories_val_head.txt", format="text", separator="\n\n"),
    "fineweb": dict(path="fineweb-edu/fineweb_edu_sample10BT_head_heuristic_split.jsonl", format="jsonl"),
    "pile": dict(path="pile/pile_sample_pearl.jsonl", format="jsonl"),
}


@dataclass
class TextSource:
    """Where documents come from.

    Args:
        preset: one of `shakespeare`, `tinystories`, `fineweb`, `pile` (fills the other fields).
        path: a file, absolute or relative to the data root (`$LRLM_DATA_DIR`).
        format: `auto` picks from the suffix (.txt → text, .jsonl → jsonl, .parquet → parquet).
        separator: for plain text, the literal that separates documents (None: the file is one document).
        text_field: the field holding the text in jsonl / parquet / hf rows.
        hf_name, hf_config, hf_split: `datasets.load_dataset(hf_name, hf_config, split=hf_split)`.
        max_documents: keep only the first N documents (None: all).
        min_chars: drop documents shorter than this many characters (after stripping).
    """

    preset: Optional[str] = None
    path: Optional[str] = None
    format: Format = "auto"
    separator: Optional[str] = None
    text_field: str = "text"
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_split: str = "train"
    max_documents: Optional[int] = None
    min_chars: int = 1

    def __post_init__(self) -> None:
        if self.preset is None:
            return
        if self.preset not in PRESETS:
            raise ValueError(f"unknown text source preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        defaults = {f.name: f.default for f in fields(self)}
        own_path = self.path is not None and self.path != PRESETS[self.preset]["path"]
        for key, value in PRESETS[self.preset].items():
            if own_path and key in ("format", "separator"):
                continue  # another file: its format comes from its own suffix, not from the preset's file
            if getattr(self, key) == defaults[key]:  # explicit fields win over the preset
                setattr(self, key, value)

    def with_(self, **changes) -> TextSource:
        return replace(self, **changes)

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.hf_name:
            return "hf"
        if self.path is None:
            raise ValueError("TextSource needs a `path`, a `preset` or an `hf_name`")
        suffix = Path(self.path).suffix.lower()
        return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(suffix, "text")

    def describe(self) -> str:
        if self.hf_name:
            return self.hf_name
        if self.preset and self.path != PRESETS.get(self.preset, {}).get("path", self.path):
            return f"{self.preset} ({self.path})"  # a preset whose file was overridden: name the file
        return self.preset or str(self.path)

    def read(self) -> list[str]:
        """Read and return the documents. Raises a clear error for a missing file or an empty corpus."""
        fmt = self.resolved_format()
        if fmt == "hf":
            docs = self._read_hf()
        else:
            path = resolve_data_path(self.path)  # FileNotFoundError naming where it looked
            if fmt == "text":
                docs = split_documents(read_utf8(path), self.separator)
            elif fmt == "jsonl":
                docs = self._read_jsonl(path)
            elif fmt == "parquet":
                docs = self._read_parquet(path)
            else:
                raise ValueError(f"unknown format {fmt!r}; expected auto, text, jsonl, parquet or hf")
        docs = [d for d in docs if len(d.strip()) >= self.min_chars]
        if self.max_documents is not None:
            docs = docs[: self.max_documents]
        if not docs:
            raise ValueError(f"text source {self.describe()!r} has no documents (empty corpus)")
        return docs

    def _read_jsonl(self, path: Path) -> list[str]:
        docs = []
        for lineno, row in jsonl_rows(path):
            if self.text_field not in row:
                raise KeyError(
                    f"{path}:{lineno} has no field {self.text_field!r} (fields: {sorted(row)}); "
                    "set text_field"
                )
            text = row[self.text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {self.text_field!r} is {json.dumps(text)[:40]}; "
                                 "expected a string")
            docs.append(text)
        return docs

    def _read_parquet(self, path: Path) -> list[str]:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if self.text_field not in table.column_names:
            raise KeyError(f"{path} has no column {self.text_field!r} (columns: {table.column_names})")
        return [str(t) for t in table.column(self.text_field).to_pylist()]

    def _read_hf(self) -> list[str]:
        from datasets import load_dataset

        ds = load_dataset(self.hf_name, self.hf_config, split=self.hf_split)
        if self.text_field not in ds.column_names:
            raise KeyError(f"{self.hf_name} has no column {self.text_field!r} (columns: {ds.column_names})")
        n = len(ds) if self.max_documents is None else min(len(ds), self.max_documents)
        return list(ds.select(range(n))[self.text_field])

    def read_rows(self) -> list[dict]:
        """Rows with every field kept (for prompt datasets whose extra fields feed reward functions)."""
        fmt = self.resolved_format()
        if fmt == "jsonl":
            rows = [row for _, row in jsonl_rows(resolve_data_path(self.path))]
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(resolve_data_path(self.path)).to_pylist()
        elif fmt == "hf":
            from datasets import load_dataset

            rows = list(load_dataset(self.hf_name, self.hf_config, split=self.hf_split))
        else:
            return [{self.text_field: d} for d in self.read()]
        rows = [r for r in rows if len(str(r.get(self.text_field, "")).strip()) >= self.min_chars]
        if self.max_documents is not None:
            rows = rows[: self.max_documents]
        if not rows:
            raise ValueError(f"text source {self.describe()!r} has no documents (empty corpus)")
        return rows


def read_utf8(path: Path) -> str:
    """A text file's contents; a file that is not UTF-8 is a ValueError naming it and the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "convert the file to UTF-8") from None


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a jsonl file; a line that is not a JSON object is a ValueError naming file:line."""
    for lineno, line in enumerate(read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {line.strip()[:40]!r}")
        yield lineno, row


def split_documents(text: str, separator: Optional[str]) -> list[str]:
    r"""Cut a plain-text corpus into documents.

    With no separator the whole text is one document. With a blank-line separator ("\n\n"), runs of blank
    lines (possibly holding spaces) count as one separator; other separators are literal.

    >>> split_documents("a b\n\n\nc\n \nd", "\n\n")
    ['a b', 'c', 'd']
    >>> split_documents("x<|endoftext|>y<|endoftext|>", "<|endoftext|>")
    ['x', 'y']
    >>> split_documents("one corpus\n\nstays whole", None)
    ['one corpus\n\nstays whole']
    """
    if separator is None:
        return [text] if text.strip() else []
    if separator.strip() == "" and "\n\n" in separator:
        parts = re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text)
    else:
        parts = text.split(separator)
    return [p.strip() for p in parts if p.strip()]
