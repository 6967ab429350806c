"""A Hydra sweeper on current Optuna: persistent, resumable, single- and multi-objective.

Selected with ``hydra/sweeper=mtl_optuna`` (the ``conf/hparams_search/`` presets do it); see
:class:`hydra_plugins.mtl_optuna_sweeper.optuna_sweeper.OptunaSweeper`.
"""
