"""Images in: files, folders or globs, WebDataset tar shards, Hugging Face datasets / arrow /
parquet files (:mod:`probe.sources`), read lazily in batches with the model's eval transform.

Decoding runs in a ``torch.utils.data.DataLoader`` with worker processes (:func:`iter_batches`,
``--workers N``; :func:`default_workers` picks a number for the machine), in the images' order,
with pinned memory when a CUDA GPU is present. Memory is the index of the images plus a few
batches. Unreadable files are skipped with a warning, counted, and replaced from the reserve of a
``--num-images`` subset. Without images, the two sample photos shipped inside scikit-learn
(``china.jpg``, ``flower.jpg``) are used: they need no download.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ProbeError
from .preflight import missing_image_path
from .sources import HF_PREFIX, LazyImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_IMAGES = "scikit-learn sample photos (china.jpg, flower.jpg)"


@dataclass
class ImageSet:
    """An ordered list of images to analyse.

    Attributes:
        items: file paths, or ``(name, PIL.Image)`` pairs for in-memory images.
        description: where the images came from, for the report.
        skipped: names of files that could not be read (filled while iterating).
    """

    items: list[Any]
    description: str
    skipped: list[str] = field(default_factory=list)
    #: further items (seeded random order) read in place of unreadable ones, so that a
    #: ``--num-images N`` run sees N readable images when the folder has them
    reserve: list[Any] = field(default_factory=list)
    #: folder that names are reported relative to (``images.txt``)
    root: Path | None = None
    #: decoding worker processes for :func:`iter_batches` (None: :func:`default_workers`)
    workers: int | None = None

    def __len__(self) -> int:
        return len(self.items)

    def display_name(self, name: str) -> str:
        """``name`` relative to :attr:`root` when it lies under it (as listed in ``images.txt``)."""
        if self.root is not None:
            try:
                return Path(name).resolve().relative_to(self.root.resolve()).as_posix()
            except (ValueError, OSError):
                pass
        return str(name)

    def names(self) -> list[str]:
        """File names (or given names) of the items."""
        return [item_name(i) for i in self.items]


def item_name(item: Any) -> str:
    """The name of an :attr:`ImageSet.items` entry: a path, a lazy item's name, or a given name."""
    return str(item[0]) if isinstance(item, tuple) else str(item)


