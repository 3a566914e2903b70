"""The quality benchmark's cases in worker processes side by side (`bench quality --workers`).

A small model on a CPU uses its cores poorly from one process (its layers are too small to
split well between threads): on 2 cores, the embedded model's benchmark ran 4 move scenes × 3
method rows in 91 s of cases with two workers of one thread against 127 s in one process of two
threads (108 against 140 s with the start). Each worker loads the model once and runs whole
cases (every variant of a scene, so the scene's inversions are still shared); the parent
gathers their rows as they finish. A worker checks that it loaded the very weights the parent
measured (`quality.fingerprint`), so the rows of one table never come from two models.

The rows are those of one process with the same torch threads per process. Another thread
count sums floats in another order: the same 4 scenes at two threads against one differed in
the last digit of a few means (background 34.9 against 35.0 dB), so resume a run with the
threads it started with.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from .quality import Settings

Finished = tuple[str, int, list[dict[str, Any]], dict[str, "np.ndarray"]]
"""edit, case number, its rows, its outputs by variant (only for case 1: the contact sheet)."""

_worker: dict[str, Any] = {}
"""The worker process's model, settings and drawn cases (set up once by `_start`)."""


def check_workers(workers: int) -> None:
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")


def threads_each(workers: int, threads: int | None) -> int:
    """Torch threads per worker: `threads` where given, else the cores shared out."""
    return threads if threads is not None else max(1, (os.cpu_count() or 1) // workers)


def _start(settings: Settings, stamp: str, threads: int) -> None:
    """Worker set-up: load the model once. A failure is kept and raised by the first case (an
    error here would only break the pool, without its message)."""
    import torch

    from ..models import default_model, load
    from .quality import fingerprint

    torch.set_num_threads(threads)
    _worker.update(settings=settings, cases={})
    try:
        name = default_model() if settings.model is None else settings.model
        pipe = load(name, settings.device, settings.dtype)
        pipe.set_progress_bar_config(disable=True)
        if fingerprint(pipe) != stamp:
            raise InputError(
                f"a benchmark worker loaded other weights from {name} than the benchmark "
                "measured (did the model change on disk?); run it again"
            )
        _worker["pipe"] = pipe
    except Exception as err:  # raised by `_case`, with its message
        _worker["error"] = err


def _case(edit: str, k: int) -> tuple[Finished, list[str]]:
    """Run case `k` of `edit` in this worker: its rows, its outputs (case 1 only) and log."""
    from .cases import draw_cases
    from .quality import case_rows, cell_pixels

    if "error" in _worker:
        raise _worker["error"]
    pipe, settings = _worker["pipe"], _worker["settings"]
    size = pipe.native_resolution
    if edit not in _worker["cases"]:
        _worker["cases"][edit] = draw_cases(edit, settings.n, settings.seed, size)
    case = _worker["cases"][edit][k - 1]
    lines: list[str] = []
    variants = settings.variants()
    rows, outputs = case_rows(
        pipe, settings, variants, edit, k, case, cell_pixels(pipe, size), lines.append
    )
    return (edit, k, rows, outputs if k == 1 else {}), lines


def side_by_side(
    settings: Settings,
    pending: list[tuple[str, int]],
    stamp: str,
    workers: int,
    threads: int | None,
    log: Callable[[str], None],
) -> Iterator[Finished]:
    """Run the `pending` (edit, case number) pairs in `workers` processes; yield each case as it
    finishes (in any order), after logging its lines. `stamp`: the parent's model fingerprint.
    A worker's error stops the run (the cases already yielded stay the caller's)."""
    each = threads_each(workers, threads)
    log(f"running {len(pending)} case(s) in {workers} worker processes, {each} thread(s) each")
    # spawn, not fork: a forked copy of a process whose torch threads have started can hang.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start, initargs=(settings, stamp, each)
    )
    try:
        futures = [pool.submit(_case, edit, k) for edit, k in pending]
        for future in as_completed(futures):
            finished, lines = future.result()
            for line in lines:
                log(line)
            yield finished
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
