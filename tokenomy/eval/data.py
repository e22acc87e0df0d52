"""Local readers for the formats benchmarks are distributed in: JSON, JSONL, TSV, parquet, `datasets` folders.

Nothing here downloads. Readers return rows; a row that cannot be used becomes a `SampleError` carrying its id,
so one bad line never takes the rest of the file with it.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from tokenomy.errors import InputError
from tokenomy.io import load_image


@dataclass(frozen=True)
class SampleError:
    """A sample that cannot be evaluated, reported with its id and where it came from."""

    id: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"sample {self.id}{where}: {self.message}"


class LazyValue:
    """A row field read only when used: images of parquet / `datasets` rows stay in (memory-mapped) Arrow
    buffers until their sample runs, so a 200k-question benchmark does not sit in memory as Python bytes."""

    def __init__(self, fetch):
        self.fetch = fetch


class ImageRef:
    """An image given as a file path, encoded bytes (parquet/TSV/base64), a decoded PIL image, or a lazy row field."""

    def __init__(self, path: str | Path | None = None, data: bytes | None = None, pil: Image.Image | None = None,
                 lazy: tuple[LazyValue, list[Path]] | None = None):
        if sum(x is not None for x in (path, data, pil, lazy)) != 1:
            raise ValueError("ImageRef takes exactly one of path, data, pil, lazy")
        self.path = Path(path) if path is not None else None
        self.data = data
        self.pil = pil
        self.lazy = lazy

    def problem(self) -> str | None:
        """Why this image cannot be opened, checked cheaply at load time (None when it looks usable)."""
        if self.path is not None and not self.path.is_file():
            return f"image file not found: {self.path}"
        if self.data is not None and len(self.data) == 0:
            return "image bytes are empty"
        return None

    def open(self) -> Image.Image:
        if self.lazy is not None:
            value, base_dirs = self.lazy
            resolved = image_ref(value.fetch(), base_dirs)
            if resolved is None:
                raise InputError("the sample's image field is empty")
            return resolved.open()
        source = self.pil if self.pil is not None else self.path if self.path is not None else self.data
        return load_image(source)

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        return "<bytes>" if self.data is not None or self.lazy is not None else "<PIL image>"

    def __repr__(self) -> str:
        return f"ImageRef({self.describe()})"


def image_ref(value: Any, base_dirs: list[Path]) -> ImageRef | None:
    """Interpret an image field: a relative/absolute path, a {bytes, path} dict, a base64 string or a PIL image."""
    if value is None:
        return None
    if isinstance(value, LazyValue):
        return ImageRef(lazy=(value, base_dirs))
    if isinstance(value, Image.Image):
        return ImageRef(pil=value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(data=value["bytes"])
        if value.get("path"):
            return image_ref(value["path"], base_dirs)
        return None
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, str):
        if value.startswith("data:image") or len(value) > 1024:  # paths are short; inline images are base64
            return ImageRef(data=decode_base64(value))
        candidate = Path(value).expanduser()
        if candidate.is_absolute():
            return ImageRef(path=candidate)
        for base in base_dirs:
            if (base / candidate).is_file():
                return ImageRef(path=base / candidate)
        return ImageRef(path=base_dirs[0] / candidate)
    raise InputError(f"unsupported image field of type {type(value).__name__}")


def decode_base64(text: str) -> bytes:
    if text.startswith("data:image"):
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=False)
    except ValueError:
        return b""


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise InputError(f"malformed JSON in {path} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc


_ID_IN_BROKEN_LINE = re.compile(r'"(?:question_id|questionId|id|index)"\s*:\s*"?([^",}\s]+)')


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[SampleError]]:
    """Rows of a JSONL file with their 1-based line numbers; malformed lines become errors (id recovered if possible)."""
    rows, errors = [], []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as exc:
                found = _ID_IN_BROKEN_LINE.search(line)
                sample_id = found.group(1) if found else f"line{line_no}"
                errors.append(SampleError(sample_id, f"malformed JSON line: {exc}", f"{path}:{line_no}"))
                continue
            rows.append((line_no, row))
    return rows, errors


def read_tsv(path: Path) -> list[dict]:
    # MMBench TSVs carry base64 images far larger than csv's default field limit.
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def rows_from_arrow(table) -> list[dict]:
    """Python rows of an Arrow table; image columns (structs with a `bytes` field) become `LazyValue`s."""
    import pyarrow as pa

    image_columns = [f.name for f in table.schema if pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0]
    rows = table.drop_columns(image_columns).to_pylist()
    for name in image_columns:
        column = table.column(name)
        for i, is_null in enumerate(column.is_null().to_pylist()):
            rows[i][name] = None if is_null else LazyValue(lambda column=column, i=i: column[i].as_py())
    return rows


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InputError(f"reading {path} needs pyarrow: pip install pyarrow") from exc
    try:
        table = pq.read_table(path, memory_map=True)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise InputError(f"cannot read parquet file {path}: {exc}") from exc
    return rows_from_arrow(table)


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def read_datasets_folder(path: Path, split: str | None = None) -> list[dict]:
    """Rows of a folder written by `datasets.Dataset(Dict).save_to_disk` (needs the optional `datasets` package)."""
    try:
        import datasets
    except ImportError as exc:
        raise InputError(f"{path} is a Hugging Face `datasets` folder; reading it needs the optional package "
                         "`datasets` (pip install datasets), or export it to parquet/JSONL") from exc
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        preferred = [split] if split else ["test", "validation", "val", "dev", "train"]
        chosen = next((s for s in preferred if s in loaded), None)
        if chosen is None:
            if split:
                raise InputError(f"{path} has splits {names}, not {split!r}")
            chosen = names[0]
        loaded = loaded[chosen]
    # save_to_disk writes flat, memory-mapped Arrow files: read the table itself, images lazily.
    return rows_from_arrow(loaded.data.table)


def find_row_files(root: Path) -> list[Path]:
    """Generic row sources below `root`: parquet files, `datasets` folders, then JSONL files (sorted, stable)."""
    if root.is_file():
        return [root]
    if is_datasets_folder(root):
        return [root]
    found = sorted(root.rglob("*.parquet"))
    found += sorted(p for p in root.iterdir() if is_datasets_folder(p))
    found += sorted(root.glob("*.jsonl"))
    return found


def read_rows(path: Path) -> tuple[list[tuple[str, dict]], list[SampleError]]:
    """Rows of one source of any supported kind, each with a `file:row` origin for error messages."""
    if path.is_dir():
        return [(f"{path}[{i}]", row) for i, row in enumerate(read_datasets_folder(path))], []
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return [(f"{path}[{i}]", row) for i, row in enumerate(read_parquet(path))], []
    if suffix == ".jsonl":
        rows, errors = read_jsonl(path)
        return [(f"{path}:{n}", row) for n, row in rows], errors
    if suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "questions", "annotations") if isinstance(data.get(k), list)), None)
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)], []
    if suffix == ".tsv":
        return [(f"{path}:{i + 2}", row) for i, row in enumerate(read_tsv(path))], []
    raise InputError(f"unsupported data file {path}; expected .json, .jsonl, .tsv, .parquet or a `datasets` folder")
