"""Distributed runs: the images sharded across processes, the reducers' sums all-reduced.

``torchrun --nproc-per-node N -m probe analyze ...`` (or ``probe.analyze(..., distributed=True)``
in a script started by ``torchrun``) runs one process per rank. Every rank resolves the model and
the same image list, then reads only its **shard**: a contiguous run of whole batches (rank
``r`` of ``W`` gets batches ``[r q + min(r, m), (r + 1) q + min(r + 1, m))`` of the ``q W + m``
batches, so rank 0 holds the first images and every rank runs the batches a single process
would run). Each rank feeds its own streaming reducers; their sums (:meth:`state`, float64 /
int64) are combined with ``torch.distributed.all_reduce`` (:func:`all_reduce_reducers`); rank 0
then runs the fits and tests on the merged statistics and returns the
:class:`~probe.result.AnalysisResult` (and the CLI writes the report); the other ranks return
``None`` and write nothing.

What is the same as a single-process run:

* every streaming statistic, to float64 rounding (sums are accumulated image by image in
  float64 and the batches are the single-process ones), hence ``heads.csv`` and ``layers.csv``
  to about 1e-12 relative (tested with gloo on the CPU, ``tests/test_distributed.py``), as long
  as the CPU's float32 matrix kernels round an image's row the same at any position in a chunk;
  some do not (an AMD EPYC: about 1e-7 relative per image), and then the columns agree to
  float32 rounding instead;
* the bootstrap replicates: image ``i``'s Poisson weights are row ``i`` of one seeded stream,
  whichever rank reads it (:class:`~probe.analyses.reducers.LayerReducer`);
* the analyses that use the first images (the example photo under the query maps, attribution,
  rollout, sinks, the conv test's random-init null): they run on rank 0 only, after the capture,
  on the global first images (rank 0's own, completed from the next ranks when its shard is
  shorter than they ask for; the null re-reads the first images of the image list).

What may differ: with unreadable files in a ``--num-images`` subset, each rank replaces its own
from its share of the reserve (every ``W``-th item), so the replacement images differ from a
single-process run; with unreadable files the batches after them are packed differently, which
changes float32 rounding of models whose per-image output depends on the batch composition.

Backends: ``gloo`` on the CPU; ``nccl`` with ``--device cuda``, one GPU per rank
(``cuda:LOCAL_RANK``): ``torchrun --nproc-per-node 8 -m probe analyze --device cuda ...`` on one
machine with 8 GPUs, or ``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-endpoint HOST:PORT ...``
across machines (every machine must see the same ``--images``).

A script that calls ``probe.analyze(..., distributed=True)`` ends with :func:`shutdown` (as the
CLI does), so that no process group is left to the interpreter's exit.

Precision: the standard errors (``*_se``) are computed from sums of squares,
``(sum x^2 - n mean^2) / (n - 1)``, whose float64 rounding, about ``eps (mean / sd)^2``
relative, differs between any two summation orders (a single-process run with another batch
size, or a distributed one): 1e-12 at ``sd / mean`` of about 1.5 %, far more for near-uniform
attention at random initialisation (``sd / mean`` ~ 1e-4), and pure noise for the embedded
model, whose attention does not depend on the image at all (its standard errors are 0). Every
other column, and standard errors of values that vary from image to image by a few percent or
more, as in trained models, agree to about 1e-13 (``tests/test_distributed.py``: 6e-14 at
5-8 %).

Errors: every rank takes part in an agreement step before the capture and another after it
(:meth:`Distributed.agree`), so an error on one rank (a bad argument, an unreadable image
folder, a rank whose data differ) stops every rank with a message naming the rank, instead of
leaving the others waiting in a collective.

Source: the collectives of ``torch.distributed`` (all_gather, all_reduce, send/recv).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ProbeError

#: Environment variables torchrun sets for each worker (``env://`` initialisation).
ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent launcher) as one of
    several ranks: ``RANK`` and ``WORLD_SIZE`` are set and ``WORLD_SIZE > 1``."""
    try:
        return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class Distributed:
    """This process's place in a distributed run.

    Attributes:
        rank, world_size: of the default process group.
        local_rank, local_world_size: on this machine (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``).
        backend: ``"gloo"`` or ``"nccl"``.
        device: where collective tensors live: the CPU for gloo, ``cuda:LOCAL_RANK`` for nccl.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: runs the analyses and writes the report."""
        return self.rank == 0

    # -- sharding -------------------------------------------------------------------------
    def shard(self, n_images: int, batch_size: int) -> tuple[int, int]:
        """``[start, stop)``: this rank's images among ``n_images`` read in batches of
        ``batch_size`` (whole batches, contiguous, earlier ranks first; see the module doc)."""
        return shard_range(n_images, batch_size, self.rank, self.world_size)

    # -- collectives ----------------------------------------------------------------------
    def all_gather_json(self, obj: Any) -> list[Any]:
        """``obj`` (JSON-serialisable) of every rank, in rank order (UTF-8 bytes in uint8
        tensors: no pickle)."""
        import torch.distributed as dist

        raw = bytearray(json.dumps(obj).encode())
        data = (torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)).to(self.device)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[:data.numel()] = data
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [json.loads(p[:int(s)].cpu().numpy().tobytes().decode()) for p, s in zip(parts, sizes)]

    def agree(self, error: BaseException | None = None, facts: dict[str, Any] | None = None) -> None:
        """Every rank's outcome so far: return when every rank succeeded and all report the same
        ``facts``; otherwise raise on every rank (the failed rank re-raises its own ``error``).

        Every rank must call it at the same point (it is a collective).

        Raises:
            ProbeError: on the ranks that did not fail, naming the rank that did and its
                message; on every rank when the ``facts`` differ (e.g. a different image count).
        """
        if error is None:
            message = None
        elif isinstance(error, ProbeError):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {error}"
        mine = {"error": message, "facts": facts or {}}
        every = self.all_gather_json(mine)
        failed = [(r, e["error"]) for r, e in enumerate(every) if e["error"] is not None]
        if error is not None:
            raise error
        if failed:
            r, msg = failed[0]
            others = f" (and rank(s) {', '.join(str(q) for q, _ in failed[1:])})" if len(failed) > 1 else ""
            raise ProbeError(f"rank {r} of {self.world_size}{others} failed, so every rank stops: {msg}")
        first = every[0]["facts"]
        for r, e in enumerate(every[1:], start=1):
            if e["facts"] != first:
                diff = sorted(k for k in set(first) | set(e["facts"]) if first.get(k) != e["facts"].get(k))
                shown = "; ".join(f"{k}: rank 0 {first.get(k)!r}, rank {r} {e['facts'].get(k)!r}" for k in diff)
                raise ProbeError(f"the ranks of the distributed run disagree ({shown}); start every rank with "
                                 "the same arguments, and give every machine the same images and model")

    def sum_int(self, value: int) -> int:
        """The sum over ranks of ``value``."""
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def gather_first(self, mine: torch.Tensor | None, want: int) -> torch.Tensor | None:
        """The first ``want`` rows of the concatenation, in rank order, of every rank's ``mine``
        (each rank passes at most ``want`` rows; ``None`` for none), on rank 0; ``None`` on the
        other ranks and when no rank has a row. Rows are sent only as far as rank 0 needs them.

        Args:
            mine: ``(n, ...)`` float tensor on any device.
            want: rows wanted.
        """
        import torch.distributed as dist

        n = 0 if mine is None else int(mine.shape[0])
        info = self.all_gather_json({"n": n, "shape": None if mine is None else list(mine.shape[1:])})
        plan, left = [], want
        for entry in info:
            take = min(entry["n"], max(0, left))
            plan.append(take)
            left -= take
        shape = next((e["shape"] for e in info if e["n"]), None)
        if shape is None:
            return None
        if self.rank != 0:
            if plan[self.rank]:
                dist.send(mine[:plan[self.rank]].float().contiguous().to(self.device), dst=0)
            return None
        parts = [mine[:plan[0]].float()] if plan[0] else []
        for r in range(1, self.world_size):
            if plan[r]:
                buf = torch.empty(plan[r], *shape, dtype=torch.float32, device=self.device)
                dist.recv(buf, src=r)
                parts.append(buf.to(mine.device if mine is not None else buf.device))
        return torch.cat(parts) if parts else None


