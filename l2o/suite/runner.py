"""Training curves of optax transformations on suite tasks, many runs in one jitted program.

:func:`run_curves` trains a :class:`~l2o.suite.base.SuiteTask` with an optimizer built by a
factory ``make_opt(hparam, num_steps) -> optax.GradientTransformation`` for each of ``P``
(hyperparameter, seed) pairs at once: ``vmap`` over the pairs, ``lax.scan`` over the steps, data
sampled on the device. One call compiles one program, whatever the number of pairs.

Protocol
--------
* Seed ``s``: ``key = PRNGKey(s)``; the parameters are ``task.init(fold_in(key, 0))`` and step
  ``t`` (0-based) trains on ``task.sample_batch(fold_in(fold_in(key, 1), t))``. Two optimizers run
  with the same seed therefore start from the same parameters and see the same batches.
* Each step: ``loss, grads = value_and_grad(task.loss)(params, batch)``, then
  ``tx.update(grads, state, params, value=loss)`` (learned optimizers get the parameters and the
  loss) and ``optax.apply_updates``.
* Recorded: ``st.train_loss(params)`` after ``0, k, 2k, ...`` steps and after the last step, with
  ``k = record_every`` (default ``max(1, num_steps // 50)``); ``st.test_metric`` of the final
  parameters; the mean over all steps of the minibatch loss.
* Nothing is clamped: a diverged run records NaN/inf and the program carries on.

The record points come from a nested scan (outer over record points, inner over ``k`` steps), so
memory does not grow with the number of steps. The initial parameters and data keys of the seeds
come from a separate small program (compiled once per task and seed count, shared by every
optimizer), and the task's arrays enter the program as arguments, not baked-in constants.
Convolutional tasks run their pairs one after the other (``lax.map``) instead of ``vmap``: see
:func:`choose_batching`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2o.suite.base import SuiteTask

#: ``(hparam, num_steps) -> optax transformation``; ``hparam`` is a traced scalar (the learning
#: rate of a baseline; ignored by a learned optimizer).
OptimizerFactory = Callable[[jax.Array, int], optax.GradientTransformation]

#: Tags folded into a seed's key: parameter initialization and the batch stream.
INIT_TAG, DATA_TAG = 0, 1


def default_record_every(num_steps: int) -> int:
    """Steps between record points: ``max(1, num_steps // 50)``."""
    return max(1, int(num_steps) // 50)


def record_steps(num_steps: int, record_every: int | None = None) -> np.ndarray:
    """The step counts at which the train loss is recorded: 0, k, 2k, ... and ``num_steps``."""
    k = int(record_every or default_record_every(num_steps))
    steps = list(range(0, int(num_steps) + 1, k))
    if steps[-1] != num_steps:
        steps.append(int(num_steps))
    return np.asarray(steps, dtype=np.int64)


def seed_keys(seed: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """``(init_key, data_key)`` of seed ``seed`` (see the module docstring)."""
    key = jax.random.PRNGKey(seed)
    return jax.random.fold_in(key, INIT_TAG), jax.random.fold_in(key, DATA_TAG)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The records of ``P`` runs of one optimizer on one task.

    ``train_loss[p]`` is run ``p``'s train loss at ``steps``; run ``p`` used ``hparams[p]`` and
    ``seeds[p]``. Values are float64; non-finite values mark divergence.
    """

    steps: np.ndarray  # [R] int
    train_loss: np.ndarray  # [P, R]
    test_metric: np.ndarray  # [P]
    mean_batch_loss: np.ndarray  # [P]
    hparams: np.ndarray  # [P]
    seeds: np.ndarray  # [P] int
    num_steps: int
    seconds: float = 0.0

    @property
    def final_train_loss(self) -> np.ndarray:
        """The train loss after the last step, ``[P]``."""
        return self.train_loss[:, -1]

    def select(self, mask: np.ndarray) -> RunResult:
        """The runs where ``mask`` (boolean or indices over ``P``) selects."""
        return dataclasses.replace(
            self, train_loss=self.train_loss[mask], test_metric=self.test_metric[mask],
            mean_batch_loss=self.mean_batch_loss[mask], hparams=self.hparams[mask],
            seeds=self.seeds[mask])

    def where_hparam(self, hparam: float) -> RunResult:
        """The runs whose hyperparameter is ``hparam`` (to a relative 1e-9)."""
        return self.select(np.isclose(self.hparams, hparam, rtol=1e-9, atol=0.0))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite values become ``None``)."""
        floats = lambda x: json_safe(np.asarray(x, np.float64))
        return {"num_steps": int(self.num_steps), "seconds": float(self.seconds),
                "steps": [int(s) for s in self.steps], "hparams": floats(self.hparams),
                "seeds": [int(s) for s in self.seeds],
                "train_loss": floats(self.train_loss),
                "test_metric": floats(self.test_metric),
                "mean_batch_loss": floats(self.mean_batch_loss)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        """Inverse of :meth:`to_json` (``None`` becomes NaN)."""
        steps = np.asarray(data["steps"], dtype=np.int64)
        loss = from_jsonable(data["train_loss"]).reshape(-1, steps.shape[0])
        return cls(steps=steps, train_loss=loss,
                   test_metric=from_jsonable(data["test_metric"]).reshape(-1),
                   mean_batch_loss=from_jsonable(data["mean_batch_loss"]).reshape(-1),
                   hparams=from_jsonable(data["hparams"]).reshape(-1),
                   seeds=np.asarray(data["seeds"], dtype=np.int64).reshape(-1),
                   num_steps=int(data["num_steps"]), seconds=float(data.get("seconds", 0.0)))


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by ``None`` and tuples/arrays by lists."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

def from_jsonable(x: Any) -> np.ndarray:
    """A float64 array from nested lists where ``None`` stands for a non-finite value (NaN)."""
    if isinstance(x, list):
        return np.asarray([from_jsonable(v) for v in x], dtype=np.float64)
    return np.asarray(np.nan if x is None else x, dtype=np.float64)


class _ByIdentity:
    """A static-argument wrapper for an unhashable leaf: equal only to itself."""

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value


def _hashable(leaf: Any) -> Any:
    try:
        hash(leaf)
        return leaf
    except TypeError:
        return _ByIdentity(leaf)


def _split_arrays(tree: Any) -> tuple[list[Any], tuple[Any, ...]]:
    """``(array leaves, static rest)`` of a pytree: arrays travel into ``jit`` as arguments (no
    data baked into the program as constants), the structure and any other leaf (e.g. a plain
    function) as a hashable static argument."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]
    rest = tuple(None if a else _hashable(leaf) for leaf, a in zip(leaves, is_array))
    return arrays, (treedef, rest)


def _join_arrays(arrays: list[Any], static: tuple[Any, ...]) -> Any:
    """Inverse of :func:`_split_arrays`."""
    treedef, rest = static
    it = iter(arrays)
    leaves = [next(it) if r is None else r.value if isinstance(r, _ByIdentity) else r
              for r in rest]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@jax.jit
def _init_runs(task: Any, seeds: jax.Array) -> tuple[Any, jax.Array]:
    """Initial parameters and data keys of each seed (leading axis); compiled once per task
    structure and number of seeds, shared by every optimizer."""
    def one(seed):
        k_init, k_data = seed_keys(seed)
        return task.init(k_init), k_data

    return jax.vmap(one)(seeds)


def _trajectory(measured: tuple[Any, Any, Any], make_opt: OptimizerFactory, num_steps: int,
                every: int, params: Any, k_data: jax.Array, hparam: jax.Array):
    """One run (unbatched): ``(train-loss records [R], test metric, mean minibatch loss)``;
    ``measured`` is ``(task, train_loss_fn, test_metric_fn)``."""
    task, train_loss_fn, test_metric_fn = measured
    tx = optax.with_extra_args_support(make_opt(hparam, num_steps))

    def train_loss(p):
        return jnp.asarray(train_loss_fn(p), jnp.float32)

    def step(carry, _):
        params, opt_state, t, loss_sum = carry
        batch = task.sample_batch(jax.random.fold_in(k_data, t))
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, t + 1, loss_sum + loss.astype(jnp.float32)), None

    def chunk(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=every)
        return carry, train_loss(carry[0])

    carry = (params, tx.init(params), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    records = [train_loss(params)[None]]
    n_chunks, rest = divmod(num_steps, every)
    if n_chunks:
        carry, chunk_records = jax.lax.scan(chunk, carry, None, length=n_chunks)
        records.append(chunk_records)
    if rest:
        carry, _ = jax.lax.scan(step, carry, None, length=rest)
        records.append(train_loss(carry[0])[None])
    return (jnp.concatenate(records), jnp.asarray(test_metric_fn(carry[0]), jnp.float32),
            carry[3] / num_steps)


@functools.partial(jax.jit,
                   static_argnames=("static", "make_opt", "num_steps", "every", "batching"))
def _run_program(arrays, params, data_keys, hparams, *, static, make_opt, num_steps, every,
                 batching):
    """Every run of one :func:`run_curves` call: :func:`_trajectory` ``vmap``-ped over the pairs
    (``batching="vmap"``) or mapped one pair after the other (``"map"``). Cached by JAX across
    calls with the same task structure, factory, steps, batching and shapes."""
    measured = _join_arrays(arrays, static)
    run = functools.partial(_trajectory, measured, make_opt, num_steps, every)
    if batching == "map":
        return jax.lax.map(lambda a: run(*a), (params, data_keys, hparams))
    return jax.vmap(run)(params, data_keys, hparams)


_HAS_CONV: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def has_convolution(st: SuiteTask) -> bool:
    """Whether the task's loss convolves (traced abstractly once per task: nothing runs)."""
    if st not in _HAS_CONV:
        def loss(key):
            return st.task.loss(st.task.init(key), st.task.sample_batch(key))

        jaxpr = jax.make_jaxpr(loss)(jax.random.PRNGKey(0))
        _HAS_CONV[st] = "conv_general_dilated" in str(jaxpr)
    return _HAS_CONV[st]


def choose_batching(st: SuiteTask) -> str:
    """``"map"`` for convolutional tasks (a vmapped convolution with per-run weights becomes a
    grouped convolution, several times slower on CPU than running the runs in turn), else
    ``"vmap"``."""
    return "map" if has_convolution(st) else "vmap"


def run_curves(st: SuiteTask, make_opt: OptimizerFactory, hparams: Sequence[float] | np.ndarray,
               seeds: Sequence[int] | np.ndarray, *, num_steps: int | None = None,
               record_every: int | None = None, batching: str = "auto") -> RunResult:
    """Train ``st`` with ``make_opt(hparams[p], num_steps)`` from seed ``seeds[p]`` for every
    pair ``p``, all in one jitted, vmapped program (see the module docstring).

    ``num_steps`` defaults to the task's horizon; ``record_every`` to ``max(1, num_steps // 50)``.
    ``make_opt`` is a static argument of the compiled program: pass the same function object (not
    a fresh closure) to reuse a compilation. ``batching``: ``"vmap"`` (all pairs at once),
    ``"map"`` (one pair after the other, inside the same program) or ``"auto"``
    (:func:`choose_batching`); the numbers do not depend on it beyond float rounding.
    """
    if batching == "auto":
        batching = choose_batching(st)
    if batching not in ("vmap", "map"):
        raise ValueError(f"batching must be 'auto', 'vmap' or 'map', got {batching!r}")
    hp = np.asarray(hparams, dtype=np.float64).reshape(-1)
    sd = np.asarray(seeds, dtype=np.int64).reshape(-1)
    if hp.shape != sd.shape or hp.size == 0:
        raise ValueError(f"hparams and seeds must be non-empty and pair up, got {hp.size} "
                         f"hparams and {sd.size} seeds")
    n = int(num_steps if num_steps is not None else st.horizon)
    if n < 1:
        raise ValueError(f"num_steps must be positive, got {n}")
    every = int(record_every or default_record_every(n))
    if every < 1:
        raise ValueError(f"record_every must be positive, got {every}")

    start = time.perf_counter()
    unique, index = np.unique(sd, return_inverse=True)
    params, keys = jax.device_get(_init_runs(st.task, jnp.asarray(unique, dtype=jnp.uint32)))
    params = jax.tree_util.tree_map(lambda x: x[index], params)
    arrays, static = _split_arrays((st.task, st.train_loss_fn, st.test_metric_fn))
    out = _run_program(arrays, params, keys[index], jnp.asarray(hp, dtype=jnp.float32),
                       static=static, make_opt=make_opt, num_steps=n, every=every,
                       batching=batching)
    loss, test, batch_loss = jax.device_get(out)
    seconds = time.perf_counter() - start
    return RunResult(steps=record_steps(n, every), train_loss=np.asarray(loss, np.float64),
                     test_metric=np.asarray(test, np.float64),
                     mean_batch_loss=np.asarray(batch_loss, np.float64),
                     hparams=hp, seeds=sd, num_steps=n, seconds=seconds)


def grid_pairs(hparams: Sequence[float], seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Every (hparam, seed) pair, hparam-major: ``(hparams [H*S], seeds [H*S])``."""
    h = np.repeat(np.asarray(hparams, dtype=np.float64), len(seeds))
    s = np.tile(np.asarray(seeds, dtype=np.int64), len(hparams))
    return h, s


def fixed_optimizer(make: Callable[[int], optax.GradientTransformation]) -> OptimizerFactory:
    """A factory that ignores its hyperparameter: ``make(num_steps)`` (a learned optimizer)."""
    return lambda _hparam, num_steps: make(num_steps)
