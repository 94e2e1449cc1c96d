"""Streaming reducers: per-layer statistics accumulated batch by batch.

A reducer consumes one batch of attention probabilities of one layer, shape
``(batch, heads, query, key)`` with ``key == query == num_tokens``, updates a fixed-size set of
sums and drops the batch: memory is independent of the number of images.

Definitions (per head; ``P`` patch tokens, ``A`` the attention row of a patch query ``q``,
``A'`` its patch-key part renormalised to sum to one, Dosovitskiy et al. 2021, Fig. 7):

* mean attention distance ``sum_k A'[q,k] * ||p_q - p_k||`` (patches or pixels),
* prefix mass ``sum_{k < prefix} A[q,k]``,
* entropy ``-sum_k A[q,k] ln A[q,k]`` over all keys, in nats (Zhai et al. 2023),
* the quadratic-encoding sufficient statistics ``sum_k A'[q,k] * phi(delta_qk)`` with
  ``phi = (d_row, d_col, d_row^2, d_col^2, d_row*d_col)``, ``delta = p_k - p_q`` in patches
  (Cordonnier et al. 2020, Eq. 9, used by :mod:`probe.analyses.quadratic`),

each averaged over the patch queries of an image. Per image these form a feature vector whose
sum, sum of squares and Poisson-bootstrap replicate sums (Hanley & MacGibbon 2006) are kept,
so standard errors and bootstrap intervals need no per-image storage.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ProbeError
from ..geometry import TokenGeometry

#: Names of the per-image, per-head features, in the order of the last axis of the sums.
FEATURES: tuple[str, ...] = (
    "mean_distance_patches",
    "mean_distance_px",
    "entropy_nats",
    "prefix_mass",
    "phi_row",
    "phi_col",
    "phi_row2",
    "phi_col2",
    "phi_rowcol",
)
#: Slice of :data:`FEATURES` holding the quadratic-encoding sufficient statistics.
PHI = slice(4, 9)

_TINY = torch.finfo(torch.float32).tiny

#: Images whose per-image features (and float32 sum of A') are buffered before they are folded
#: into the float64 sums (see LayerReducer).
FLUSH_IMAGES = 64

#: Raw buffer columns are (7 table features, sum p ln p, prefix sum); FEATURES[i] is
#: raw[_RAW_ORDER[i]] * _RAW_SCALE[i] / P: the table features and the prefix mass are means over
#: the P patch queries, the entropy is minus that mean.
_RAW_ORDER = (0, 1, 7, 8, 2, 3, 4, 5, 6)
_RAW_SCALE = (1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

#: Attention entries reduced at once (4 MiB of float32): larger batches are split into chunks of
#: whole images, which keeps the reducer's temporaries cache-sized and its memory bounded.
CHUNK_ELEMENTS = 1 << 20


def feature_tables(geometry: TokenGeometry) -> torch.Tensor:
    """Per-(query, key) values whose attention-weighted sum gives the patch-key features.

    Computed once per geometry and cached (the result is shared: do not modify it in place).

    Returns:
        float64 tensor ``(P * P, 7)``: columns are the distance in patches, the distance in
        pixels, and ``phi`` (5 columns) for each (query, key) pair of patch tokens, flattened
        query-major. Divided by ``P`` so that a contraction with ``A'`` averages over queries.
    """
    return _feature_tables(geometry)


@functools.lru_cache(maxsize=16)
def _feature_tables(geometry: TokenGeometry) -> torch.Tensor:
    off = geometry.offsets()
    dr, dc = off[..., 0], off[..., 1]
    cols = [
        geometry.distances_patches(),
        geometry.distances_pixels(),
        dr,
        dc,
        dr * dr,
        dc * dc,
        dr * dc,
    ]
    table = torch.stack(cols, dim=-1).reshape(-1, len(cols))
    return table / geometry.num_patches



def _check_state(state: Any, keys: tuple[str, ...], where: str) -> None:
    """``state`` is a dict holding tensors under ``keys`` (ProbeError otherwise)."""
    if not isinstance(state, dict) or any(not isinstance(state.get(k), torch.Tensor) for k in keys):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ProbeError(f"{where}: a reducer state needs the tensors {list(keys)}, got {got}")


def merge_states(states: Sequence[dict[str, torch.Tensor] | None]) -> dict[str, torch.Tensor] | None:
    """The sum of reducer states (what an all-reduce over ranks computes, for one process).

    Every streaming reducer keeps only sums, so the state of the union of disjoint image sets is
    the key-wise sum of their states; ``None`` entries (a reducer that saw no image) are left
    out. Integer tensors stay integers, floating ones are summed in float64.

    Args:
        states: ``reducer.state()`` of reducers of the same layer and analysis.

    Returns:
        The summed state, or ``None`` when every entry is ``None``.

    Raises:
        ProbeError: when the states have different keys or shapes.
    """
    present = [s for s in states if s is not None]
    if not present:
        return None
    keys = sorted(present[0])
    out: dict[str, torch.Tensor] = {}
    for s in present:
        if sorted(s) != keys:
            raise ProbeError(f"reducer states with different keys cannot be merged: {keys} and {sorted(s)}")
    for k in keys:
        shapes = {tuple(s[k].shape) for s in present}
        if len(shapes) > 1:
            raise ProbeError(f"reducer states disagree on the shape of {k!r}: {sorted(shapes)}")
        dtype = torch.int64 if not present[0][k].is_floating_point() else torch.float64
        total = torch.zeros(present[0][k].shape, dtype=dtype)
        for s in present:
            total += s[k].detach().to("cpu", dtype)
        out[k] = total
    return out


class MomentsReducer:
    """Base of the reducers whose accumulator is one :class:`ImageMoments` in ``self._moments``
    (per-image values, mean and standard error over images): the image count and the
    distributed-run ``state`` / ``load_state`` (:class:`probe.analyses.base.Reducer`)."""

    _moments: "ImageMoments"

    @property
    def n_images(self) -> int:
        """Images accumulated."""
        return self._moments.n_images

    def state(self):
        """The accumulated sums (:meth:`ImageMoments.state`), which
        combine across ranks by summation; ``None`` before the first :meth:`update`."""
        return self._moments.state()

    def load_state(self, state) -> None:
        """Replace the sums by ``state`` (e.g. summed over ranks; :meth:`result` next).

        Raises:
            ProbeError: as :meth:`ImageMoments.load_state`.
        """
        self._moments.load_state(state)


class ImageMoments:
    """Streaming mean and standard error over images of a per-image value ``(images, ...)``.

    Keeps a float64 sum and sum of squares of shape ``(...)`` (memory independent of the number of
    images); used by the reducers of per-image statistics (distance modes, per-image NMI).

    Args:
        layer: layer index (for error messages).
        what: what is accumulated (for the error of an empty result).
    """

    def __init__(self, layer: int, what: str) -> None:
        self.layer, self.what = layer, what
        self.n_images = 0
        self._sum: torch.Tensor | None = None
        self._sumsq: torch.Tensor | None = None

    def add(self, v: torch.Tensor) -> None:
        """Accumulate ``v`` of shape ``(images, heads, ...)``.

        Raises:
            ProbeError: when the per-image shape (the head count) changed.
        """
        if self._sum is None:
            self._sum = torch.zeros(v.shape[1:], dtype=torch.float64, device=v.device)
            self._sumsq = torch.zeros_like(self._sum)
        elif self._sum.shape != v.shape[1:]:
            raise ProbeError(f"layer {self.layer}: head count changed from {self._sum.shape[0]} to {v.shape[1]}")
        self._sum += v.sum(0)
        self._sumsq += v.square().sum(0)
        self.n_images += v.shape[0]

    def state(self) -> dict[str, torch.Tensor] | None:
        """The accumulator as tensors that combine by summation (:func:`merge_states`): ``sum``,
        ``sumsq`` float64 ``(...)`` and ``n_images`` int64 ``()``; ``None`` before the first
        :meth:`add`."""
        if self._sum is None:
            return None
        return {"n_images": torch.tensor(self.n_images, dtype=torch.int64), "sum": self._sum, "sumsq": self._sumsq}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the accumulator by ``state`` (as :meth:`state` returns it, e.g. summed over ranks).

        Raises:
            ProbeError: for missing keys or a per-image shape other than the accumulated one.
        """
        _check_state(state, ("n_images", "sum", "sumsq"), f"layer {self.layer} ({self.what})")
        if self._sum is not None and tuple(state["sum"].shape) != tuple(self._sum.shape):
            raise ProbeError(f"layer {self.layer}: state of shape {tuple(state['sum'].shape)} does not fit the "
                             f"accumulated {tuple(self._sum.shape)} ({self.what})")
        device = self._sum.device if self._sum is not None else state["sum"].device
        self._sum = state["sum"].to(device, torch.float64).clone()
        self._sumsq = state["sumsq"].to(device, torch.float64).clone()
        self.n_images = int(state["n_images"])

    def mean_se(self):
        """``(mean, standard error)`` over images as float64 numpy arrays (SE NaN for one image).

        Raises:
            ProbeError: if nothing was accumulated.
        """
        import math

        import numpy as np

        if self._sum is None:
            raise ProbeError(f"layer {self.layer}: no attention was accumulated for {self.what}")
        n = self.n_images
        mean = (self._sum / n).cpu().numpy()
        if n > 1:
            var = ((self._sumsq / n).cpu().numpy() - mean**2).clip(min=0) * n / (n - 1)
            se = np.sqrt(var / n)
        else:
            se = np.full_like(mean, math.nan)
        return mean, se

