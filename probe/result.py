"""The result of an analysis: tables, per-layer statistics, metadata, and report writing."""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analyses.reducers import LayerStats
from .geometry import TokenGeometry


@dataclass
class AnalysisResult:
    """Everything ``probe.analyze`` measured.

    Attributes:
        heads: one row per (layer, head); columns documented in :mod:`probe.tables`.
        layers: one row per analysed layer.
        stats: ``{layer: LayerStats}``, the streaming sums (tensors) behind the tables.
        geometry: the token geometry the attention was read with.
        meta: what was analysed (model, weights source, images, versions, seed, run time, ...).
        extras: further analyses' tables and values, keyed by analysis name.
    """

    heads: pd.DataFrame
    layers: pd.DataFrame
    stats: dict[int, LayerStats]
    geometry: TokenGeometry
    meta: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        m = self.meta
        cl = self.extras.get("convlike")
        verdict = f", conv test: {cl.summary().split('.')[0]}" if cl is not None else ""
        return (f"AnalysisResult(model={m.get('model')!r}, weights={m.get('weights')!r}, "
                f"images={m.get('num_images')}, layers={len(self.layers)}, heads={len(self.heads)}{verdict})")

    def _repr_html_(self) -> str:
        """Notebook view: model, images, a per-layer table and the verdicts (not the full tables)."""
        import html

        m = self.meta
        cols = [c for c in ("layer", "heads", "mean_distance_px", "uniform_distance_px", "entropy_nats",
                            "conv_n_local", "conv_n_taps", "conv_verdict", "conv_verdict_stability")
                if c in self.layers]
        table = self.layers[cols].to_html(index=False, border=0, float_format=lambda x: f"{x:.3g}", na_rep="–")
        cl = self.extras.get("convlike")
        verdict = f"<p>{html.escape(cl.summary())}</p>" if cl is not None else ""
        return (f"<div><b>probe AnalysisResult</b>: {html.escape(str(m.get('model')))} "
                f"(weights: {html.escape(str(m.get('weights')))}), {m.get('num_images')} images "
                f"({html.escape(str(m.get('images')))}){verdict}{table}"
                "<p><code>.heads</code>, <code>.layers</code>: DataFrames; <code>.write_report(dir)</code></p></div>")

    def center_maps(self, query: int | None = None) -> dict[int, np.ndarray]:
        """Mean attention map of one patch query per layer.

        Args:
            query: patch index (row-major); default the central patch.

        Returns:
            ``{layer: array (heads, rows, cols)}`` of renormalised patch attention.
        """
        return {l: s.center_map(query).numpy() for l, s in self.stats.items()}

    def write_report(self, out_dir: str | Path, query: tuple[int, int] | int | None = None) -> Path:
        """Write ``report.html``, ``heads.csv``, ``layers.csv`` and ``images.txt`` to ``out_dir``,
        with the saved-result files (``result.json``, ``stats.safetensors.gz``, see :meth:`save`) so
        that :func:`probe.load` reads the folder back.

        Everything is rendered in memory first and each file is written atomically
        (temporary file + rename), so a failure never leaves a half-written report.

        Returns:
            The path of ``report.html``.
        """
        from .report.render import render_report

        out = check_output_dir(out_dir)
        if query is None and self.meta.get("query") is not None:
            query = tuple(self.meta["query"])
        if isinstance(query, (tuple, list)):
            from .pipeline import _check_query

            query = _check_query(tuple(query), self.geometry)
        elif query is not None and (isinstance(query, bool) or not isinstance(query, int)
                                    or not 0 <= query < self.geometry.num_patches):
            from .errors import ProbeError

            raise ProbeError(f"query must be (row, col) or a patch index below {self.geometry.num_patches}, got {query!r}")
        grids = {s.geometry.grid for s in self.stats.values()}
        if query is None and len(grids) > 1:  # layers on different grids (Swin stages): own centres
            maps = self.center_maps(None)
            query_rc: Any = {l: divmod(s.geometry.center_patch, s.geometry.grid[1]) for l, s in self.stats.items()}
        else:
            q = self.geometry.center_patch if query is None else query
            maps, query_rc = self.center_maps(q), divmod(q, self.geometry.grid[1])
        html = render_report(
            heads=self.heads,
            layers=self.layers,
            meta=self.meta,
            center_maps=maps,
            query_rc=query_rc,
            extras=self.extras,
            mean_attn={l: s.mean_attn.numpy() for l, s in self.stats.items()},
            grids={l: tuple(s.geometry.grid) for l, s in self.stats.items()},
            photo=self.extras.get("example_image"),
        )
        from .saved import saved_files

        files = {
            **self._analysis_files(),  # e.g. rollout.npz
            **saved_files(self),  # heads.csv, layers.csv, result.json, stats: the folder loads again
            "images.txt": images_txt(self.meta.get("image_names", [])),
            "report.html": html,
        }
        write_output_set(out, files)
        return out / "report.html"

    def _analysis_files(self) -> dict[str, bytes]:
        """The registered analyses' own output files (:meth:`probe.analyses.base.Analysis.files`)."""
        from .analyses.base import analysis_files

        return analysis_files(self.heads, self.layers, self.meta, self.extras)

    def save(self, out_dir: str | Path) -> Path:
        """Save the result (tables, metadata, streaming statistics, further analyses' results)
        to ``out_dir`` without a report; :func:`probe.load` reads it back.

        The folder format is described in :mod:`probe.saved` (``result.json``, ``heads.csv``,
        ``layers.csv``, ``stats.safetensors.gz``, ``extras.safetensors``, ``images.txt``; no pickle).
        :meth:`write_report` writes the same files beside ``report.html``, so every report
        folder loads as well. Written as one set (:func:`write_output_set`): an earlier probe
        output in ``out_dir`` is replaced as a whole.

        Returns:
            ``out_dir`` as a :class:`~pathlib.Path`.

        Raises:
            ProbeError: as :func:`check_output_dir`; metadata that cannot be stored.
        """
        from .saved import saved_files

        out = check_output_dir(out_dir)
        files = {**self._analysis_files(), **saved_files(self),
                 "images.txt": images_txt(self.meta.get("image_names", []))}
        write_output_set(out, files)
        return out

    def rerun(self, *, fits: bool = True, anisotropic: bool = False, conv_test: bool = True,
              conv_config: Any = None, random_init_scores: dict[int, list[float]] | None = None) -> "AnalysisResult":
        """The fits and the conv test run again on the saved statistics, with other settings,
        without the model (e.g. on a result from :func:`probe.load`).

        The base tables are rebuilt from :attr:`stats` (:func:`probe.tables.heads_frame`), the
        quadratic fits (:func:`probe.steps.add_quadratic_fits`) and the conv test
        (:func:`probe.steps.add_conv_test`) run on them, and the columns of the other analyses
        (e.g. ``importance_*``) are carried over. The conv test's random-init null (a) needs
        forward passes of random-init copies of the model: it is applied only when
        ``random_init_scores`` is given (``{layer: [score per seed]}``, e.g.
        ``result.extras["convlike"].random_init_scores`` when the thresholds are unchanged);
        otherwise ``meta["conv_null_status"]`` is ``"needs the model"`` and the report says so.

        Args:
            fits: fit Δ and α (needed by the conv test).
            anisotropic: also fit the full 2x2 covariance form.
            conv_test: run the conv test (implies ``fits``).
            conv_config: a :class:`~probe.analyses.convlike.ConvLikeConfig`; default the saved
                test's config, else ``ConvLikeConfig(seed=meta["seed"])``.
            random_init_scores: null (a) scores to apply, see above.

        Returns:
            a new :class:`AnalysisResult` (this one is not changed).

        Raises:
            ProbeError: for a bad ``conv_config`` or ``random_init_scores`` naming unknown layers.
        """
        import copy
        import time

        from .analyses.convlike import ConvLikeConfig
        from .errors import ProbeError
        from .steps import add_conv_test, add_quadratic_fits
        from .tables import heads_frame, layers_frame

        if conv_config is not None and not isinstance(conv_config, ConvLikeConfig):
            raise ProbeError(f"conv_config must be a ConvLikeConfig, got {type(conv_config).__name__}")
        stats = list(self.stats.values())
        heads = heads_frame(stats)
        new = AnalysisResult(heads=heads, layers=layers_frame(heads, stats), stats=dict(self.stats),
                             geometry=self.geometry, meta=copy.deepcopy(self.meta),
                             extras={k: v for k, v in self.extras.items() if k not in ("quadratic", "convlike")})
        meta = new.meta
        for k in [k for k in meta if k.startswith("conv_null")]:
            del meta[k]
        if fits or conv_test:
            add_quadratic_fits(new, anisotropic=anisotropic)
        cfg = None
        if conv_test:
            old = self.extras.get("convlike")
            cfg = conv_config or getattr(old, "config", None) or ConvLikeConfig(seed=int(meta.get("seed", 0)))
            add_conv_test(new, cfg, random_init_scores or None)
            given = random_init_scores or {}
            meta["conv_null_layers_rule"] = (self.meta.get("conv_null_layers_rule", "all") if given
                                             else "needs the model")
            meta["conv_null_status"] = "run" if given else "needs the model"
            meta["conv_null_layers"] = sorted(int(l) for l in given)
            meta["conv_null_seeds"] = len(next(iter(given.values()), []))
            meta["conv_null_images"] = int(self.meta.get("conv_null_images", 0)) if given else 0
        keep = [c for c in self.heads.columns if c not in new.heads.columns and c not in ("layer", "head")
                and not c.startswith(("conv_", "aniso_")) and c not in _FIT_COLUMNS]
        if keep:
            new.heads = new.heads.merge(self.heads[["layer", "head", *keep]], on=["layer", "head"], how="left")
        lkeep = [c for c in self.layers.columns if c not in new.layers.columns and not c.startswith("conv_")]
        if lkeep:
            new.layers = new.layers.merge(self.layers[["layer", *lkeep]], on="layer", how="left")
        from dataclasses import asdict

        meta["rerun"] = {"fits": bool(fits or conv_test), "anisotropic": bool(anisotropic),
                         "conv_test": bool(conv_test), "conv_config": asdict(cfg) if cfg is not None else None,
                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        return new


def images_txt(names: Any) -> str:
    """``images.txt``: one image name per line, in analysis order. A backslash, newline or carriage
    return inside a name is written ``\\\\``, ``\\n``, ``\\r``, so every line is one image."""
    def line(name: Any) -> str:
        return str(name).replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")

    return "".join(line(n) + "\n" for n in (names if isinstance(names, (list, tuple)) else []))


#: Heads-table columns of the quadratic fits (:meth:`probe.analyses.quadratic.QuadraticFit.to_frame`
#: and ``r90_empirical_patches``), dropped by :meth:`AnalysisResult.rerun` before it fits again.
_FIT_COLUMNS = frozenset((
    "delta_row", "delta_col", "delta_row_px", "delta_col_px", "alpha", "sigma_patches", "r50_patches",
    "r90_patches", "b_row", "b_col", "quad_loglik_nats", "quad_ll_gain_nats", "quad_kl_fit_nats",
    "quad_kl_explained", "delta_row_se", "delta_col_se", "delta_row_px_se", "delta_col_px_se", "alpha_se",
    "quad_local", "quad_converged", "quad_status", "r90_empirical_patches"))


from .preflight import (MARKER, _foreign_files, _marker_files, _resolved_out, _shown,  # noqa: E402,F401
                        check_output_dir)  # checked before torch loads (probe.preflight)

#: Infix of the hidden sibling folders a write works in: ``.<out name>.probe-tmp-<pid>-<32 hex>``.
_TMP_INFIX = ".probe-tmp-"
#: This process's temporary folders still in use (absolute paths), so that a thread never takes
#: another thread's temporary folder of the same process for a dead one.
_LIVE_TEMPS: set[str] = set()
_LIVE_LOCK = threading.Lock()


def _rename(a: Path, b: Path, flags: int) -> bool | None:
    """Linux ``renameat2(a, b, flags)``: True when done, False when ``b`` exists (``EEXIST`` /
    ``ENOTEMPTY``, for ``RENAME_NOREPLACE``), None when the call or flag is unsupported here.

    Raises:
        OSError: any other failure.
    """
    import ctypes
    import ctypes.util
    import errno

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return None
    raise OSError(err, os.strerror(err), str(b))


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False if unsupported."""
    try:
        return bool(_rename(a, b, _RENAME_EXCHANGE))
    except OSError:
        return False


def _new_temp(parent: Path, name: str) -> Path:
    """A new, empty temporary sibling ``.<name>.probe-tmp-<pid>-<unique id>`` of this call, marked live."""
    import uuid

    tmp = parent / f".{name}{_TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex}"
    with _LIVE_LOCK:
        os.mkdir(tmp, 0o700)
        _LIVE_TEMPS.add(os.path.abspath(tmp))
    return tmp


def _release_temp(tmp: Path) -> None:
    with _LIVE_LOCK:
        _LIVE_TEMPS.discard(os.path.abspath(tmp))


def _remove_dead_temps(parent: Path, name: str) -> None:
    """Remove the temporary siblings of ``parent/name`` left by writes that died (killed runs).

    Only a folder whose name parses exactly as ``.<name>.probe-tmp-<pid>-<32 hex digits>``, that
    is a real folder (not a link) holding only regular files, and whose writer is provably gone
    is removed: its process does not exist, or it is this process and no call here uses it any
    more. Anything else is left alone (a live run's temporary folder, a user's
    ``.run.probe-tmp-backup``, names with glob characters of other outputs).
    """
    import re
    import shutil

    pattern = re.compile(re.escape(f".{name}{_TMP_INFIX}") + r"([1-9][0-9]{0,9})-[0-9a-f]{32}")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            with _LIVE_LOCK:
                dead = os.path.abspath(entry.path) not in _LIVE_TEMPS
        else:
            try:
                os.kill(pid, 0)
                dead = False
            except ProcessLookupError:
                dead = True
            except (OSError, OverflowError, ValueError):  # another user's live process, or no such pid type
                dead = False
        if not dead:
            continue
        try:
            if all(e.is_file(follow_symlinks=False) for e in os.scandir(entry.path)):
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def write_output_set(out_dir: str | Path, files: dict[str, str | bytes]) -> None:
    """Write ``files`` (``{name: text or bytes}``) as one set: afterwards ``out_dir`` holds either the
    complete earlier set or the complete new one, never a mix.

    The files are written and flushed into a hidden sibling folder
    ``.<name>.probe-tmp-<pid>-<unique id>``, which then replaces ``out_dir`` in one step (a new
    folder: ``rename``; an existing one: Linux ``renameat2(RENAME_EXCHANGE)``, falling back to
    two renames where the file system lacks it); the earlier set is then deleted. A run killed
    before the swap leaves ``out_dir`` as it was; its hidden sibling is removed by a later write
    to the same folder once its process is gone (nothing else is ever removed, see
    :func:`_remove_dead_temps`). Files that appear in ``out_dir`` while the set is written are
    checked for again at the swap: the write is then refused, ``out_dir`` keeps the earlier set
    and those files, and the new set is kept beside it in ``<name>.probe-new-<id>``. Several
    processes or threads may write the same folder at once; the last swap wins. A symbolic link
    to a folder is written through (see :func:`check_output_dir`).

    Raises:
        ProbeError: as :func:`check_output_dir`; files added to the folder during the write;
            writing fails (e.g. the disk is full).
    """
    import json
    import shutil

    from .errors import ProbeError

    out = _resolved_out(check_output_dir(out_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(out.parent, out.name)
    tmp = _new_temp(out.parent, out.name)
    kept = False
    try:
        for name, text in {**files, MARKER: json.dumps({"files": sorted(files)}) + "\n"}.items():
            binary = isinstance(text, (bytes, bytearray))
            with open(tmp / name, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        kept = _swap_in(tmp, out)
    except OSError as e:
        raise ProbeError(f"writing the report to {str(out)!r} failed ({e.strerror or e}); nothing there was "
                         "changed — free space or choose another --out") from None
    finally:
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
        _release_temp(tmp)


def _swap_in(tmp: Path, out: Path) -> bool:
    """Put the finished set ``tmp`` in place of ``out`` (see :func:`write_output_set`); the earlier
    set ends in ``tmp``. Returns False (``tmp`` is then to be removed).

    Raises:
        ProbeError: ``out`` gained files probe did not write, or stopped being a folder; the new
            set is then kept beside it (renamed, so ``tmp`` is gone).
    """
    from .errors import ProbeError

    def refuse(why: str) -> None:
        keep = out.parent / f"{out.name}.probe-new-{tmp.name.rsplit('-', 1)[1][:8]}"
        os.rename(tmp, keep)
        raise ProbeError(f"--out {str(out)!r} {why} while probe wrote it, so it was not replaced; the new "
                         f"results are in {str(keep)!r} — move your files elsewhere and rename that folder")

    for _ in range(100):  # a folder created or removed by a concurrent writer in between: try again
        if not os.path.lexists(out):
            done = _rename(tmp, out, _RENAME_NOREPLACE)
            if done is None:
                try:
                    os.rename(tmp, out)  # no NOREPLACE here: replaces at most an empty folder
                    done = True
                except OSError as e:
                    if e.errno not in (39, 17):  # ENOTEMPTY, EEXIST
                        raise
                    done = False
            if done:
                return True
            continue
        if out.is_symlink() or not out.is_dir():
            refuse("was replaced by a file or link")
        theirs = _foreign_files(out)
        if theirs:
            refuse(f"gained files probe did not write ({_shown(theirs)})")
        if _exchange(tmp, out):  # now tmp holds the earlier set
            theirs = _foreign_files(tmp) if tmp.is_dir() and not tmp.is_symlink() else [out.name]
            if theirs:  # written in the instant before the swap: put the earlier set back
                if not _exchange(tmp, out):
                    raise OSError(f"cannot restore {out} after files appeared in it")
                refuse(f"gained files probe did not write ({_shown(theirs)})")
            return False
        old = _new_temp(out.parent, out.name)
        os.rmdir(old)
        try:
            os.rename(out, old)
        except FileNotFoundError:
            _release_temp(old)
            continue
        theirs = _foreign_files(old)
        if theirs:
            os.rename(old, out)
            _release_temp(old)
            refuse(f"gained files probe did not write ({_shown(theirs)})")
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(old, out)
            _release_temp(old)
            raise
        import shutil

        shutil.rmtree(old, ignore_errors=True)
        _release_temp(old)
        return True
    raise OSError(f"{out} kept changing while probe wrote it")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
