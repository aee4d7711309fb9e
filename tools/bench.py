"""How fast FaceNN trains and predicts against torchvision's ConvNeXt, how fast its data path is,
and how much memory a training step at the seed's batch size needs. One command, one table:

    python -m tools.bench                          # CPU: batch 16, 224 px
    python -m tools.bench --device cuda            # GPU: 16-mixed (fp16 autocast + GradScaler)
    python -m tools.bench --data-dir data/train    # time the data path on real JPEGs

Every setting (model x memory layout x eager/compiled) takes a warm-up step (where torch.compile
compiles), then the settings take turns for --repeats rounds, so that other work on the machine
slows them alike; the table shows medians and ratios against the reference, torchvision's ConvNeXt
at FaceNN's widths and depths in NCHW, eager. A train step is forward, cross-entropy over the
classes, backward and a fused AdamW step; its FLOPs (forward and backward) come from torch's
FlopCounterMode. Then each part of both networks (stem, ConvNeXt blocks, the layers between stages,
head) is timed alone, forward and backward, to show where FaceNN's extra time goes and what it
bounds. Progress goes to stderr, the report to stdout. torch.compile takes longer the first time
(inductor caches its kernels).
"""

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from architecture import NUM_CLASSES, FaceNN, convnext_baseline, train_flops
from cli import keep_freed_memory
from data import KAGGLE_MEAN, KAGGLE_STD, BatchAugment, decode_batch, load_image, read_encoded, train_transform
from tools.memory import estimated_training_memory
from residual_blocks import ConvNeXtBlock
from synthetic_faces import generate

MODELS = {"FaceNN": FaceNN, "ConvNeXt": convnext_baseline}
REFERENCE = ("ConvNeXt", "NCHW", "eager")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
TARGET_SPEED, TARGET_FLOPS = 1.17, 1.10  # FaceNN's fastest setting against the reference
GPU_MEMORY, TARGET_HEADROOM = 16e9, 0.25  # the seed's GPU, and what a batch of 256 should leave free
MEMORY_VARIANTS = {"defaults": {}, "--recompute-gelu": dict(recompute_gelu=True)}  # FaceNN's arguments


def log(message: str):
    print(message, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# speed

def autocast(device: torch.device):
    """fp16 autocast on a GPU (the project's 16-mixed); fp32 on CPU, where fp16 and bf16 are slower."""
    return torch.autocast(device.type, torch.float16, enabled=device.type == "cuda")


def train_step(model, images, labels, compiled: bool):
    """A function running one training step of `model` on the batch, with its own optimizer."""
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
    """A function computing the logits of the batch in eval mode, without autograd."""
    model.eval()

    def step():
        with torch.inference_mode(), autocast(images.device):
            model(images)
    return step


def time_interleaved(steps: dict, warmup: int, repeats: int, sync, verbose: bool = True) -> tuple[dict, dict]:
    """Seconds of each step's first `warmup` calls together, and the median of its next `repeats`
    calls, the steps taking turns call by call."""
    warmups, times = {}, {name: [] for name in steps}
    for name, step in steps.items():
        if verbose:
            log(f"warm-up: {' '.join(name)}")
        start = time.perf_counter()
        for _ in range(warmup):
            step()
            sync()
        warmups[name] = time.perf_counter() - start
    for round_ in range(repeats):
        log(f"round {round_ + 1}/{repeats}")
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return warmups, {name: statistics.median(t) for name, t in times.items()}


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


# -----------------------------------------------------------------------------
# data path

def original_pipeline(path):
    """The original's train path, for comparison: PIL decode, v2's transforms on the PIL image."""
    augment = v2.Compose([v2.RandomRotation(30), v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2, 0.2),
                          v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(KAGGLE_MEAN, KAGGLE_STD)])
    with Image.open(path) as image:
        return augment(image.convert("RGB"))


