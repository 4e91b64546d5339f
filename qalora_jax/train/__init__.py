"""Training: the trainable/frozen split, optimizers, and pure train and eval steps."""

from qalora_jax.train.partition import partition, path_leaves
from qalora_jax.train.step import TrainState, make_optimizer, make_train_step

__all__ = ["TrainState", "make_optimizer", "make_train_step", "partition", "path_leaves"]
