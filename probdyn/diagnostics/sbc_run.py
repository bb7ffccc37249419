"""Running the simulations of `probdyn.sbc`: one after another, or with the fits on a
pool of worker processes (``spawn``) that take the float settings of this one, saving
every finished simulation to the checkpoint file as it comes."""

from __future__ import annotations

import itertools
import os
import pickle
from collections.abc import Callable
from typing import Any

from probdyn.core.backends import backend_names, get_backend
from probdyn.diagnostics.sbc_checkpoint import _fingerprint, _load_checkpoint, _save_checkpoint
from probdyn.diagnostics.sbc_simulation import _fit_and_rank, _Job, _run_one, _seeds, _simulate


def _run_all(
    job: _Job,
    num_simulations: int,
    checkpoint: str | os.PathLike[str] | None,
    num_workers: int,
    progress_bar: bool,
) -> dict[int, dict[str, Any]]:
    """Run the simulations ``0..num_simulations - 1`` not yet in ``checkpoint``: their
    records by index (those of the checkpoint included)."""
    from tqdm.auto import tqdm

    fingerprint = _fingerprint(job)
    records = _load_checkpoint(checkpoint, fingerprint)
    todo = [i for i in range(num_simulations) if i not in records]
    bar = tqdm(
        total=num_simulations,
        initial=num_simulations - len(todo),
        desc="SBC",
        disable=not progress_bar,
    )

    warned = [0]

    def done(record: dict[str, Any]) -> None:
        records[record["index"]] = record
        if checkpoint is not None:
            _save_checkpoint(checkpoint, fingerprint, records)
        warned[0] += bool(record["warnings"])
        if warned[0]:
            bar.set_postfix(fits_with_warnings=warned[0])
        bar.update(1)

    with bar:
        if num_workers == 1 or len(todo) <= 1:
            for i in todo:
                done(_run_one(job, i))
        else:
            _run_parallel(job, todo, num_workers, done)
    return records


def _run_parallel(
    job: _Job, todo: list[int], num_workers: int, done: Callable[[dict[str, Any]], None]
) -> None:
    """Fit the simulations ``todo`` on ``num_workers`` processes, drawing them here;
    ``done`` gets each record as it finishes."""
    import concurrent.futures
    import multiprocessing

    try:
        pickle.dumps(job)
    except Exception as err:
        raise TypeError(
            f"sbc(num_workers={num_workers}): the model, engine, runner or arguments cannot be "
            f"sent to worker processes ({err}). Define the model as a top-level function of an "
            "importable module (not a lambda, a closure or a notebook cell), or use num_workers=1."
        ) from err
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(num_workers, len(todo)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(_precision(),),
    )

    # Simulations are drawn here, in order, and only the fits go to the workers: the
    # truths and simulated data are then those of a serial run on every backend (a
    # GPU program compiled in another process may differ in the last bit). A few
    # simulations per worker are kept ahead, so that the workers never wait.
    def submit(index: int) -> concurrent.futures.Future[dict[str, Any]]:
        sim, redraws = _simulate(job, _seeds(job.key, index)[0])
        return pool.submit(_fit_and_rank, job, index, sim, redraws)

    queue = iter(todo)
    with pool:
        pending = {submit(i) for i in itertools.islice(queue, 2 * num_workers)}
        while pending:
            finished, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                done(future.result())
                following = next(queue, None)
                if following is not None:
                    pending.add(submit(following))


def _precision() -> dict[str, Any]:
    """The float settings in force here, so that worker processes simulate and fit
    exactly as this one would (read only from backends already imported)."""
    env: dict[str, Any] = {}
    for name in backend_names():
        backend = get_backend(name)
        if backend.loaded():
            env[name] = backend.service("precision")()
    return env


def _init_worker(env: dict[str, Any]) -> None:
    for name, settings in env.items():
        get_backend(name).service("set_precision")(settings)
