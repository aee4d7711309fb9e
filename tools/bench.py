"""How fast FaceNN trains and predicts against torchvision's ConvNeXt, how fast its data path is,
and how much memory a training step at the seed's batch size needs. One command, one table:

    python -m tools.bench                          # CPU: batch 16, 224 px
    python -m tools.bench --device cuda            # GPU: 16-mixed (fp16 autocast + GradScaler)
    python -m tools.bench --data-dir data/train    # time the data path on real JPEGs

The settings (model x memory layout x eager/compiled) take turns, so that other work on the machine
slows them alike; ratios are against torchvision's ConvNeXt at FaceNN's widths and depths, NCHW,
eager (docs/performance.md reads a run). Progress goes to stderr, the report to stdout.
"""

import argparse
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from architecture import NUM_CLASSES, FaceNN, convnext_baseline, train_flops
from cli import keep_freed_memory, log
from data import KAGGLE_MEAN, KAGGLE_STD, BatchAugment, decode_batch, load_image, read_encoded, train_transform
from tools.memory import estimated_training_memory
from residual_blocks import ConvNeXtBlock
from synthetic_faces import generate

MODELS = {"FaceNN": FaceNN, "ConvNeXt": convnext_baseline}
REFERENCE = ("ConvNeXt", "NCHW", "eager")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
PART_LAYOUTS = {"FaceNN": "channels_last", "ConvNeXt": REFERENCE[1]}  # each model's layout when timed in parts
TARGET_SPEED, TARGET_FLOPS = 1.17, 1.10  # FaceNN's fastest setting against the reference
GPU_MEMORY, TARGET_HEADROOM = 16e9, 0.25  # the seed's GPU, and what a batch of 256 should leave free
MEMORY_VARIANTS = {"defaults": {}, "--recompute-gelu": dict(recompute_gelu=True)}  # FaceNN's arguments


# -----------------------------------------------------------------------------
# speed

def autocast(device: torch.device):
    """fp16 autocast on a GPU (the project's 16-mixed); fp32 on CPU, where fp16 and bf16 are slower."""
    return torch.autocast(device.type, torch.float16, enabled=device.type == "cuda")


def setting(args, name: str, layout: str, size: int | None = None, **architecture):
    """(model, images, labels): a model of MODELS and a random batch of `size` (default --batch-size) in `layout`."""
    torch.manual_seed(0)
    model = MODELS[name](args.num_classes, **architecture).to(args.device, memory_format=LAYOUTS[layout])
    size = size or args.batch_size
    images = torch.randn(size, 3, args.image_size, args.image_size, device=args.device)
    labels = torch.randint(args.num_classes, (size,), device=args.device)
    return model, images.contiguous(memory_format=LAYOUTS[layout]), labels


