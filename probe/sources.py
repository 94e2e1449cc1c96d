"""Image sources beyond folders: WebDataset-style tar shards and Hugging Face datasets.

Each source becomes a list of small *lazy items* (:class:`LazyImage`: a name and where the
encoded bytes are), so the rest of :mod:`probe.data` — the seeded ``--num-images`` subset, the
reserve that replaces unreadable images, the decoding workers — treats them like files. No image
is read until it is decoded, and decoded images are dropped after their batch: memory is the
index (about a hundred bytes per image) plus one batch.

* **Tar shards** (``--images 'shards-{000..003}.tar'``, a glob, or a folder of ``.tar`` files):
  the WebDataset layout (Aizman et al. 2019; webdataset.github.io): each sample is a group of
  members sharing a key (the member path up to the first dot of its base name), e.g.
  ``0001.jpg``, ``0001.cls``; the first image member of each key is the sample's image. Members
  are indexed by scanning the tar headers (Python's ``tarfile``, no extraction) and read by
  offset, which gives the random access the seeded subset needs; shards must be uncompressed
  ``.tar`` (as WebDataset writes them).
* **Hugging Face datasets** (``--images hf-dataset:PATH[:split]``): a folder written by
  ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``,
  memory-mapped), a ``.arrow`` file (``datasets.Dataset.from_file``), or a ``.parquet`` file
  (``pyarrow.parquet``, one row group in memory at a time per process). The image column is found
  automatically: a ``datasets.Image`` feature, else a ``{bytes, path}`` struct column (the parquet
  encoding of that feature), else a binary column; ``image`` / ``img`` are preferred when several
  qualify.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ProbeError

HF_PREFIX = "hf-dataset:"
_PREFERRED_COLUMNS = ("image", "img", "jpg", "png", "picture", "photo")


@dataclass(frozen=True)
class LazyImage:
    """An encoded image that is read only when decoded.

    Attributes:
        name: the name reported for it (``images.txt``, skipped files).
    """

    name: str

    def open(self) -> io.BytesIO | str:
        """The encoded image: a binary stream or a file path (for ``PIL.Image.open``).

        Raises:
            OSError: when it cannot be read (the caller skips the image).
        """
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class TarMember(LazyImage):
    """One image member of a tar shard, read by offset (no extraction).

    Attributes:
        shard: path of the ``.tar`` file.
        offset: byte offset of the member's data in the shard.
        size: its size in bytes.
    """

    shard: str = ""
    offset: int = 0
    size: int = 0

    def open(self) -> io.BytesIO:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"truncated tar member ({len(data)} of {self.size} bytes)")
        return io.BytesIO(data)


@dataclass(frozen=True)
class TableRow(LazyImage):
    """The image cell of one row of a Hugging Face dataset, arrow or parquet file.

    Attributes:
        source: path of the dataset folder or file.
        split: split of a saved ``DatasetDict`` (``None`` for a single dataset or a file).
        column: the image column.
        index: the row.
        kind: ``"hf"`` (``load_from_disk`` / ``.arrow``) or ``"parquet"``.
    """

    source: str = ""
    split: str | None = None
    column: str = ""
    index: int = 0
    kind: str = "hf"

    def open(self) -> io.BytesIO | str:
        if self.kind == "parquet":
            cell = _parquet_cell(self.source, self.column, self.index)
        else:
            ds, _ = _hf_dataset(self.source, self.split)
            cell = ds.with_format("arrow")[self.index][self.column][0].as_py()
        return _cell_stream(cell, self.source)


def _cell_stream(cell: Any, source: str) -> io.BytesIO | str:
    """Bytes of an image cell: raw bytes, or a ``{bytes, path}`` dict (the ``datasets.Image`` storage)."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(cell))
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            return io.BytesIO(bytes(cell["bytes"]))
        if cell.get("path"):
            p = Path(cell["path"])
            return str(p if p.is_absolute() else Path(source).parent / p)
    raise OSError(f"the image cell holds no bytes and no path ({type(cell).__name__})")


# -- tar shards ------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion as WebDataset uses for shard lists.

    ``{000..003}`` is a numeric range (zero-padded to the width of its first bound when that has
    a leading zero, descending when the first bound is larger); ``{a,b}`` is a list; several
    groups multiply. Text without braces is returned as is.

    Raises:
        ProbeError: for an unclosed brace or a range of more than 1,000,000 names.
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        if "{" in pattern or "}" in pattern:
            raise ProbeError(f"unbalanced brace in {pattern!r}; write shard ranges as shards-{{000..009}}.tar")
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        lo, hi = int(a), int(b)
        if abs(hi - lo) > 1_000_000:
            raise ProbeError(f"the range {{{body}}} in {pattern!r} is too long")
        width = len(a) if a.lstrip("-").startswith("0") and len(a) > 1 else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [name for p in parts for name in expand_braces(head + p + tail)]


