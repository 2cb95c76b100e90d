"""Inner problems (``Task``) and distributions over them (``TaskFamily``)."""

from l2o.tasks.base import SingleTaskFamily, Task, TaskFamily
from l2o.tasks.conv import ConvTask
from l2o.tasks.datasets import (
    DataNotFoundError,
    Dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist,
    read_idx,
    write_idx,
)
from l2o.tasks.mlp import MLPTask
from l2o.tasks.quadratic import QuadraticFamily, QuadraticTask
from l2o.tasks.registry import TASKS, describe_tasks, make_task_family
from l2o.tasks.simple import SimpleTask, simple_family

__all__ = [
    "TASKS",
    "ConvTask",
    "DataNotFoundError",
    "Dataset",
    "MLPTask",
    "QuadraticFamily",
    "QuadraticTask",
    "SimpleTask",
    "SingleTaskFamily",
    "Task",
    "TaskFamily",
    "describe_tasks",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "make_task_family",
    "read_idx",
    "simple_family",
    "write_idx",
]
