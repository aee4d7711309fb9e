"""The blocks and FaceNN: shapes, residual identity, parameter counts, gradients, determinism."""

import pytest
import torch
from torch import nn

from architecture import FaceNN, convnext_baseline, count_parameters, summary
from residual_blocks import ConvNeXtBlock, InvertedBottleneck

TINY = dict(widths=(8, 16, 24, 32), depths=(1, 1, 2, 1))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("position", ["after_dwconv", "before_dwconv", "after_expand"])
@pytest.mark.parametrize("size", [7, 13, 16])
def test_convnext_block_keeps_shape(norm, position, size):
    block = ConvNeXtBlock(12, norm=norm, norm_position=position)
    assert block(torch.randn(2, 12, size, size)).shape == (2, 12, size, size)


@pytest.mark.parametrize("size, out_size", [(13, 7), (14, 7), (7, 4), (56, 28)])
def test_inverted_bottleneck_stride_2_downsamples_odd_and_even(size, out_size):
    block = InvertedBottleneck(8, 16, stride=2)
    assert not block.residual
    assert block(torch.randn(2, 8, size, size)).shape == (2, 16, out_size, out_size)


def test_inverted_bottleneck_residual_only_when_shapes_allow():
    assert InvertedBottleneck(8, 8).residual
    assert not InvertedBottleneck(8, 16).residual
    assert not InvertedBottleneck(8, 8, residual=False).residual
    with pytest.raises(ValueError, match="stride 1 and in == out"):
        InvertedBottleneck(8, 8, stride=2, residual=True)
    with pytest.raises(ValueError, match="stride 1 and in == out"):
        InvertedBottleneck(8, 16, residual=True)


def _zero_last(module: nn.Module):
    """Zero the weights of a block's last layer, so its residual branch outputs a constant."""
    last = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


@pytest.mark.parametrize(
    "block", [ConvNeXtBlock(12), ConvNeXtBlock(12, norm="layer"), InvertedBottleneck(12, 12)]
)
def test_residual_block_is_identity_when_branch_is_zero(block):
    x = torch.randn(2, 12, 9, 9)
    block.train()
    out_with_branch = block(x)
    assert not torch.allclose(out_with_branch, x)
    _zero_last(block)
    torch.testing.assert_close(block(x), x)


def test_convnext_block_equals_branch_plus_input():
    block = ConvNeXtBlock(12, layer_scale=0.5).eval()
    x = torch.randn(2, 12, 9, 9)
    torch.testing.assert_close(block(x), x + block.branch(x))
    assert block.branch(x).abs().mean() > 1e-3


def test_drop_path_drops_whole_branches_in_training_only():
    block = ConvNeXtBlock(8, drop_path=0.999)
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(block.train()(x), x)  # all rows dropped (p ~ 1)
    assert not torch.allclose(block.eval()(x), x)


@pytest.mark.parametrize(
    "stem, head_layers, expected",
    [("classic", 2, 19_575_801), ("patchify", 2, 19_567_881), ("classic", 1, 19_165_561), ("patchify", 1, 19_157_641)],
)
def test_parameter_counts_match_the_seed(stem, head_layers, expected):
    model = FaceNN(stem=stem, head_layers=head_layers)
    total = count_parameters(model)
    assert total == expected
    assert 19_000_000 <= total < 20_000_000


def test_parameter_counts_per_part_match_the_seed():
    model = FaceNN()
    assert count_parameters(model.stem) == 12_000
    assert count_parameters(model.body) == 14_665_920
    assert count_parameters(model.head) == 4_897_881


def test_no_lazy_modules():
    model = FaceNN(num_classes=10, **TINY)
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


