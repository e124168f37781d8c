"""ResNet models for the trainer: torchvision architectures plus the fast-ImageNet options.

BlurPool, freezing, fine-tune head replacement, weight-decay parameter groups and a model summary
(layers, parameters, FLOPs at a given resolution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
# torchvision's block type and blocks per stage for each architecture (as in torchvision.models.resnet18 ...)
ARCHITECTURE_LAYERS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
                       "resnet50": ("Bottleneck", [3, 4, 6, 3])}
STEMS = ("imagenet", "small")
SMALL_STEM_STRIDE = 2   # measured at 32 px: stride 1 costs 3.5x the time for no gain (README, "Small images")
FREEZE_MODES = ("none", "bn", "backbone")
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


class BlurPoolConv2d(nn.Conv2d):
    """A strided convolution preceded by a fixed 3x3 binomial blur (anti-aliased downsampling).

    Hand-written because neither torch nor torchvision ships it. Subclassing Conv2d keeps the weight
    names (`conv2.weight`), so checkpoints load into models with or without BlurPool.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :]) / 16.0
        self.register_buffer("blur", kernel.expand(self.in_channels, 1, 3, 3).clone(), persistent=False)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> BlurPoolConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        new.load_state_dict(conv.state_dict())
        return new.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(blurred)


