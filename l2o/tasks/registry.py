"""Named task families: what ``task.name`` in a config and the ``l2o tasks`` CLI refer to.

Each entry of :data:`TASKS` is a factory taking keyword arguments only; the first line of its
docstring is the description :func:`describe_tasks` shows. Datasets are loaded when a factory is
called, never at import, so MNIST files are only needed by the MNIST tasks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from l2o.tasks.base import SingleTaskFamily, TaskFamily
from l2o.tasks.quadratic import QuadraticFamily

MNIST_LIKE = ("mnist", "fashion_mnist")


def _int_tuple(name: str, values: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(values, int):
        values = (values,)
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if any(v <= 0 for v in out):
        raise ValueError(f"{name} must be positive ints, got {out}")
    return out


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _load(dataset: str, data_dir: str | None):
    from l2o.tasks import datasets

    if dataset == "digits":
        return datasets.load_digits()
    if dataset == "synthetic":
        return datasets.load_synthetic()
    if dataset == "mnist":
        return datasets.load_mnist(data_dir)
    if dataset == "fashion_mnist":
        return datasets.load_fashion_mnist(data_dir)
    raise ValueError(f"unknown dataset {dataset!r}")


def _mlp(dataset: str, hidden_sizes, activation: str, batch_size: int,
         data_dir: str | None = None) -> SingleTaskFamily:
    from l2o.tasks.mlp import MLPTask

    hidden = _int_tuple("hidden_sizes", hidden_sizes)
    bs = _positive_int("batch_size", batch_size)
    data = _load(dataset, data_dir)
    return SingleTaskFamily(base=MLPTask(data=data, hidden_sizes=hidden, activation=activation,
                                         batch_size=bs, num_classes=data.num_classes))


def _conv(dataset: str, channels, activation: str, batch_size: int,
          data_dir: str | None = None) -> SingleTaskFamily:
    from l2o.tasks.conv import ConvTask

    chans = _int_tuple("channels", channels)
    bs = _positive_int("batch_size", batch_size)
    data = _load(dataset, data_dir)
    return SingleTaskFamily(base=ConvTask(data=data, channels=chans, activation=activation,
                                          batch_size=bs, num_classes=data.num_classes))


def quadratic(dim: int = 10) -> TaskFamily:
    """Random d-dim quadratics ‖Wx − y‖², W and y ~ N(0, 1) per problem (L2L; dim=10)."""
    return QuadraticFamily(dim=_positive_int("dim", dim))


def simple() -> TaskFamily:
    """L2L's simple problem: one scalar x from 1.0, loss x²."""
    from l2o.tasks.simple import simple_family

    return simple_family()


def digits_mlp(hidden_sizes: Sequence[int] = (20,), activation: str = "sigmoid",
               batch_size: int = 128) -> TaskFamily:
    """MLP 64-20-10 sigmoid on scikit-learn's 8×8 digits, batch 128 (the default job)."""
    return _mlp("digits", hidden_sizes, activation, batch_size)


def digits_mlp_relu(hidden_sizes: Sequence[int] = (20,), activation: str = "relu",
                    batch_size: int = 128) -> TaskFamily:
    """MLP 64-20-10 relu on scikit-learn's 8×8 digits, batch 128."""
    return _mlp("digits", hidden_sizes, activation, batch_size)


def digits_conv(channels: Sequence[int] = (8, 16), activation: str = "relu",
                batch_size: int = 128) -> TaskFamily:
    """Conv net (3×3 stride-2 convs, 8/16 channels, relu, linear readout) on 8×8 digits."""
    return _conv("digits", channels, activation, batch_size)


