"""Training: config, step with gradient accumulation, trainer, atomic checkpoints, loop."""

from moekit.training.config import DataConfig, TrainConfig, apply_overrides
from moekit.training.heap import keep_freed_memory
from moekit.training.run import TrainResult, train
from moekit.training.step import StepResult, apply_bias_update, train_step
from moekit.training.trainer import NonFiniteLossError, Trainer

__all__ = ["DataConfig", "TrainConfig", "apply_overrides", "keep_freed_memory", "TrainResult", "train", "StepResult",
           "train_step", "apply_bias_update", "NonFiniteLossError", "Trainer"]