@dataclass(frozen=True)
class LayerStats:
    """Accumulated statistics of one layer over ``n_images`` images.

    Attributes:
        layer: block index in the model.
        geometry: the token geometry the attention was read with.
        n_images: images accumulated.
        attn_sum: float64 ``(heads, P, P)``, sum over images of the renormalised patch-to-patch
            attention ``A'``.
        feat_sum: float64 ``(heads, F)``, sum over images of the per-image features
            (:data:`FEATURES`).
        feat_sumsq: float64 ``(heads, F)``, sum over images of their squares.
        boot_sum: float64 ``(R, heads, F)``, Poisson-bootstrap weighted sums.
        boot_weight: float64 ``(R,)``, total Poisson weight of each replicate.
    """

    layer: int
    geometry: TokenGeometry
    n_images: int
    attn_sum: torch.Tensor
    feat_sum: torch.Tensor
    feat_sumsq: torch.Tensor
    boot_sum: torch.Tensor
    boot_weight: torch.Tensor

    @property
    def num_heads(self) -> int:
        """Number of heads of the layer."""
        return int(self.attn_sum.shape[0])

    @property
    def mean_attn(self) -> torch.Tensor:
        """Mean over images of ``A'``, float64 ``(heads, P, P)``; rows sum to one."""
        return self.attn_sum / self.n_images

    def feature(self, name: str) -> torch.Tensor:
        """Mean over images of feature ``name`` (see :data:`FEATURES`), float64 ``(heads,)``."""
        return self.feat_sum[:, FEATURES.index(name)] / self.n_images

    def feature_se(self, name: str) -> torch.Tensor:
        """Standard error over images of the mean of feature ``name``, float64 ``(heads,)``.

        ``sqrt(var / n)`` with the unbiased per-image variance; NaN for a single image.
        """
        i = FEATURES.index(name)
        n = self.n_images
        if n < 2:
            return torch.full((self.num_heads,), float("nan"), dtype=torch.float64)
        mean = self.feat_sum[:, i] / n
        var = (self.feat_sumsq[:, i] - n * mean * mean).clamp_min(0) / (n - 1)
        return (var / n).sqrt()

    @property
    def phi_mean(self) -> torch.Tensor:
        """Quadratic-encoding sufficient statistics, float64 ``(heads, 5)``.

        Mean over images and patch queries of ``sum_k A'[q,k] phi(delta_qk)`` with
        ``phi = (d_row, d_col, d_row^2, d_col^2, d_row*d_col)`` in patches.
        """
        return self.feat_sum[:, PHI] / self.n_images

    @property
    def phi_bootstrap(self) -> torch.Tensor:
        """Poisson-bootstrap replicates of :attr:`phi_mean`, float64 ``(R, heads, 5)``."""
        return self.boot_sum[:, :, PHI] / self.boot_weight.clamp_min(1e-12)[:, None, None]

    def center_map(self, query: int | None = None) -> torch.Tensor:
        """Mean attention map of one patch query over the patch grid.

        Args:
            query: patch index (row-major); default the central patch.

        Returns:
            float64 ``(heads, rows, cols)``: the mean renormalised attention ``A'[query, :]``.
        """
        q = self.geometry.center_patch if query is None else query
        rows, cols = self.geometry.grid
        return self.mean_attn[:, q, :].reshape(self.num_heads, rows, cols)


