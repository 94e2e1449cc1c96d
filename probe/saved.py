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
    DataFrames ``{"$frame": ...}``; probe's dataclasses ``{"$dataclass": TAG, ...}`` with a stable tag
    of :data:`SAVED_TYPES` (``"module:Class"`` in folders written before the tags, read through
    :data:`SAVED_TYPE_ALIASES`)
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
import os
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

#: Stable type tags of probe's dataclasses in saved results (``{"$dataclass": TAG, ...}``): a tag
#: names the class wherever its code lives, so moving a class to another module changes only this
#: table, never a saved folder. Classes not listed (a plug-in's own) are stored as
#: ``"module:qualname"`` (refused on load unless under ``probe.``).
SAVED_TYPES: dict[str, str] = {
    "TokenGeometry": "probe.geometry:TokenGeometry",
    "LayerStats": "probe.analyses.reducers:LayerStats",
    "QuadraticFit": "probe.analyses.quadratic:QuadraticFit",
    "ConvLikeConfig": "probe.analyses.convlike:ConvLikeConfig",
    "ConvLikeResult": "probe.analyses.convlike:ConvLikeResult",
    "LayerFit": "probe.analyses.convlike:LayerFit",
    "LatticeMatch": "probe.analyses.convlike:LatticeMatch",
    "HeadAttribution": "probe.attribution:HeadAttribution",
    "AblationCheck": "probe.attribution:AblationCheck",
    "RolloutMaps": "probe.analyses.rollout:RolloutMaps",
    "RolloutOptions": "probe.analyses.rollout:RolloutOptions",
    "NmiPerImage": "probe.analyses.nmi:NmiPerImage",
    "DistanceModes": "probe.analyses.distance_modes:DistanceModes",
    "SinkStats": "probe.analyses.sinks:SinkStats",
    "SinkOptions": "probe.analyses.sinks:SinkOptions",
    "QuadraticOptions": "probe.steps:QuadraticOptions",
    "ConvTestOptions": "probe.steps:ConvTestOptions",
    "AttributionOptions": "probe.steps:AttributionOptions",
    "NoOptions": "probe.analyses.base:NoOptions",
    "RunSettings": "probe.analyses.base:RunSettings",
}
#: ``"module:qualname"`` names written before the tags (format 1 and early format 2) -> tag: a
#: class that moves keeps its old name here, so folders that name it the old way still load.
SAVED_TYPE_ALIASES: dict[str, str] = {path: tag for tag, path in SAVED_TYPES.items()}


def register_saved_type(tag: str, cls: type, aliases: tuple[str, ...] = ()) -> None:
    """Give a dataclass of a plug-in analysis a stable tag in saved results.

    Args:
        tag: a name without ``:`` (e.g. ``"myorg.MyResult"``); cls: the dataclass;
        aliases: earlier ``"module:qualname"`` names of it, still read.

    Raises:
        ProbeError: a tag with ``:``, a class that is not a dataclass, or a tag taken by another class.
    """
    if not isinstance(tag, str) or not tag or ":" in tag:
        raise ProbeError(f"a saved-type tag is a name without ':', got {tag!r}")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ProbeError(f"register_saved_type needs a dataclass, got {cls!r}")
    path = f"{cls.__module__}:{cls.__qualname__}"
    if SAVED_TYPES.get(tag, path) != path:
        raise ProbeError(f"the saved-type tag {tag!r} already names {SAVED_TYPES[tag]}")
    SAVED_TYPES[tag] = path
    for a in (path, *aliases):
        SAVED_TYPE_ALIASES[a] = tag


