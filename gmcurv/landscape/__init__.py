"""1-D / 2-D loss slices around the weights: ``L(θ0 + α d1 + β d2)`` on a grid.

The pieces: `grid` (the range and axes), `directions` (random filter-normalised, Hessian
eigenvectors, other checkpoints), `points` (the loss at many points, several per forward
pass), `chunks` and `stacked` (how a chunk of points runs: stacked Linear products, ``vmap``
or a loop), `totals` (loss and accuracy per point), `fit` (sharpness: a parabola fitted
around the centre) and `slices` (the grid, centre and fits in one pass). See each module.
"""

from gmcurv.landscape.directions import (
    NORMALISATIONS,
    Direction,
    checkpoint_directions,
    direction_norm,
    eigen_directions,
    filter_normalize,
    is_filter_param,
    random_directions,
)
from gmcurv.landscape.fit import FIT_POINTS, FIT_STEP, QuadraticFit, quadratic_fit
from gmcurv.landscape.grid import grid_axis, parse_range
from gmcurv.landscape.points import PointValues, chunk_size, evaluate_points
from gmcurv.landscape.slices import Landscape, landscape, mean_loss
from gmcurv.landscape.stacked import input_linears, stackable_linears

__all__ = [
    "FIT_POINTS",
    "FIT_STEP",
    "NORMALISATIONS",
    "Direction",
    "Landscape",
    "PointValues",
    "QuadraticFit",
    "checkpoint_directions",
    "chunk_size",
    "direction_norm",
    "eigen_directions",
    "evaluate_points",
    "filter_normalize",
    "grid_axis",
    "input_linears",
    "is_filter_param",
    "landscape",
    "mean_loss",
    "parse_range",
    "quadratic_fit",
    "random_directions",
    "stackable_linears",
]
