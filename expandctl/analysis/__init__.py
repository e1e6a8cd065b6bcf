"""What the ExpandNets paper analyses, for any checkpoint or run (docs/analysis.md).

* :func:`gradient_confusion`: pairwise cosine similarities of mini-batch gradients
  (Sankararaman et al. 2020; ExpandNets Fig. 2), and :func:`grad_confusion_hook` to record their
  minimum after every training epoch (``expandctl train --grad-confusion``);
* :func:`loss_landscape`: loss and error along filter-normalised random directions (Li et al. 2018);
* :mod:`expandctl.analysis.plots`: kernel densities, landscape curves and contours, runs overlaid.

>>> from expandctl.analysis import gradient_confusion, loss_landscape
>>> gradient_confusion(model, data.train, pairs=100)["min"]
>>> loss_landscape(model, data.train, dims=1, steps=21)["loss"]

Pure functions: they never print, and never change the model they are given. The verbs that load a
checkpoint and write the figures are :mod:`expandctl.workflows.analyze` and :mod:`expandctl.workflows.plot`
(the commands ``expandctl analyze`` and ``expandctl plot``).
"""

from .confusion import MODES, WRT, cosine_similarities, grad_confusion_hook, gradient_confusion
from .landscape import SPACES, evaluate, filter_normalized_direction, loss_landscape
from .plots import gaussian_kde, plot_confusion, plot_landscape, plot_runs, read_metrics, scott_bandwidth

__all__ = [
    "gradient_confusion",
    "cosine_similarities",
    "grad_confusion_hook",
    "WRT",
    "MODES",
    "loss_landscape",
    "filter_normalized_direction",
    "evaluate",
    "SPACES",
    "gaussian_kde",
    "scott_bandwidth",
    "plot_confusion",
    "plot_landscape",
    "plot_runs",
    "read_metrics",
]
