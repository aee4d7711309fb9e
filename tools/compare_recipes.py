"""The seed's recipe against the modern regularisers, on the demo's synthetic faces.

    python -m tools.compare_recipes            # FaceNN and ConvNeXt, both recipes, seeds 0 and 1
    python -m tools.compare_recipes --epochs 8 # shorter runs, the same for every recipe
    python -m tools.compare_recipes --recipes original ema drop-path cutmix erasing trivial --backbones facenn \
        --seeds 0 --name recipes_ablation      # each part of the modern recipe alone

Each run is run_training.py with the demo's settings (50 identities at 64 px, the demo's network
widths, batch, lr and epochs) on one data set, only the recipe flags and the seed differing. It
writes docs/NAME.csv (one row per run) and docs/NAME.png (dev accuracy per epoch, and the best
dev accuracy of each run), which docs/recipes.md and train_example.ipynb show.
"""

import argparse
import csv
import itertools
import statistics
import time
from pathlib import Path

from matplotlib.figure import Figure

import run_training
import synthetic_faces
from cli import ArgumentParser, at_least, run
from config import as_flags
from training import epoch_metrics

# The modern combination: what timm's train.py and the ConvNeXt paper add to AdamW + cosine +
# label smoothing + mixup. EMA 0.99: the demo's run is a few hundred steps, so the average spans
# about three of its epochs.
MODERN = {"ema": ["--ema", "0.99"], "drop-path": ["--drop-path", "0.1"], "cutmix": ["--cutmix-alpha", "1"],
          "erasing": ["--random-erasing", "0.25"], "trivial": ["--auto-augment", "trivial"]}
# original and modern are the comparison; each part of modern alone is the ablation (--recipes)
RECIPES = {"original": [], "modern": sum(MODERN.values(), []), **MODERN}
BACKBONES = ("facenn", "convnext")
FIELDS = ("backbone", "recipe", "seed", "epochs", "best_dev_acc", "last_dev_acc", "minutes")


def train(data_dir: Path, out: Path, backbone: str, recipe: str, seed: int, epochs: int) -> dict:
    demo = {k: v for k, v in run_training.DEMO_ARGS.items() if k not in ("data_dir", "out")}  # --demo's, as flags
    argv = [f"--data-dir={data_dir}", f"--out={out}", "--overwrite", *as_flags({**demo, "epochs": epochs}),
            f"--backbone={backbone}", f"--seed={seed}", *RECIPES[recipe]]
    print("python run_training.py " + " ".join(argv), flush=True)
    start = time.perf_counter()
    outcome = run_training.train(run_training.parse_args(argv))
    seconds = time.perf_counter() - start
    curve = [value for _, value in epoch_metrics(out / "metrics.csv")["val_acc"]]
    return dict(backbone=backbone, recipe=recipe, seed=seed, epochs=len(curve),
                best_dev_acc=round(outcome.best_dev_acc, 4), last_dev_acc=round(curve[-1], 4),
                minutes=round(seconds / 60, 2), curve=curve)


def summary(rows: list[dict]) -> list[tuple]:
    """(backbone, recipe, mean best dev accuracy, the seeds' values) for each pair, in run order."""
    seeds = {}
    for row in rows:
        seeds.setdefault((row["backbone"], row["recipe"]), []).append(row["best_dev_acc"])
    return [(backbone, recipe, statistics.mean(values), values) for (backbone, recipe), values in seeds.items()]


def plot(rows: list[dict], out_png: Path) -> None:
    fig = Figure(figsize=(12, 4))
    curves, bars = fig.subplots(1, 2)
    table = summary(rows)
    colours = {(backbone, recipe): f"C{i}" for i, (backbone, recipe, _, _) in enumerate(table)}
    for row in rows:
        key = (row["backbone"], row["recipe"])
        curves.plot(range(len(row["curve"])), row["curve"], color=colours[key], marker="o", markersize=3,
                    linestyle="-" if row["seed"] == 0 else "--", label=f"{key[0]} {key[1]} seed {row['seed']}")
    curves.set(title="dev accuracy per epoch", xlabel="epoch", ylabel="top-1")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    for x, (backbone, recipe, mean, values) in enumerate(table):
        bars.bar(x, mean, color=colours[(backbone, recipe)], alpha=0.6)
        bars.scatter([x] * len(values), values, color="k", s=12, zorder=3)
    bars.set_xticks(range(len(table)), [f"{b}\n{r}" for b, r, _, _ in table])
    bars.set(title="best dev accuracy (bar: mean of the seeds, dots: each seed)", ylabel="top-1")
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m tools.compare_recipes", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=at_least(2), default=run_training.DEMO_ARGS["epochs"], help="for every run")
    p.add_argument("--seeds", type=at_least(0), nargs="+", default=[0, 1])
    p.add_argument("--backbones", choices=BACKBONES, nargs="+", default=list(BACKBONES))
    p.add_argument("--recipes", choices=tuple(RECIPES), nargs="+", default=["original", "modern"])
    p.add_argument("--name", default="recipes", help="the results' file names: RESULTS/NAME.csv and NAME.png")
    p.add_argument("--data-dir", type=Path, default=run_training.DEMO_ARGS["data_dir"],
                   help="the demo's synthetic faces")
    p.add_argument("--runs", type=Path, default=Path("checkpoint/recipes"), help="each run's checkpoints and logs")
    p.add_argument("--results", type=Path, default=Path("docs"), help="where the table and the plot go")
    args = p.parse_args(argv)
    synthetic_faces.generate(args.data_dir, **run_training.DEMO_DATA, seed=0)  # one data set for every run
    args.results.mkdir(parents=True, exist_ok=True)
    rows = []
    # row by row: a stopped comparison keeps its runs
    with open(args.results / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for backbone, seed, recipe in itertools.product(args.backbones, args.seeds, args.recipes):
            out = args.runs / f"{backbone}-{recipe}-seed{seed}"
            rows.append(train(args.data_dir, out, backbone, recipe, seed, args.epochs))
            writer.writerow(rows[-1])
            f.flush()
    plot(rows, args.results / f"{args.name}.png")
    for backbone, recipe, mean, values in summary(rows):
        seeds = ", ".join(f"{value:.4f}" for value in values)
        print(f"{backbone:9s} {recipe:9s} best dev accuracy {mean:.4f} (seeds: {seeds})")
    print(f"wrote {args.results / f'{args.name}.csv'} and {args.results / f'{args.name}.png'}")
    return 0


if __name__ == "__main__":
    run(main)
