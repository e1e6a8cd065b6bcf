"""Contract what others trained: find every linear region of any model and merge it into one layer.

``contract_graph(model, example_inputs)`` traces the model (torch.fx; what cannot be traced stays an
opaque leaf), finds each maximal region that maps one tensor to one tensor through linear operations
(convolutions, linear layers, eval-mode BatchNorm, identity, sums and differences of branches,
per-channel or scalar constants, zero padding, average pooling that counts the padding), and
replaces each region that is exactly one layer, borders included, by that layer. Every merge is
checked in float64 on the region's own input. ``plan_graph`` says what it would do.
"""

from .regions import REGION_RTOL, GraphPlan, Region, contract_graph, plan_graph

__all__ = ["contract_graph", "plan_graph", "GraphPlan", "Region", "REGION_RTOL"]