def is_tar(path: str | Path) -> bool:
    """True for a name ending in ``.tar`` (any case)."""
    return str(path).lower().endswith(".tar")


def _is_compressed_tar(path: str | Path) -> bool:
    s = str(path).lower()
    return s.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst"))


def tar_shards(spec: str | Path) -> list[Path] | None:
    """The shard files named by ``spec`` (brace pattern, glob, one ``.tar``, or a folder whose
    only image sources are ``.tar`` files, searched recursively), sorted within each pattern;
    ``None`` when ``spec`` names no tar shards.

    Raises:
        ProbeError: for compressed shards, or a pattern whose expansion names missing files.
    """
    import glob

    s = str(spec)
    if _is_compressed_tar(s):
        raise ProbeError(f"{s!r} is a compressed tar; probe reads shards by offset, which needs uncompressed "
                         ".tar shards (as WebDataset writes them): decompress it first")
    p = Path(s)
    if p.is_dir():
        tars = sorted(q for q in p.rglob("*") if q.is_file() and is_tar(q))
        return tars or None
    if not is_tar(s) and not re.search(r"\{[^{}]*\}\s*$", s):
        return None
    names = expand_braces(s)
    out: list[Path] = []
    missing = []
    for n in names:
        if any(ch in n for ch in "*?["):
            out.extend(sorted(Path(h) for h in glob.glob(n, recursive=True) if is_tar(h)))
        elif Path(n).is_file():
            out.append(Path(n))
        else:
            missing.append(n)
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ProbeError(f"{len(missing)} of the {len(names)} shard(s) named by {s!r} do not exist ({shown}); "
                         "check the pattern, e.g. --images 'shards-{000..003}.tar'")
    return [q for q in out if is_tar(q)] or None


def tar_items(shards: list[Path], image_suffixes: set[str]) -> list[TarMember]:
    """Index the image members of ``shards`` (WebDataset samples: the first image member of each key).

    Reads the tar headers only (``tarfile`` seeks over the data), keeping no member list.

    Raises:
        ProbeError: for a file that is not a readable tar.
    """
    items: list[TarMember] = []
    for shard in shards:
        seen: set[str] = set()
        try:
            with tarfile.open(shard, "r:") as tf:
                while True:
                    m = tf.next()
                    if m is None:
                        break
                    tf.members = []  # keep memory flat: the index is all we need
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    suffix = "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""
                    if suffix not in image_suffixes:
                        continue
                    key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
                    if key in seen:
                        continue
                    seen.add(key)
                    items.append(TarMember(name=f"{shard.name}/{m.name}", shard=str(shard),
                                           offset=m.offset_data, size=m.size))
        except (tarfile.TarError, OSError) as e:
            raise ProbeError(f"cannot read the tar shard {str(shard)!r} ({e}); pass uncompressed WebDataset "
                             ".tar shards") from None
    return items


# -- Hugging Face datasets, arrow and parquet ------------------------------------------------