def _type_tag(cls: type) -> str:
    """The tag a dataclass is saved under (its ``module:qualname`` when it has none)."""
    path = f"{cls.__module__}:{cls.__qualname__}"
    return SAVED_TYPE_ALIASES.get(path, path)
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
            return {"$dataclass": _type_tag(cls), "fields": fields}
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

        if ":" not in name:  # a stable tag
            if name not in SAVED_TYPES:
                raise ProbeError(f"{self.where}: the saved type {name!r} is unknown to this probe; load the folder "
                                 "with the probe version (or plug-in) that wrote it")
            name = SAVED_TYPES[name]
        elif name in SAVED_TYPE_ALIASES:  # an older module:qualname name of a tagged class
            name = SAVED_TYPES[SAVED_TYPE_ALIASES[name]]
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
        if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
            raise ProbeError(f"{self.where}: {name!r} is not a dataclass")
        values = {k: self(x) for k, x in fields.items()}
        _check_fields(obj, values, self.where)
        return obj(**values)

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


def _check_fields(cls: type, values: dict, where: str) -> None:
    """The saved ``values`` of dataclass ``cls`` against its fields: known names, every required
    field present, and each value of its annotated class (``int`` for ``float``, ``list`` for
    ``tuple`` accepted; generic and union annotations checked on their outer classes).

    Raises:
        ProbeError: naming the class and the field.
    """
    import types
    import typing

    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    name = f"{cls.__module__}:{cls.__qualname__}"
    extra = [k for k in values if k not in known]
    missing = [k for k, f in known.items() if k not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if extra or missing:
        raise ProbeError(f"{where}: the saved {name} has " + (f"unknown fields {extra}" if extra else
                         f"no {missing}") + "; the saved result is damaged or was edited")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # annotations naming types only imported for type checking
        return
    alias = {float: (int, float, np.floating, np.integer), int: (int, np.integer), tuple: (tuple, list)}

    def classes(hint: Any) -> tuple | None:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            out: tuple = ()
            for a in typing.get_args(hint):
                c = classes(a)
                if c is None:
                    return None
                out += c
            return out
        if hint is type(None):
            return (type(None),)
        cls_ = origin or hint
        return alias.get(cls_, (cls_,)) if isinstance(cls_, type) else None

    for k, v in values.items():
        want = classes(hints.get(k, Any))
        if want is not None and not isinstance(v, want):
            raise ProbeError(f"{where}: field {k!r} of the saved {name} is a {type(v).__name__}, not "
                             f"{' or '.join(c.__name__ for c in want)}; the saved result is damaged or was edited")


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


def _read_table(path: Path, spec: dict, raw: bytes) -> pd.DataFrame:
    """A table CSV (``raw``, the bytes of ``path``) read back with the types recorded by :func:`_table_spec`."""
    import io

    cols: dict[str, str] = spec["columns"]
    numeric = {c for c, t in cols.items() if t in ("float64", "float32", "int64", "int32", "bool")}
    text = {c: "str" for c in cols if c not in numeric}
    kw: dict[str, Any] = {}
    if int(pd.__version__.split(".")[0]) < 3:
        kw["float_precision"] = "round_trip"  # pandas 3 parses floats exactly by default
    try:
        frame = pd.read_csv(io.BytesIO(raw), keep_default_na=False, na_values={c: [""] for c in numeric},
                            dtype=text or None, **kw)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise ProbeError(f"cannot read {path} ({' '.join(str(e).split())[:160]}); the saved result is damaged") from None
    if list(frame.columns) != list(cols) or len(frame) != spec.get("rows", len(frame)):
        raise ProbeError(f"{path.name} does not match {RESULT_FILE} (columns or rows differ: was it edited?); "
                         "save the result again, or restore the file")
    n = len(frame)
    bad = [c for c, rows in spec.get("missing", {}).items() if c not in cols or any(r >= n for r in rows)]
    bad += [c for c, vals in spec.get("objects", {}).items() if c not in cols or len(vals) != n]
    if bad:
        raise ProbeError(f"{RESULT_FILE} describes column {bad[0]!r} of {path.name} with rows it does not have; "
                         "the saved result is damaged or was edited")
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


#: Deepest nesting of lists and objects a ``result.json`` may hold (probe writes about 12).
MAX_DEPTH = 100
#: Column / array types a saved table or ``$frame`` may declare (no complex, object arrays only as JSON).
_DTYPE_PATTERN = (r"^(bool|u?int(8|16|32|64)|float(16|32|64)|U?Int(8|16|32|64)|Float(32|64)|boolean"
                  r"|object|str|string|category)$")
#: A file of the set: a plain name inside the folder, never a path.
_FILE_NAME = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\\x00]{1,255}$",
              "description": "a plain file name inside the folder (no path, no '..')"}


