"""What the benchmarks share: fresh-process workers, one way to time, one way to measure memory.

A benchmark script re-invokes itself as a *worker* (``--worker NAME``) for every measurement
whose memory matters: a fresh process, so its peak is its own (glibc keeps freed heap pages,
so a process that ran something else first would under-report). The worker prints one
result line (:func:`report`); the parent reads it back (:func:`run_worker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

RESULTS_DIR = (
    Path(__file__).resolve().parent / "results"
)  # the recorded results (tracked): written when asked
RUNS_DIR = Path("runs/benchmarks")  # where a run writes by default, beside neusub's runs (not tracked)
_MARK = "@@NEUSUB_BENCHMARK_RESULT@@ "


# --------------------------------------------------------------------------- workers


def report(result: dict) -> None:
    """Worker side: hand ``result`` (JSON-able) to the parent."""
    print(_MARK + json.dumps(result), flush=True)


def run_worker(script: str, name: str, flags: Sequence[str], env: dict | None = None) -> dict:
    """Parent side: ``python script --worker name *flags`` in a fresh process → its result."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", name, *flags]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name!r} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(_MARK) :])


# --------------------------------------------------------------------------- time


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def median_time(fn: Callable[[], object], warmup: int = 1, iters: int = 5) -> tuple[float, float, float]:
    """(median wall, min wall, median CPU) seconds of ``iters`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    samples = [timed(fn) for _ in range(iters)]
    walls = [wall for wall, _ in samples]
    return statistics.median(walls), min(walls), statistics.median(cpu for _, cpu in samples)


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Reset the kernel's high-water mark of resident memory (Linux; False where not allowed)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def peak_memory() -> Iterator[dict]:
    """Peak resident memory of this process, filled into the yielded dict on exit (MiB):

    - ``peak_mib``: the process's lifetime peak (``ru_maxrss``; what ``/usr/bin/time`` shows);
    - ``growth_mib``: the peak during the block over the resident size at its start —
      what the block needs on top of what lived before (models, inputs), not hidden by
      torch's import-time peak. Read from ``VmHWM`` after resetting it (``clear_refs``);
      where that is not allowed, the lifetime peak stands in (``method`` says which).
    """
    lifetime_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    baseline_kib = _status_kib("VmRSS")
    exact = baseline_kib is not None and _reset_peak()  # the reset also lowers ru_maxrss
    result: dict = {"method": "VmHWM after clear_refs" if exact else "ru_maxrss"}
    yield result
    block_kib = _status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start_kib = baseline_kib if exact else lifetime_kib
    result["peak_mib"] = max(lifetime_kib, block_kib) / 1024
    result["baseline_mib"] = start_kib / 1024
    result["growth_mib"] = (block_kib - start_kib) / 1024


# --------------------------------------------------------------------------- reporting


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or an em dash where there is none."""
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table; ``align`` has one letter per column: ``l`` or ``r``."""
    rule = {"l": "---", "r": "--:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def code_version(git: bool = True) -> dict:
    """A hash of the imported neusub sources; with ``git``, the commit and whether src/ has changes."""
    import neusub

    root = Path(neusub.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    info: dict = {"neusub_src_sha1": digest.hexdigest()[:12]}
    if git:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            command = ["git", "-C", str(root)]
            info["git_commit"] = subprocess.run(
                [*command, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
            status = subprocess.run([*command, "status", "--porcelain", "."], capture_output=True, text=True)
            info["src_dirty"] = bool(status.stdout.strip())
    return info


def machine() -> dict:
    """What the figures depend on besides the code."""
    import torch

    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]
