"""Saved results: the output folder of an analysis *is* the storage format.

A folder written by :meth:`probe.AnalysisResult.save` (or ``write_report``, or ``probe analyze``)
holds, besides the human-readable report:

``result.json``
    ``{"format": FORMAT, "kind": "probe.AnalysisResult", "written_by": "probe X.Y.Z", ...}``: the
    metadata of the run (``meta``), the token geometry, one entry per layer of statistics
    (``layer``, ``n_images``, its geometry), the column types of the two tables, and the further
    analyses' results (``extras``: the conv test, the quadratic fits, the attribution) as tagged
    JSON whose arrays live in ``extras.safetensors``. Standard JSON: non-finite floats are written
    ``{"$float": "nan"}``; dicts with integer keys ``{"$int_keys": {"0": ...}}``; tuples
    ``{"$tuple": [...]}``; arrays ``{"$ndarray": "key"}`` (a tensor of ``extras.safetensors``);
    DataFrames ``{"$frame": ...}``; probe's dataclasses ``{"$dataclass": "module:Class", ...}``
    (only classes defined in ``probe`` are rebuilt; nothing is unpickled).
``heads.csv``, ``layers.csv``
    the two tables (:mod:`probe.tables`), read back with the recorded column types (floats
    round-trip exactly; text columns' missing values are recorded by row).
``stats.safetensors.gz``
    the streaming statistics (:class:`~probe.analyses.reducers.LayerStats`) of every analysed
    layer, float64, keyed ``layer<L>.<field>`` (``attn_sum`` ``(heads, P, P)``, ``feat_sum``,
    ``feat_sumsq`` ``(heads, F)``, ``boot_sum`` ``(R, heads, F)``, ``boot_weight`` ``(R,)``), a
    safetensors file compressed with gzip (lossless: the sums load bit-equal; the mean attention
    maps ``attn_sum`` are most of it — ``heads · P²`` float64 per layer, 28 MB uncompressed for the
    embedded model, whose sparse maps compress about 10x; dense maps of trained ViTs less).
``extras.safetensors``
    the arrays of ``extras`` (only when there are any).

Never pickle: a folder from an untrusted source can at worst fail to load.

Versioning: :data:`FORMAT` is an integer raised on every incompatible change; :func:`load`
reads exactly the formats in :data:`READABLE` and refuses others with a message naming both.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
import zlib
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import ProbeError
from .preflight import RESULT_FILE, check_result_folder

#: Version of the saved-result format written by this probe (2: the statistics gzip-compressed).
FORMAT = 2
#: Formats :func:`load` reads.
READABLE = (1, 2)
#: The statistics file (format 1 wrote it uncompressed, as ``stats.safetensors``).
STATS_FILE = "stats.safetensors.gz"
EXTRAS_FILE = "extras.safetensors"
KIND = "probe.AnalysisResult"


class _Unsupported(TypeError):
    """A value the format cannot store (e.g. an arbitrary Python object)."""


class _Encoder:
    """Tagged JSON for nested values; arrays and tensors are collected into :attr:`tensors`."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _store(self, t: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        self.tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def __call__(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            f = float(v)
            return f if math.isfinite(f) else {"$float": "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")}
        if isinstance(v, Path):
            return {"$path": str(v)}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, tuple):
            return {"$tuple": [self(x) for x in v]}
        if isinstance(v, dict):
            keys = list(v)
            if all(isinstance(k, str) and not k.startswith("$") for k in keys):
                return {k: self(x) for k, x in v.items()}
            if keys and all(isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)) for k in keys):
                return {"$int_keys": {str(int(k)): self(x) for k, x in v.items()}}
            return {"$dict": [[self(k), self(x)] for k, x in v.items()]}
        if isinstance(v, torch.Tensor):
            return {"$tensor": self._store(v)}
        if isinstance(v, np.ndarray):
            if v.dtype.kind in "biuf" and v.dtype.itemsize <= 8 and v.dtype != np.uint16 and v.dtype != np.uint32:
                return {"$ndarray": self._store(torch.from_numpy(np.array(v, order="C", copy=True)))}
            if v.dtype.kind in "US":
                return {"$strarray": {"dtype": v.dtype.str, "shape": list(v.shape), "values": v.reshape(-1).tolist()}}
            if v.dtype.kind == "O":
                return {"$objarray": {"shape": list(v.shape), "values": [self(x) for x in v.reshape(-1)]}}
            raise _Unsupported(f"array of dtype {v.dtype}")
        if isinstance(v, pd.DataFrame):
            return {"$frame": self._frame(v)}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            cls = type(v)
            if not cls.__module__.startswith("probe."):
                raise _Unsupported(f"dataclass {cls.__module__}.{cls.__qualname__} (only probe's are stored)")
            fields = {f.name: self(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
            return {"$dataclass": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
        raise _Unsupported(type(v).__name__)

    def _frame(self, df: pd.DataFrame) -> dict:
        cols = []
        for name in df.columns:
            s = df[name]
            kind = s.dtype.kind if isinstance(s.dtype, np.dtype) else None
            if kind in ("b", "i", "u", "f"):
                data = self(s.to_numpy())
            else:
                data = [self(None if (isinstance(x, float) and math.isnan(x)) or x is pd.NA else x)
                        for x in s.tolist()]
            cols.append({"name": self(name), "dtype": str(s.dtype), "data": data})
        idx = df.index
        if isinstance(idx, pd.RangeIndex):
            index: Any = {"range": [idx.start, idx.stop, idx.step]}
        else:
            index = {"values": self(np.asarray(idx.to_numpy()))}
        index["name"] = self(idx.name)
        return {"columns": cols, "index": index}


class _Decoder:
    """Inverse of :class:`_Encoder` given the loaded tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        self.tensors = tensors
        self.where = where

    def _tensor(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ProbeError(f"{self.where}: array {key!r} named in {RESULT_FILE} is missing from {EXTRAS_FILE}; "
                             "the folder is incomplete — save the result again")
        return self.tensors[key]

    def __call__(self, v: Any) -> Any:
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1 or "$dataclass" in v:
            tag = next(iter(v))
            if tag == "$float":
                return float(v[tag])
            if tag == "$path":
                return Path(v[tag])
            if tag == "$tuple":
                return tuple(self(x) for x in v[tag])
            if tag == "$int_keys":
                return {int(k): self(x) for k, x in v[tag].items()}
            if tag == "$dict":
                return {self(k): self(x) for k, x in v[tag]}
            if tag == "$tensor":
                return self._tensor(v[tag]).clone()
            if tag == "$ndarray":
                return self._tensor(v[tag]).numpy().copy()
            if tag == "$strarray":
                d = v[tag]
                return np.array(d["values"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])
            if tag == "$objarray":
                d = v[tag]
                out = np.empty(len(d["values"]), dtype=object)
                out[:] = [self(x) for x in d["values"]]
                return out.reshape(d["shape"])
            if tag == "$frame":
                return self._frame(v[tag])
            if tag == "$dataclass":
                return self._dataclass(v["$dataclass"], v.get("fields", {}))
        return {k: self(x) for k, x in v.items()}

    def _dataclass(self, name: str, fields: dict) -> Any:
        import importlib

        mod, _, qual = name.partition(":")
        if not mod.startswith("probe."):
            raise ProbeError(f"{self.where}: refusing to rebuild {name!r} (only probe's own classes are loaded)")
        try:
            obj: Any = importlib.import_module(mod)
            for part in qual.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            raise ProbeError(f"{self.where}: class {name!r} of a saved analysis does not exist in this probe; "
                             "load the folder with the probe version that wrote it") from None
        if not dataclasses.is_dataclass(obj):
            raise ProbeError(f"{self.where}: {name!r} is not a dataclass")
        return obj(**{k: self(x) for k, x in fields.items()})

    def _frame(self, d: dict) -> pd.DataFrame:
        data = {}
        for c in d["columns"]:
            vals = self(c["data"])
            data[self(c["name"])] = pd.Series(vals, dtype=c["dtype"]) if not isinstance(vals, np.ndarray) \
                else pd.Series(vals, dtype=vals.dtype)
        idx = d["index"]
        index = (pd.RangeIndex(*idx["range"]) if "range" in idx else pd.Index(self(idx["values"])))
        index.name = self(idx.get("name"))
        frame = pd.DataFrame(data, columns=list(data))
        frame.index = index
        for c in d["columns"]:  # object columns of strings and missing values: dtype as written
            name = self(c["name"])
            if str(frame[name].dtype) != c["dtype"]:
                frame[name] = frame[name].astype(c["dtype"])
        return frame


def _table_spec(df: pd.DataFrame) -> dict:
    """Column types of a table written as CSV, and the rows where its text columns are missing."""
    dtypes, missing, objects = {}, {}, {}
    enc = _Encoder()
    for name in df.columns:
        s = df[name]
        dtypes[str(name)] = str(s.dtype)
        kind = s.dtype.kind if isinstance(s.dtype, np.dtype) else None
        if kind in ("b", "i", "u", "f"):
            continue
        if kind == "O":  # arbitrary objects: kept exactly in the JSON (the CSV shows their text)
            try:
                objects[str(name)] = [enc(None if x is pd.NA else x) for x in s.tolist()]
            except _Unsupported:
                pass
            if enc.tensors:
                raise ProbeError(f"table column {name!r} holds arrays; a table column must hold scalars")
        rows = np.flatnonzero(s.isna().to_numpy()).tolist()
        if rows:
            missing[str(name)] = rows
    return {"columns": dtypes, "missing": missing, "objects": objects, "rows": int(len(df))}


def _read_table(path: Path, spec: dict) -> pd.DataFrame:
    """A table CSV read back with the types recorded by :func:`_table_spec`."""
    cols: dict[str, str] = spec["columns"]
    numeric = {c for c, t in cols.items() if t in ("float64", "float32", "int64", "int32", "bool")}
    text = {c: "str" for c in cols if c not in numeric}
    kw: dict[str, Any] = {}
    if int(pd.__version__.split(".")[0]) < 3:
        kw["float_precision"] = "round_trip"  # pandas 3 parses floats exactly by default
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values={c: [""] for c in numeric},
                            dtype=text or None, **kw)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ProbeError(f"cannot read {path} ({' '.join(str(e).split())[:160]}); the saved result is damaged") from None
    if list(frame.columns) != list(cols) or len(frame) != spec.get("rows", len(frame)):
        raise ProbeError(f"{path.name} does not match {RESULT_FILE} (columns or rows differ: was it edited?); "
                         "save the result again, or restore the file")
    dec = _Decoder({}, str(path))
    for c, t in cols.items():
        if c in spec.get("objects", {}):
            vals = spec["objects"][c]
            frame[c] = pd.Series([dec(x) for x in vals], dtype=object, index=frame.index)
            continue
        rows = spec.get("missing", {}).get(c)
        if c in text and rows:
            frame[c] = frame[c].astype(object)
            frame.loc[frame.index[rows], c] = np.nan
        if str(frame[c].dtype) != t:
            try:
                frame[c] = frame[c].astype(t)
            except (TypeError, ValueError):
                raise ProbeError(f"{path.name}: column {c!r} cannot be read as {t}; the saved result is damaged "
                                 "or was edited") from None
    return frame


def _geometry_dict(g) -> dict:
    return {"num_prefix_tokens": g.num_prefix_tokens, "grid": list(g.grid),
            "pixels_per_token": list(g.pixels_per_token)}


def _geometry(d: dict):
    from .geometry import TokenGeometry

    return TokenGeometry(int(d["num_prefix_tokens"]), tuple(d["grid"]), tuple(d["pixels_per_token"]))


def saved_files(result) -> dict[str, str | bytes]:
    """The files of a saved result (``{name: text or bytes}``): tables, ``result.json``, statistics.

    Extras that the format cannot store (objects other than numbers, strings, arrays, tensors,
    DataFrames, containers and probe's dataclasses) are left out with a ``UserWarning`` and
    listed in ``result.json`` under ``extras_skipped``.
    """
    import warnings

    from safetensors.torch import save as st_save

    from . import __version__

    enc = _Encoder()
    extras, skipped = {}, []
    for key, value in result.extras.items():
        before = dict(enc.tensors)
        try:
            extras[str(key)] = enc(value)
        except _Unsupported as e:
            enc.tensors = before
            skipped.append(str(key))
            warnings.warn(f"saving: extras[{key!r}] is not stored ({e} cannot be saved without pickle)", stacklevel=3)
    try:
        meta = enc(result.meta)
    except _Unsupported as e:
        raise ProbeError(f"cannot save the result: its metadata holds a {e}; store only numbers, strings, "
                         "lists and dicts in result.meta") from None
    stats_tensors, stats_index = {}, []
    for layer, st in result.stats.items():
        entry = {"layer": int(layer), "n_images": int(st.n_images), "geometry": _geometry_dict(st.geometry),
                 "fields": []}
        for f in dataclasses.fields(st):
            v = getattr(st, f.name)
            if isinstance(v, torch.Tensor):
                stats_tensors[f"layer{int(layer)}.{f.name}"] = v.detach().to("cpu").contiguous()
                entry["fields"].append(f.name)
        stats_index.append(entry)
    doc = {
        "format": FORMAT,
        "kind": KIND,
        "written_by": f"probe {__version__}",
        "files": {"heads": "heads.csv", "layers": "layers.csv", "stats": STATS_FILE,
                  "extras": EXTRAS_FILE if enc.tensors else None},
        "geometry": _geometry_dict(result.geometry),
        "stats": stats_index,
        "tables": {"heads": _table_spec(result.heads), "layers": _table_spec(result.layers)},
        "meta": meta,
        "extras": extras,
        "extras_skipped": skipped,
    }
    files: dict[str, str | bytes] = {
        RESULT_FILE: json.dumps(doc, indent=1, allow_nan=False) + "\n",
        "heads.csv": result.heads.to_csv(index=False),
        "layers.csv": result.layers.to_csv(index=False),
        STATS_FILE: gzip.compress(st_save(stats_tensors, metadata={"format": str(FORMAT), "kind": KIND}),
                                  compresslevel=6, mtime=0),
    }
    if enc.tensors:
        files[EXTRAS_FILE] = st_save(enc.tensors, metadata={"format": str(FORMAT)})
    return files


def load(path: str | Path):
    """Load an analysis saved by :meth:`~probe.AnalysisResult.save` (any ``probe analyze`` output folder).

    The loaded result has the same tables (equal column by column, types included), bit-equal
    statistics, the same metadata and the further analyses' results, so it re-renders the same
    report (``write_report``), re-runs fits and the conv test with other settings without the
    model (:meth:`~probe.AnalysisResult.rerun`) and feeds :func:`probe.compare`.

    Args:
        path: the output folder (or its ``result.json``).

    Returns:
        an :class:`~probe.result.AnalysisResult`.

    Raises:
        ProbeError: the folder does not exist, is not a probe result, lacks one of its files, was
            written in a format this probe does not read (older or newer), or is damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from .analyses.reducers import LayerStats
    from .result import AnalysisResult

    folder = check_result_folder(path)
    doc_path = folder / RESULT_FILE
    try:
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ProbeError(f"{doc_path} is not readable JSON ({' '.join(str(e).split())[:120]}); the saved result is damaged") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND or "format" not in doc:
        raise ProbeError(f"{doc_path} is not a probe result file (no 'kind': {KIND!r} and 'format'); "
                         "pass the output folder of probe analyze")
    fmt = doc["format"]
    if fmt not in READABLE:
        from . import __version__

        newer = isinstance(fmt, int) and fmt > max(READABLE)
        raise ProbeError(
            f"{str(folder)!r} is saved-result format {fmt!r} ({doc.get('written_by', 'unknown probe')}); probe "
            f"{__version__} reads format {', '.join(map(str, READABLE))}: "
            + ("upgrade probe to load it" if newer else "load it with the probe version that wrote it, or run "
               "the analysis again"))
    files = doc.get("files") or {}
    for role in ("heads", "layers", "stats", "extras"):
        name = files.get(role)
        if name is not None and not (folder / name).is_file():
            raise ProbeError(f"{str(folder)!r} lacks {name} (the {role} of the saved result); the folder is "
                             "incomplete — save or run the analysis again")
    tensors: dict[str, torch.Tensor] = {}
    try:
        raw = (folder / files["stats"]).read_bytes()
        stats_t = st_load(gzip.decompress(raw) if files["stats"].endswith(".gz") else raw)
        if files.get("extras"):
            tensors = st_load((folder / files["extras"]).read_bytes())
    except (SafetensorError, OSError, ValueError, zlib.error, EOFError) as e:
        raise ProbeError(f"{str(folder)!r}: a statistics file is damaged ({' '.join(str(e).split())[:120]}); "
                         "run the analysis again") from None
    stats = {}
    for entry in doc["stats"]:
        layer = int(entry["layer"])
        geometry = _geometry(entry["geometry"])
        kw = {}
        for name in entry["fields"]:
            key = f"layer{layer}.{name}"
            if key not in stats_t:
                raise ProbeError(f"{str(folder)!r}: {files['stats']} lacks {key}; the saved result is damaged")
            kw[name] = stats_t[key]
        st = LayerStats(layer=layer, geometry=geometry, n_images=int(entry["n_images"]), **kw)
        p = geometry.num_patches
        if st.attn_sum.shape[-2:] != (p, p) or st.feat_sum.shape[0] != st.attn_sum.shape[0]:
            raise ProbeError(f"{str(folder)!r}: layer {layer} statistics do not match its {geometry.grid} grid; "
                             "the saved result is damaged")
        stats[layer] = st
    dec = _Decoder(tensors, str(folder))
    heads = _read_table(folder / files["heads"], doc["tables"]["heads"])
    layers = _read_table(folder / files["layers"], doc["tables"]["layers"])
    meta = dec(doc["meta"])
    extras = {k: dec(v) for k, v in (doc.get("extras") or {}).items()}
    return AnalysisResult(heads=heads, layers=layers, stats=stats, geometry=_geometry(doc["geometry"]),
                          meta=meta, extras=extras)


def is_saved_result(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a probe ``result.json`` (of any format)."""
    p = Path(path) / RESULT_FILE
    try:
        return p.is_file() and json.loads(p.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["FORMAT", "READABLE", "load", "saved_files", "is_saved_result"]