def mnist_mlp(hidden_sizes: Sequence[int] = (20,), activation: str = "sigmoid",
              batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """MLP 784-20-10 sigmoid on MNIST, batch 128 (L2L's MNIST problem; needs the MNIST files)."""
    return _mlp("mnist", hidden_sizes, activation, batch_size, data_dir)


def fashion_mnist_mlp(hidden_sizes: Sequence[int] = (20,), activation: str = "sigmoid",
                      batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """MLP 784-20-10 sigmoid on Fashion-MNIST, batch 128 (needs the Fashion-MNIST files)."""
    return _mlp("fashion_mnist", hidden_sizes, activation, batch_size, data_dir)


def mnist_conv(channels: Sequence[int] = (8, 16), activation: str = "relu",
               batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """Conv net (3×3 stride-2 convs, 8/16 channels, relu) on MNIST (needs the MNIST files)."""
    return _conv("mnist", channels, activation, batch_size, data_dir)


def fashion_mnist_conv(channels: Sequence[int] = (8, 16), activation: str = "relu",
                       batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """Conv net (3×3 stride-2 convs, 8/16 channels, relu) on Fashion-MNIST (needs its files)."""
    return _conv("fashion_mnist", channels, activation, batch_size, data_dir)


def sampled_mlp(dataset: str = "digits", widths: Sequence[int] = (16, 32, 64),
                depths: Sequence[int] = (1, 2),
                activations: Sequence[str] = ("relu", "tanh", "sigmoid"),
                batch_sizes: Sequence[int] = (32, 64, 128),
                norms: Sequence[str] = ("none",),
                data_dir: str | None = None) -> TaskFamily:
    """MLPs with width, depth, activation, norm (``none``/``layernorm``) and batch size drawn per
    problem (masked; digits)."""
    from l2o.tasks.sampled import SampledMLPFamily

    return SampledMLPFamily(data=_load(dataset, data_dir),
                            widths=_int_tuple("widths", widths),
                            depths=_int_tuple("depths", depths),
                            activations=tuple(activations),
                            batch_sizes=_int_tuple("batch_sizes", batch_sizes),
                            norms=tuple(norms))


def reparam(task: str = "sampled_mlp", task_kwargs: dict | None = None,
            min_scale: float = 1e-2, max_scale: float = 1e2) -> TaskFamily:
    """A registered task with each parameter tensor rescaled (log-uniform), undone in the loss.

    The scale-invariance augmentation of :mod:`l2o.tasks.augment`: ``task``/``task_kwargs`` name
    the wrapped task; each tensor's scale is log-uniform in ``[min_scale, max_scale]``.
    """
    from l2o.tasks.augment import ReparamFamily

    if task == "reparam":
        raise ValueError("reparam cannot wrap itself")
    base = make_task_family(task, **(task_kwargs or {}))
    return ReparamFamily(base=base, min_scale=float(min_scale), max_scale=float(max_scale))


def simple_multi() -> TaskFamily:
    """L2L's simple-multi: scalars x_0, x_1 from 1.0, loss x_0² + x_1² (route them apart)."""
    from l2o.tasks.simple_multi import simple_multi_family

    return simple_multi_family()


def cifar(channels: Sequence[int] = (16, 16, 16), kernel_size: int = 5, batch_size: int = 128,
          data_dir: str | None = None) -> TaskFamily:
    """Conv net (three 5×5 stride-2 ReLU convs, 16 channels, readout) on CIFAR-10 (needs files)."""
    from l2o.tasks.cifar import cifar_conv_family, load_cifar10

    return cifar_conv_family(load_cifar10(data_dir), _int_tuple("channels", channels),
                             _positive_int("kernel_size", kernel_size),
                             _positive_int("batch_size", batch_size))


def cifar_multi(channels: Sequence[int] = (16, 16, 16), kernel_size: int = 5,
                batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """L2L's cifar-multi network (= cifar); its preset gives conv and readout separate nets."""
    return cifar(channels, kernel_size, batch_size, data_dir)


def digits_conv_multi(channels: Sequence[int] = (8, 16), activation: str = "relu",
                      batch_size: int = 128) -> TaskFamily:
    """Offline stand-in for cifar-multi: digits_conv (its preset routes conv/readout apart)."""
    return _conv("digits", channels, activation, batch_size)


# L2O-Scale's evaluation problems (Chen et al. 2020; docs/l2o_scale.md) and offline stand-ins with
# the same architecture on scikit-learn's digits.


def mnist_mlp_relu(hidden_sizes: Sequence[int] = (20,), activation: str = "relu",
                   batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """L2O-Scale's ReLU MLP: 784-20-10 relu on MNIST, batch 128 (needs the MNIST files)."""
    return _mlp("mnist", hidden_sizes, activation, batch_size, data_dir)


def mnist_mlp_deeper(hidden_sizes: Sequence[int] = (20, 20), activation: str = "sigmoid",
                     batch_size: int = 128, data_dir: str | None = None) -> TaskFamily:
    """L2O-Scale's deeper MLP: 784-20-20-10 sigmoid on MNIST, batch 128 (needs the MNIST files)."""
    return _mlp("mnist", hidden_sizes, activation, batch_size, data_dir)


def digits_mlp_deeper(hidden_sizes: Sequence[int] = (20, 20), activation: str = "sigmoid",
                      batch_size: int = 128) -> TaskFamily:
    """Offline stand-in for mnist_mlp_deeper: 64-20-20-10 sigmoid on 8×8 digits, batch 128."""
    return _mlp("digits", hidden_sizes, activation, batch_size)


def digits_cifar_conv(channels: Sequence[int] = (16, 16, 16), kernel_size: int = 5,
                      batch_size: int = 128) -> TaskFamily:
    """Offline stand-in for cifar: its conv net (three 5×5 stride-2 ReLU convs) on 8×8 digits."""
    from l2o.tasks.cifar import cifar_conv_family
    from l2o.tasks.datasets import load_digits

    return cifar_conv_family(load_digits(), _int_tuple("channels", channels),
                             _positive_int("kernel_size", kernel_size),
                             _positive_int("batch_size", batch_size))


#: L2O-Scale's evaluation problems: name → (task on the real data, offline digits stand-in with
#: the same architecture). ``l2o eval CKPT --suite l2o-scale [--offline]`` scores all of them.
L2O_SCALE_EVAL_TASKS: dict[str, tuple[str, str]] = {
    "mnist_mlp": ("mnist_mlp", "digits_mlp"),
    "mnist_mlp_relu": ("mnist_mlp_relu", "digits_mlp_relu"),
    "mnist_mlp_deeper": ("mnist_mlp_deeper", "digits_mlp_deeper"),
    "mnist_conv": ("mnist_conv", "digits_conv"),
    "cifar10_conv": ("cifar", "digits_cifar_conv"),
}


def unsupervised_digits(hidden_sizes: Sequence[int] = (128, 128, 128, 128), output_size: int = 32,
                        shuffle_input: bool = False, batch_per_class: int = 10,
                        samples_per_class: int = 10, ridge_factor: float = 0.1,
                        hinge_loss: bool = False) -> TaskFamily:
    """Base models for the unsupervised update rule on 8×8 digits, class-balanced (offline)."""
    from l2o.unsupervised.data import unsupervised_family

    return unsupervised_family("digits", hidden_sizes, output_size, shuffle_input,
                               batch_per_class, samples_per_class, ridge_factor, hinge_loss)


def unsupervised_tiny_mnist(hidden_sizes: Sequence[int] = (128, 128, 128, 128),
                            output_size: int = 32, shuffle_input: bool = False,
                            batch_per_class: int = 10, samples_per_class: int = 10,
                            ridge_factor: float = 0.1, hinge_loss: bool = False,
                            data_dir: str | None = None) -> TaskFamily:
    """Base models for the unsupervised update rule on MNIST at 14×14 (needs the MNIST files)."""
    from l2o.unsupervised.data import unsupervised_family

    return unsupervised_family("tiny_mnist", hidden_sizes, output_size, shuffle_input,
                               batch_per_class, samples_per_class, ridge_factor, hinge_loss,
                               data_dir)


def problem_set(kinds: Sequence[str] | None = None, noise_prob: float = 0.5,
                rescale_prob: float = 0.25, sum_prob: float = 0.25) -> TaskFamily:
    """Hierarchical-RNN problem set: quadratics, bowls, Rosenbrock, Beale, logistic, tiny MLPs."""
    from l2o.tasks.problem_set import KINDS, ProblemSetFamily

    chosen = tuple(KINDS if kinds is None else (kinds,) if isinstance(kinds, str) else kinds)
    bad = [k for k in chosen if k not in KINDS]
    if bad or not chosen:
        raise ValueError(f"problem_set kinds must be among {KINDS}, got {chosen}")
    for name, p in (("noise_prob", noise_prob), ("rescale_prob", rescale_prob),
                    ("sum_prob", sum_prob)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    return ProblemSetFamily(kinds=chosen, noise_prob=float(noise_prob),
                            rescale_prob=float(rescale_prob), sum_prob=float(sum_prob))


TASKS: dict[str, Callable[..., TaskFamily]] = {
    "quadratic": quadratic,
    "simple": simple,
    "digits_mlp": digits_mlp,
    "digits_mlp_relu": digits_mlp_relu,
    "digits_conv": digits_conv,
    "mnist_mlp": mnist_mlp,
    "fashion_mnist_mlp": fashion_mnist_mlp,
    "mnist_conv": mnist_conv,
    "fashion_mnist_conv": fashion_mnist_conv,
    "sampled_mlp": sampled_mlp,
    "reparam": reparam,
    # L2L problem suite
    "simple_multi": simple_multi,
    "cifar": cifar,
    "cifar_multi": cifar_multi,
    "digits_conv_multi": digits_conv_multi,
    "problem_set": problem_set,
    # the learned unsupervised update rule (l2o.unsupervised; estimator "unsupervised")
    "unsupervised_digits": unsupervised_digits,
    "unsupervised_tiny_mnist": unsupervised_tiny_mnist,
    # L2O-Scale's evaluation problems (L2O_SCALE_EVAL_TASKS)
    "mnist_mlp_relu": mnist_mlp_relu,
    "mnist_mlp_deeper": mnist_mlp_deeper,
    "digits_mlp_deeper": digits_mlp_deeper,
    "digits_cifar_conv": digits_cifar_conv,
}


def make_task_family(name: str, **kwargs) -> TaskFamily:
    """The task family registered as ``name``, built with ``kwargs``.

    Raises ``ValueError`` for an unknown name (listing the known ones) and ``TypeError`` naming
    the task for keyword arguments its factory does not accept.
    """
    try:
        factory = TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise ValueError(f"unknown task {name!r}; known tasks: {known}") from None
    sig = inspect.signature(factory)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        accepted = ", ".join(sig.parameters) or "none"
        raise TypeError(f"task {name!r}: bad arguments {sorted(kwargs)} ({e}); "
                        f"accepted: {accepted}") from None
    return factory(**kwargs)


def describe_tasks() -> list[tuple[str, str]]:
    """``(name, one-line description)`` for every registered task, sorted by name."""
    out = []
    for name in sorted(TASKS):
        doc = inspect.getdoc(TASKS[name]) or ""
        out.append((name, doc.splitlines()[0] if doc else ""))
    return out