def _schema() -> dict:
    """The JSON Schema (draft 2020-12) of ``result.json``, format :data:`FORMAT`."""
    from .analyses.reducers import LayerStats

    fields = [f.name for f in dataclasses.fields(LayerStats) if f.name not in ("layer", "geometry", "n_images")]
    nonneg = {"type": "integer", "minimum": 0}
    dim = {"type": "integer", "minimum": 1, "maximum": 100_000}
    pair = lambda item: {"type": "array", "prefixItems": [item, item], "items": False, "minItems": 2}  # noqa: E731
    geometry = {"type": "object", "additionalProperties": False,
                "required": ["num_prefix_tokens", "grid", "pixels_per_token"],
                "properties": {"num_prefix_tokens": {"type": "integer", "minimum": 0, "maximum": 100_000},
                               "grid": pair(dim),
                               "pixels_per_token": pair({"type": "number", "exclusiveMinimum": 0,
                                                         "maximum": 1e9})}}
    dtype = {"type": "string", "pattern": _DTYPE_PATTERN,
             "description": "a column type probe writes (bool, int, float, str or object; no complex)"}
    table = {"type": "object", "additionalProperties": False, "required": ["columns"],
             "properties": {"columns": {"type": "object", "additionalProperties": dtype},
                            "missing": {"type": "object", "additionalProperties": {"type": "array", "items": nonneg}},
                            "objects": {"type": "object", "additionalProperties": {
                                "type": "array", "items": {"$ref": "#/$defs/value"}}},
                            "rows": nonneg}}
    ref = {"$ref": "#/$defs/value"}
    shape = {"type": "array", "items": nonneg, "maxItems": 32}

    def tag(name: str, body: dict) -> dict:
        return {"type": "object", "required": [name], "additionalProperties": False, "properties": {name: body}}

    frame = {"type": "object", "additionalProperties": False, "required": ["columns", "index"], "properties": {
        "columns": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "dtype", "data"],
            "properties": {"name": ref, "dtype": dtype, "data": ref}}},
        "index": {"type": "object", "additionalProperties": False, "properties": {
            "range": {"type": "array", "prefixItems": [{"type": "integer"}] * 3, "items": False, "minItems": 3},
            "values": ref, "name": ref},
            "oneOf": [{"required": ["range"]}, {"required": ["values"]}]}}}
    tagged = [
        tag("$float", {"enum": ["nan", "inf", "-inf"]}),
        tag("$path", {"type": "string"}),
        tag("$tuple", {"type": "array", "items": ref}),
        tag("$int_keys", {"type": "object", "propertyNames": {"pattern": r"^-?[0-9]{1,18}$"},
                          "additionalProperties": ref}),
        tag("$dict", {"type": "array", "items": {"type": "array", "prefixItems": [ref, ref], "items": False,
                                                  "minItems": 2}}),
        tag("$tensor", {"type": "string"}),
        tag("$ndarray", {"type": "string"}),
        tag("$strarray", {"type": "object", "additionalProperties": False, "required": ["dtype", "shape", "values"],
                          "properties": {"dtype": {"type": "string", "pattern": r"^[<>|=]?U[0-9]{1,5}$",
                                                   "description": "a NumPy text type such as <U16"},
                                         "shape": shape, "values": {"type": "array", "items": {"type": "string"}}}}),
        tag("$objarray", {"type": "object", "additionalProperties": False, "required": ["shape", "values"],
                          "properties": {"shape": shape, "values": {"type": "array", "items": ref}}}),
        tag("$frame", frame),
        {"type": "object", "required": ["$dataclass", "fields"], "additionalProperties": False, "properties": {
            "$dataclass": {"type": "string",
                           "pattern": r"^(probe(\.[A-Za-z_]\w*)+:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*|[A-Za-z_][\w.]*)$"},
            "fields": {"$ref": "#/$defs/plain"}}},
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object", "additionalProperties": False,
        "required": ["format", "kind", "files", "geometry", "stats", "tables", "meta"],
        "properties": {
            "format": {"enum": list(READABLE)}, "kind": {"const": KIND}, "written_by": {"type": "string"},
            "files": {"type": "object", "additionalProperties": False, "required": ["heads", "layers", "stats"],
                      "properties": {"heads": _FILE_NAME, "layers": _FILE_NAME, "stats": _FILE_NAME,
                                     "extras": {"anyOf": [{"type": "null"}, _FILE_NAME]}}},
            "geometry": geometry,
            "stats": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["layer", "n_images", "geometry", "fields"],
                "properties": {"layer": nonneg, "n_images": {"type": "integer", "minimum": 1},
                               "geometry": geometry,
                               "fields": {"type": "array", "items": {"enum": fields}, "uniqueItems": True,
                                          "minItems": len(fields)}}}},
            "tables": {"type": "object", "additionalProperties": False, "required": ["heads", "layers"],
                       "properties": {"heads": table, "layers": table}},
            "meta": {"$ref": "#/$defs/plain"},
            "extras": {"$ref": "#/$defs/plain"},
            "extras_skipped": {"type": "array", "items": {"type": "string"}},
        },
        "$defs": {
            "value": {"anyOf": [{"type": ["null", "boolean", "number", "string"]},
                                {"type": "array", "items": ref},
                                {"$ref": "#/$defs/plain"},
                                {"anyOf": tagged}]},
            "plain": {"type": "object", "propertyNames": {"not": {"pattern": r"^\$"}}, "additionalProperties": ref},
        },
    }


