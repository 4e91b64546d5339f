"""Training: configs, the experiment a config builds, the pure train step, the loop, checkpoints, meshes, sweeps."""

from qalora_jax.train.step import TrainState, make_optimizer, make_train_step

__all__ = ["TrainState", "make_optimizer", "make_train_step"]