class LayerReducer:
    """Streaming accumulator of :class:`LayerStats` for one layer.

    Args:
        layer: block index (for labelling).
        geometry: token geometry of the attention tensors it will receive.
        n_bootstrap: number of Poisson-bootstrap replicates (0 disables them).
        seed: seed of the bootstrap weights.

    Call :meth:`update` with each batch's attention probabilities, then :meth:`result`.

    Per-image features wait in a buffer of at most :data:`FLUSH_IMAGES` images (or one batch)
    and are folded into the float64 sums, squares and bootstrap sums together, so memory stays
    fixed and a small batch costs few operations; the sum of ``A'`` is added in float64 chunk by
    chunk. The sums add each image's values in float64, whatever the split of the images into
    batches or among processes, and :meth:`state` / :meth:`load_state` merge the sums of
    disjoint image sets exactly as float64 addition (a distributed run, :mod:`probe.distributed`).
    Each image's values themselves come from float32 products and sums over its keys, which a
    CPU's matrix kernels may round differently by the image's position in a chunk or the thread
    count (seen on AMD EPYC CPUs): another split agrees to float32 rounding (about 1e-7 relative
    per image), not bit for bit.

    Bootstrap weights are keyed by image index: image ``i`` (``image_index`` of :meth:`update`;
    default the count of images before it) gets row ``i`` of one seeded stream of Poisson(1)
    draws (a CPU generator seeded ``seed * 1_000_003 + layer``, rows drawn in index order, the
    rows of indices that never arrive drawn and dropped), so the replicates do not depend on the
    batch split, on the sharding of the images across ranks, or on the device.
    All sums live on the attention's device; :meth:`result` copies them to the host.
    """

    #: :meth:`update` takes ``image_index=`` (the pipeline passes each batch's global indices).
    uses_image_index = True

    def __init__(
        self, layer: int, geometry: TokenGeometry, n_bootstrap: int = 100, seed: int = 0
    ) -> None:
        self.layer = layer
        self.geometry = geometry
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        self._drawn = 0  # rows of the weight stream drawn so far (= next image index it can weight)
        self._pending: list[int] = []  # image indices of the buffered and staged images, in order
        self._next_index = 0  # the default index of the next image
        self._tables: dict[torch.device, torch.Tensor] = {}
        self._buf: torch.Tensor | None = None
        self._nbuf = 0
        self._stage: torch.Tensor | None = None
        self._nstage = 0
        self.n_images = 0
        self.attn_sum: torch.Tensor | None = None
        self.feat_sum: torch.Tensor | None = None
        self.feat_sumsq: torch.Tensor | None = None
        self.boot_sum: torch.Tensor | None = None
        self.boot_weight = torch.zeros(n_bootstrap, dtype=torch.float64)

    def _table(self, device: torch.device) -> torch.Tensor:
        """The feature table per query, float32 ``(P, P, 7)`` on ``device`` (not divided by P)."""
        if device not in self._tables:
            p = self.geometry.num_patches
            per_query = (feature_tables(self.geometry) * p).reshape(p, p, -1)
            self._tables[device] = per_query.to(device, torch.float32)
        return self._tables[device]

    def _init_sums(self, heads: int, device: torch.device) -> None:
        """Allocate the float64 sums on ``device`` (where the attention lives: no per-batch copy to
        the host, so a GPU run never waits on the host)."""
        nf = len(FEATURES)
        p = self.geometry.num_patches
        f64 = dict(dtype=torch.float64, device=device)
        self.attn_sum = torch.zeros(heads, p, p, **f64)
        self.feat_sum = torch.zeros(heads, nf, **f64)
        self.feat_sumsq = torch.zeros(heads, nf, **f64)
        self.boot_sum = torch.zeros(self.n_bootstrap, heads, nf, **f64)
        self.boot_weight = torch.zeros(self.n_bootstrap, **f64)
        self._buf = torch.empty(FLUSH_IMAGES, heads, nf, **f64)
        self._nbuf = 0
        # raw buffer column -> FEATURES order, and the factor that turns raw sums into features
        self._order = torch.tensor(_RAW_ORDER, device=device)
        self._scale = torch.tensor(_RAW_SCALE, **f64) / p

    @torch.no_grad()
    def update(self, attn: torch.Tensor, image_index: Any = None) -> None:
        """Accumulate one batch.

        The batch is reduced in chunks of at most :data:`CHUNK_ELEMENTS` attention entries (at
        least one image), so the temporaries stay cache-sized and bounded whatever the batch size;
        batches smaller than a chunk are copied into a staging chunk (float32, at most
        :data:`CHUNK_ELEMENTS` entries) and reduced together once it is full or at :meth:`result`.

        Args:
            attn: attention probabilities ``(batch, heads, tokens, tokens)``, rows summing to 1,
                on any device and floating dtype.
            image_index: the images' indices ``(batch,)`` (ints or an integer tensor), which key
                their bootstrap weights; increasing over the run. Default: consecutive, after
                the previous batch's last index (the first batch starts at 0).

        Raises:
            ProbeError: if the shape does not match the geometry, the head count changes, or the
                indices are not ``batch`` increasing non-negative integers above the previous ones.
        """
        if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            raise ProbeError(
                f"layer {self.layer}: expected attention (batch, heads, tokens, tokens), "
                f"got shape {tuple(attn.shape)}"
            )
        g = self.geometry
        g.check_tokens(attn.shape[-1], where=f"layer {self.layer} attention")
        b, h = attn.shape[:2]
        index = self._check_index(image_index, b)
        if self.attn_sum is None:
            self._init_sums(h, attn.device)
        elif self.attn_sum.shape[0] != h:
            raise ProbeError(
                f"layer {self.layer}: head count changed from {self.attn_sum.shape[0]} to {h}"
            )
        self._pending.extend(index)
        self._next_index = index[-1] + 1 if index else self._next_index
        step = max(1, CHUNK_ELEMENTS // max(1, attn[0].numel()))
        if b < step:
            # a small batch is copied into a staging chunk and reduced with the next ones: the
            # fixed cost of a reduction (a few dozen tensor operations) is paid once per chunk
            if self._stage is None or self._stage.shape[1:] != attn.shape[1:] or self._stage.device != attn.device:
                self._reduce_staged()
                self._stage = torch.zeros(step, *attn.shape[1:], dtype=torch.float32, device=attn.device)
            if self._nstage + b > self._stage.shape[0]:
                self._reduce_staged()
            self._stage[self._nstage:self._nstage + b].copy_(attn)
            self._nstage += b
        else:
            self._reduce_staged()
            self._ingest(attn, step)
        self.n_images += b

    def _check_index(self, image_index: Any, b: int) -> list[int]:
        """``image_index`` as a list of ``b`` increasing ints above every earlier index."""
        if image_index is None:
            return list(range(self._next_index, self._next_index + b))
        if isinstance(image_index, torch.Tensor):
            if image_index.is_floating_point() or image_index.dim() != 1:
                raise ProbeError(f"layer {self.layer}: image_index must be a 1-D integer tensor, got "
                                 f"{image_index.dtype} of shape {tuple(image_index.shape)}")
            index = [int(v) for v in image_index.tolist()]
        else:
            index = [int(v) for v in image_index]
        if len(index) != b:
            raise ProbeError(f"layer {self.layer}: {len(index)} image indices for a batch of {b} images")
        previous = self._next_index - 1 if self.n_images else -1
        for v in index:
            if v <= previous:
                raise ProbeError(f"layer {self.layer}: image indices must be non-negative and increase over "
                                 f"the run (bootstrap weights are keyed by them); got {v} after {previous}")
            previous = v
        return index

    def _reduce_staged(self) -> None:
        """Reduce the images waiting in the staging chunk, always as a whole chunk (the rows
        after the waiting images are left over and their results dropped): every staged image is
        then computed in operations of the same shapes (matrix kernels may round differently for
        other shapes), so its float32 features depend on the batch split or the sharding across
        ranks at most through its row's position in the chunk (float32 rounding)."""
        if self._nstage:
            n, self._nstage = self._nstage, 0
            self._make_room(n)
            self._reduce(self._stage, self._buf[self._nbuf:self._nbuf + n], valid=n)
            self._nbuf += n

    def _make_room(self, b: int) -> None:
        """Flush the feature buffer if ``b`` more images do not fit; grow it for ``b`` images."""
        if self._nbuf + b > self._buf.shape[0]:
            self._flush()
            if b > self._buf.shape[0]:
                self._buf = self._buf.new_empty(b, *self._buf.shape[1:])

    def _ingest(self, attn: torch.Tensor, step: int) -> None:
        """Reduce ``attn`` in chunks of ``step`` images into the feature buffer."""
        b = attn.shape[0]
        self._make_room(b)
        for i in range(0, b, step):
            chunk = attn[i:i + step] if step < b else attn
            c = chunk.shape[0]
            self._reduce(chunk, self._buf[self._nbuf:self._nbuf + c])
            self._nbuf += c

    def _reduce(self, attn: torch.Tensor, out: torch.Tensor, valid: int | None = None) -> None:
        """Add the chunk's ``A'`` to :attr:`attn_sum` (float64) and write its raw per-image sums
        to ``out`` (float64 ``(valid, heads, 9)``, columns in :data:`_RAW_ORDER` order, before
        scaling); only the first ``valid`` images (default all) count. One pass per elementwise
        step over the chunk, nothing copied to the host."""
        a = attn if attn.dtype == torch.float32 else attn.float()
        b, h = a.shape[:2]
        v = b if valid is None else valid
        n_pre, p = self.geometry.num_prefix_tokens, self.geometry.num_patches
        rows = a[:, :, n_pre:, :]  # patch queries, all keys: one contiguous block per (image, head)
        patch = rows[..., n_pre:] if n_pre else rows  # (b, h, P, P)
        # Renormalised patch attention A' (contiguous), then every patch-key feature at once: for
        # each patch query q, (b*h, P) @ (P, 7) in float32; the sum over queries in float64.
        patch_mass = patch.sum(-1, keepdim=True)
        a_prime = patch / patch_mass.clamp_min(1e-30)
        per_query = torch.bmm(a_prime.view(b * h, p, p).transpose(0, 1), self._table(a.device))
        out[..., :7] = per_query.sum(0, dtype=torch.float64).view(b, h, 7)[:v]
        if v == 1:
            self.attn_sum += a_prime[0]
        else:
            self.attn_sum += a_prime[:v].sum(0, dtype=torch.float64)
        del a_prime, per_query
        # Entropy: sum p ln p over all keys of the patch queries, in one temporary. Clamping
        # before the log makes p = 0 contribute 0 * ln(tiny) = 0 (the limit), as xlogy does.
        plogp = rows.clamp_min(_TINY)
        plogp.log_().mul_(rows)
        out[..., 7] = plogp.view(b, h, -1).sum(-1)[:v]
        del plogp
        out[..., 8] = rows[:v, :, :, :n_pre].sum((-1, -2))  # prefix mass, read directly

    def _weights(self, index: list[int]) -> torch.Tensor:
        """Poisson(1) weights of the images ``index`` (increasing, not below the stream's
        position), float64 ``(len(index), n_bootstrap)`` on the CPU: row ``i`` of the seeded
        stream for image ``i``; rows of indices not asked for are drawn and dropped."""
        r = self.n_bootstrap
        ones = torch.ones(1, r, dtype=torch.float64)
        parts = []
        start = 0
        while start < len(index):  # runs of consecutive indices, one draw each
            end = start + 1
            while end < len(index) and index[end] == index[end - 1] + 1:
                end += 1
            gap = index[start] - self._drawn
            while gap > 0:  # rows of images this process does not see (other ranks, skipped files)
                k = min(gap, 1 << 14)
                torch.poisson(ones.expand(k, r), self._gen)
                gap -= k
            parts.append(torch.poisson(ones.expand(end - start, r), self._gen))
            self._drawn = index[end - 1] + 1
            start = end
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _flush(self) -> None:
        """Fold the buffered per-image features into the sums and the bootstrap sums."""
        self._reduce_staged()
        n = self._nbuf
        if n == 0:
            return
        f = self._buf[:n].index_select(-1, self._order).mul_(self._scale)  # (n, heads, F)
        self.feat_sum += f.sum(0)
        self.feat_sumsq += f.square().sum(0)
        index, self._pending = self._pending[:n], self._pending[n:]
        if self.n_bootstrap:
            w = self._weights(index).to(f.device).T  # (R, n), image i's weights keyed by its index
            self.boot_sum += (w @ f.view(n, -1)).view(self.n_bootstrap, *f.shape[1:])
            self.boot_weight += w.sum(1)
        self._nbuf = 0

    #: Keys of :meth:`state`.
    STATE_KEYS = ("n_images", "attn_sum", "feat_sum", "feat_sumsq", "boot_sum", "boot_weight")

    def state(self) -> dict[str, torch.Tensor] | None:
        """The accumulated sums as tensors that combine across disjoint image sets by summation
        (the all-reduce of a distributed run, :func:`probe.distributed.all_reduce_reducers`;
        :func:`merge_states` in one process): ``n_images`` int64 ``()`` and the float64 fields of
        :class:`LayerStats` on the attention's device. Pending images are folded in first.
        ``None`` before the first :meth:`update`."""
        if self.attn_sum is None:
            return None
        self._flush()
        out = {"n_images": torch.tensor(self.n_images, dtype=torch.int64)}
        out.update({k: getattr(self, k) for k in self.STATE_KEYS[1:]})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the sums by ``state`` (as :meth:`state` returns it, e.g. summed over ranks);
        call :meth:`result` next.

        Raises:
            ProbeError: for missing keys or shapes that do not fit this layer's geometry and
                replicate count.
        """
        _check_state(state, self.STATE_KEYS, f"layer {self.layer}")
        heads = int(state["attn_sum"].shape[0]) if state["attn_sum"].dim() == 3 else -1
        p, nf, r = self.geometry.num_patches, len(FEATURES), self.n_bootstrap
        want = {"attn_sum": (heads, p, p), "feat_sum": (heads, nf), "feat_sumsq": (heads, nf),
                "boot_sum": (r, heads, nf), "boot_weight": (r,)}
        bad = [k for k, shape in want.items() if tuple(state[k].shape) != shape]
        if heads < 1 or bad or (self.attn_sum is not None and self.attn_sum.shape[0] != heads):
            raise ProbeError(f"layer {self.layer}: state shapes {[tuple(state[k].shape) for k in want]} do not fit "
                             f"{p} patches, {nf} features and {r} bootstrap replicates")
        device = self.attn_sum.device if self.attn_sum is not None else state["attn_sum"].device
        self._init_sums(heads, device)
        self._pending, self._nstage = [], 0
        for k in self.STATE_KEYS[1:]:
            setattr(self, k, state[k].to(device, torch.float64).clone())
        self.n_images = int(state["n_images"])

    def result(self) -> LayerStats:
        """The accumulated statistics.

        Raises:
            ProbeError: if no batch was accumulated.
        """
        if self.attn_sum is None:
            raise ProbeError(f"layer {self.layer}: no attention was accumulated")
        self._flush()
        return LayerStats(
            layer=self.layer,
            geometry=self.geometry,
            n_images=self.n_images,
            attn_sum=self.attn_sum.detach().to("cpu", copy=True),
            feat_sum=self.feat_sum.detach().to("cpu", copy=True),
            feat_sumsq=self.feat_sumsq.detach().to("cpu", copy=True),
            boot_sum=self.boot_sum.detach().to("cpu", copy=True),
            boot_weight=self.boot_weight.detach().to("cpu", copy=True),
        )
