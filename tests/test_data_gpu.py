"""On a CUDA machine: batches arrive on the GPU, and DALI's mixed (nvJPEG) decoding matches its CPU path."""
from __future__ import annotations

import pytest
import torch

from fastpipe.data import build_loader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("backend", ["ffcv", "dali", "torch"])
def test_cuda_batches_are_normalised_on_the_gpu(betons, backend):
    loader = build_loader(backend, betons, "train", batch_size=16, resolution=64, workers=2, device="cuda",
                          dtype=torch.bfloat16)
    batches = 0
    for images, labels in loader:
        assert images.device.type == "cuda" and labels.device.type == "cuda"
        assert images.shape == (16, 3, 64, 64) and images.dtype == torch.bfloat16
        assert images.is_contiguous(memory_format=torch.channels_last) and labels.dtype == torch.int64
        batches += 1
    assert batches == len(loader) > 0


def test_dali_mixed_decoding_matches_the_cpu_pipeline(betons):
    outputs = {}
    for device in ("cpu", "cuda"):
        loader = build_loader("dali", betons, "train", batch_size=8, resolution=32, workers=2, device=device,
                              shuffle=False, drop_last=False, normalize=False, min_scale=1.0, ratio=(1.0, 1.0),
                              flip=False)
        outputs[device] = torch.cat([images.float().cpu() for images, _ in loader])
    # train split: JPEG and raw samples in the same batches; decoders differ only in rounding
    assert (outputs["cpu"] - outputs["cuda"]).abs().mean() < 3


def test_dali_pipeline_itself_puts_labels_on_the_gpu(betons):
    loader = build_loader("dali", betons, "train", batch_size=8, resolution=32, workers=2, device="cuda")
    runner = loader.build_pipeline(32, 8)
    images, labels = next(runner.epoch(loader.epoch_order(0)))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
