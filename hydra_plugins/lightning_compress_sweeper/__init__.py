"""Hydra plugin of lightning-compress: the resumable Optuna sweeper (``hydra/sweeper`` target of every
``hparams_search`` config). The logic lives in :mod:`lightning_compress.apps.study`; Hydra only loads plugins from
the ``hydra_plugins`` package, hence this module."""

try:
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # the `sweeps` extra is not installed: no sweeper to offer
    pass
else:
    from lightning_compress.apps.study import ResumableOptunaSweeperMixin

    class ResumableOptunaSweeper(ResumableOptunaSweeperMixin, OptunaSweeper):
        """Hydra's Optuna sweeper whose stored study resumes: see :mod:`lightning_compress.apps.study`."""
