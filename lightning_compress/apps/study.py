"""Resumable, shareable Optuna sweeps: the study persists in the sweep directory and a rerun continues it.

Hydra's Optuna sweeper (``hydra-optuna-sweeper`` 1.3 and 1.4) runs ``n_trials`` *more* trials every time it is
started and numbers its job directories from 0 again, so a rerun of an interrupted sweep retrains everything and
overwrites the first jobs' directories. :class:`ResumableOptunaSweeper` (shipped as the Hydra plugin
``hydra_plugins.lightning_compress_sweeper``, selected by the Optuna ``hparams_search`` configs: tpe, random,
cmaes, nsga2) keeps Optuna's sampling, launching and bookkeeping and changes only that:

- the study is stored (``hydra.sweeper.storage``; by default ``sqlite:///<sweep dir>/optuna.db``) and
  ``n_trials`` counts *finished* trials: a rerun of the same command runs only the trials still missing, in new job
  directories after the existing ones (a trial that was running when the sweep was stopped is run again; the
  sampler is reseeded, so that it does not draw the points of the first run again);
- a study remembers the command-line overrides that started it; a rerun whose overrides differ (other than the sweep
  size, the number of parallel jobs and the launcher) is refused with both lists, so that one study never mixes
  two searches;
- a storage that cannot be written is refused before any trial, naming ``hydra.sweeper.storage``.

Several launcher jobs work on one study at once: ``hydra.sweeper.n_jobs`` trials are launched together (the joblib
launcher runs them in parallel, the SLURM launcher submits them as one array), and their results are told to the one
study. Sweeps started separately can share a study through one storage URL (each with its own ``hydra.sweep.dir``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: Overrides that change how a sweep runs, not what it searches: a rerun may change them.
RUN_ONLY = ("hydra.sweeper.n_trials", "hydra.sweeper.n_jobs", "hydra.launcher.", "launcher=", "hydra.sweep.")


def search_overrides(overrides: list[str]) -> list[str]:
    """The command-line overrides that define the search (those of :data:`RUN_ONLY` left out), sorted.

    Example:
        >>> search_overrides(["seed=1", "hydra.sweeper.n_trials=20", "launcher=local_parallel", "recipe=dense"])
        ['recipe=dense', 'seed=1']
    """
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(RUN_ONLY))


def check_storage(storage: Any) -> Any:
    """The storage, its directory created; a ``sqlite:///`` file that cannot be written is refused.

    Raises:
        ValueError: The file's directory cannot be created or written; the message names ``hydra.sweeper.storage``.
    """
    if not isinstance(storage, str) or not storage.startswith("sqlite:///"):
        return storage
    path = Path(storage[len("sqlite:///") :])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(path if path.exists() else path.parent, os.W_OK)
    except OSError as err:
        writable, reason = False, err.strerror or str(err)
    else:
        reason = "permission denied"
    if not writable:
        raise ValueError(
            f"hydra.sweeper.storage={storage!r}: {str(path)!r} cannot be written ({reason}). Point it to a writable "
            "file (e.g. hydra.sweeper.storage=sqlite:///<dir>/optuna.db) or set hydra.sweep.dir to a writable "
            "directory."
        )
    return storage


def finished_and_next_job(study: Any) -> tuple[int, int]:
    """(trials finished in ``study``, the next free job number: one per trial asked so far)."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials), len(trials)


def check_same_search(study: Any, overrides: list[str]) -> None:
    """Remember the overrides that define the search in the study; refuse a rerun with other ones.

    Raises:
        ValueError: The stored study was started with other overrides (both lists named).
    """
    started = study.user_attrs.get("lightning_compress_overrides")
    if started is None:
        study.set_user_attr("lightning_compress_overrides", overrides)
    elif list(started) != overrides:
        raise ValueError(
            f"The study {study.study_name!r} was started with the overrides {list(started)}; this sweep has "
            f"{overrides}. Repeat the first command to continue that study, or start another one with "
            "hydra.sweep.dir=<new directory> (or hydra.sweeper.study_name=<new name>)."
        )


def prepare_resume(impl: Any, arguments: list[str], objective: str | None = None) -> None:
    """Set the Optuna sweeper implementation ``impl`` to run only the missing trials of its stored study, in job
    directories after the existing ones; the app's ``objective`` is checked against the sweeper's directions
    before any trial."""
    import optuna

    from lightning_compress.apps.sweeps import check_directions

    directions = impl._get_directions()
    if objective is not None:
        check_directions(objective, directions)
    if impl.storage is None:
        return  # an in-memory study: nothing to resume
    impl.storage = check_storage(impl.storage)
    study = optuna.create_study(
        study_name=impl.study_name, storage=impl.storage, directions=directions, load_if_exists=True
    )
    finished, next_job = finished_and_next_job(study)
    check_same_search(study, search_overrides(list(arguments)))
    missing = max(0, int(impl.n_trials) - finished)
    log.info(
        "Study %r in %s: %d of %d trials finished, %d to run (jobs from #%d).",
        impl.study_name, impl.storage, finished, impl.n_trials, missing, next_job,
    )  # fmt: skip
    if missing == 0:
        log.info("Nothing to run: the study has its trials. Raise hydra.sweeper.n_trials to add more.")
    if next_job and hasattr(impl.sampler, "reseed_rng"):
        # A seeded sampler restarted on a stored study would draw its first random points again (points already
        # run); a resumed sweep draws new ones instead.
        impl.sampler.reseed_rng()
    impl.n_trials, impl.job_idx = missing, next_job


class ResumableOptunaSweeperMixin:
    """Wraps ``hydra-optuna-sweeper``'s sweeper (its ``self.sweeper`` implementation does the work)."""

    sweeper: Any

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)  # type: ignore[misc]
        self._objective = config.get("objective")

    def sweep(self, arguments: list[str]) -> Any:
        prepare_resume(self.sweeper, arguments, None if self._objective is None else str(self._objective))
        return self.sweeper.sweep(arguments)


def register_sweeper() -> None:
    """Make the plugin class known to Hydra before it starts. An installed wheel's ``hydra_plugins`` directory is
    found by Hydra's scan; an editable install's is not (its import hook cannot be listed), so the app registers the
    class itself (idempotent). Without the ``sweeps`` extra there is nothing to register."""
    try:
        from hydra_plugins.lightning_compress_sweeper import ResumableOptunaSweeper  # type: ignore[attr-defined]
    except ImportError:
        return
    from hydra.core.plugins import Plugins

    Plugins.instance().register(ResumableOptunaSweeper)