def train_step(model, images, labels, compiled: bool):
    device = images.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    forward = torch.compile(model) if compiled else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = F.cross_entropy(forward(images), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def inference_step(model, images):
    model.eval()

    def step():
        with torch.inference_mode(), autocast(images.device):
            model(images)
    return step


def seconds(step, calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
        if torch.cuda.is_initialized():  # the GPU's queued work is part of a step's time
            torch.cuda.synchronize()
    return time.perf_counter() - start


def time_interleaved(steps: dict, warmup: int, repeats: int, verbose: bool = True) -> tuple[dict, dict]:
    """Seconds of each step's first `warmup` calls together, and the median of its next `repeats`
    calls, the steps taking turns call by call."""
    warmups, times = {}, {name: [] for name in steps}
    for name, step in steps.items():
        if verbose:
            log(f"warm-up: {' '.join(name)}")
        warmups[name] = seconds(step, warmup)
    for round_ in range(repeats):
        log(f"round {round_ + 1}/{repeats}")
        for name, step in steps.items():
            times[name].append(seconds(step))
    return warmups, {name: statistics.median(t) for name, t in times.items()}


def speed(args) -> tuple[dict, dict]:
    """Train FLOPs per image of each model, and each setting's train and inference img/s, train
    FLOP/s and warm-up seconds."""
    log("counting FLOPs")
    flops = {name: train_flops(*setting(args, name, "NCHW", size=2)) / 2 for name in MODELS}
    settings = [(name, layout, "eager") for name in MODELS for layout in LAYOUTS]
    if not args.no_compile:
        settings += [(name, "channels_last", "compiled") for name in MODELS]
    steps = {("train", *s): train_step(*setting(args, *s[:2]), s[2] == "compiled") for s in settings}
    steps |= {("infer", *s): inference_step(*setting(args, *s[:2])[:2]) for s in settings if s[2] == "eager"}
    warmups, medians = time_interleaved(steps, args.warmup, args.repeats)
    rows = {}
    for s in settings:
        train = args.batch_size / medians[("train", *s)]
        infer = args.batch_size / medians[("infer", *s)] if ("infer", *s) in medians else None
        rows[s] = dict(train=train, flops=train * flops[s[0]], warmup=warmups[("train", *s)], infer=infer)
    return flops, rows


# -----------------------------------------------------------------------------
# where the time goes

PART_ROWS = ("stem", "ConvNeXt blocks", "between stages", "head + loss")


def parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's pieces in forward order, each with the row of PART_ROWS it counts in."""
    if isinstance(model, FaceNN):
        return [("stem", model.stem),
                *(("ConvNeXt blocks" if isinstance(layer, ConvNeXtBlock) else "between stages", layer)
                  for layer in model.body.layers),
                ("head + loss", model.head)]
    stem, *stages = model.features  # torchvision's ConvNeXt: stem, stage, downsample, stage, ...
    pieces = [("stem", stem)]
    for i, stage in enumerate(stages):
        pieces += [("ConvNeXt blocks", block) for block in stage] if i % 2 == 0 else [("between stages", stage)]
    return pieces + [("head + loss", nn.Sequential(model.avgpool, model.classifier))]


def part_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[str, callable]]:
    """For each piece, a function running its forward and backward alone, on the input it gets in
    the whole model and a gradient of that output's shape (the head's comes from the loss)."""
    steps, x = [], images
    for row, piece in parts(model):
        x = x.detach().requires_grad_(row != "stem")  # no step needs the images' gradient
        with torch.no_grad(), autocast(x.device):
            out = piece(x)
        grad = torch.randn_like(out)

        def step(piece=piece, x=x, grad=grad, last=row == "head + loss"):
            x.grad = None  # as the whole step's zero_grad: nothing accumulates
            piece.zero_grad(set_to_none=True)
            with autocast(x.device):
                out = piece(x)
            (F.cross_entropy(out, labels) if last else out).backward(None if last else grad)
        steps.append((row, step))
        x = out
    return steps


def part_times(args) -> dict:
    """(model, row) -> ms of that row's pieces of a train step, each timed alone; row "all" sums them."""
    log("timing each part of a train step alone")
    pieces = {(name, i, row): step for name, layout in PART_LAYOUTS.items()
              for i, (row, step) in enumerate(part_steps(*setting(args, name, layout)))}
    _, medians = time_interleaved(pieces, args.warmup, args.repeats, verbose=False)
    ms = {(name, row): 1e3 * sum(s for (n, _, r), s in medians.items() if (n, r) == (name, row))
          for name in MODELS for row in PART_ROWS}
    return ms | {(name, "all"): sum(ms[(name, row)] for row in PART_ROWS) for name in MODELS}


# -----------------------------------------------------------------------------
# data path

def original_pipeline(path):
    """The original's train path, for comparison: PIL decode, v2's transforms on the PIL image."""
    augment = v2.Compose([v2.RandomRotation(30), v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2, 0.2),
                          v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(KAGGLE_MEAN, KAGGLE_STD)])
    with Image.open(path) as image:
        return augment(image.convert("RGB"))


