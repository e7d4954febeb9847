"""Restartable access to texts for the activation buffer: a datasets.Dataset with a `text` column, a
list of strings, a .jsonl (field `text`) or .txt (one text per line) file, or a one-shot iterable.
tokens.TokenStream reads from it by index, so a stream position can be saved and restored.
"""

from __future__ import annotations

import json
from pathlib import Path

from .utils import utf8_error


class TextSource:
    """Restartable text access: a datasets.Dataset with a `text` column, a list of strings, a
    .jsonl (field `text`) / .txt (one text per line) path, or a one-shot iterable of strings
    (which cannot be re-streamed: no epochs > 1, no load_state_dict)."""

    def __init__(self, data):
        self.data, self.kind, self._pos = data, None, 0
        if isinstance(data, (str, Path)):
            self.data = Path(data)
            if self.data.suffix not in (".jsonl", ".txt") or not self.data.is_file():
                raise ValueError(
                    f"{data}: not a .jsonl or .txt file (use dataset.load_texts for other sources)"
                )
            self.kind = "file"
        elif isinstance(data, (list, tuple)):
            self.kind = "list"
        elif hasattr(data, "column_names") and hasattr(data, "__len__"):
            if "text" not in data.column_names:
                raise ValueError(f"dataset has no `text` column (columns: {data.column_names})")
            self.kind = "dataset"
        elif hasattr(data, "__iter__"):
            self.kind, self.data = "iter", iter(data)
        else:
            raise ValueError(
                f"unsupported data of type {type(data).__name__}: pass a Dataset, list, path or iterable"
            )

    def iter_from(self, start: int):
        """Yield (index, text) from record `start` on."""
        if self.kind == "list":
            yield from ((i, self.data[i]) for i in range(start, len(self.data)))
        elif self.kind == "dataset":
            for lo in range(start, len(self.data), 256):
                yield from enumerate(self.data[lo : lo + 256]["text"], start=lo)
        elif self.kind == "file":
            with open(self.data, encoding="utf-8") as f:
                try:
                    for i, line in enumerate(f):
                        if i >= start:
                            yield i, self._parse(line, i)
                except UnicodeDecodeError:
                    raise utf8_error(self.data) from None
        else:
            if start != self._pos:
                raise ValueError(
                    "cannot re-stream a one-shot iterator (epochs > 1 or load_state_dict): "
                    "pass a list, a Dataset or a file path"
                )
            for text in self.data:  # rows of an IterableDataset are dicts
                self._pos += 1
                yield self._pos - 1, text.get("text") if isinstance(text, dict) else text

    def _parse(self, line: str, i: int):
        if self.data.suffix == ".txt":
            return line.rstrip("\n")
        if not line.strip():
            return ""
        try:
            return json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{self.data}:{i + 1}: not a JSON object with a `text` field ({e})") from None
