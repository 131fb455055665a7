"""cnnjax.train: the data-parallel training system.

``train_and_evaluate(config, workdir)`` trains and returns the final metrics;
``evaluate(config, workdir)`` scores the newest checkpoint. Both are what the
``cnnjax train`` / ``cnnjax eval`` commands call.
"""

from cnnjax.train.checkpoint import CheckpointError
from cnnjax.train.config import (
    ConfigError,
    apply_overrides,
    default_config,
    load_config_file,
)
from cnnjax.train.loop import (
    NonFiniteLossError,
    RestoredRun,
    TrainingPreempted,
    evaluate,
    restore_run,
    stored_config,
    train_and_evaluate,
)
from cnnjax.train.state import TrainState

__all__ = ["train_and_evaluate", "evaluate", "restore_run", "RestoredRun", "stored_config",
           "TrainState", "ConfigError",
           "CheckpointError", "NonFiniteLossError", "TrainingPreempted", "apply_overrides",
           "default_config", "load_config_file"]
