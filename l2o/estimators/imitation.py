"""Imitation of a hand-designed optimizer (L2O-Scale's "multi-task" option, ``--if_mt``).

"Training Stronger Baselines for Learning to Optimize" (Chen et al. 2020) guides meta-training by
off-policy imitation of Adam: on some episodes the learned optimizer is trained to reproduce the
steps that Adam (learning rate 0.01) takes, instead of to lower the optimizee's loss. Our precise
reading of the flags ``--mt_ratio`` and ``--mt_k``, as implemented by
:class:`~l2o.estimators.truncated_step.TruncatedStep` and
:class:`~l2o.estimators.tbptt.TruncatedBackprop`:

- **Which episodes.** Every inner problem draws, each time it (re)starts, whether its new episode
  is an imitation episode, with probability ``ratio`` (``mt_ratio``), independently of the other
  problems.
- **How long.** An imitation episode imitates during its first ``k · unroll_length`` inner steps,
  that is its first ``k`` truncations (``mt_k``) when episodes start on truncation boundaries (as
  they do with a constant horizon that is a multiple of the unroll length). The seed's flags count
  in unrolls of ``fix_unroll_length`` steps, so ``mt_k = 1`` imitates for one unroll; counting in
  steps keeps the definition exact when a problem restarts inside a truncation.
- **The teacher.** ``optax.adam(teacher_lr)``, its state carried with the problem in
  :attr:`ImitationState.teacher` and restarted with it. At each imitated step the teacher and the
  learned optimizer see the same gradient at the same parameters; the teacher proposes
  ``Δ_teacher`` and the learned optimizer ``Δ_learned = params(new_state) − params(old_state)``.
- **The trajectory follows the teacher.** While imitating, the problem's parameters advance by
  ``Δ_teacher`` (the learned optimizer's own state, e.g. its RNN state, still advances on the
  gradients it saw). This is the off-policy reading of the paper: the demonstrations are the
  teacher's own trajectory, so what is imitated does not depend on how well the learned optimizer
  already imitates, and a poor early θ cannot drive the problem into regions Adam never visits.
  When imitation ends the learned optimizer takes over from where Adam left the parameters.
- **The loss.** Per imitated step ``0.5 · Σ_params (Δ_teacher − Δ_learned)²``
  (:func:`imitation_loss`); in a truncation, a problem's meta-loss is the reduction (mean or sum)
  of its per-step terms, each the imitation loss for an imitated step and the inner loss
  otherwise, plus the final loss only when the truncation's last step was not imitated. A
  truncation imitated throughout therefore has meta-loss ``mean over steps of the imitation loss``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from l2o.types import Params


@dataclasses.dataclass(frozen=True)
class Imitation:
    """Static settings of imitation learning (hashable: part of the compiled program).

    ``ratio``: probability that an episode imitates; ``steps``: how many inner steps at the start
    of an imitation episode imitate (``mt_k × unroll_length``); ``teacher_lr``: Adam's learning
    rate.
    """

    ratio: float
    steps: int
    teacher_lr: float = 0.01

    def __post_init__(self):
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"imitation ratio (mt_ratio) must be in [0, 1], got {self.ratio}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"imitation steps must be a positive int, got {self.steps!r}")
        if not self.teacher_lr > 0:
            raise ValueError(f"teacher learning rate (mt_teacher_lr) must be > 0, "
                             f"got {self.teacher_lr}")

    def teacher(self) -> optax.GradientTransformation:
        """The teacher optimizer, ``optax.adam(teacher_lr)``."""
        return optax.adam(self.teacher_lr)


@struct.dataclass
class ImitationState:
    """Per inner problem: whether its current episode imitates, and the teacher's state."""

    active: jax.Array  # bool: this episode is an imitation episode
    teacher: Any  # optax state of the teacher, restarted with the problem


def imitation_loss(delta_teacher: Params, delta_learned: Params) -> jax.Array:
    """``0.5 · Σ (Δ_teacher − Δ_learned)²`` over every coordinate of two pytrees of steps."""
    sq = jax.tree_util.tree_map(lambda a, b: jnp.sum(jnp.square(a - b)), delta_teacher,
                                delta_learned)
    return 0.5 * sum(jax.tree_util.tree_leaves(sq), jnp.zeros(()))


def tree_sub(a: Params, b: Params) -> Params:
    """``a − b`` leaf by leaf."""
    return jax.tree_util.tree_map(jnp.subtract, a, b)
