"""Training and fine-tuning Sana: config, flow-matching loss, data, CAME, checkpoints and the training loop.

from sana.train import load_config, train
summary = train(load_config("configs/train/tiny.toml", ["schedule.max_steps=50"]))
"""

from sana.train.cache import CachedDataset, build_cache
from sana.train.checkpoint import StopRequest, latest_checkpoint, load_checkpoint, save_checkpoint
from sana.train.config import TrainConfig, load_config
from sana.train.data import DataError, ImageFolderDataset
from sana.train.loop import TrainingError, train
from sana.train.loss import drop_captions, flow_matching_loss, sample_sigmas, shift_sigmas
from sana.train.optim import CAME, EMA, build_optimizer, lr_at

__all__ = [
    "CAME",
    "EMA",
    "CachedDataset",
    "DataError",
    "ImageFolderDataset",
    "StopRequest",
    "TrainConfig",
    "TrainingError",
    "build_cache",
    "build_optimizer",
    "drop_captions",
    "flow_matching_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "load_config",
    "lr_at",
    "sample_sigmas",
    "save_checkpoint",
    "shift_sigmas",
    "train",
]
