"""Training, evaluation and whole runs: the Python API behind ``peftkit train``."""
from .data import DataConfig, load_splits
from .job import JobConfig, run_job
from .metrics import evaluate, predict
from .models import ModelLoadError, load_model
from .trainer import TrainConfig, Trainer, TrainingInterrupted

__all__ = ["DataConfig", "JobConfig", "ModelLoadError", "TrainConfig", "Trainer", "TrainingInterrupted", "evaluate",
           "load_model", "load_splits", "predict", "run_job"]
