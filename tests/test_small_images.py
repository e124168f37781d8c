"""Small images: the small stem and narrow widths, "auto" stem selection, small-image augmentation defaults
that yield to what the user sets, fine-tuning across stems refused, and the LR finder reading its curve
without lag."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fastpipe.config import load_config
from fastpipe.model import build_resnet, stem_of
from fastpipe.train.assemble import build_model, resolve_stem
from fastpipe.train.checkpoint import CheckpointError, save_checkpoint
from fastpipe.train.lr_finder import EDGE_RISE, read_curve
from fastpipe.train.runtime import build_runtime


def stage_sizes(model: nn.Module, resolution: int) -> dict[str, int]:
    """Spatial size of each stage's output for one image at `resolution`."""
    sizes = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda _m, _i, out, name=name: sizes.__setitem__(name, out.shape[-1])) for name in ("layer1", "layer4")]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    for hook in hooks:
        hook.remove()
    return sizes


def test_small_stem_keeps_resolution_the_imagenet_stem_throws_away():
    imagenet, small = build_resnet("resnet18", 10), build_resnet("resnet18", 10, stem="small")
    assert stage_sizes(imagenet, 32) == {"layer1": 8, "layer4": 1}    # 7x7 stride 2 + max-pool: 32 -> 8
    assert stage_sizes(small, 32) == {"layer1": 16, "layer4": 2}      # one 3x3 stride-2 conv: 32 -> 16
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert small.state_dict().keys() == imagenet.state_dict().keys()


