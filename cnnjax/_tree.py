"""Small pytree helpers shared by the summary, the models and the checkpoints."""

from __future__ import annotations


def path_names(path) -> tuple[str, ...]:
    """A ``jax.tree_util`` key path as plain strings: ``("vgg16", "block1_conv1", "kernel")``."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)