def shard_range(n_images: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s images: the ``ceil(n_images / batch_size)`` batches
    split into ``world_size`` contiguous runs, the first ``m`` ranks one batch longer
    (``q, m = divmod(batches, world_size)``); ``start`` is a multiple of ``batch_size``.

    Raises:
        ProbeError: for a rank outside ``[0, world_size)`` or non-positive sizes.
    """
    if world_size < 1 or not 0 <= rank < world_size or batch_size < 1 or n_images < 0:
        raise ProbeError(f"bad shard request: rank {rank} of {world_size}, {n_images} images, batch {batch_size}")
    batches = -(-n_images // batch_size)
    q, m = divmod(batches, world_size)
    first = rank * q + min(rank, m)
    last = first + q + (1 if rank < m else 0)
    return min(first * batch_size, n_images), min(last * batch_size, n_images)


def setup(device: str | torch.device = "cpu", timeout_s: float | None = None) -> Distributed:
    """Join the distributed run this process was started in (``torchrun``'s environment,
    ``env://``), initialising the default process group unless it already is: ``gloo`` on the
    CPU, ``nccl`` for ``cuda`` (each rank on ``cuda:LOCAL_RANK``, made the current device). A
    group initialised here is destroyed at interpreter exit (:func:`shutdown`, ``atexit``); one
    the caller initialised is left to the caller.

    Args:
        device: the run's device (``--device``): picks the backend.
        timeout_s: collective timeout (default torch's: 30 minutes for gloo, 10 for nccl).

    Returns:
        The :class:`Distributed` of this process.

    Raises:
        ProbeError: without the launcher's environment (``RANK``, ``WORLD_SIZE``,
            ``MASTER_ADDR``, ``MASTER_PORT``) when no process group is initialised, or when
            ``torch.distributed`` is unavailable.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise ProbeError("torch.distributed is not available in this torch build; run without --distributed")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    cuda = dev.type == "cuda" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if not dist.is_initialized():
        missing = [v for v in ENV_VARS if v not in os.environ]
        if missing:
            raise ProbeError(f"a distributed run needs the launcher's environment ({', '.join(missing)} not set); "
                             "start it as: torchrun --nproc-per-node N -m probe analyze ... "
                             "(or python -m torch.distributed.run ...)")
        if cuda:
            torch.cuda.set_device(local_rank)
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=float(timeout_s))}
        dist.init_process_group("nccl" if cuda else "gloo", **kw)
        import atexit

        atexit.register(shutdown)  # a library script need not call shutdown() (gloo aborts otherwise)
    backend = str(dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    if "nccl" in backend:
        comm = torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    return Distributed(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                       backend=backend, device=comm)


def shutdown() -> None:
    """Destroy the default process group if one is initialised (end of a distributed CLI run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_mergeable(reducers: Sequence[tuple[str, Any]]) -> None:
    """Every ``(analysis name, reducer)`` has ``state`` and ``load_state`` (see
    :class:`~probe.analyses.base.Reducer`).

    Raises:
        ProbeError: naming the first analysis whose reducer cannot be merged across ranks.
    """
    for name, r in reducers:
        if not (callable(getattr(r, "state", None)) and callable(getattr(r, "load_state", None))):
            raise ProbeError(f"analysis {name!r} has a reducer ({type(r).__name__}) without state()/load_state(), so "
                             "its sums cannot be combined across ranks; add them (probe.analyses.base.Reducer) "
                             "or run without --distributed")


def all_reduce_reducers(dist_run: Distributed, reducers: Sequence[Any]) -> None:
    """Combine every reducer's sums over the ranks: ``state()`` of each (the same reducers in the
    same order on every rank), summed with ``torch.distributed.all_reduce`` (float64 and int64
    tensors, one collective per tensor), loaded back with ``load_state``. A rank whose reducer
    saw no image (``state() is None``) takes part with zeros of the shapes another rank reports;
    a reducer no rank fed is left as it is (its ``result()`` raises as in a single-process run).

    Raises:
        ProbeError: for a state tensor that is neither float64 nor int64, or when the ranks
            report different keys or shapes for the same reducer.
    """
    import torch.distributed as dist

    states: list[Any] = []
    error: Exception | None = None
    try:
        states = [r.state() for r in reducers]
    except Exception as e:  # noqa: BLE001 - every rank must hear of it (agree), not wait in a collective
        error = e
    dist_run.agree(error)
    specs = [None if st is None else {k: [_dtype_name(st[k]), list(getattr(st[k], "shape", ()))] for k in sorted(st)}
             for st in states]
    every = dist_run.all_gather_json(specs)
    # per reducer, the specs of the ranks that fed it: the same on every rank (gathered)
    knowns = [[s[i] for s in every if s[i] is not None] for i in range(len(reducers))]
    for r, known in zip(reducers, knowns):  # every check before any collective
        if not known:
            continue
        if any(s != known[0] for s in known):
            raise ProbeError(f"the ranks' {type(r).__name__} states disagree in keys, dtypes or shapes ({known[0]} vs "
                             f"{next(s for s in known if s != known[0])}); every rank must see the same model")
        bad = {k: v[0] for k, v in known[0].items() if v[0] not in ("float64", "int64")}
        if bad:
            raise ProbeError(f"reducer {type(r).__name__}: state tensors must be float64 or int64 (sums merge exactly "
                             f"only in float64), got {bad}")
    for r, known, mine in zip(reducers, knowns, states):
        if not known:
            continue
        out = {}
        for k, (dtype, shape) in known[0].items():
            if mine is None:
                t = torch.zeros(shape, dtype=getattr(torch, dtype), device=dist_run.device)
            else:
                t = mine[k].detach().to(dist_run.device, copy=True)
            dist.all_reduce(t)
            out[k] = t
        r.load_state(out)


def _dtype_name(t: Any) -> str:
    """``"float64"`` for a float64 tensor, ``"not a tensor (int)"`` for anything else."""
    if isinstance(t, torch.Tensor):
        return str(t.dtype).replace("torch.", "")
    return f"not a tensor ({type(t).__name__})"
