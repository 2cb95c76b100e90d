"""The remote side: the learner owns θ and the meta-optimizer state.

- :mod:`learner.core` -- θ, validation, deduplication, staleness, aggregation, checkpoints;
- :mod:`learner.server` -- its gRPC server (health, reflection, bearer-token auth);
- :mod:`learner.process` -- the process around both, as ``python -m learner`` or a Ray actor.
"""
