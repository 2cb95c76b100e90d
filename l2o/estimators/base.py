"""The interface every meta-gradient estimator implements.

``init_worker_state(θ, key)`` creates the local-side state (inner problems, inner optimizer states,
estimator accumulators) and ``compute_gradient_estimate(θ, worker_state, key)`` runs one truncation
and returns ``(meta_gradient, new_worker_state, metrics)``. The learner only ever sees the
meta-gradient and metrics: worker state never leaves the worker.
"""

from __future__ import annotations

from typing import Any

import jax

from l2o.types import MetaParams, PRNGKey

WorkerState = Any
Metrics = dict[str, jax.Array]

#: Metrics every estimator reports (each a scalar; ``inner_steps`` counts inner steps taken).
CORE_METRICS = ("meta_loss", "inner_loss", "final_inner_loss", "inner_steps")
#: Scalars some configurations add (curvature penalty, imitation, the unsupervised rule's ridge
#: readout); logged and streamed whenever an estimator reports them.
OPTIONAL_METRICS = ("curvature", "imitation_fraction", "imitation_loss", "ridge_accuracy")


class GradientEstimator:
    """Estimates ∂(meta-loss)/∂θ from truncated unrolls of inner problems."""

    #: a short name sent with every gradient (e.g. ``"tbptt"``, ``"pes"``)
    estimator_name: str = "estimator"

    def init_worker_state(self, theta: MetaParams, key: PRNGKey) -> WorkerState:
        """Fresh inner problems for this worker."""
        raise NotImplementedError

    def compute_gradient_estimate(
        self, theta: MetaParams, worker_state: WorkerState, key: PRNGKey
    ) -> tuple[MetaParams, WorkerState, Metrics]:
        """One truncation: ``(meta_gradient, new_worker_state, metrics)``."""
        raise NotImplementedError