_HF_CACHE: dict[tuple[str, str | None], tuple[Any, str | None]] = {}
_PARQUET_CACHE: dict[str, Any] = {}


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``hf-dataset:PATH[:split]`` -> ``(PATH, split or None)``; a ``PATH`` that exists as given
    (even with a colon in it) is taken whole.

    Raises:
        ProbeError: for an empty path.
    """
    rest = spec[len(HF_PREFIX):]
    if not rest.strip():
        raise ProbeError("--images hf-dataset: needs a path, e.g. hf-dataset:data/imagenet-val or "
                         "hf-dataset:data/ds:validation or hf-dataset:images.parquet")
    if Path(rest).exists() or ":" not in rest:
        return rest, None
    path, split = rest.rsplit(":", 1)
    return path, (split or None)


def _need_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ProbeError("reading a Hugging Face dataset needs the datasets package: pip install 'probe[data]' "
                         "(or pip install datasets)") from None
    return datasets


def _hf_dataset(path: str, split: str | None) -> tuple[Any, str | None]:
    """``(dataset, split)`` at ``path`` — the split resolved (a DatasetDict with one split needs
    none) — opened once per process (memory-mapped).

    Raises:
        ProbeError: unreadable path, unknown or missing split.
    """
    key = (path, split)
    if key not in _HF_CACHE:
        datasets = _need_datasets()
        p = Path(path)
        try:
            ds = datasets.Dataset.from_file(str(p)) if p.is_file() else datasets.load_from_disk(str(p))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ProbeError(f"cannot open the Hugging Face dataset {path!r} ({' '.join(str(e).split())[:160]}); "
                             "pass a folder written by save_to_disk, an .arrow or a .parquet file") from None
        resolved = split
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            if resolved is None and len(names) == 1:
                resolved = names[0]
            if resolved not in ds:
                raise ProbeError(f"the dataset {path!r} has splits {', '.join(names)}; name one, e.g. "
                                 f"--images hf-dataset:{path}:{names[0]}")
            ds = ds[resolved]
        elif split is not None:
            raise ProbeError(f"the dataset {path!r} has no splits (it is one Dataset); drop ':{split}'")
        _HF_CACHE[key] = _HF_CACHE[(path, resolved)] = (ds, resolved)
    return _HF_CACHE[key]


def _pick_column(candidates: list[str], columns: list[str], where: str) -> str:
    if not candidates:
        raise ProbeError(f"{where} has no image column (a datasets Image feature, a {{bytes, path}} struct or "
                         f"a binary column); its columns: {', '.join(columns)}")
    for pref in _PREFERRED_COLUMNS:
        if pref in candidates:
            return pref
    return candidates[0]


def _arrow_image_columns(schema) -> list[str]:
    import pyarrow as pa

    out = []
    for f in schema:
        t = f.type
        if pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} >= {"bytes"}:
            out.append(f.name)
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            out.append(f.name)
    return out


def hf_items(spec: str) -> tuple[list[TableRow], str]:
    """Lazy items of every row of ``hf-dataset:PATH[:split]`` and a description for the report.

    Raises:
        ProbeError: missing path, unknown split, no image column, ``datasets`` not installed.
    """
    path, split = parse_hf_spec(spec)
    p = Path(path)
    if not p.exists():
        raise ProbeError(f"the dataset path {path!r} does not exist; --images hf-dataset:PATH[:split] needs a folder "
                         "written by save_to_disk, an .arrow or a .parquet file")
    if p.is_file() and p.suffix.lower() == ".parquet":
        if split is not None:
            raise ProbeError(f"a parquet file has no splits; drop ':{split}' from --images")
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(str(p))
        except Exception as e:  # pyarrow raises its own error types for damaged files
            raise ProbeError(f"cannot read the parquet file {path!r} ({' '.join(str(e).split())[:160]})") from None
        schema = meta.schema_arrow
        column = _pick_column(_arrow_image_columns(schema), schema.names, f"the parquet file {path!r}")
        n = meta.metadata.num_rows
        items = [TableRow(name=f"{p.name}#{i}", source=str(p), column=column, index=i, kind="parquet")
                 for i in range(n)]
        return items, f"parquet file {path} (column {column!r}, {n} rows)"
    datasets = _need_datasets()
    ds, split = _hf_dataset(path, split)
    image_cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    column = _pick_column(image_cols or _arrow_image_columns(ds.data.schema), list(ds.features),
                          f"the dataset {path!r}")
    label = p.name + (f"[{split}]" if split else "")
    items = [TableRow(name=f"{label}#{i}", source=str(p), split=split, column=column, index=i, kind="hf")
             for i in range(len(ds))]
    return items, f"Hugging Face dataset {path}{f' split {split}' if split else ''} (column {column!r}, {len(ds)} rows)"


def _parquet_cell(path: str, column: str, index: int) -> Any:
    """The cell of row ``index``: its row group is read once and kept (one per process)."""
    import bisect

    import pyarrow.parquet as pq

    entry = _PARQUET_CACHE.get(path)
    if entry is None:
        pf = pq.ParquetFile(path)
        starts, total = [], 0
        for g in range(pf.metadata.num_row_groups):
            starts.append(total)
            total += pf.metadata.row_group(g).num_rows
        entry = _PARQUET_CACHE[path] = {"file": pf, "starts": starts, "group": -1, "cells": None}
    g = bisect.bisect_right(entry["starts"], index) - 1
    if entry["group"] != g:
        entry["cells"] = entry["file"].read_row_group(g, columns=[column]).column(0)
        entry["group"] = g
    return entry["cells"][index - entry["starts"][g]].as_py()
