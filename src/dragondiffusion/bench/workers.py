"""The quality benchmark's cases in worker processes side by side (`bench quality --workers`).

A small model on a CPU uses its cores poorly from one process (its layers are too small to
split well between threads): on 2 cores, the embedded model's benchmark ran 4 move scenes × 3
method rows in 91 s of cases with two workers of one thread against 127 s in one process of two
threads (108 against 140 s with the start). Each worker loads the model once (from
`Settings.model`, as the parent did) and runs whole cases (every variant of a scene, so the
scene's inversions are still shared); the parent sends the drawn cases and gathers their rows as
they finish. A worker checks that it loaded the model the parent measured
(`quality.fingerprint`), so the rows of one table never come from two models.

The rows are those of one process with the same torch threads. Another thread count sums floats
in another order: the same 4 scenes at two threads against one gave means about 1e-5 of their
value apart, two of them printed on either side of a rounding edge (background 34.9 against
35.0 dB), so resume a run with the threads it ran with (quality.json records them).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from .cases import Case
    from .quality import Settings

Finished = tuple[str, int, list[dict[str, Any]], dict[str, "np.ndarray"]]
"""edit, case number, its rows, and its outputs by variant name (workers send them back for
case 1 only: all the contact sheet uses)."""

_worker: dict[str, Any] = {}
"""The worker process's model and what every case needs (set up once by `_start`)."""


def check_workers(workers: int, threads: int | None = None) -> None:
    """InputError unless `workers` and `threads` (None: the default) are at least 1."""
    if workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")


def threads_each(workers: int, threads: int | None) -> int:
    """Torch threads per worker: `threads` where given, else this process's shared out."""
    return threads if threads is not None else max(1, torch.get_num_threads() // workers)


def _exit_with_parent() -> None:
    """End this worker when the benchmark's process ends, however it ends (a parent killed
    outright cannot stop its workers, which would otherwise wait for work for ever)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(1)


def _start(settings: Settings, cell_px: float, stamp: str, threads: int) -> None:
    """Worker set-up: load the model once. A failure is kept and raised by the first case (an
    error here would only break the pool, without its message). The variants are made here,
    not sent: `quality.produce` knows the identity, exact, VAE and baseline rows by identity."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    _worker.update(settings=settings, variants=settings.variants(), cell_px=cell_px)
    try:
        from ..models import default_model, load
        from .quality import fingerprint

        torch.set_num_threads(threads)
        name = default_model() if settings.model is None else settings.model
        pipe = load(name, settings.device, settings.dtype)
        pipe.set_progress_bar_config(disable=True)
        if fingerprint(pipe) != stamp:
            raise InputError(
                f"a benchmark worker loaded {name}, but its weights, edit defaults or package "
                "version differ from the model the benchmark measured (did it change on "
                "disk?); run the benchmark again"
            )
        _worker["pipe"] = pipe
    except Exception as err:  # raised by `_case`, with its message
        _worker["error"] = err


def _case(edit: str, k: int, case: Case) -> tuple[Finished, list[str]]:
    """Run case `k` of `edit` in this worker: its rows, its outputs (case 1 only) and log."""
    from .quality import case_rows, scene_line

    if "error" in _worker:
        raise _worker["error"]
    settings, lines = _worker["settings"], []
    try:
        rows, outputs = case_rows(
            _worker["pipe"], settings, _worker["variants"], edit, k, case, _worker["cell_px"],
            lines.append,
        )  # fmt: skip
    except InputError as err:  # say which scene, as the one-process run's log would
        raise InputError(f"{scene_line(edit, k, settings.n, case)}: {err}") from None
    return (edit, k, rows, outputs if k == 1 else {}), lines


def _stop(pool: ProcessPoolExecutor) -> None:
    """End the pool's workers now, mid-case or not (after an error or Ctrl-C nothing they make
    is kept, and a case can take minutes)."""
    processes = list(getattr(pool, "_processes", {}).values())  # no public way before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def side_by_side(
    pending: list[tuple[str, int, Case]],
    settings: Settings,
    cell_px: float,
    stamp: str,
    workers: int,
    threads: int,
    log: Callable[[str], None],
) -> Iterator[Finished]:
    """Run the `pending` (edit, case number, case) in `workers` processes, each with `threads`
    torch threads; yield each case as it finishes, in any order, after logging its lines.
    stamp: the parent's model `fingerprint`. A worker's error, Ctrl-C or the caller closing the
    generator ends every worker at once; the cases already yielded stay the caller's."""
    log(f"running {len(pending)} case(s) in {workers} worker processes, {threads} thread(s) each")
    # spawn, not fork: a forked copy of a process whose torch threads have started can hang.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(settings, cell_px, stamp, threads),
    )
    ended = False
    try:
        running: set[Future] = {pool.submit(_case, *item) for item in pending}
        while running:
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                finished, lines = future.result()
                for line in lines:
                    log(line)
                yield finished
        ended = True
    finally:
        if ended:
            pool.shutdown()
        else:
            _stop(pool)