_VALIDATOR: Any = None


def _validator():
    global _VALIDATOR
    if _VALIDATOR is None:
        from jsonschema import Draft202012Validator

        _VALIDATOR = Draft202012Validator(_schema())
    return _VALIDATOR


def _depth(doc: Any) -> int:
    """Deepest nesting of lists and dicts in ``doc`` (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _parse_json(raw: bytes, where: str) -> Any:
    """Strict standard JSON: ``NaN``, ``Infinity`` and numbers beyond float range (``1e400``) are
    refused, and so is nesting deeper than :data:`MAX_DEPTH`.

    Raises:
        ProbeError: naming the problem.
    """
    def no_constant(name: str) -> Any:
        raise ProbeError(f"{where} holds {name}, which is not standard JSON (probe writes "
                         '{"$float": "nan"}); the saved result is damaged or was edited')

    def finite(text: str) -> float:
        v = float(text)
        if not math.isfinite(v):
            raise ProbeError(f"{where} holds the number {text[:40]}, beyond the range of a float; "
                             "the saved result is damaged or was edited")
        return v

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=no_constant, parse_float=finite)
    except RecursionError:
        doc = None
        deep = True
    except (ValueError, UnicodeDecodeError) as e:
        raise ProbeError(f"{where} is not readable JSON ({' '.join(str(e).split())[:120]}); "
                         "the saved result is damaged") from None
    else:
        deep = _depth(doc) > MAX_DEPTH
    if deep:
        raise ProbeError(f"{where} is nested more than {MAX_DEPTH} levels deep (probe writes about 12); "
                         "the saved result is damaged or was edited")
    return doc


def _validate(doc: dict, where: str) -> None:
    """Check ``doc`` against :func:`_schema`.

    Raises:
        ProbeError: one line naming the first problem and where in the document it is.
    """
    from jsonschema.exceptions import best_match

    err = best_match(_validator().iter_errors(doc))
    if err is None:
        return
    at = ".".join(str(p) for p in err.absolute_path) or "the top level"
    described = err.schema.get("description") if isinstance(err.schema, dict) else None
    msg = f"{err.instance!r} is not {described}" if described else " ".join(err.message.split())
    if len(msg) > 160:
        msg = msg[:157] + "..."
    raise ProbeError(f"{where} does not match the saved-result format at {at}: {msg}; the saved result is "
                     "damaged or was edited — save or run the analysis again")


class _Gone(Exception):
    """A file of the set vanished between opening the folder and reading it."""


def _read_at(dfd: int, name: str, folder: Path) -> bytes:
    """The bytes of the regular file ``name`` of the folder opened as ``dfd`` (never through a link).

    Raises:
        _Gone: no such file (any more).
        ProbeError: a link, a folder, a FIFO or device, or unreadable.
    """
    import errno
    import stat

    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except FileNotFoundError:
        raise _Gone(name) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ProbeError(f"{str(folder / name)!r} is a symbolic link; a saved result reads only the regular "
                             "files inside its folder — copy the file into the folder instead") from None
        raise ProbeError(f"cannot read {str(folder / name)!r} ({e.strerror or e}); check its permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProbeError(f"{str(folder / name)!r} is not a regular file; the saved result is damaged")
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 24)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ProbeError(f"cannot read {str(folder / name)!r} ({e.strerror or e}); check its permissions") from None
    finally:
        os.close(fd)


def _read_set(folder: Path) -> tuple[dict, dict[str, bytes]]:
    """``(document, {role: bytes})`` of the saved result in ``folder``, all read from one folder.

    The folder is opened once and every file is read through that handle, so a folder that a
    concurrent :func:`~probe.result.write_output_set` replaces yields one complete set: the one
    opened, or (when its files were deleted meanwhile) the next one, read again from the start.

    Raises:
        ProbeError: see :func:`load`.
    """
    import random
    import time

    deadline, first = time.monotonic() + 30.0, True
    while first or time.monotonic() < deadline:
        if not first:
            time.sleep(random.uniform(0, 0.005))  # out of step with a writer replacing the folder in a loop
        first = False
        try:
            dfd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            continue  # between the two renames of a writer without an atomic exchange
        except OSError as e:
            raise ProbeError(f"cannot open {str(folder)!r} ({e.strerror or e}); check its permissions") from None
        try:
            try:
                raw = _read_at(dfd, RESULT_FILE, folder)
            except _Gone:
                if _replaced(folder, dfd):
                    continue
                hint = ("it was written by a probe from before saved results (report only): run probe analyze again"
                        if (folder / "heads.csv").is_file() else
                        "pass the output folder of probe analyze or AnalysisResult.save")
                raise ProbeError(f"{str(folder)!r} holds no {RESULT_FILE}, so it is not a saved probe result; {hint}")
            doc = _document(raw, folder)
            data: dict[str, bytes] = {}
            for role, name in doc["files"].items():
                if name is None:
                    continue
                try:
                    data[role] = _read_at(dfd, name, folder)
                except _Gone:
                    if _replaced(folder, dfd):
                        break
                    raise ProbeError(f"{str(folder)!r} lacks {name} (the {role} of the saved result); the folder "
                                     "is incomplete — save or run the analysis again") from None
            else:
                return doc, data
        finally:
            os.close(dfd)
    raise ProbeError(f"{str(folder)!r} kept being replaced while it was read (another run writes it); "
                     "load it again when that run is done")


def _replaced(folder: Path, dfd: int) -> bool:
    """True when ``folder`` no longer names the folder opened as ``dfd``."""
    try:
        a, b = os.stat(folder), os.fstat(dfd)
    except OSError:
        return True
    return (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino)


def _document(raw: bytes, folder: Path) -> dict:
    """The checked ``result.json`` of ``folder`` (:func:`_parse_json`, format, :func:`_validate`)."""
    where = str(folder / RESULT_FILE)
    doc = _parse_json(raw, where)
    if not isinstance(doc, dict) or doc.get("kind") != KIND or "format" not in doc:
        raise ProbeError(f"{where} is not a probe result file (no 'kind': {KIND!r} and 'format'); "
                         "pass the output folder of probe analyze")
    fmt = doc["format"]
    if isinstance(fmt, bool) or fmt not in READABLE:
        from . import __version__

        newer = isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > max(READABLE)
        written = doc.get("written_by")
        raise ProbeError(
            f"{str(folder)!r} is saved-result format {fmt!r} ({written if isinstance(written, str) else 'unknown probe'});"
            f" probe {__version__} reads format {', '.join(map(str, READABLE))}: "
            + ("upgrade probe to load it" if newer else "load it with the probe version that wrote it, or run "
               "the analysis again"))
    _validate(doc, where)
    return doc


def _check_stats(st, folder: Path) -> None:
    """The shapes and types of one layer's statistics against each other and its geometry.

    Raises:
        ProbeError: a tensor of another type or shape than :class:`LayerStats` documents.
    """
    from .analyses.reducers import FEATURES

    p, nf = st.geometry.num_patches, len(FEATURES)
    fields = {f: getattr(st, f) for f in ("attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight")}
    bad = [f for f, t in fields.items() if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float64,
                                                                                           torch.float32)]
    h = st.attn_sum.shape[0] if not bad and st.attn_sum.dim() == 3 else -1
    r = st.boot_weight.shape[0] if not bad and st.boot_weight.dim() == 1 else -1
    want = {"attn_sum": (h, p, p), "feat_sum": (h, nf), "feat_sumsq": (h, nf), "boot_sum": (r, h, nf),
            "boot_weight": (r,)}
    bad += [f for f, t in fields.items() if f not in bad and (h < 1 or r < 0 or tuple(t.shape) != want[f])]
    if bad:
        shapes = ", ".join(f"{f} {getattr(fields[f], 'dtype', '?')} {tuple(getattr(fields[f], 'shape', ()))}"
                           for f in bad)
        raise ProbeError(f"{str(folder)!r}: layer {st.layer} statistics do not fit its {st.geometry.grid} grid "
                         f"and each other ({shapes}); the saved result is damaged")


def load(path: str | Path):
    """Load an analysis saved by :meth:`~probe.AnalysisResult.save` (any ``probe analyze`` output folder).

    The loaded result has the same tables (equal column by column, types included), bit-equal
    statistics, the same metadata and the further analyses' results, so it re-renders the same
    report (``write_report``), re-runs fits and the conv test with other settings without the
    model (:meth:`~probe.AnalysisResult.rerun`) and feeds :func:`probe.compare`.

    A folder from an untrusted source at worst fails to load: ``result.json`` is checked against
    the format's JSON Schema (:func:`_schema`, with ``jsonschema``) before use, the statistics'
    shapes against the geometry, nothing is unpickled, and only regular files inside the folder
    named by plain names are read (no paths, no ``..``, no symbolic links). The folder is opened
    once and read through that handle, so loading a folder another run is replacing returns one
    complete set, never a mix of two.

    Args:
        path: the output folder (or its ``result.json``).

    Returns:
        an :class:`~probe.result.AnalysisResult`.

    Raises:
        ProbeError: the folder does not exist, is not a probe result, lacks one of its files, was
            written in a format this probe does not read (older or newer), or is damaged or edited
            (one line naming what and where).
    """
    from .analyses.reducers import LayerStats
    from .result import AnalysisResult

    folder = check_result_folder(path)
    doc, data = _read_set(folder)
    files = doc["files"]
    try:
        return _build(doc, data, folder, LayerStats, AnalysisResult)
    except ProbeError:
        raise
    except (RecursionError, MemoryError):
        raise ProbeError(f"{str(folder)!r}: the saved result is too large or deep to rebuild; it is damaged") from None
    except Exception as e:  # anything the schema cannot rule out (e.g. a dataclass refusing its fields)
        raise ProbeError(f"{str(folder)!r}: the saved result is damaged or was edited ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); save or run the analysis again "
                         f"(files: {', '.join(n for n in files.values() if n)})") from None


def _build(doc: dict, data: dict[str, bytes], folder: Path, LayerStats, AnalysisResult):
    """The :class:`AnalysisResult` of a checked document and its files' bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    files = doc["files"]
    tensors: dict[str, torch.Tensor] = {}
    try:
        raw = data["stats"]
        stats_t = st_load(gzip.decompress(raw) if files["stats"].endswith(".gz") else raw)
        if "extras" in data:
            tensors = st_load(data["extras"])
    except (SafetensorError, OSError, ValueError, RuntimeError, zlib.error, EOFError) as e:
        raise ProbeError(f"{str(folder)!r}: a statistics file is damaged ({' '.join(str(e).split())[:120]}); "
                         "run the analysis again") from None
    stats = {}
    for entry in doc["stats"]:
        layer = int(entry["layer"])
        if layer in stats:
            raise ProbeError(f"{str(folder)!r}: layer {layer} is listed twice in {RESULT_FILE}; the saved result "
                             "is damaged or was edited")
        geometry = _geometry(entry["geometry"])
        kw = {}
        for name in entry["fields"]:
            key = f"layer{layer}.{name}"
            if key not in stats_t:
                raise ProbeError(f"{str(folder)!r}: {files['stats']} lacks {key}; the saved result is damaged")
            kw[name] = stats_t[key]
        st = LayerStats(layer=layer, geometry=geometry, n_images=int(entry["n_images"]), **kw)
        _check_stats(st, folder)
        stats[layer] = st
    dec = _Decoder(tensors, str(folder))
    heads = _read_table(folder / files["heads"], doc["tables"]["heads"], data["heads"])
    layers = _read_table(folder / files["layers"], doc["tables"]["layers"], data["layers"])
    meta = dec(doc["meta"])
    extras = {k: dec(v) for k, v in (doc.get("extras") or {}).items()}
    _check_extras(extras, folder)
    return AnalysisResult(heads=heads, layers=layers, stats=stats, geometry=_geometry(doc["geometry"]),
                          meta=meta, extras=extras)


