"""cnnjax: the classic convolutional networks as pure JAX/Flax functions."""

from cnnjax import ops, shapes
from cnnjax.shapes import ShapeError

# The function shadows its module's name on purpose: cnnjax.summary(model, input_shape).
from cnnjax.summary import summary

__version__ = "0.1.0"

__all__ = ["ops", "shapes", "ShapeError", "summary", "__version__"]
