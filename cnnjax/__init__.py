"""cnnjax: the classic convolutional networks as pure JAX/Flax functions."""

from cnnjax import ops, shapes
from cnnjax.shapes import ShapeError

__version__ = "0.1.0"

__all__ = ["ops", "shapes", "ShapeError", "__version__"]