def test_narrow_resnet_scales_every_stage_and_keeps_torchvision_names():
    wide, narrow = build_resnet("resnet50", 7), build_resnet("resnet50", 7, width=16, stem="small")
    assert narrow.state_dict().keys() == wide.state_dict().keys()
    assert narrow.conv1.out_channels == 16 and narrow.layer4[-1].conv3.out_channels == 16 * 8 * 4
    assert narrow.fc.in_features == 16 * 8 * 4 and narrow(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_resnet("resnet18", 7, width=12)


@pytest.mark.parametrize("overrides, stem, why", [
    (["--resolution.start=32", "--resolution.end=32"], "small", "up to 32 px <= 64"),
    (["--resolution.start=64", "--resolution.end=64"], "small", "up to 64 px <= 64"),
    (["--resolution.start=32", "--resolution.end=96", "--schedule.epochs=4", "--resolution.ramp_start=1",
      "--resolution.ramp_end=3"], "imagenet", "up to 96 px > 64"),    # progressive: the largest epoch decides
    (["--resolution.start=32", "--resolution.end=32", "--model.stem=imagenet"], "imagenet", "set by model.stem"),
    ([], "imagenet", "up to 192 px > 64"),
])
def test_auto_stem_follows_the_largest_training_resolution(overrides, stem, why):
    chosen, reason = resolve_stem(load_config(None, overrides))
    assert chosen == stem and why in reason


def test_fine_tuning_across_stems_is_refused_with_the_setting_to_use(tmp_path):
    source = tmp_path / "imagenet.pt"
    save_checkpoint(source, {"model": build_resnet("resnet18", 4).state_dict(), "epoch": 0, "stem": "imagenet"})
    config = load_config("small.toml")
    runtime = build_runtime(config, device="cpu")
    with pytest.raises(CheckpointError, match=r'"imagenet".*"small" stem.*--model\.stem=imagenet'):
        build_model(config, 4, runtime, init_from=source, log=lambda message: None)
    same = load_config("small.toml", ["--model.stem=imagenet", "--model.width=64"])
    model = build_model(same, 4, build_runtime(same, device="cpu"), init_from=source, log=lambda message: None)
    assert model.conv1.kernel_size == (7, 7)


def test_a_checkpoint_without_a_recorded_stem_is_read_from_its_first_convolution():
    assert stem_of({"model": build_resnet("resnet18", 3).state_dict()}) == "imagenet"
    assert stem_of({"model": build_resnet("resnet18", 3, stem="small").state_dict()}) == "small"


def test_small_image_defaults_apply_only_to_keys_nobody_set(tmp_path):
    small = load_config(None, ["--resolution.start=32", "--resolution.end=32"])
    assert small.augment.min_scale == 0.6
    assert [key for key, _, _ in small.size_defaults] == ["augment.min_scale"]
    assert "up to 32 px <= 64" in small.size_defaults[0][2] and "0.08" in small.size_defaults[0][2]

    by_flag = load_config(None, ["--resolution.start=32", "--resolution.end=32", "--augment.min_scale=0.08"])
    assert by_flag.augment.min_scale == 0.08 and by_flag.size_defaults == ()
    recipe = tmp_path / "mine.toml"
    recipe.write_text("[resolution]\nstart = 32\nend = 32\n\n[augment]\nmin_scale = 0.08\n")
    assert load_config(recipe).augment.min_scale == 0.08

    large = load_config(None, ["--resolution.start=128", "--resolution.end=160"])
    assert large.augment.min_scale == 0.08 and large.size_defaults == ()


def test_lr_finder_suggestion_sits_at_the_true_steepest_point_without_lag():
    # a loss that falls fastest at lr = 0.1 (a logistic step in log-LR), then blows up, plus noise
    steps = 100
    lrs = np.logspace(-5, 1, steps)
    x = np.log10(lrs)
    rng = np.random.default_rng(0)
    losses = 2.3 - 2.0 / (1 + np.exp(-(x + 1) * 4)) + np.exp(4 * (x - 0.6)) + rng.normal(0, 0.03, steps)
    result = read_curve(lrs.tolist(), losses.tolist(), steps=steps)
    assert 0.1 / 1.3 <= result.steepest <= 0.1 * 1.3
    # a running average of 0.98 (the old smoothing) trails the curve and puts its steepest point 3.5x too high
    average, lagged = 0.0, []
    for step, value in enumerate(losses):
        average = 0.98 * average + 0.02 * value
        lagged.append(average / (1 - 0.98 ** (step + 1)))
    old_steepest = lrs[10:-5][np.argmin(np.gradient(np.array(lagged)[10:-5], x[10:-5]))]
    assert not 0.1 / 2 <= old_steepest <= 0.1 * 2


def test_lr_finder_suggests_the_edge_where_the_loss_turns_back_up_through_the_noise():
    steps = 100
    lrs = np.logspace(-5, 1, steps)
    x = np.log10(lrs)
    clean = 2.3 - 2.0 / (1 + np.exp(-(x + 2) * 4)) + np.exp(3 * (x - 0.3))   # floor from ~1e-2, rising past ~0.3
    drop = clean[:10].mean() - clean.min()
    expected = lrs[np.argmax((clean > clean.min() + EDGE_RISE * drop) & (x > x[np.argmin(clean)]))]
    noisy = clean + np.random.default_rng(1).normal(0, 0.03, steps)
    result = read_curve(lrs.tolist(), noisy.tolist(), steps=steps)
    assert result.rule == "edge" and result.suggestion == result.edge
    assert expected / 1.3 <= result.edge <= expected * 1.3
    assert result.steepest < result.min_loss < result.edge   # the descent, the floor, then its edge


def test_lr_finder_edge_does_not_move_with_the_size_of_the_blown_up_last_loss():
    # a sweep that stops at step 71 of 100 on one huge loss (as the divergence check ends it): how huge must not
    # matter, the smoothing window would otherwise drag the rise several steps earlier
    steps = 100
    lrs = np.logspace(-5, 1, steps)[:71]
    x = np.log10(lrs)
    losses = 2.3 - 2.0 / (1 + np.exp(-(x + 2) * 4)) + np.exp(3 * (x - 0.3))
    edges = []
    for last in (5.0, 50.0, 1e4):
        stopped = losses.copy()
        stopped[-1] = last
        edges.append(read_curve(lrs.tolist(), stopped.tolist(), steps=steps, stopped_early=True).edge)
    assert edges[0] == edges[1] == edges[2], edges
    assert edges[0] >= lrs[-4]   # only the window's half-width (3 steps) before the blow-up
