"""l2o: meta-training of learned optimizers, from one laptop to a Ray cluster.

The core library (this package) is pure JAX with no network I/O:

- :mod:`l2o.tasks` -- inner problems (``Task``) and distributions over them (``TaskFamily``);
- :mod:`l2o.optimizers` -- learned and hand-designed optimizers behind one interface;
- :mod:`l2o.estimators` -- truncated meta-gradient estimators;
- :mod:`l2o.io.checkpoints` -- atomic, checksummed checkpoint files;
- :mod:`l2o.training.trainer`, :mod:`l2o.evaluation.comparison`, :mod:`l2o.io.config` -- the
single-machine loop, scoring, configs.
"""

__version__ = "0.1.0"
