"""engine.py's trainer building: SyncBatchNorm where per-GPU batches are small, fused AdamW on CUDA only.
(The training step's behaviour is tested with real runs in test_train.py and test_reliability.py.)"""
from __future__ import annotations

import pytest
import torch

import config_shenron as C
from engine import build_trainer, uses_sync_batchnorm
from losses import build_loss
from runtime import DistributedEnv

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
DDP = DistributedEnv(rank=0, local_rank=0, world_size=4)


def cfg_for(model: str, **options) -> C.RunConfig:
    return C.config_from_options("cpu", "/data", model=model, **options)


@pytest.mark.parametrize("model, options, device, env, expected", [
    ("unet_3d", {}, CUDA, DDP, True),                          # auto: on for 3D (batch 2 per GPU)
    ("unet_2d", {}, CUDA, DDP, False),                         # auto: off for 2D
    ("unet_2d", {"sync_bn": "on"}, CUDA, DDP, True),
    ("unet_3d", {"sync_bn": "off"}, CUDA, DDP, False),
    ("unet_3d", {}, CUDA, DistributedEnv(), False),            # one process: nothing to synchronise
    ("unet_3d", {}, CPU, DDP, False),                          # SyncBatchNorm runs on GPUs only
    ("unet_3d", {"norm": "instance"}, CUDA, DDP, False),       # no BatchNorm to convert
])
def test_sync_batchnorm_where_per_gpu_batches_are_small(model, options, device, env, expected):
    assert uses_sync_batchnorm(cfg_for(model, **options), device, env) is expected


def test_a_cpu_trainer_has_plain_adamw_fp32_and_no_scaler():
    cfg = cfg_for("unet_2d", base_channels=4, depth=2, patch_yx=32)
    trainer = build_trainer(cfg, build_loss(cfg.loss, cfg.classes), CPU, DistributedEnv())
    assert not trainer.optimizer.defaults.get("fused") and not trainer.scaler.is_enabled()
    assert trainer.model is trainer.raw_model and trainer.ema is None
    with trainer.autocast():
        assert not torch.is_autocast_enabled("cpu")