def images_per_second(load, files: list[Path], repeats: int) -> float:
    """Images one DataLoader worker loads with `load(path)` per second: one process, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for path in files:
                load(path)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return len(files) / statistics.median(times)


def device_rates(files: list[Path], batch_size: int, device: torch.device, repeats: int = 3) -> dict:
    """Images per second of --augment-on-device's half on `device`, per batch of batch_size JPEGs:
    decode (decode_batch: batched nvjpeg on CUDA), BatchAugment, and both."""
    encoded = [read_encoded(files[i % len(files)]) for i in range(batch_size)]
    paths = [str(files[i % len(files)]) for i in range(batch_size)]
    augment = BatchAugment().to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    decode = lambda: decode_batch(encoded, paths, device, None, set())[0]  # noqa: E731
    images = decode()
    steps = {"decode": decode, "augment": lambda: augment(images), "decode + augment": lambda: augment(decode())}
    rates = {}
    for name, step in steps.items():
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        rates[name] = batch_size / statistics.median(times[1:])
    return rates


def data_rates(data_dir: str | None, count: int, image_size: int, repeats: int, device: torch.device,
               device_batch: int) -> tuple[dict, dict, str]:
    """Per-worker rates on the CPU (the original's pipeline, this project's decode + augment, decode
    alone, and reading the bytes, all --augment-on-device leaves the workers) and rates on `device`,
    on `count` JPEGs of data_dir, or on synthetic faces written to a temporary directory."""
    augment = train_transform()
    loads = {"the original's PIL decode + augment": original_pipeline, "decode + augment": lambda p: augment(load_image(p)),
             "decode only": load_image, "read bytes (--augment-on-device)": read_encoded}

    def measure(files):
        per_worker = {kind: images_per_second(load, files, repeats) for kind, load in loads.items()}
        return per_worker, device_rates(files, device_batch, device)
    if data_dir:
        files = sorted(Path(data_dir).rglob("*.jpg"))[:count]
        if not files:
            raise SystemExit(f"error: no .jpg files under {data_dir}")
        return *measure(files), f"{len(files)} JPEGs of {data_dir}"
    with tempfile.TemporaryDirectory() as tmp:
        identities = 8
        generate(tmp, identities=identities, train_per_identity=math.ceil(count / identities), dev_per_identity=0,
                 test_per_identity=0, image_size=image_size, workers=1)
        files = sorted(Path(tmp).rglob("*.jpg"))
        return *measure(files), f"{len(files)} synthetic {image_size} px face JPEGs"


# -----------------------------------------------------------------------------
# memory

def measured_training_memory(batch_size: int, image_size: int, num_classes: int, device: torch.device,
                             **architecture) -> int:
    """torch.cuda.max_memory_allocated over two real training steps of FaceNN, beyond what was
    allocated before."""
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    model = FaceNN(num_classes, **architecture).to(device, memory_format=torch.channels_last)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(num_classes, (batch_size,), device=device)
    step = train_step(model, images, labels, compiled=False)
    step()
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# -----------------------------------------------------------------------------
# the report

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
    if args.quick:  # tiny tensors gain nothing from a second thread
        args.batch_size, args.image_size, args.data_images, args.no_compile = 2, 64, 8, True
        args.repeats, args.warmup, args.threads = 1, 1, args.threads or 1
    args.repeats = args.repeats or (20 if on_gpu else 5)
    args.warmup = args.warmup or (3 if on_gpu else 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    keep_freed_memory()  # as run_training.py does; both models get it
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    started = time.perf_counter()

    def batch(layout):
        torch.manual_seed(0)
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        return images.contiguous(memory_format=LAYOUTS[layout]), torch.randint(args.num_classes, (args.batch_size,), device=device)

    def model(name, layout):
        torch.manual_seed(0)
        return MODELS[name](args.num_classes).to(device, memory_format=LAYOUTS[layout])

    log("counting FLOPs")
    images, labels = batch("NCHW")
    flops = {name: train_flops(model(name, "NCHW"), images[:2], labels[:2]) / 2 for name in MODELS}

    settings = [(name, layout, "eager") for name in MODELS for layout in LAYOUTS]
    if not args.no_compile:
        settings += [(name, "channels_last", "compiled") for name in MODELS]
    steps = {("train", *s): train_step(model(*s[:2]), *batch(s[1]), s[2] == "compiled") for s in settings}
    steps |= {("infer", *s): inference_step(model(*s[:2]), batch(s[1])[0]) for s in settings if s[2] == "eager"}
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    warmups, seconds = time_interleaved(steps, args.warmup, args.repeats, sync)
    del steps
    rate = {key: args.batch_size / s for key, s in seconds.items()}

    log("timing each part of a train step alone")
    part_layouts = {"FaceNN": "channels_last", "ConvNeXt": REFERENCE[1]}
    pieces = {(name, i, row): step for name, layout in part_layouts.items()
              for i, (row, step) in enumerate(part_steps(model(name, layout), *batch(layout)))}
    _, piece_seconds = time_interleaved(pieces, args.warmup, args.repeats, sync, verbose=False)
    part_ms = {(name, row): 1e3 * sum(s for (n, _, r), s in piece_seconds.items() if (n, r) == (name, row))
               for name in MODELS for row in PART_ROWS}
    del pieces

    log("timing the data path")
    device_batch = 8 if args.quick else 256
    data, on_device, data_source = data_rates(args.data_dir, args.data_images, args.image_size, 2, device, device_batch)
    log("estimating training memory")
    memory = {}
    for variant, architecture in MEMORY_VARIANTS.items():
        sizes = (args.memory_batch_size, args.image_size, args.num_classes)
        memory[variant] = {"estimated": estimated_training_memory(*sizes, **architecture)}
        if on_gpu:
            try:
                memory[variant]["measured (torch.cuda.max_memory_allocated)"] = measured_training_memory(
                    *sizes, device, **architecture)
            except torch.cuda.OutOfMemoryError:
                log(f"measuring the memory ({variant}): out of memory at batch {args.memory_batch_size}")

    precision = "16-mixed (fp16 autocast + GradScaler)" if on_gpu else "fp32"
    where = (torch.cuda.get_device_name(device) if on_gpu else
             f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"bench.py: batch {args.batch_size}, {args.image_size} px, {args.num_classes} classes, {precision}, {where}; "
          f"medians of {args.repeats} interleaved rounds after {args.warmup} warm-up call(s); torch {torch.__version__}")
    print("train FLOPs per image (forward + backward): " + ", ".join(f"{n} {f / 1e9:.1f} G" for n, f in flops.items()))
    print()
    print("| model | layout | compile | train img/s | x ref | train GFLOP/s | x ref | warm-up s | infer img/s | x ref |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    ref_train, ref_infer = rate[("train", *REFERENCE)], rate[("infer", *REFERENCE)]
    flop_rate = {s: rate[("train", *s)] * flops[s[0]] for s in settings}
    for s in settings:
        train, infer = rate[("train", *s)], rate.get(("infer", *s))
        infer_cells = f"{infer:.1f} | {infer / ref_infer:.2f}" if infer else "- | -"
        print(f"| {' | '.join(s)} | {train:.2f} | {train / ref_train:.2f} | {flop_rate[s] / 1e9:.1f} | "
              f"{flop_rate[s] / flop_rate[REFERENCE]:.2f} | {warmups[('train', *s)]:.1f} | {infer_cells} |")
    print()
    print(f"where a train step's time goes: each part's forward and backward alone, ms per batch of {args.batch_size} "
          f"(FaceNN {part_layouts['FaceNN']}, ConvNeXt {part_layouts['ConvNeXt']}, eager)")
    print()
    print("| part | FaceNN | ConvNeXt |")
    print("|---|---:|---:|")
    for row in PART_ROWS:
        print(f"| {row} | {part_ms[('FaceNN', row)]:.0f} | {part_ms[('ConvNeXt', row)]:.0f} |")
    total = {name: sum(part_ms[(name, row)] for row in PART_ROWS) for name in MODELS}
    print(f"| all | {total['FaceNN']:.0f} | {total['ConvNeXt']:.0f} |")
    print()
    shared = part_ms[("FaceNN", "ConvNeXt blocks")] + part_ms[("FaceNN", "head + loss")]
    print(f"bound: FaceNN's ConvNeXt blocks and head alone take {shared / total['ConvNeXt']:.2f}x ConvNeXt's whole step: "
          f"with its stem and between-stage layers free, FaceNN would train at most {total['ConvNeXt'] / shared:.2f}x "
          f"as fast as ConvNeXt")
    print()

    fastest = {name: max((s for s in settings if s[0] == name), key=lambda s: rate[("train", *s)]) for name in MODELS}
    best = rate[("train", *fastest["FaceNN"])]
    print(f"data path ({data_source}); FaceNN's fastest training here takes {best:.1f} img/s")
    print()
    print("| data path | where | img/s | workers to feed the training |")
    print("|---|---|---:|---:|")
    for kind, per_worker in data.items():
        print(f"| {kind} | per CPU worker | {per_worker:.0f} | {math.ceil(best / per_worker)} |")
    for kind, device_rate in on_device.items():
        print(f"| {kind} | {device.type}, batches of {device_batch} | {device_rate:.0f} | - |")
    print()
    print(f"data path, CPU decode + augment: {data['decode + augment'] / data[next(iter(data))]:.2f}x the original's "
          f"per worker (target >= 1.50x); on the {device.type}, decode + augment takes "
          f"{100 * best / on_device['decode + augment']:.0f}% of the training's rate")
    headroom = {variant: 1 - max(figures.values()) / GPU_MEMORY for variant, figures in memory.items()}
    for variant, figures in memory.items():
        print(f"memory, FaceNN ({variant}) training at batch {args.memory_batch_size}, {args.image_size} px, 16-mixed: "
              + ", ".join(f"{b / 1e9:.1f} GB {how}" for how, b in figures.items())
              + f"; headroom on a 16 GB GPU: {100 * headroom[variant]:.0f}%")
    face, convnext = fastest["FaceNN"], fastest["ConvNeXt"]
    for what, ratio, target in (("train img/s", lambda s: rate[("train", *s)], TARGET_SPEED),
                                ("achieved train FLOP/s", lambda s: flop_rate[s], TARGET_FLOPS)):
        value = ratio(face) / ratio(REFERENCE)
        print(f"target: FaceNN {what} ({' '.join(face[1:])}) = {value:.2f}x ConvNeXt NCHW eager "
              f"(target >= {target:.2f}x): {'met' if value >= target else 'NOT met'}; "
              f"{ratio(face) / ratio(convnext):.2f}x ConvNeXt's fastest ({' '.join(convnext[1:])})")
    print(f"target: batch {args.memory_batch_size} within 16 GB with >= {100 * TARGET_HEADROOM:.0f}% headroom: "
          + "; ".join(f"{'met' if h >= TARGET_HEADROOM else 'NOT met'} with {variant} ({100 * h:.0f}%)"
                      for variant, h in headroom.items()))
    log(f"bench took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