def _check_extras(extras: dict, folder: Path) -> None:
    """probe's own further results in ``extras`` (read by the report and :func:`probe.compare`)
    are of their classes: ``convlike`` a ``ConvLikeResult`` with DataFrame tables, ``quadratic``
    ``{layer: QuadraticFit}``, ``example_image`` an array.

    Raises:
        ProbeError: naming the entry.
    """
    from .analyses.convlike import ConvLikeResult
    from .analyses.quadratic import QuadraticFit

    checks = {
        "convlike": lambda v: isinstance(v, ConvLikeResult) and isinstance(v.layers, pd.DataFrame)
        and isinstance(v.heads, pd.DataFrame),
        "quadratic": lambda v: isinstance(v, dict) and all(isinstance(k, int) and isinstance(f, QuadraticFit)
                                                           for k, f in v.items()),
        "example_image": lambda v: isinstance(v, np.ndarray),
    }
    for key, ok in checks.items():
        if key in extras and not ok(extras[key]):
            raise ProbeError(f"{str(folder)!r}: extras[{key!r}] of the saved result is a "
                             f"{type(extras[key]).__name__}, not what probe writes there; the saved result is "
                             "damaged or was edited — save or run the analysis again")


def is_saved_result(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a probe ``result.json`` (of any format)."""
    p = Path(path) / RESULT_FILE
    try:
        return p.is_file() and json.loads(p.read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


__all__ = ["FORMAT", "READABLE", "SAVED_TYPES", "SAVED_TYPE_ALIASES", "load", "saved_files", "is_saved_result",
           "register_saved_type"]
