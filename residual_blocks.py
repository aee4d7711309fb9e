"""Residual blocks of FaceNN: the ConvNeXt block and the MobileNetV2 inverted bottleneck.

1x1 convolutions of the ConvNeXt block run as `nn.Linear` on the channels-last view of the tensor
(as torchvision's ConvNeXt does): with a `channels_last` input the permutes are free and the
projections become plain matrix multiplies.
"""

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torchvision.models.convnext import LayerNorm2d  # over the channels of NCHW: ConvNeXt's own norm
from torchvision.ops import StochasticDepth

NORM_POSITIONS = ("after_dwconv", "before_dwconv", "after_expand")
NORMS = {"batch": nn.BatchNorm2d, "layer": partial(LayerNorm2d, eps=1e-6)}  # for NCHW tensors


class _ReLU6InPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        ctx.save_for_backward(x.clamp_(0, 6))
        return x

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, y, 0.0, 6.0)  # y in (0, 6) exactly where x was


class ReLU6InPlace(nn.Module):
    """ReLU6 that overwrites its input and saves only its output for backward: some of the largest
    tensors of a training step are then allocated and saved once instead of twice.

    `nn.ReLU6(inplace=True)` does not save memory in training: autograd copies the input first,
    because its derivative formula reads the input. The output carries the same information (it is
    strictly between 0 and 6 exactly where the input was), so nothing needs copying. The input
    must be a fresh tensor nobody else needs, such as a convolution's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6InPlace.apply(x)


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep what a matmul computed; recompute the rest (the GELU, views, dtype casts)."""
    matmul = op in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)
    return CheckpointPolicy.MUST_SAVE if matmul else CheckpointPolicy.PREFER_RECOMPUTE


RECOMPUTE_GELU = partial(create_selective_checkpoint_contexts, _keep_matmuls)


class ConvNeXtBlock(nn.Module):
    """Depthwise kxk conv -> norm -> 1x1 expand -> GELU -> 1x1 project, plus the input.

    BatchNorm by default (the seed's variation on ConvNeXt); `norm="layer"` gives the original
    channel LayerNorm. `norm_position` moves the norm: after the depthwise conv (the default, as
    ConvNeXt), before it, or after the expanding 1x1 (before the GELU). Layer-scale and
    stochastic depth (drop-path) are off by default, as in the seed.

    `recompute_gelu` trades time for memory: backward recomputes the GELU's 4x-wide output from its
    input (selective activation checkpointing) instead of keeping both, the largest tensors of a
    training step; the gradients are the same.
    """

    def __init__(
        self,
        channels: int,
        expansion: int = 4,
        kernel_size: int = 7,
        norm: str = "batch",
        norm_position: str = "after_dwconv",
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        recompute_gelu: bool = False,
    ):
        super().__init__()
        if norm_position not in NORM_POSITIONS:
            raise ValueError(f"norm_position must be one of {NORM_POSITIONS}, got {norm_position!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be 'batch' or 'layer', got {norm!r}")
        hidden = expansion * channels
        self.norm_position = norm_position
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = NORMS[norm](hidden if norm_position == "after_expand" else channels)
        self.expand = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.project = nn.Linear(hidden, channels)
        self.layer_scale = nn.Parameter(torch.full((channels,), layer_scale)) if layer_scale else None
        self.drop_path = StochasticDepth(drop_path, "row")
        self.recompute_gelu = recompute_gelu

    def activate_and_project(self, x: torch.Tensor) -> torch.Tensor:
        def act_project(x):
            return self.project(self.act(x))

        if self.recompute_gelu and torch.is_grad_enabled():
            return checkpoint(act_project, x, use_reentrant=False, context_fn=RECOMPUTE_GELU,
                              preserve_rng_state=False)  # nothing random in the region
        return act_project(x)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_position == "before_dwconv":
            x = self.norm(x)
        x = self.dwconv(x)
        if self.norm_position == "after_dwconv":
            x = self.norm(x)
        x = self.expand(x.permute(0, 2, 3, 1))  # NHWC: the 1x1 convs are matmuls over channels
        if self.norm_position == "after_expand":
            x = self.norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = self.activate_and_project(x)
        if self.layer_scale is not None:
            x = x * self.layer_scale
        return x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.branch(x))


class InvertedBottleneck(nn.Module):
    """MobileNetV2's block, with each BN after its activation as the seed has it. The residual is
    added only when the shapes allow it (stride 1 and in == out); `residual=None` decides by itself,
    and asking for one that cannot exist is an error. With stride 2 and out = 2 * in it downsamples
    between the stages of FaceNN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        expansion: int = 6,
        kernel_size: int = 3,
        residual: bool | None = None,
        activation: type[nn.Module] = ReLU6InPlace,
    ):
        super().__init__()
        can_add = stride == 1 and in_channels == out_channels
        if residual and not can_add:
            raise ValueError(
                f"a residual needs stride 1 and in == out channels, got stride {stride}, "
                f"{in_channels} -> {out_channels}"
            )
        self.residual = can_add if residual is None else residual
        hidden = expansion * in_channels
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            activation(),
            nn.BatchNorm2d(hidden),
            nn.Conv2d(hidden, hidden, kernel_size, stride, padding=kernel_size // 2, groups=hidden),
            activation(),
            nn.BatchNorm2d(hidden),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)