def add_blurpool(model: nn.Module, min_channels: int = 16) -> int:
    """Swap strided convolutions with at least `min_channels` inputs (not the RGB stem) for BlurPool ones."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= min_channels):
                setattr(parent, name, BlurPoolConv2d.from_conv(child))
                replaced += 1
    return replaced


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with `width` channels in its first stage instead of 64 (and 2x, 4x, 8x that in
    the later ones). Same modules and weight names; only the channel counts differ."""

    def __init__(self, block, layers: list[int], *, width: int, num_classes: int, zero_init_residual: bool):
        self.width = width
        super().__init__(block, layers, num_classes=num_classes, zero_init_residual=zero_init_residual)
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:   # the first stage: its input is the stem's `width` channels
            self.inplanes = self.width
        return super()._make_layer(block, planes * self.width // 64, blocks, stride, dilate)


def build_resnet(arch: str, num_classes: int, *, stem: str = "imagenet", width: int = 64, blurpool: bool = False,
                 zero_init_residual: bool = True, stem_stride: int = SMALL_STEM_STRIDE) -> nn.Module:
    """A randomly initialised torchvision ResNet. zero_init_residual zeroes the last BN of each block so
    every block starts as the identity, which trains faster with large batches (Goyal et al., 2017).

    `stem="small"` swaps the 7x7 stride-2 convolution and the max-pool (32 px -> 8 px before the first
    block) for one 3x3 convolution of `stem_stride`, as ResNets for CIFAR-size images do. `width` below 64
    narrows every stage (a quarter of the FLOPs at 32)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"Unknown model.arch '{arch}'; choose one of {', '.join(ARCHITECTURES)}.")
    if stem not in STEMS:
        raise ValueError(f"Unknown model.stem '{stem}'; choose one of {', '.join(STEMS)}.")
    if width < 8 or width % 8:
        raise ValueError(f"model.width must be a multiple of 8 (at least 8), got {width}.")
    if width == 64:
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes,
                                                  zero_init_residual=zero_init_residual)
    else:
        reference = getattr(torchvision.models.resnet, ARCHITECTURE_LAYERS[arch][0])
        model = NarrowResNet(reference, ARCHITECTURE_LAYERS[arch][1], width=width, num_classes=num_classes,
                             zero_init_residual=zero_init_residual)
    if stem == "small":
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=stem_stride, padding=1,
                                bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")   # as torchvision
        model.maxpool = nn.Identity()
    if blurpool:
        add_blurpool(model)
    return model


def stem_of(state: dict) -> str:
    """The stem a checkpoint's weights were built with: recorded since stems exist, else read from the
    first convolution's kernel (7x7: imagenet)."""
    if state.get("stem"):
        return state["stem"]
    return "imagenet" if state["model"]["conv1.weight"].shape[-1] == 7 else "small"


def replace_head(model: nn.Module, num_classes: int) -> None:
    model.fc = nn.Linear(model.fc.in_features, num_classes).to(model.fc.weight.device)


def load_weights(model: nn.Module, state: dict) -> list[str]:
    """Fine-tune initialisation: load matching weights, keep the new head when its shape differs.
    Returns the names of the tensors left at their fresh initialisation."""
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    kept = {k: v for k, v in state.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    reshaped = [k for k in skipped if not k.startswith("fc.")]
    if unexpected or reshaped or any(not k.startswith("fc.") for k in missing):
        raise ValueError(f"Checkpoint does not match the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, other shape {reshaped[:5]}. Check model.arch, model.width and "
                         f"model.blurpool against the checkpoint.")
    return sorted(set(skipped) | set(missing))


def apply_freeze(model: nn.Module, mode: str) -> None:
    """`bn`: BatchNorm affine parameters fixed; `backbone`: only the classifier head trains."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"Unknown model.freeze '{mode}'; choose one of {', '.join(FREEZE_MODES)}.")
    for module in model.modules():
        frozen = (mode == "backbone" and module is not model.fc) or (
            mode == "bn" and isinstance(module, nn.modules.batchnorm._BatchNorm))
        if frozen:
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
    if mode == "backbone":
        for param in model.fc.parameters():
            param.requires_grad_(True)


def set_train_mode(model: nn.Module, freeze: str) -> None:
    """model.train(), except frozen BatchNorm layers keep their running statistics (eval mode)."""
    model.train()
    if freeze in ("bn", "backbone"):
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only: normalisation layers and biases are chosen by module
    type, not by name (name matching misses torchvision's `downsample.1` BatchNorm)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, NORM_TYPES) or name == "bias" else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_summary(model: nn.Module, resolution: int, *, device: torch.device | str = "cpu") -> tuple[str, int]:
    """A text table of the top-level layers (output shape, parameters, forward FLOPs) for one image at
    `resolution`, and the total forward FLOPs per image."""
    shapes: dict[str, tuple] = {}
    hooks = [child.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
             for name, child in model.named_children()]
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, resolution, resolution, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    lines = [f"{'layer':<12} {'type':<18} {'output':<20} {'params':>12} {'GFLOPs':>10}"]
    for name, child in model.named_children():
        params = sum(p.numel() for p in child.parameters())
        flops = sum(per_module.get(f"{root}.{name}", {}).values())
        lines.append(f"{name:<12} {type(child).__name__:<18} {shapes.get(name, '-')!s:<20} "
                     f"{params:>12,} {flops / 1e9:>10.3f}")
    total_flops = counter.get_total_flops()
    total, trainable = count_parameters(model)
    lines += ["", f"parameters: {total:,} ({trainable:,} trainable)",
              (f"forward FLOPs per image at {resolution}px: {total_flops / 1e9:.3f} G "
               f"(training step ~3x: {3 * total_flops / 1e9:.3f} G)")]
    return "\n".join(lines), total_flops


class CompileCounter:
    """A torch.compile backend that counts the graphs it compiles, then hands them to `backend`.

    With dynamic=False every new input shape (resolution, batch size) is one new graph, so the count
    shows recompiles directly: it must grow once per distinct resolution and never in steady state.
    """

    def __init__(self, backend: str = "inductor"):
        self.backend = backend
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend(self.backend)(graph_module, example_inputs)


def compile_cache_counts() -> dict[str, int]:
    """inductor's graph cache lookups in this process so far: {"hits": ..., "misses": ...}."""
    from torch._dynamo.utils import counters  # local: torch._dynamo loads only where compile runs

    return {"hits": int(counters["inductor"]["fxgraph_cache_hit"]),
            "misses": int(counters["inductor"]["fxgraph_cache_miss"])}


def compile_model(model: nn.Module, backend: str = "inductor", max_graphs: int = 64):
    """torch.compile with static shapes: one specialised graph per resolution instead of a slower
    dynamic-shape graph. Returns (compiled module, CompileCounter)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, max_graphs)
    counter = CompileCounter(backend)
    return torch.compile(model, dynamic=False, backend=counter), counter
