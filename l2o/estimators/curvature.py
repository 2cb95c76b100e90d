"""Curvature of a scalar loss from Hessian-vector products: trace, top eigenvalue, spectrum.

L2O-Scale's regularized variant (``--reg_optimizer --reg_option=... --alpha=...``) penalizes the
learned optimizer by the curvature of the optimizee's loss at the iterates it produces, pushing it
towards flat regions (the "learning to generalize provably" line of work on L2O). Everything here
is matrix-free: the Hessian ``H`` of ``f`` at ``params`` (a pytree) is only touched through
forward-over-reverse products ``H v = jvp(grad f)(params; v)``, so the cost is a small multiple of
a gradient whatever the number of parameters.

The three quantities, and what :data:`REG_OPTIONS` names them:

- ``"hessian-trace"`` — ``tr H = Σ λ_i``, by Hutchinson's estimator ``E[vᵀ H v]`` over Rademacher
  probes ``v`` (unbiased; :func:`hutchinson_trace`).
- ``"hessian-top"`` — the eigenvalue of largest magnitude ``λ_max``, by power iteration on ``H``
  from a random start, reported as the Rayleigh quotient ``vᵀ H v`` of the normalized final
  iterate (:func:`top_eigenvalue`). Its gradient is taken through that last quotient only, with
  ``v`` held fixed: at convergence this is exactly ``∂λ_max = vᵀ (∂H) v`` (the eigenvector's own
  derivative does not contribute), and it avoids differentiating the whole iteration.
- ``"hessian-esd"`` — a summary of the eigenvalue spectral density. We use its second moment,
  unnormalized: ``Σ λ_i² = tr(H²) = ‖H‖_F²``, estimated without bias by ``E‖H v‖²`` over
  Rademacher probes (``E[vᵀ H² v] = tr H²``; :func:`spectrum_second_moment`). Unlike the trace,
  positive and negative curvature do not cancel in it, and unlike ``λ_max`` it weighs the whole
  spectrum, which is what a density-based (ESD) penalty is meant to capture; it is smooth in the
  parameters, where density estimates by Lanczos quadrature are not.

All functions are pure, ``jit``-able and differentiable with respect to anything ``params``
depends on (the meta-gradient reaches θ through the learned optimizer's iterates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from l2o.types import Params, PRNGKey

#: The curvature penalties, by their L2O-Scale ``--reg_option`` names ("none": off).
REG_OPTIONS = ("none", "hessian-trace", "hessian-top", "hessian-esd")

Loss = Callable[[Params], jax.Array]


def hvp(f: Loss, params: Params, v: Params) -> Params:
    """The Hessian-vector product ``∇²f(params)·v`` (forward over reverse), a pytree like ``v``."""
    return jax.jvp(jax.grad(f), (params,), (v,))[1]


def _vdot(a: Params, b: Params) -> jax.Array:
    """``Σ a·b`` over all leaves of two pytrees of the same structure."""
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(leaves, jnp.zeros((), jnp.result_type(*leaves) if leaves else jnp.float32))


def _rademacher(key: PRNGKey, like: Params) -> Params:
    """A pytree like ``like`` of independent ±1 entries."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [jax.random.rademacher(k, jnp.shape(x), dtype=jnp.result_type(x))
           for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_count(name: str, n: Any) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")
    return n


def _probe_mean(fn: Callable[[Params], jax.Array], params: Params, key: PRNGKey,
                num_samples: int) -> jax.Array:
    """Mean of ``fn(v)`` over ``num_samples`` Rademacher probes ``v`` (a ``lax.scan``)."""
    def body(total, k):
        return total + fn(_rademacher(k, params)), None

    keys = jax.random.split(key, num_samples)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    total, _ = jax.lax.scan(body, jnp.zeros((), dtype), keys)
    return total / num_samples


def hutchinson_trace(f: Loss, params: Params, key: PRNGKey, num_samples: int = 1) -> jax.Array:
    """Hutchinson's unbiased estimate of ``tr ∇²f(params)``: mean of ``vᵀHv`` over Rademacher ``v``.

    Its variance is ``2 Σ_{i≠j} H_ij²`` per probe, so it is exact for a diagonal Hessian.
    """
    _check_count("num_samples", num_samples)
    return _probe_mean(lambda v: _vdot(v, hvp(f, params, v)), params, key, num_samples)


def spectrum_second_moment(f: Loss, params: Params, key: PRNGKey,
                           num_samples: int = 1) -> jax.Array:
    """Unbiased estimate of ``Σλ² = tr(H²)`` of ``H = ∇²f(params)``: mean of ``‖Hv‖²``.

    The second moment of the Hessian's eigenvalue spectrum (times the number of parameters); the
    ``"hessian-esd"`` penalty.
    """
    _check_count("num_samples", num_samples)

    def sq_norm(v):
        hv = hvp(f, params, v)
        return _vdot(hv, hv)

    return _probe_mean(sq_norm, params, key, num_samples)


def _normalize(v: Params) -> Params:
    norm = jnp.sqrt(_vdot(v, v))
    norm = jnp.where(norm > 0, norm, 1.0)
    return jax.tree_util.tree_map(lambda x: x / norm, v)


def top_eigenvalue(f: Loss, params: Params, key: PRNGKey, num_iters: int = 20) -> jax.Array:
    """The Hessian eigenvalue of largest magnitude, by ``num_iters`` power iterations.

    Starts from a Gaussian vector, iterates ``v ← Hv/‖Hv‖`` in a ``lax.fori_loop`` and returns the
    Rayleigh quotient ``vᵀHv`` of the final unit vector. Gradients flow through that quotient
    only (``v`` is a constant to them), which is ``vᵀ(∂H)v``, the derivative of a simple
    eigenvalue, once the iteration has converged. Convergence is geometric in the ratio of the two
    largest eigenvalue magnitudes; it needs them distinct.
    """
    _check_count("num_iters", num_iters)
    frozen = jax.lax.stop_gradient(params)
    leaves, treedef = jax.tree_util.tree_flatten(frozen)
    keys = jax.random.split(key, max(len(leaves), 1))
    v0 = jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                  for k, x in zip(keys, leaves)])

    def body(_, v):
        return _normalize(hvp(f, frozen, v))

    v = jax.lax.stop_gradient(jax.lax.fori_loop(0, num_iters, body, _normalize(v0)))
    return _vdot(v, hvp(f, params, v))


def curvature_penalty(option: str, f: Loss, params: Params, key: PRNGKey,
                      num_samples: int = 1, num_iters: int = 20) -> jax.Array:
    """The penalty ``option`` (in :data:`REG_OPTIONS`, not ``"none"``) of ``f`` at ``params``.

    ``num_samples`` Rademacher probes for the trace and the spectrum term, ``num_iters`` power
    iterations for the top eigenvalue.
    """
    if option == "hessian-trace":
        return hutchinson_trace(f, params, key, num_samples)
    if option == "hessian-top":
        return top_eigenvalue(f, params, key, num_iters)
    if option == "hessian-esd":
        return spectrum_second_moment(f, params, key, num_samples)
    raise ValueError(f"unknown curvature penalty {option!r}; known: "
                     f"{', '.join(o for o in REG_OPTIONS if o != 'none')}")