def worker_rates(files: list[Path], repeats: int = 2) -> dict:
    """Images per second that one DataLoader worker (one process, one thread) loads with the
    original's pipeline, this project's decode + augment, decode alone, and reading the bytes
    (all that --augment-on-device leaves the workers)."""
    augment = train_transform()
    loads = {"the original's PIL decode + augment": original_pipeline,
             "decode + augment": lambda path: augment(load_image(path)),
             "decode only": load_image, "read bytes (--augment-on-device)": read_encoded}
    steps = {kind: lambda load=load: [load(path) for path in files] for kind, load in loads.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    _, medians = time_interleaved(steps, 0, repeats, verbose=False)
    torch.set_num_threads(threads)
    return {kind: len(files) / s for kind, s in medians.items()}


def device_rates(files: list[Path], batch_size: int, device: torch.device, repeats: int = 3) -> dict:
    """Images per second of --augment-on-device's half on `device`, per batch of batch_size JPEGs:
    decode (decode_batch: batched nvjpeg on CUDA), BatchAugment, and both."""
    paths = [str(files[i % len(files)]) for i in range(batch_size)]
    encoded = [read_encoded(path) for path in paths]
    augment = BatchAugment().to(device)
    decode = lambda: decode_batch(encoded, paths, device, None, set())[0]  # noqa: E731
    images = decode()
    steps = {"decode": decode, "augment": lambda: augment(images), "decode + augment": lambda: augment(decode())}
    _, medians = time_interleaved(steps, 1, repeats, verbose=False)
    return {name: batch_size / s for name, s in medians.items()}


def data_rates(args) -> tuple[dict, dict, str]:
    """worker_rates and device_rates on --data-images JPEGs of --data-dir, or on synthetic faces
    written to a temporary directory, and what the files were."""
    log("timing the data path")
    with tempfile.TemporaryDirectory() as tmp:
        if args.data_dir:
            files = sorted(Path(args.data_dir).rglob("*.jpg"))[:args.data_images]
            source = f"{len(files)} JPEGs of {args.data_dir}"
        else:
            generate(tmp, identities=8, train_per_identity=math.ceil(args.data_images / 8), dev_per_identity=0,
                     test_per_identity=0, image_size=args.image_size, workers=1)
            files = sorted(Path(tmp).rglob("*.jpg"))
            source = f"{len(files)} synthetic {args.image_size} px face JPEGs"
        if not files:
            raise SystemExit(f"error: no .jpg files under {args.data_dir}")
        return worker_rates(files), device_rates(files, args.device_batch, args.device), source


# -----------------------------------------------------------------------------
# memory

def measured_training_memory(args, **architecture) -> int:
    """torch.cuda.max_memory_allocated over two real training steps of FaceNN at --memory-batch-size,
    beyond what was allocated before."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(args.device)
    torch.cuda.reset_peak_memory_stats(args.device)
    step = train_step(*setting(args, "FaceNN", "channels_last", args.memory_batch_size, **architecture), False)
    seconds(step, calls=2)  # the second step with AdamW's state in place
    return torch.cuda.max_memory_allocated(args.device) - before


def training_memory(args) -> dict:
    """Each of MEMORY_VARIANTS' bytes for training at --memory-batch-size: estimated, and measured on a GPU."""
    log("estimating training memory")
    memory = {}
    for variant, architecture in MEMORY_VARIANTS.items():
        estimated = estimated_training_memory(args.memory_batch_size, args.image_size, args.num_classes, **architecture)
        memory[variant] = {"estimated": estimated}
        if args.device.type == "cuda":
            try:
                memory[variant]["measured (torch.cuda.max_memory_allocated)"] = measured_training_memory(
                    args, **architecture)
            except torch.cuda.OutOfMemoryError:
                log(f"measuring the memory ({variant}): out of memory at batch {args.memory_batch_size}")
    return memory


# -----------------------------------------------------------------------------
# the report

def print_speed(args, flops: dict, rows: dict):
    on_gpu = args.device.type == "cuda"
    precision = "16-mixed (fp16 autocast + GradScaler)" if on_gpu else "fp32"
    where = (torch.cuda.get_device_name(args.device) if on_gpu else
             f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"bench.py: batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, {precision}, {where}; "
          f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up call(s); "
          f"torch {torch.__version__}")
    print("train FLOPs per image (forward + backward): " + ", ".join(f"{n} {f / 1e9:.1f} G" for n, f in flops.items()))
    print("\n| model | layout | compile | train img/s | x ref | train GFLOP/s | x ref | warm-up s "
          "| infer img/s | x ref |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ref = rows[REFERENCE]
    for s, row in rows.items():
        infer = f"{row['infer']:.1f} | {row['infer'] / ref['infer']:.2f}" if row["infer"] else "- | -"
        print(f"| {' | '.join(s)} | {row['train']:.2f} | {row['train'] / ref['train']:.2f} | "
              f"{row['flops'] / 1e9:.1f} | {row['flops'] / ref['flops']:.2f} | {row['warmup']:.1f} | {infer} |")
    print()


def print_parts(args, ms: dict):
    print(f"where a train step's time goes: each part's forward and backward alone, ms per batch of {args.batch_size} "
          f"(FaceNN {PART_LAYOUTS['FaceNN']}, ConvNeXt {PART_LAYOUTS['ConvNeXt']}, eager)\n")
    print("| part | FaceNN | ConvNeXt |\n|---|---:|---:|")
    for row in (*PART_ROWS, "all"):
        print(f"| {row} | {ms[('FaceNN', row)]:.0f} | {ms[('ConvNeXt', row)]:.0f} |")
    shared = ms[("FaceNN", "ConvNeXt blocks")] + ms[("FaceNN", "head + loss")]
    print(f"\nbound: FaceNN's ConvNeXt blocks and head alone take {shared / ms[('ConvNeXt', 'all')]:.2f}x ConvNeXt's "
          f"whole step: with its stem and between-stage layers free, FaceNN would train at most "
          f"{ms[('ConvNeXt', 'all')] / shared:.2f}x as fast as ConvNeXt\n")


def print_data(args, per_worker: dict, on_device: dict, source: str, best: float):
    print(f"data path ({source}); FaceNN's fastest training here takes {best:.1f} img/s\n")
    print("| data path | where | img/s | workers to feed the training |\n|---|---|---:|---:|")
    for kind, rate in per_worker.items():
        print(f"| {kind} | per CPU worker | {rate:.0f} | {math.ceil(best / rate)} |")
    for kind, rate in on_device.items():
        print(f"| {kind} | {args.device.type}, batches of {args.device_batch} | {rate:.0f} | - |")
    original = per_worker["the original's PIL decode + augment"]
    print(f"\ndata path, CPU decode + augment: {per_worker['decode + augment'] / original:.2f}x "
          f"the original's per worker (target >= 1.50x); on the {args.device.type}, decode + augment takes "
          f"{100 * best / on_device['decode + augment']:.0f}% of the training's rate")


def print_targets(args, rows: dict, fastest: dict, memory: dict):
    headroom = {variant: 1 - max(figures.values()) / GPU_MEMORY for variant, figures in memory.items()}
    for variant, figures in memory.items():
        print(f"memory, FaceNN ({variant}) training at batch {args.memory_batch_size}, {args.image_size} px, 16-mixed: "
              + ", ".join(f"{b / 1e9:.1f} GB {how}" for how, b in figures.items())
              + f"; headroom on a 16 GB GPU: {100 * headroom[variant]:.0f}%")
    face, convnext = fastest["FaceNN"], fastest["ConvNeXt"]
    for what, key, target in (("train img/s", "train", TARGET_SPEED), ("achieved train FLOP/s", "flops", TARGET_FLOPS)):
        value = rows[face][key] / rows[REFERENCE][key]
        print(f"target: FaceNN {what} ({' '.join(face[1:])}) = {value:.2f}x ConvNeXt NCHW eager "
              f"(target >= {target:.2f}x): {'met' if value >= target else 'NOT met'}; "
              f"{rows[face][key] / rows[convnext][key]:.2f}x ConvNeXt's fastest ({' '.join(convnext[1:])})")
    print(f"target: batch {args.memory_batch_size} within 16 GB with >= {100 * TARGET_HEADROOM:.0f}% headroom: "
          + "; ".join(f"{'met' if h >= TARGET_HEADROOM else 'NOT met'} with {variant} ({100 * h:.0f}%)"
                      for variant, h in headroom.items()))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 5 on CPU, 20 on a GPU)")
    parser.add_argument("--warmup", type=int, help="untimed calls per setting first (default: 1 on CPU, 3 on a GPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile settings")
    parser.add_argument("--data-dir", help="time the data path on up to --data-images JPEGs under this directory")
    parser.add_argument("--data-images", type=int, default=64)
    parser.add_argument("--memory-batch-size", type=int, default=256, help="batch of the memory figures (the seed's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no compile: checks that the bench runs")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no GPU is visible")
    on_gpu = args.device == "cuda"
    args.device, args.device_batch = torch.device(args.device), 256  # the batch of the data path on the device
    if args.quick:  # tiny tensors gain nothing from a second thread
        args.batch_size, args.image_size, args.data_images, args.no_compile = 2, 64, 8, True
        args.repeats, args.warmup, args.threads, args.device_batch = 1, 1, args.threads or 1, 8
    args.repeats = args.repeats or (20 if on_gpu else 5)
    args.warmup = args.warmup or (3 if on_gpu else 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # as run_training.py does; both models get it
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    flops, rows = speed(args)
    part_ms = part_times(args)
    per_worker, on_device, source = data_rates(args)
    memory = training_memory(args)
    fastest = {name: max((s for s in rows if s[0] == name), key=lambda s: rows[s]["train"]) for name in MODELS}
    print_speed(args, flops, rows)
    print_parts(args, part_ms)
    print_data(args, per_worker, on_device, source, rows[fastest["FaceNN"]]["train"])
    print_targets(args, rows, fastest, memory)
    log(f"bench took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