class TensorImages:
    """Images already decoded and transformed into model input, streamed batch by batch.

    For callers that prepare their own inputs (a dataset pipeline, a benchmark): no file is read
    and no transform is applied. Batches are made on the fly, so a long stream can be generated
    from a small pool: memory is that of the pool plus one batch, whatever ``num_images`` is.

    Args:
        pool: float tensor ``(N, C, H, W)``, images after the model's eval transform
            (see :func:`eval_transform`).
        num_images: images to stream; default ``N``. Image ``i`` is ``pool[i % N]``, so more than
            ``N`` cycles through the pool.
        description: where the images came from, for the report.

    Attributes:
        skipped: always empty (nothing can fail to decode); present for parity with
            :class:`ImageSet`.

    Raises:
        ProbeError: if ``pool`` is not a non-empty 4-D floating tensor or ``num_images < 1``.
    """

    def __init__(self, pool: torch.Tensor, num_images: int | None = None, description: str | None = None):
        if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or pool.shape[0] < 1 or not pool.is_floating_point():
            shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
            raise ProbeError(
                f"an image tensor must be float (N, C, H, W) with N >= 1, got {shape}; "
                "stack transformed images with torch.stack"
            )
        if num_images is not None and num_images < 1:
            raise ProbeError(f"--num-images must be at least 1, got {num_images}")
        self.pool = pool
        self.num_images = int(pool.shape[0] if num_images is None else num_images)
        n = pool.shape[0]
        cyc = f", cycled to {self.num_images}" if self.num_images > n else ""
        self.description = description or f"tensor of {n} transformed images{cyc}"
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return self.num_images

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(int(v) for v in self.pool.shape[1:])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Yield ``(batch (B, C, H, W), names)``; each batch is a new tensor gathered from the pool.

        Raises:
            ProbeError: if ``batch_size < 1``.
        """
        for batch, names, _ in self.indexed_batches(batch_size):
            yield batch, names

    def indexed_batches(self, batch_size: int, start: int = 0, stop: int | None = None
                        ) -> Iterator[tuple[torch.Tensor, list[str], list[int]]]:
        """Yield ``(batch (B, C, H, W), names, indices)`` for the images ``[start, stop)`` of the
        stream (default all), batches of ``batch_size`` counted from ``start``; ``indices`` are
        the images' positions in the stream (a distributed rank's shard, :mod:`probe.distributed`).

        Raises:
            ProbeError: if ``batch_size < 1``.
        """
        if batch_size < 1:
            raise ProbeError(f"--batch-size must be at least 1, got {batch_size}")
        n = self.pool.shape[0]
        stop = self.num_images if stop is None else min(stop, self.num_images)
        for first in range(start, stop, batch_size):
            pos = torch.arange(first, min(first + batch_size, stop))
            idx = pos % n
            yield (self.pool.index_select(0, idx.to(self.pool.device)), [f"image_{int(i)}" for i in idx],
                   pos.tolist())


def _expand(source: str | Path) -> list[Path]:
    p = Path(source)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
    if p.is_file():
        return [p]
    if p.exists():  # a FIFO, a device such as /dev/zero, a socket: never opened
        import stat

        mode = p.stat().st_mode
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise ProbeError(f"image path {str(source)!r} is {kind}, not an image file or folder; pass a folder, "
                         "file or glob to --images")
    hits = sorted(Path(h) for h in glob.glob(str(source), recursive=True) if Path(h).is_file())
    if not hits and not any(ch in str(source) for ch in "*?["):
        raise missing_image_path(source)
    return hits


def default_images(input_side: int | None = None, num_views: int = 64, seed: int = 0) -> ImageSet:
    """The embedded default images (no download): scikit-learn's two sample photos.

    Args:
        input_side: the model's input side in pixels. For small-input models (``<= 64`` px,
            e.g. CIFAR-10 models at 32x32) two photos squeezed to 32x32 pixels would be two
            thumbnails, so ``num_views`` square views are cut from them instead: a seeded random
            side of 48-160 px (a region of roughly object scale in the 427x640 photos) at a random
            position, alternating between the photos; the model's eval transform then resizes each
            view to its input. ``None`` or larger inputs: the two whole photos.
        num_views: views cut for small-input models.
        seed: seed of the views' positions and sizes.

    Returns:
        an :class:`ImageSet` of in-memory images; views are named
        ``china.jpg@ROW,COL+SIDE`` (top-left corner and side in pixels of the photo).
    """
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    photos = [(Path(f).name, Image.fromarray(a)) for f, a in zip(data.filenames, data.images)]
    if input_side is None or input_side > 64:
        return ImageSet(photos, DEFAULT_IMAGES)
    rng = random.Random(seed)
    items = []
    for i in range(num_views):
        name, im = photos[i % len(photos)]
        side = rng.randint(48, 160)
        r, c = rng.randint(0, im.height - side), rng.randint(0, im.width - side)
        items.append((f"{name}@{r},{c}+{side}", im.crop((c, r, c + side, r + side))))
    return ImageSet(items, f"{num_views} square views (48-160 px, seed {seed}) cut from the {DEFAULT_IMAGES}")


def _source_items(source: str | Path) -> tuple[list[Any], str | None]:
    """Items of one ``--images`` source and, for a dataset or shards, its description (None for files)."""
    from .sources import hf_items, tar_items, tar_shards

    text = str(source)
    if text.startswith(HF_PREFIX):
        return hf_items(text)
    p = Path(text)
    if p.is_dir():
        files = _expand(p)
        if files:
            return files, None
    shards = tar_shards(text)
    if shards is not None:
        items = tar_items(shards, IMAGE_SUFFIXES)
        if not items:
            raise ProbeError(f"the tar shard(s) {text!r} hold no image members ({', '.join(sorted(IMAGE_SUFFIXES)[:5])}, ...)")
        return items, f"{len(shards)} tar shard(s) {text} ({len(items)} images)"
    return _expand(source), None


def collect_images(
    images: str | Path | Sequence[str | Path] | None,
    num_images: int | None = None,
    seed: int = 0,
    input_side: int | None = None,
    *,
    workers: int | None = None,
) -> ImageSet:
    """Resolve ``images`` to an :class:`ImageSet`.

    Args:
        images: a folder (searched recursively), a file, a glob, WebDataset tar shards (a brace
            pattern ``shards-{000..003}.tar``, a glob or a folder of ``.tar`` files), a Hugging
            Face dataset ``"hf-dataset:PATH[:split]"`` (a ``save_to_disk`` folder, an ``.arrow``
            or ``.parquet`` file; :mod:`probe.sources`), a list of those, a list of
            ``PIL.Image``, or ``None`` for the embedded default photos (:func:`default_images`).
        num_images: keep at most this many; when fewer than available, a seeded random subset
            (in sorted order) is taken so that a subset is not one class of a sorted folder.
        seed: seed of that subset.
        input_side: the model's input side (pixels), which picks the default images.
        workers: decoding worker processes for :func:`iter_batches` (``ImageSet.workers``);
            None: :func:`default_workers`.

    Raises:
        ProbeError: for ``num_images < 1``, a missing path, no image files, a bad dataset or
            shard specification, ``workers < 0``.
    """
    found = _collect(images, num_images, seed, input_side)
    if workers is not None:
        _check_workers(workers)
        found.workers = workers
    return found


def _collect(images: Any, num_images: int | None, seed: int, input_side: int | None) -> ImageSet:
    if num_images is not None and num_images < 1:
        raise ProbeError(f"--num-images must be at least 1, got {num_images}")
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray):
        images = _arrays_to_pil(images)
    root = None
    if images is None:
        found = default_images(input_side, seed=seed)
    elif isinstance(images, (list, tuple)) and images and all(isinstance(i, Image.Image) for i in images):
        found = ImageSet([(f"image_{i}", im) for i, im in enumerate(images)], f"{len(images)} in-memory images")
    else:
        sources = [images] if isinstance(images, (str, Path)) else list(images) if isinstance(images, (list, tuple)) else None
        if not sources or not all(isinstance(x, (str, Path)) and str(x) for x in sources):
            kinds = sorted({type(x).__name__ for x in sources}) if sources else [type(images).__name__]
            raise ProbeError(
                f"images must be a folder, file or glob, a list of paths, a list of PIL images, a NumPy "
                f"array or a tensor; got {' and '.join(kinds)}"
                + (" mixed in one list: pass paths or PIL images, not both" if sources and len(kinds) > 1 else "")
            )
        if len(sources) == 1 and Path(sources[0]).is_dir():
            root = Path(sources[0])
        paths: list[Any] = []
        described: list[str] = []
        for s in sources:
            items, what = _source_items(s)
            paths.extend(items)
            if what:
                described.append(what)
        if not paths:
            raise ProbeError(
                f"no image files found in {', '.join(map(str, sources))}; --images needs a folder, "
                f"file or glob with {', '.join(sorted(IMAGE_SUFFIXES)[:5])}, ... files, tar shards or "
                "hf-dataset:PATH"
            )
        if described and len(described) == len(sources):
            desc = "; ".join(described)
            root = None
        elif len(sources) <= 3:
            desc = ", ".join(map(str, sources))
        else:
            import os.path

            common = os.path.commonpath([str(Path(x).parent) for x in sources]) or "."
            desc = f"{len(sources)} files under {common}"
        found = ImageSet(list(paths), desc, root=root)
    if num_images is not None and num_images < len(found.items):
        order = random.Random(seed).sample(range(len(found.items)), len(found.items))
        idx = sorted(order[:num_images])
        found = ImageSet([found.items[i] for i in idx], found.description,
                         reserve=[found.items[i] for i in order[num_images:]], root=found.root)
    return found


def _arrays_to_pil(arr: np.ndarray) -> list[Image.Image]:
    """A uint8 image array ``(H, W)``, ``(H, W, C)`` or ``(N, H, W, C)`` as PIL images."""
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.ndim not in (2, 3, 4) or (a.ndim >= 3 and a.shape[-1] not in (1, 3, 4)):
        raise ProbeError(f"a NumPy image array must be uint8 (H, W), (H, W, C) or (N, H, W, C) with C in 1, 3, 4; "
                         f"got {a.dtype} {a.shape}; for transformed float input pass a torch tensor (N, C, H, W)")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 3, 4) and a.shape[0] > 4):
        a = a[None]
    return [Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x) for x in a]


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (``I;16*``, ``I``, ``F``) scaled to 8 bits instead of clipped."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F" and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif im.mode.startswith("I;16") or np.nanmax(a) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")
    return im


def decode_image(item: Any, mode: str) -> Image.Image:
    """The one decoding path (files, in-memory ``(name, PIL.Image)`` pairs and the lazy items of
    :mod:`probe.sources`): open, apply EXIF orientation (``ImageOps.exif_transpose``, as photo
    viewers do), scale 16/32-bit grayscale to 8 bits, convert to ``mode``.

    Raises:
        OSError / ValueError / ``PIL.Image.DecompressionBombError`` for files that cannot be read
        (callers skip them).
    """
    if isinstance(item, tuple):
        return _to_8bit(item[1]).convert(mode)
    with Image.open(item.open() if isinstance(item, LazyImage) else item) as im:
        im = ImageOps.exif_transpose(im)
        return _to_8bit(im).convert(mode)



#: Exceptions of a file that cannot be decoded (the image is skipped, not the run).
_UNREADABLE = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError,
               Image.DecompressionBombWarning, SyntaxError)
#: Set by :func:`workers_default` (the CLI's ``--workers``).
_WORKERS_OVERRIDE: int | None = None


def _check_workers(workers: Any) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ProbeError(f"--workers must be a non-negative integer (0: decode in this process), got {workers!r}")


def cpu_count() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(num_images: int | None = None, batch_size: int | None = None, cpus: int | None = None) -> int:
    """Decoding worker processes when none are asked for: ``min(4, CPUs − 1)`` (one CPU is left
    for the forward pass, and more than four rarely pay for a ViT's batch); 0 (decode in this
    process) on at most two CPUs — there a worker only takes a core from the forward pass, which
    is the bottleneck (``bench/RESULTS-loader.md``: decoding 290 images/s, DeiT-Tiny's forward 48)
    — and for at most two batches of images, where starting workers costs more than it saves.
    :func:`workers_default` overrides it. ``cpus``: the CPUs this process may use (default
    :func:`cpu_count`; a distributed rank passes its share of the machine).
    """
    if _WORKERS_OVERRIDE is not None:
        return _WORKERS_OVERRIDE
    cpus = cpu_count() if cpus is None else max(1, int(cpus))
    n = min(4, cpus - 1) if cpus > 2 else 0
    if n <= 0 or (num_images is not None and batch_size is not None and num_images <= 2 * batch_size):
        return 0
    return n


@contextlib.contextmanager
def workers_default(workers: int | None) -> Iterator[None]:
    """Within the block, :func:`default_workers` returns ``workers`` (None: no override).

    Raises:
        ProbeError: for a negative or non-integer ``workers``.
    """
    global _WORKERS_OVERRIDE
    if workers is not None:
        _check_workers(workers)
    before, _WORKERS_OVERRIDE = _WORKERS_OVERRIDE, workers
    try:
        yield
    finally:
        _WORKERS_OVERRIDE = before


class _DecodedChunks(torch.utils.data.Dataset):
    """Chunk ``k``: items ``[k * size, (k + 1) * size)`` decoded and transformed.

    Returns ``(entries, tensor)``: ``entries`` one ``(name, error or None)`` per item in order,
    ``tensor`` the readable ones stacked ``(n_ok, C, H, W)`` (None when none is readable).
    """

    def __init__(self, items: Sequence[Any], transform: Callable, mode: str, size: int) -> None:
        self.items, self.transform, self.mode, self.size = items, transform, mode, size

    def __len__(self) -> int:
        return -(-len(self.items) // self.size)

    def __getitem__(self, k: int) -> tuple[list[tuple[str, str | None]], torch.Tensor | None]:
        entries: list[tuple[str, str | None]] = []
        tensors = []
        for item in self.items[k * self.size:(k + 1) * self.size]:
            name = item_name(item)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    img = decode_image(item, self.mode)
            except _UNREADABLE as e:
                entries.append((name, " ".join(str(e).split())[:200] or type(e).__name__))
                continue
            tensors.append(self.transform(img))
            entries.append((name, None))
        return entries, (torch.stack(tensors) if tensors else None)


def iter_batches(
    images: ImageSet,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    mode: str = "RGB",
    *,
    workers: int | None = None,
    pin_memory: bool | None = None,
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Yield ``(batch (B, C, H, W) float32, names)``: the images decoded in a
    ``torch.utils.data.DataLoader`` (chunks of ``batch_size`` images per worker, returned in
    order), a few batches in memory.

    The batches are the same, in the same order, whatever the number of workers. Unreadable
    files are skipped with a ``UserWarning`` (in this process, in order) and appended to
    ``images.skipped``; as many images of ``images.reserve`` as were skipped are then read in
    their place (again, until the reserve is used up), so a ``--num-images N`` subset yields N
    readable images when the source has them. Reserve images are read only when needed.

    Args:
        images: the images.
        transform: PIL image -> ``(C, H, W)`` float tensor (run in the workers).
        batch_size: images per batch (the last may be smaller).
        mode: PIL mode the images are converted to (``"RGB"``, ``"L"``).
        workers: decoding worker processes; 0 decodes in this process; None:
            ``images.workers``, else 0 for in-memory PIL images and :func:`default_workers`
            for files and lazy items.
        pin_memory: batches in page-locked memory for fast, asynchronous copies to a GPU
            (``batch.to("cuda", non_blocking=True)``); None or True: when CUDA is available
            (without CUDA there is nothing to pin for); False: never.

    Raises:
        ProbeError: if ``batch_size < 1``, ``workers < 0``, or no image at all could be read.
    """
    for batch, names, _ in iter_indexed_batches(images, transform, batch_size, mode, workers=workers,
                                                pin_memory=pin_memory):
        yield batch, names


def iter_indexed_batches(
    images: ImageSet,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    mode: str = "RGB",
    *,
    workers: int | None = None,
    pin_memory: bool | None = None,
    start: int = 0,
    stop: int | None = None,
    reserve_part: tuple[int, int] = (0, 1),
    require_any: bool = True,
) -> Iterator[tuple[torch.Tensor, list[str], list[int]]]:
    """:func:`iter_batches` with each image's index, optionally for one shard of the images.

    Yields ``(batch, names, indices)``: ``indices[j]`` is the position of image ``j`` in
    ``images.items`` (``len(items) + k`` for the ``k``-th reserve item), increasing. A
    distributed rank (:mod:`probe.distributed`) reads ``items[start:stop]`` and, in place of its
    unreadable ones, the reserve items ``k`` with ``k % parts == part`` (``reserve_part = (part,
    parts)``), so ranks never read the same image.

    Args:
        images, transform, batch_size, mode, workers, pin_memory: as :func:`iter_batches`.
        start, stop: the slice of ``images.items`` to read (default all).
        reserve_part: ``(part, parts)``, the share of the reserve this reader may use.
        require_any: raise when no image could be read (off for a shard: the ranks decide
            together).

    Raises:
        ProbeError: as :func:`iter_batches` (the last only with ``require_any``).
    """
    if batch_size < 1:
        raise ProbeError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is None:
        workers = getattr(images, "workers", None)
    if workers is not None:
        _check_workers(workers)
    pin = torch.cuda.is_available() and (pin_memory is None or bool(pin_memory))  # pinning needs CUDA
    n_items = len(images.items)
    stop = n_items if stop is None else min(stop, n_items)
    start = min(max(0, start), stop)
    part, parts = reserve_part
    wanted = stop - start
    pieces: list[torch.Tensor] = []
    names: list[str] = []
    index: list[int] = []
    n_pending = n_ok = 0
    skipped_before, first_error = len(images.skipped), ""

    def take(k: int) -> torch.Tensor:
        out, need = [], k
        while need:
            p = pieces[0]
            if p.shape[0] <= need:
                out.append(pieces.pop(0))
                need -= p.shape[0]
            else:
                out.append(p[:need])
                pieces[0] = p[need:]
                need = 0
        if len(out) == 1:
            return out[0]
        batch = torch.cat(out)
        return batch.pin_memory() if pin else batch

    todo: Sequence[Any] = images.items[start:stop]
    todo_index: list[int] = list(range(start, stop))
    reserve_index = list(range(part, len(images.reserve), parts))
    next_reserve = 0
    while len(todo):
        if workers is not None:
            n_workers = workers
        elif all(isinstance(i, tuple) for i in todo):  # in-memory images: nothing to decode in parallel
            n_workers = 0
        else:
            n_workers = default_workers(len(todo), batch_size)
        chunks = _DecodedChunks(todo, transform, mode, batch_size)
        loader = torch.utils.data.DataLoader(chunks, batch_size=None, shuffle=False,
                                             num_workers=min(n_workers, len(chunks)), pin_memory=pin)
        for k, (entries, tensor) in enumerate(loader):
            for j, (name, err) in enumerate(entries):
                if err is not None:
                    images.skipped.append(name)
                    first_error = first_error or f"{name}: {err}"
                else:
                    names.append(name)
                    index.append(todo_index[k * batch_size + j])
            if tensor is not None:
                pieces.append(tensor)
                n_pending += tensor.shape[0]
                n_ok += tensor.shape[0]
            while n_pending >= batch_size:
                batch = take(batch_size)
                yield batch, names[:batch_size], index[:batch_size]
                del names[:batch_size], index[:batch_size]
                n_pending -= batch_size
        missing = wanted - n_ok  # the reserve replaces unreadable ones, as many as were skipped
        picked = reserve_index[next_reserve:next_reserve + missing] if missing > 0 else []
        todo = [images.reserve[k] for k in picked]
        todo_index = [n_items + k for k in picked]
        next_reserve += len(todo)
    if n_pending:
        yield take(n_pending), names, index
    n_skipped = len(images.skipped) - skipped_before
    if n_skipped:  # one line for all of them (a folder may hold thousands)
        more = f" (and {n_skipped - 1:,} more unreadable files, replaced from the other images)" if n_skipped > 1 else ""
        warnings.warn(f"skipping unreadable image {first_error}{more}", stacklevel=2)
    if n_ok == 0 and require_any:
        raise ProbeError(
            f"none of the {len(images.items)} image file(s) in {images.description} could be read "
            f"({len(images.skipped)} unreadable); pass a folder of JPEG/PNG images to --images"
        )


def built_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The ``(H, W)`` a timm model was built for when it differs from what its ``pretrained_cfg``
    says: ``timm.create_model(name, img_size=96)`` keeps the config's 224 px, but its fixed-size
    patch embedding (``patch_embed.img_size``, ``strict_img_size``) only takes 96 px. ``None`` for
    models without such an embedding or with a dynamic input size (``dynamic_img_size``)."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if pe is None or getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
        return None
    if not getattr(pe, "strict_img_size", True):
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        return None
    return int(size[0]), int(size[1])


def eval_transform(model: torch.nn.Module, overrides: dict[str, Any] | None = None) -> tuple[Callable, dict]:
    """The model's own eval transform (timm data config), with optional overrides.

    Args:
        model: the model; its ``pretrained_cfg`` (timm convention: ``input_size``, ``mean``,
            ``std``, ``interpolation``, ``crop_pct``) is read when present.
        overrides: values replacing those of the config (e.g. ``{"input_size": (1, 32, 32)}``).

    Returns:
        ``(transform, data_config)``; the transform maps a PIL image to ``(C, H, W)`` float32.
    """
    from timm.data import create_transform, resolve_data_config

    args = dict(overrides or {})
    cfg = resolve_data_config(args, model=model)
    cfg.update({k: v for k, v in args.items() if v is not None})
    if args.get("input_size") is None:
        built = built_input_size(model)
        if built is not None and tuple(cfg["input_size"][1:]) != built:
            cfg["input_size"] = (int(cfg["input_size"][0]), *built)
    channels = int(cfg["input_size"][0])
    for key in ("mean", "std"):  # a 1-channel (grayscale) model needs 1-value mean/std
        vals = tuple(float(v) for v in cfg[key])
        if len(vals) != channels:
            if len(set(vals)) != 1:
                raise ProbeError(
                    f"the model takes {channels} input channel(s) but its {key} has {len(vals)} values "
                    f"{vals}; pass --{key} with {channels} value(s)"
                )
            vals = vals[:1] * channels
        cfg[key] = vals
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    tf = create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=False)
    return tf, cfg
