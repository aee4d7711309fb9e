"""FaceNN: stem -> four stages of ConvNeXt blocks joined by inverted bottlenecks -> pooled MLP head.

The defaults are the seed's network; `python architecture.py` prints its parts' parameters and shapes.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count
from torchvision.models.convnext import CNBlockConfig, ConvNeXt

from residual_blocks import ConvNeXtBlock, InvertedBottleneck, ReLU6InPlace

NUM_CLASSES = 7001
WIDTHS = (80, 160, 320, 640)
DEPTHS = (2, 2, 6, 2)
MIN_IMAGE_SIZE = 32  # the network downsamples by 32: smaller inputs vanish before the head


class Stem(nn.Module):
    """`classic`: 7x7/2 conv + 3x3/2 max-pool (ResNet's); `patchify`: 4x4/4 conv (ConvNeXt's).
    Both downsample by 4; the seed follows each conv by ReLU6 then BatchNorm."""

    def __init__(self, out_channels: int = WIDTHS[0], kind: str = "classic", in_channels: int = 3):
        super().__init__()
        if kind == "classic":
            conv = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3)
            pool = [nn.MaxPool2d(3, stride=2, padding=1)]
        elif kind == "patchify":
            conv = nn.Conv2d(in_channels, out_channels, 4, stride=4)
            pool = []
        else:
            raise ValueError(f"stem must be 'classic' or 'patchify', got {kind!r}")
        self.layers = nn.Sequential(conv, ReLU6InPlace(), nn.BatchNorm2d(out_channels), *pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Body(nn.Module):
    """Stages of ConvNeXt blocks, each closed by a BatchNorm; a stride-2 inverted bottleneck that
    widens to the next stage's width sits between stages."""

    def __init__(self, widths=WIDTHS, depths=DEPTHS, drop_path: float = 0.0, **block_options):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError(f"widths {widths} and depths {depths} must have the same length")
        # stochastic depth grows linearly with block index, as in ConvNeXt
        blocks = sum(depths)
        rates = [drop_path * i / max(blocks - 1, 1) for i in range(blocks)]
        layers = []
        for width, depth, next_width in zip(widths, depths, [*widths[1:], None]):
            layers += [ConvNeXtBlock(width, drop_path=rates.pop(0), **block_options) for _ in range(depth)]
            layers.append(nn.BatchNorm2d(width))
            if next_width:
                layers.append(InvertedBottleneck(width, next_width, stride=2))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Head(nn.Module):
    """Global average pool, then Linear -> ReLU -> Linear (the seed's), or a single Linear."""

    def __init__(self, in_features: int = WIDTHS[-1], num_classes: int = NUM_CLASSES, layers: int = 2):
        super().__init__()
        if layers == 1:
            self.classifier = nn.Linear(in_features, num_classes)
        elif layers == 2:
            self.classifier = nn.Sequential(
                nn.Linear(in_features, in_features), nn.ReLU(), nn.Linear(in_features, num_classes)
            )
        else:
            raise ValueError(f"head layers must be 1 or 2, got {layers}")

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(x))


class FaceNN(nn.Module):
    """The face classifier. `forward_features` gives the pooled embedding (for verification);
    `forward` the logits over identities. It computes in the memory layout it is given; channels_last
    (weights and input) is the fast one, in which the blocks' 1x1 convolutions need no copy."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        stem: str = "classic",
        widths=WIDTHS,
        depths=DEPTHS,
        head_layers: int = 2,
        norm: str = "batch",
        norm_position: str = "after_dwconv",
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        recompute_gelu: bool = False,
    ):
        super().__init__()
        self.stem = Stem(widths[0], stem)
        self.body = Body(widths, depths, drop_path, norm=norm, norm_position=norm_position, layer_scale=layer_scale,
                         recompute_gelu=recompute_gelu)
        self.head = Head(widths[-1], num_classes, head_layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.pool(self.body(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.classifier(self.forward_features(x))


class ConvNeXtBaseline(ConvNeXt):
    """torchvision's ConvNeXt with FaceNN's `forward_features`, so that a checkpoint of either
    backbone gives embeddings for verification."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # the pooled, layer-normed features
        return self.classifier[:-1](self.avgpool(self.features(x)))


def convnext_baseline(num_classes: int = NUM_CLASSES, widths=WIDTHS, depths=DEPTHS,
                      drop_path: float = 0.0) -> ConvNeXtBaseline:
    """torchvision's ConvNeXt at FaceNN's widths and depths: the design the seed measured itself
    against ("slightly better than the base ConvNeXt"). `drop_path` is its stochastic depth,
    linear over the blocks as in FaceNN."""
    stages = [CNBlockConfig(width, out, depth) for width, out, depth in zip(widths, [*widths[1:], None], depths)]
    return ConvNeXtBaseline(stages, stochastic_depth_prob=drop_path, num_classes=num_classes)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None) -> int:
    """The input gradient and the weight gradient of a convolution each cost its forward FLOPs.
    torch's own formula leaves `groups` out of the weight gradient, which counts a depthwise
    convolution's weight gradient once per channel."""
    forward = conv_flop_count(grad_out_shape if transposed else x_shape, w_shape,
                              x_shape if transposed else grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def train_flops(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of one forward and backward pass (matmuls and convolutions, as torch counts them)."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
    with counter:
        F.cross_entropy(model(images), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def summary(model: FaceNN, image_size: int = 224) -> str:
    """A table of each part's parameters and output shape for one image."""
    rows = [("part", "parameters", "output")]
    x = torch.zeros(1, 3, image_size, image_size)
    model.eval()
    with torch.no_grad():
        for name, part in (("stem", model.stem), ("body", model.body), ("head", model.head)):
            x = part(x)
            rows.append((name, f"{count_parameters(part):,}", "x".join(map(str, x.shape[1:]))))
    rows.append(("total", f"{count_parameters(model):,}", ""))
    return "\n".join(f"{a:<8}{b:>14}  {c}" for a, b, c in rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print FaceNN's parameter counts and shapes.")
    parser.add_argument("--stem", choices=("classic", "patchify"), default="classic")
    parser.add_argument("--head-layers", type=int, choices=(1, 2), default=2)
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    net = FaceNN(args.num_classes, stem=args.stem, head_layers=args.head_layers)
    print(f"FaceNN, {args.stem} stem, {args.head_layers}-layer head, {args.image_size} px input")
    print(summary(net, args.image_size))
