"""Inner problems (``Task``) and distributions over them (``TaskFamily``)."""

from l2o.tasks.base import SingleTaskFamily, Task, TaskFamily
from l2o.tasks.quadratic import QuadraticFamily, QuadraticTask

__all__ = ["QuadraticFamily", "QuadraticTask", "SingleTaskFamily", "Task", "TaskFamily"]
