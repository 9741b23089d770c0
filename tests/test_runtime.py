"""runtime.py: the device a rank trains on, with cuDNN autotuning on CUDA."""
from __future__ import annotations

import torch

import runtime
from runtime import DistributedEnv


def test_a_cuda_rank_gets_its_local_gpu_with_cudnn_autotuning(monkeypatch):
    """cuDNN picks the fastest convolution for the fixed patch shape (it was left off)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    device = runtime.select_device("cuda", DistributedEnv(rank=5, local_rank=1, world_size=8))
    assert device == torch.device("cuda", 1) and chosen == [device]
    assert torch.backends.cudnn.benchmark is True


def test_a_cpu_rank_trains_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert runtime.select_device("cpu", DistributedEnv()) == torch.device("cpu")
    assert torch.backends.cudnn.benchmark is False
