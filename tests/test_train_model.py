"""Model and optimisation pieces of the trainer, checked without training: BlurPool, weight-decay groups,
freezing, fine-tune loading, the summary, the epoch plan and the one-cycle schedule across stages."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpipe.config import load_config
from fastpipe.model import (
    BlurPoolConv2d,
    apply_freeze,
    build_resnet,
    load_weights,
    model_summary,
    parameter_groups,
    set_train_mode,
)
from fastpipe.train.optim import build_optimizer, build_scheduler, plan_epochs, rescale_lr


def test_blurpool_wraps_strided_convs_and_keeps_weight_names():
    plain, blurred = build_resnet("resnet18", 5), build_resnet("resnet18", 5, blurpool=True)
    wrapped = [name for name, m in blurred.named_modules() if isinstance(m, BlurPoolConv2d)]
    assert wrapped and "conv1" not in wrapped                       # the RGB stem stays as it is
    assert all(max(blurred.get_submodule(n).stride) > 1 for n in wrapped)
    blurred.load_state_dict(plain.state_dict())                   # same keys, so checkpoints interchange
    assert blurred(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_last_bn_of_each_residual_block_starts_at_zero():
    model = build_resnet("resnet50", 4)
    assert all(torch.all(block.bn3.weight == 0) for layer in (model.layer1, model.layer4) for block in layer)


def test_no_weight_decay_on_any_norm_layer_or_bias_including_downsample_bn():
    model = build_resnet("resnet50", 4)
    decay, no_decay = parameter_groups(model, 1e-4)
    no_decay_ids = {id(p) for p in no_decay["params"]}
    downsample_bn = model.layer1[0].downsample[1]
    assert isinstance(downsample_bn, nn.BatchNorm2d) and id(downsample_bn.weight) in no_decay_ids
    assert id(model.fc.bias) in no_decay_ids and id(model.fc.weight) not in no_decay_ids
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_freeze_backbone_trains_only_the_head_and_keeps_bn_statistics():
    model = build_resnet("resnet18", 4)
    apply_freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    set_train_mode(model, "backbone")
    assert not model.bn1.training and model.training


def test_fine_tune_load_replaces_the_head_when_class_count_differs():
    source = build_resnet("resnet18", 10)
    target = build_resnet("resnet18", 3)
    reset = load_weights(target, source.state_dict())
    assert reset == ["fc.bias", "fc.weight"]
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match="model.arch"):
        load_weights(build_resnet("resnet50", 3), source.state_dict())


def test_summary_counts_flops_growing_with_resolution():
    model = build_resnet("resnet18", 4)
    text, small = model_summary(model, 32)
    _, large = model_summary(model, 64)
    assert "layer4" in text and "parameters:" in text
    assert large == pytest.approx(4 * small, rel=0.1)   # convolution FLOPs scale with the pixel count


def test_epoch_plan_covers_stages_with_different_batch_sizes():
    config = load_config(None, ["--schedule.epochs=4", "--data.batch_size=32",
                                ("--resolution.stages=[{epochs = 2, resolution = 64}, "
                                 "{epochs = 2, resolution = 96, batch_size = 16}]")])
    plans = plan_epochs(config, samples_per_rank=100)
    assert [(p.resolution, p.batch_size, p.steps, p.lr_scale) for p in plans] == [
        (64, 32, 3, 1.0), (64, 32, 3, 1.0), (96, 16, 6, 0.5), (96, 16, 6, 0.5)]
    assert plan_epochs(config, 100, world_size=2)[0].lr_scale == 2.0
    with pytest.raises(ValueError, match="batch size"):
        plan_epochs(config, samples_per_rank=10)


def test_one_cycle_schedule_spans_the_run_and_scales_with_the_stage_batch_size():
    config = load_config(None, ["--schedule.epochs=2", "--optim.lr=1.0"])
    model = nn.Linear(2, 2)
    optimizer = build_optimizer(model, config)
    assert optimizer.param_groups[0]["nesterov"]
    scheduler = build_scheduler(optimizer, config, peak_lr=1.0, total_steps=40)   # peak at step 0.125*40-1
    lrs, momenta = [], []
    for step in range(40):
        if step == 20:
            rescale_lr(optimizer, 0.5)   # second stage: half the batch, half the LR
        lrs.append(optimizer.param_groups[0]["lr"])
        momenta.append(optimizer.param_groups[0]["momentum"])
        optimizer.step()
        if step < 39:
            scheduler.step()
    peak = lrs.index(max(lrs))
    assert lrs[peak] == pytest.approx(1.0) and peak == 4
    assert momenta[peak] == pytest.approx(0.85 * 0.9)             # momentum is lowest when the LR peaks
    assert lrs[0] == pytest.approx(1.0 / 25)
    assert lrs[-1] == pytest.approx(0.5 / 25 / 1e4, rel=1e-6)   # final LR of the scaled curve
    assert all(lr > 0 for lr in lrs)
