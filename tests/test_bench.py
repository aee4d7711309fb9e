"""tools/bench.py: what the quick run prints (the dry GPU check runs it), FLOPs of grouped convolutions,
the memory tracer."""

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from architecture import FaceNN, conv_backward_flops, convnext_baseline, count_parameters
from tools.bench import PART_ROWS, parts
from tools.memory import LiveMemory


def check_quick_run(output: str) -> None:
    """What `python -m tools.bench --quick` prints: the table, the parts, the data path, memory and the
    targets. The dry GPU check runs it (tests/test_gpu_check.py), so the suite runs it once."""
    lines = output.splitlines()
    assert "| model | layout | compile | train img/s | x ref |" in output
    for model in ("FaceNN", "ConvNeXt"):
        for layout in ("NCHW", "channels_last"):
            assert any(line.startswith(f"| {model} | {layout} | eager | ") for line in lines), (model, layout)
    assert "| ConvNeXt | NCHW | eager | " in output and " | 1.00 | " in output  # the reference
    for kind in ("the original's PIL decode + augment", "decode + augment", "decode only", "read bytes"):
        assert any(line.startswith(f"| {kind}") and "| per CPU worker |" in line for line in lines), kind
    for kind in ("decode", "augment", "decode + augment"):
        assert any(line.startswith(f"| {kind} | cpu, batches of 8 |") for line in lines), kind
    assert any(line.startswith("data path, CPU decode + augment: ") for line in lines)
    for variant in ("defaults", "--recompute-gelu"):
        assert any(line.startswith(f"memory, FaceNN ({variant}) training at batch 256") for line in lines), variant
    assert sum(line.startswith("target: FaceNN ") for line in lines) == 2
    assert any(line.startswith("target: batch 256 within 16 GB with >= 25% headroom: ") for line in lines)
    for row in PART_ROWS:
        assert any(line.startswith(f"| {row} | ") for line in lines), row
    assert any(line.startswith("bound: FaceNN's ConvNeXt blocks and head alone take ") for line in lines)


def train_flops(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    with FlopCounterMode(display=False) as forward:
        conv(x)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as step:
        conv(x).sum().backward()
    return forward.get_total_flops(), step.get_total_flops()


def test_a_depthwise_convolution_costs_its_forward_once_per_gradient():
    forward, step = train_flops(nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(2, 8, 16, 16, requires_grad=True))
    assert forward == 2 * 2 * 8 * 16 * 16 * 9  # multiply-adds of each output, times 2
    assert step == 3 * forward  # forward, input gradient, weight gradient


def test_the_first_convolution_needs_no_input_gradient():
    forward, step = train_flops(nn.Conv2d(3, 8, 3), torch.randn(2, 3, 16, 16))
    assert step == 2 * forward


def test_live_memory_follows_storages_and_their_peak():
    with FakeTensorMode():
        with LiveMemory() as memory:
            a = torch.empty(1000)  # 4,000 bytes
            b = a + 1
            view = b[:10]
            del a
            c = b * 2
            assert memory.live == 8_000
            del b, c
            assert memory.live == 4_000  # the view keeps b's storage
            del view
        assert (memory.live, memory.peak) == (0, 8_000)


def test_the_parts_of_a_step_cover_each_model_once():
    for model in (FaceNN(10, widths=(8, 16, 24, 32), depths=(1, 1, 2, 1)), convnext_baseline(10, (8, 16, 24, 32), (1, 1, 2, 1))):
        pieces = parts(model)
        assert {row for row, _ in pieces} == set(PART_ROWS)
        assert sum(row == "ConvNeXt blocks" for row, _ in pieces) == 5
        assert sum(count_parameters(piece) for _, piece in pieces) == count_parameters(model)
