"""The coordinatewise RNN: one small GRU per coordinate, no hierarchy.

The variant of Wichrowska et al.'s optimizer that sits closer to L2L's coordinatewise LSTM: the
same inputs (multi-timescale normalized momenta, relative log gradient magnitudes, the log learning
rate) and outputs (a mixture of the momenta and a change of the per-coordinate log learning rate)
as :class:`~l2o.optimizers.hierarchical_rnn.HierarchicalRNN`, with the per-tensor and global cells
removed, so every coordinate is optimized independently.
"""

from __future__ import annotations

import dataclasses

from l2o.optimizers.hierarchical_rnn import HierarchicalRNN
from l2o.optimizers.registry import register_optimizer


@register_optimizer("coordinatewise_rnn")
@dataclasses.dataclass(frozen=True)
class CoordinatewiseRNN(HierarchicalRNN):
    """:class:`HierarchicalRNN` with ``hierarchy=False`` by default (θ has no upper levels)."""

    hierarchy: bool = False