@pytest.mark.parametrize("stem", ["classic", "patchify"])
def test_tiny_facenn_forward_backward_gives_every_parameter_a_gradient(stem):
    model = FaceNN(num_classes=10, stem=stem, **TINY)
    x = torch.randn(4, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_forward_features_is_the_pooled_embedding():
    model = FaceNN(num_classes=10, **TINY).eval()
    x = torch.randn(3, 3, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (3, 32)
    torch.testing.assert_close(model.head.classifier(features), model(x))


def test_eval_mode_uses_running_statistics_not_the_batchs():
    model = FaceNN(num_classes=10, **TINY)
    x = torch.randn(4, 3, 64, 64)
    assert not torch.allclose(model(x)[:1], model(x[:1]))  # training: BatchNorm normalises by the batch
    model.eval()
    before = [buffer.clone() for buffer in model.buffers()]
    torch.testing.assert_close(model(x)[:1], model(x[:1]))  # eval: an image's output is its own
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # and the statistics stay


def test_channels_last_gives_the_same_output_as_nchw():
    model = FaceNN(num_classes=10, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5)


def test_minimum_input_size_reaches_the_head():
    model = FaceNN(num_classes=10, **TINY).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="stem"):
        FaceNN(stem="vit")
    with pytest.raises(ValueError, match="head layers"):
        FaceNN(head_layers=3)
    with pytest.raises(ValueError, match="norm must be"):
        ConvNeXtBlock(8, norm="group")
    with pytest.raises(ValueError, match="norm_position"):
        ConvNeXtBlock(8, norm_position="end")


def test_summary_lists_parts_and_total():
    text = summary(FaceNN(num_classes=10, **TINY), image_size=64)
    assert "stem" in text and "body" in text and "head" in text
    assert "32x2x2" in text  # body output at 64 px: downsampled by 32


def reference_facenn(num_classes: int, widths, depths) -> nn.Sequential:
    """The seed's network written plainly: every 1x1 convolution a Conv2d, nothing in place."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.branch = nn.Sequential(
                nn.Conv2d(c, c, 7, padding=3, groups=c), nn.BatchNorm2d(c),
                nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1),
            )

        def forward(self, x):
            return x + self.branch(x)

    layers = [nn.Conv2d(3, widths[0], 7, 2, 3), nn.ReLU6(), nn.BatchNorm2d(widths[0]), nn.MaxPool2d(3, 2, 1)]
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        layers += [Block(width) for _ in range(depth)] + [nn.BatchNorm2d(width)]
        if stage + 1 < len(widths):
            hidden, out = 6 * width, widths[stage + 1]
            layers += [
                nn.Conv2d(width, hidden, 1), nn.ReLU6(), nn.BatchNorm2d(hidden),
                nn.Conv2d(hidden, hidden, 3, 2, 1, groups=hidden), nn.ReLU6(), nn.BatchNorm2d(hidden),
                nn.Conv2d(hidden, out, 1), nn.BatchNorm2d(out),
            ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], widths[-1]), nn.ReLU(),
               nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


def assert_near(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-4):
    """Close as a whole: gradients sum over batch and pixels in another order, and some (a conv
    bias before a BatchNorm) are rounding noise around zero."""
    error, scale = (actual - expected).norm().item(), expected.norm().item()
    assert error <= rtol * scale + 1e-6, f"{name}: |difference| {error:.2e}, |expected| {scale:.2e}"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("config", [TINY, {}], ids=["tiny", "seed"])
def test_facenn_computes_what_the_plain_reference_computes(config, memory_format):
    """Same outputs, gradients and BatchNorm statistics as the plain network with copied weights,
    in training and in eval mode."""
    widths, depths = config.get("widths", (80, 160, 320, 640)), config.get("depths", (2, 2, 6, 2))
    model = FaceNN(num_classes=10, **config)
    reference = reference_facenn(10, widths, depths)
    ours, theirs = model.state_dict().values(), reference.state_dict().values()
    assert [t.numel() for t in ours] == [t.numel() for t in theirs]
    with torch.no_grad():
        for mine, other in zip(ours, theirs):
            other.copy_(mine.view_as(other))
    model, reference = model.to(memory_format=memory_format), reference.to(memory_format=memory_format)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=memory_format)
    inputs = [x.clone().requires_grad_(), x.clone().requires_grad_()]

    outputs = [net(i) for net, i in zip((model, reference), inputs)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    for out in outputs:
        nn.functional.cross_entropy(out, torch.arange(4)).backward()
    assert_near(inputs[0].grad, inputs[1].grad, "input")
    for (name, mine), other in zip(model.named_parameters(), reference.parameters()):
        assert_near(mine.grad.view_as(other.grad), other.grad, name)
    for mine, other in zip(model.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(mine.view_as(other), other, rtol=1e-4, atol=1e-6)  # running statistics
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference.eval()(x), rtol=1e-4, atol=1e-5)


def test_channels_last_training_step_copies_no_tensor():
    """With channels_last weights and input every permute is a view, and no in-place operation makes
    autograd copy a tensor: neither forward nor backward runs a copying operator."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    model = FaceNN(num_classes=10, **TINY).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with Ops() as ops:
        model(x).sum().backward()
    assert not [name for name in ops.names if name.split(".")[0] in ("clone", "copy_", "contiguous", "_to_copy")]


@pytest.mark.parametrize("recompute_gelu", [False, True])
def test_facenn_compiles_without_graph_breaks(recompute_gelu):
    model = FaceNN(num_classes=10, **TINY, recompute_gelu=recompute_gelu)
    explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 64, 64))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_convnext_baseline_features_are_what_its_classifier_classifies():
    model = convnext_baseline(10, (8, 16, 24, 32), (1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 32)
        torch.testing.assert_close(model.classifier[-1](features), model(x))


def test_recomputing_the_gelu_keeps_the_gradients_and_frees_its_output():
    """Backward needs the same tensors less each block's 4x-wide GELU output, plus the block's
    output (selective checkpointing keeps what the project matmul computed): 3C values per position."""
    import torch.nn.functional as F

    from tools.memory import LiveMemory

    torch.manual_seed(0)
    models = {recompute: FaceNN(num_classes=10, **TINY, recompute_gelu=recompute) for recompute in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    x, y = torch.randn(4, 3, 64, 64), torch.randint(10, (4,))
    saved = {}
    for recompute, model in models.items():
        with LiveMemory(*model.parameters(), *model.buffers(), x, y) as memory:
            loss = F.cross_entropy(model(x), y)
            saved[recompute] = memory.live  # what backward will need, and the loss
            loss.backward()
    sizes = [(8, 16), (16, 8), (24, 4), (24, 4), (32, 2)]  # (channels, side) of TINY's blocks at 64 px
    assert saved[False] - saved[True] == sum(4 * side * side * 3 * channels * 4 for channels, side in sizes)
    for plain, recomputed in zip(models[False].parameters(), models[True].parameters()):
        assert torch.equal(plain.grad, recomputed.grad)


def test_recomputing_the_gelu_under_autocast_keeps_the_gradients():
    """Under autocast the recomputation also reruns the weights' casts, as the forward did."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    models = {recompute: FaceNN(num_classes=10, **TINY, recompute_gelu=recompute) for recompute in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    x, y = torch.randn(2, 3, 64, 64), torch.randint(10, (2,))
    for model in models.values():
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    for plain, recomputed in zip(models[False].parameters(), models[True].parameters()):
        torch.testing.assert_close(plain.grad, recomputed.grad)
