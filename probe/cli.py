"""Command line: ``probe analyze --model NAME [--weights FILE] [--images DIR|FILE|GLOB] ...``."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import ProbeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="probe — what did these attention heads learn?")
console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` as one line (never wrapped; colour only on a terminal) and return
    the exit to raise."""
    from rich.markup import escape

    console.print(f"[red]error:[/] {escape(' '.join(str(message).split()))}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def _interrupted() -> "typer.Exit":
    console.print("interrupted", soft_wrap=True, highlight=False)
    return typer.Exit(130)


def _status(text: str):
    """A started spinner line ``starting: text ...`` on the terminal (nothing in a pipe or log);
    ``.stop()`` it before any other live display starts."""
    status = console.status(f"[bold]starting[/]: {text} …", spinner="dots")
    status.start()
    return status


def _stop(status) -> None:
    """Stop a spinner of :func:`_status` (None: nothing)."""
    if status is not None:
        status.stop()


@contextlib.contextmanager
def _cli_call():
    """Within the block the library's errors name the command's flags only (probe.options)."""
    from .options import CLI_CALL

    token = CLI_CALL.set(True)
    try:
        yield
    finally:
        CLI_CALL.reset(token)


@contextlib.contextmanager
def _loading(text: str):
    """A spinner while the heavy modules (torch, timm, ...) load, seconds on a fresh machine."""
    status = _status(text)
    try:
        yield
    finally:
        status.stop()


#: ``running``: a command's own code runs (it reports Ctrl-C itself, :func:`_interruptible`).
_CTRL_C = {"running": False}


def _note_interrupt(signum, frame) -> None:
    """SIGINT handler of the command line. Before a command's code runs (typer parsing its
    options, which would end the process silently): ``interrupted``, exit 130 at once; then a
    KeyboardInterrupt as usual."""
    if not _CTRL_C["running"]:
        _interrupted()
        raise SystemExit(130)
    signal.default_int_handler(signum, frame)


def _interruptible(command):
    """A command whose Ctrl-C anywhere (also while its imports load) ends with ``interrupted``,
    exit 130."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        _CTRL_C["running"] = True
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise _interrupted() from None
        finally:
            _CTRL_C["running"] = False
            if signal.getsignal(signal.SIGINT) is _note_interrupt:  # e.g. CliRunner in a test process
                signal.signal(signal.SIGINT, signal.default_int_handler)

    return run


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"probe {version('probe')}")
        raise typer.Exit()


@app.callback(context_settings={"help_option_names": ["-h", "--help"]})
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Analyse the attention heads of trained vision transformers."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _note_interrupt)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


@app.command()
@_interruptible
def analyze(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="default: probe's embedded attention-only CIFAR-10 model (Cordonnier et al. 2020; no download); or a timm name or alias (vit_small, deit_tiny, ...), package.module:factory, hf:FOLDER / hf:ORG/NAME (Hugging Face), open_clip:ARCH[:TAG] (OpenCLIP image tower), or torchvision:NAME[:WEIGHTS]", rich_help_panel="Model"),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="local checkpoint: .safetensors, or .pth/.pt read with weights_only=True", rich_help_panel="Model"),
    random_init: bool = typer.Option(False, "--random-init", help="analyse untrained weights (explicit opt-in)", rich_help_panel="Model"),
    images: Optional[str] = typer.Option(None, "--images", "-i", help="folder, file or glob; WebDataset tar shards ('shards-{000..003}.tar', a glob or a folder of .tar); hf-dataset:PATH[:split] (a datasets save_to_disk folder, .arrow or .parquet file); default: scikit-learn's two sample photos", rich_help_panel="Images"),
    workers: Optional[int] = typer.Option(None, "--workers", help="image-decoding worker processes (0: in this process); default min(4, CPUs - 1), 0 on at most 2 CPUs or for at most two batches", rich_help_panel="Images"),
    layers: str = typer.Option("all", "--layers", "-l", help="'all', a range '0-4' or a list '0,2,5'", rich_help_panel="Analyses"),
    num_images: Optional[int] = typer.Option(None, "--num-images", "-n", help="analyse at most N images (seeded random subset)", rich_help_panel="Images"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", rich_help_panel="Images"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda", rich_help_panel="Images"),
    amp: bool = typer.Option(False, "--amp", help="bf16 autocast on CUDA", rich_help_panel="Images"),
    seed: int = typer.Option(0, "--seed", rich_help_panel="Images"),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder; default reports/<model>-<timestamp>/", rich_help_panel="Output"),
    prefix_tokens: Optional[int] = typer.Option(None, "--prefix-tokens", help="number of prefix tokens (class, distillation, registers)", rich_help_panel="Model"),
    grid: Optional[str] = typer.Option(None, "--grid", help="patch grid ROWSxCOLS", rich_help_panel="Model"),
    patch_size: Optional[float] = typer.Option(None, "--patch-size", help="pixels per token", rich_help_panel="Model"),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="C,H,W of the model input", rich_help_panel="Model"),
    mean: Optional[str] = typer.Option(None, "--mean", help="per-channel normalisation mean", rich_help_panel="Model"),
    std: Optional[str] = typer.Option(None, "--std", help="per-channel normalisation std", rich_help_panel="Model"),
    fits: bool = typer.Option(True, "--fits/--no-fits", help="fit each head's quadratic-encoding centre Δ and sharpness α", rich_help_panel="Analyses"),
    anisotropic: bool = typer.Option(False, "--anisotropic", help="also fit the full 2x2 covariance form", rich_help_panel="Analyses"),
    conv_test: bool = typer.Option(True, "--conv-test/--no-conv-test", help="test whether layers act like KxK convolutions", rich_help_panel="Conv test"),
    null_seeds: int = typer.Option(3, "--null-seeds", help="random-init copies for the conv test's null (0: skip)", rich_help_panel="Conv test"),
    null_images: int = typer.Option(4, "--null-images", help="images each random-init copy sees (the first analysed ones)", rich_help_panel="Conv test"),
    null_layers: str = typer.Option("candidates", "--null-layers",
                                    help="layers the random-init null runs on: candidates (those it could veto) or all", rich_help_panel="Conv test"),
    local_radius: float = typer.Option(2.0, "--local-radius", help="a head is local when 90% of its attention lies within this many patches of its centre", rich_help_panel="Conv test"),
    kernel_size: Optional[int] = typer.Option(None, "--kernel-size", help="K of the KxK kernel (default sqrt(heads) if a square >= 4, else the largest odd K with K*K <= heads, at least 3; never wider than the patch grid)", rich_help_panel="Conv test"),
    conv_level: float = typer.Option(0.01, "--conv-level", help="significance level of each layer's conv test (its own test: no correction across layers)", rich_help_panel="Conv test"),
    attribution: str = typer.Option("none", "--attribution", help="head attribution with captum (opt-in: it costs about 2x the rest of a run): ig, ablation, both or none", rich_help_panel="Attribution"),
    attribution_images: int = typer.Option(16, "--attribution-images", help="the first N analysed images are used for the attribution", rich_help_panel="Attribution"),
    query: Optional[str] = typer.Option(None, "--query", help="query patch ROW,COL whose mean attention map the report shows (default: the central patch)", rich_help_panel="Output"),
    analysis: Optional[list[str]] = typer.Option(None, "--analysis", metavar="NAME", help="also run this registered analysis: distance_modes, nmi, rollout, sinks, or one of your own (repeatable; docs/analyses.md)", rich_help_panel="Analyses"),
    set_option: Optional[list[str]] = typer.Option(None, "--set", metavar="ANALYSIS.OPTION=VALUE", help="an analysis option, ANALYSIS.OPTION=VALUE (repeatable), e.g. quadratic.anisotropic=true", rich_help_panel="Analyses"),
    distributed: Optional[bool] = typer.Option(None, "--distributed/--no-distributed", help="shard the images across the ranks of a torchrun launch (torchrun --nproc-per-node N -m probe analyze ...; gloo on cpu, nccl with --device cuda, one GPU per rank); rank 0 writes the report. Default: on when started by torchrun with WORLD_SIZE > 1", rich_help_panel="Images"),
) -> None:
    """Capture attention, compute per-head statistics and write report.html and heads.csv."""
    from .preflight import check_image_path, check_model_spec

    world = os.environ.get("WORLD_SIZE", "1").strip()
    torchrun = "RANK" in os.environ and world.isdigit() and int(world) > 1  # as probe.distributed.launched()
    checked = None
    # every option of the command checked in one call (main: whether this process writes the output)
    check_options = functools.partial(_checked_options, model=model, out=out, input_size=input_size, mean=mean,
                                      std=std, num_images=num_images, batch_size=batch_size,
                                      attribution_images=attribution_images, patch_size=patch_size,
                                      null_seeds=null_seeds, null_images=null_images, local_radius=local_radius,
                                      conv_level=conv_level, kernel_size=kernel_size, query=query,
                                      set_option=set_option)
    try:  # what needs no torch is checked before torch loads: an error line at once
        check_model_spec(model, weights, random_init)
        check_image_path(images)
        if not (distributed or (distributed is None and torchrun)):
            checked = check_options(True)
    except ProbeError as e:
        raise _fail(str(e))
    with _loading("loading torch and the model libraries"):
        from .pipeline import analyze as run_analysis

    dist_run = None
    try:
        from .distributed import launched, setup

        if distributed or (distributed is None and launched()):
            dist_run = setup(device)
    except ProbeError as e:
        raise _fail(str(e))
    main = dist_run is None or dist_run.is_main
    try:
        return _analyze(dist_run, main, checked, check_options, model=model, weights=weights, random_init=random_init, images=images,
                        workers=workers, layers=layers, num_images=num_images, batch_size=batch_size,
                        device=device, amp=amp, seed=seed, out=out, prefix_tokens=prefix_tokens, grid=grid,
                        patch_size=patch_size, input_size=input_size, mean=mean, std=std, fits=fits,
                        anisotropic=anisotropic, conv_test=conv_test, null_seeds=null_seeds,
                        null_images=null_images, null_layers=null_layers, local_radius=local_radius,
                        kernel_size=kernel_size, conv_level=conv_level,
                        attribution=attribution, attribution_images=attribution_images, query=query,
                        analysis=analysis, set_option=set_option,
                        run_analysis=run_analysis)
    finally:
        if dist_run is not None:
            from .distributed import shutdown

            shutdown()


def _analyze(dist_run, main: bool, checked, check_options, *, model, weights, random_init, images, workers, layers, num_images,
             batch_size, device, amp, seed, out, prefix_tokens, grid, patch_size, input_size, mean, std, fits,
             anisotropic, conv_test, null_seeds, null_images, null_layers, local_radius, kernel_size, conv_level,
             attribution, attribution_images, query, analysis, set_option,
             run_analysis) -> None:
    """``probe analyze`` after the distributed set-up: on a rank other than 0 (``main`` false)
    the output folder is not checked, no progress or summary is shown and nothing is written.
    ``checked``: what :func:`_checked_options` returned before torch loaded (None: check now with
    ``check_options(main)``, the same call with this command's options)."""
    status = None
    try:
        try:
            checked = checked or check_options(main)
        except ProbeError as e:
            if dist_run is not None:
                dist_run.agree(e)  # the other ranks stop at their agreement before the capture
            raise
        out_dir, overrides, analysis_options = checked
        from .data import workers_default
        from .progress import RichProgress

        status = _status("reading the model and the images") if main else None
        progress_ctx = RichProgress(console, on_start=status.stop) if main else contextlib.nullcontext(False)
        with workers_default(workers), progress_ctx as progress:  # one bar per stage (capture, fits, ...)
            with warnings.catch_warnings(record=True) as caught, _cli_call():
                warnings.simplefilter("always", UserWarning)
                result = run_analysis(
                    model, images, layers=layers, weights=weights, random_init=random_init,
                    num_images=num_images, batch_size=batch_size, device=device, amp=amp,
                    seed=seed, prefix_tokens=prefix_tokens, grid=grid,
                    patch_size=patch_size, data_overrides=overrides, progress=progress,
                    fits=fits, anisotropic=anisotropic, conv_test=conv_test and fits,
                    local_radius=local_radius, kernel_size=kernel_size, conv_level=conv_level,
                    null_seeds=null_seeds, null_images=null_images, null_layers=null_layers,
                    attribution=attribution, attribution_images=attribution_images,
                    query=query, analyses=analysis or None,
                    analysis_options=analysis_options or None,
                    distributed=dist_run if dist_run is not None else False,
                )
        _stop(status)
        for w in caught:
            if "unreadable image" in str(w.message):
                from rich.markup import escape

                console.print(f"[yellow]warning:[/] {escape(str(w.message))}", soft_wrap=True, highlight=False)
        if result is None:  # a rank other than 0 of a distributed run: rank 0 writes the report
            return
        import shlex

        result.meta["command"] = "probe " + shlex.join(sys.argv[1:])
        report = result.write_report(out_dir)
    except ProbeError as e:
        _stop(status)
        raise _fail(str(e))
    except KeyboardInterrupt:
        _stop(status)
        raise _interrupted()
    _summary(result)
    console.print(f"report: {report}\nheads table: {report.parent / 'heads.csv'}")


def _checked_options(main: bool, *, model, out, input_size, mean, std, num_images, batch_size,
                     attribution_images, patch_size, null_seeds, null_images, local_radius, conv_level,
                     kernel_size, query, set_option) -> tuple:
    """``(output folder, data overrides, analysis options)`` of ``probe analyze``, every option
    checked before any work; the output folder only on rank 0 (``main``; None elsewhere).

    Raises:
        ProbeError: naming the bad option.
    """
    from .options import check_options, data_overrides_from
    from .preflight import check_output_dir

    overrides = data_overrides_from(None, input_size, mean, std) or {}

    out_dir = None
    if main:
        out_dir = check_output_dir(out if out is not None else
                                   Path("reports") / f"{_safe_name(model or 'cordonnier')}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_options(num_images=num_images, batch_size=batch_size, attribution_images=attribution_images,
                   patch_size=patch_size, null_seeds=null_seeds, null_images=null_images,
                   local_radius=local_radius, conv_level=conv_level, kernel_size=kernel_size,
                   overrides=overrides, query=query)
    from .analyses.base import parse_assignments

    return out_dir, overrides, parse_assignments(set_option)


def _summary(result) -> None:
    meta = result.meta
    t = Table(title=f"{meta['model']} — {meta['num_images']} images, weights: {meta['weights']}")
    for col in ("layer", "heads", "mean dist px (min–max)", "uniform px", "entropy nats", "prefix mass"):
        t.add_column(col, justify="right")
    for _, r in result.layers.iterrows():
        t.add_row(str(int(r.layer)), str(int(r.heads)),
                  f"{r.mean_distance_px:.1f} ({r.min_distance_px:.1f}–{r.max_distance_px:.1f})",
                  f"{r.uniform_distance_px:.1f}", f"{r.entropy_nats:.3f}", f"{r.prefix_mass:.3f}")
    Console().print(t)
    cl = result.extras.get("convlike")
    if cl is not None:
        verdicts = ", ".join(f"{int(r.layer)}: {r.conv_verdict}" for _, r in cl.layers.iterrows())
        Console().print(f"conv test — {cl.summary()}\n  per layer: {verdicts}")
    att = result.extras.get("attribution")
    for m, c in (att["checks"].items() if att else []):
        Console().print(f"attribution ({m}) — {c.summary()}")
    if "attribution_skipped" in result.meta:
        console.print(f"[yellow]attribution skipped:[/] {result.meta['attribution_skipped']}")


@app.command()
@_interruptible
def train(
    train_dir: Optional[Path] = typer.Option(None, "--train", help="training images, ROOT/<class>/<image> (e.g. CIFAR-10's training set as JPEG or PNG files); required", show_default=False),
    test_dir: Optional[Path] = typer.Option(None, "--test", help="test images, same classes: the final accuracy and the tracker's probe batch (default: none, no test accuracy or tracking)", show_default=False),
    out: Path = typer.Option(Path("runs/quadratic"), "--out", "-o", help="run folder (checkpoints, snapshots, logs, model.safetensors); an existing run there resumes"),
    attention: str = typer.Option("quadratic", "--attention", help="quadratic, generalized or relative (Cordonnier et al. 2020)"),
    dim: int = typer.Option(72, "--dim", help="width (paper: 400)"),
    depth: int = typer.Option(6, "--depth"),
    heads: int = typer.Option(9, "--heads"),
    mlp_dim: int = typer.Option(144, "--mlp-dim"),
    epochs: float = typer.Option(100.0, "--epochs", help="passes over the training set (the shipped model: 100)"),
    batch_size: int = typer.Option(100, "--batch-size"),
    lr: float = typer.Option(0.1, "--lr"),
    position_lr_mult: float = typer.Option(20.0, "--position-lr-mult", help="learning-rate factor of Δ and α"),
    position_schedule: str = typer.Option("cosine", "--position-schedule", help="cosine (Δ and α decay with the weights, the shipped model's recipe) or constant (held at lr x mult after warm-up, the previous recipe: its centres never settled)"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="stop (with a checkpoint) after this wall time; run again to resume"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="stop (with a checkpoint) at this step"),
    track_every: int = typer.Option(250, "--track-every", help="probe.track record every N steps (0: off)"),
    limit_train: Optional[int] = typer.Option(None, "--limit-train", help="use only the first N training images (smoke tests)"),
) -> None:
    """Train probe's attention-only CIFAR-10 model (Cordonnier et al. 2020 recipe), resumable."""
    from rich.progress import TimeElapsedColumn

    from .preflight import check_class_folder

    try:  # checked before torch loads
        if train_dir is None:
            raise ProbeError("probe train needs --train FOLDER: training images in one sub-folder per class "
                             "(ROOT/<class>/<image>); add --test FOLDER for the test accuracy")
        check_class_folder(train_dir)
        if test_dir is not None:
            check_class_folder(test_dir)
    except ProbeError as e:
        raise _fail(str(e))
    with _loading("loading torch"):
        from .cordonnier.train import TrainConfig, check_run, train as run_train

    cfg = TrainConfig(train=str(train_dir), test=str(test_dir) if test_dir else None, out=str(out),
                      attention=attention, dim=dim, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                      epochs=epochs, batch_size=batch_size, lr=lr, position_lr_mult=position_lr_mult,
                      position_schedule=position_schedule, seed=seed, threads=threads,
                      max_minutes=max_minutes, max_steps=max_steps, track_every=track_every,
                      limit_train=limit_train)
    try:
        check_run(cfg)  # every option and the checkpoint to resume, before any progress is shown
        with Progress(TextColumn("[bold]{task.description:<13}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                      console=console) as bar:
            tasks: dict[str, int] = {}

            def decoding(role: str, done: int, total: int) -> None:
                """One bar per image folder decoded (a cached folder shows none)."""
                name = f"decode {role}"
                if name not in tasks:
                    tasks[name] = bar.add_task(name, total=total, info="images")
                bar.update(tasks[name], completed=done, total=total)

            def progress(step: int, total: int, row: Optional[dict]) -> None:
                if "train" not in tasks:
                    tasks["train"] = bar.add_task("train", total=total, completed=step, info="")
                info = {} if row is None else {
                    "info": f"epoch {row['epoch']:.2f} loss {row['train_loss']:.3f} acc {row['train_acc']:.3f}"}
                bar.update(tasks["train"], completed=step, total=total, **info)

            summary = run_train(cfg, progress, decoding)
    except ProbeError as e:
        raise _fail(str(e))
    except KeyboardInterrupt:
        raise _interrupted()
    acc = summary.get("test_accuracy")
    state = "finished" if summary["finished"] else "stopped (run the same command to resume)"
    console.print(f"{state} at step {summary['steps']}/{summary['total_steps']}, {summary['wall_s']:.0f} s"
                  + (f", test accuracy {acc:.4f}" if acc is not None else "") + f"\nrun folder: {out}")


@app.command()
@_interruptible
def compare(
    dirs: list[Path] = typer.Argument(..., help="two or more output folders of probe analyze (saved results)", show_default=False),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="output folder; default reports/compare-<timestamp>/"),
    order: Optional[str] = typer.Option(None, "--order", help="'name' (labels in natural order, ckpt2 before ckpt10) or a metadata key, e.g. weights or seed (numbers in numeric order); default: as given"),
    labels: Optional[str] = typer.Option(None, "--labels", help="comma-separated names of the results, one per folder, in the order given (default: the folder names)"),
) -> None:
    """Compare saved analyses (models, or checkpoints of one model) on relative depth: compare.html."""
    from .preflight import check_out_not_input, check_output_dir, check_result_folder, default_out_dir

    try:  # checked before the tables load
        names = _split_labels(labels, len(dirs))
        for d in dirs:
            check_result_folder(d)
        out_dir = check_output_dir(out if out is not None else default_out_dir())
        check_out_not_input(out_dir, dirs)
        with _loading("loading the saved results"):
            from .comparison import compare as run_compare

            comparison = run_compare([str(d) for d in dirs], labels=names, order=order)
        report = comparison.write_report(out_dir)
    except ProbeError as e:
        raise _fail(str(e))
    except KeyboardInterrupt:
        raise _interrupted()
    console.print(f"comparison: {report}\nper-layer table: {report.parent / 'compare_layers.csv'}")


def _split_labels(text: Optional[str], n: int) -> Optional[list[str]]:
    """``--labels A,B,...`` as a list of ``n`` names (None when not given).

    Raises:
        ProbeError: another number of names than folders, or an empty name.
    """
    if text is None:
        return None
    names = [v.strip() for v in text.split(",")]
    if len(names) != n or not all(names):
        raise ProbeError(f"--labels {text!r} must give {n} non-empty comma-separated names, one per folder "
                         f"(got {len([v for v in names if v])})")
    return names


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
