"""Time to first output of the ``probe`` command, as a person at a terminal sees it.

Each command runs under a pseudo-terminal (so rich draws its spinner and bars as it would for a
person); the clock starts before the process is spawned and stops at the first byte it prints
(``first``) and, where a later line is awaited, at the first output holding that text
(``until``: the capture bar of ``probe analyze``, the first training step of ``probe train``).
The process is then ended (SIGTERM), so a long run is not waited for. Medians of ``--repeats``
runs; nothing is asserted (the goals — an error line under 1 s, the first progress line under
2 s — are read off the table, ``bench/RESULTS-startup.md``).

Run::

    python bench/startup.py                      # this checkout
    python bench/startup.py --root /path/to/other/checkout --json before.json

``probe train`` is timed on ``../shared/data/cifar10-train`` / ``cifar10-test`` (skipped when
absent) for one step: once with an empty cache (the 60,000 JPEGs decoded) and with the decoded
arrays cached (``~/.cache/probe``, the cache of earlier runs).
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def first_output(cmd: list[str], env: dict, cwd: Path, until: str | None = None, limit_s: float = 600.0) -> dict:
    """Seconds from spawning ``cmd`` to its first printed byte, and to the first output holding
    ``until`` (None: not awaited); the process is ended afterwards."""
    master, slave = pty.openpty()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                            start_new_session=True)
    os.close(slave)
    first = seen = None
    text = b""
    try:
        while time.perf_counter() - t0 < limit_s:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                now = time.perf_counter() - t0
                first = first if first is not None else now
                text += chunk
                if until is not None and until.encode() in text:
                    seen = now
                    break
                if until is None:
                    break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text.decode(errors="replace"))  # colours, cursor codes
    shown = [line.strip() for line in plain.replace("\r", "\n").splitlines() if line.strip()]
    return {"first_s": first, "until_s": seen, "first_line": shown[0][:100] if shown else ""}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout whose probe is timed (default: this one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-train", action="store_true", help="skip the probe train timings")
    args = ap.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": str(args.root.resolve()), "COLUMNS": "120", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    work = Path(tempfile.mkdtemp(prefix="probe-startup-"))
    py = [sys.executable, "-m", "probe"]
    cases = [
        ("probe --help", py + ["--help"], None),
        ("mistyped option", py + ["analyze", "--modle", "vit_small"], None),
        ("unknown model", py + ["analyze", "--model", "vit_smal", "--out", str(work / "a")], None),
        ("missing --images path", py + ["analyze", "--images", str(work / "nowhere"), "--out", str(work / "b")], None),
        ("probe analyze: first line", py + ["analyze", "--out", str(work / "c")], None),
        ("probe analyze: capture bar", py + ["analyze", "--out", str(work / "d")], "capture"),
    ]
    cases = [(name, cmd, until, None, args.repeats) for name, cmd, until in cases]
    train_dir, test_dir = SHARED / "cifar10-train", SHARED / "cifar10-test"
    if not args.no_train and train_dir.is_dir() and test_dir.is_dir():
        # one step, then the checkpoint and "stopped ...": the start-up of a run
        run = ["train", "--train", str(train_dir), "--test", str(test_dir), "--out", str(work / "run"),
               "--max-steps", "1", "--track-every", "0"]
        cold = str(work / "cold-cache")  # an empty cache: the 60,000 JPEGs are decoded
        cases += [("probe train: first line", py + run, None, None, args.repeats),
                  ("probe train: 1 step, cold cache", py + run, "stopped", cold, 1),
                  ("probe train: 1 step, warm cache", py + run, "stopped", None, args.repeats)]
    elif not args.no_train:
        print(f"probe train skipped: {train_dir} or {test_dir} is absent", file=sys.stderr)
    out = {"root": str(args.root), "repeats": args.repeats, "cpus": os.cpu_count(), "cases": {}}
    for name, cmd, until, cache, repeats in cases:
        runs = []
        for _ in range(repeats):
            if cache is not None:
                subprocess.run(["rm", "-rf", cache])
            runs.append(first_output(cmd, {**env, "XDG_CACHE_HOME": cache} if cache else env, work, until))
            for sub in ("c", "d", "run"):  # a fresh output folder each time
                subprocess.run(["rm", "-rf", str(work / sub)])
        key = "until_s" if until else "first_s"
        times = [r[key] for r in runs if r[key] is not None]
        out["cases"][name] = {"median_s": statistics.median(times) if times else None,
                              "runs_s": times, "first_line": runs[-1]["first_line"]}
        med = out["cases"][name]["median_s"]
        print(f"{name:<30} {'-' if med is None else f'{med:6.2f} s'}   {runs[-1]['first_line'][:70]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
