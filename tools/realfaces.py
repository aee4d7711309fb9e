"""The real-faces benchmark, one command: every row of docs/realfaces-benchmark.md measured side by
side on LFW, on this machine, in one run.

    python -m tools.realfaces --lfw ../shared/realfaces/lfw                   # every row (hours on a CPU)
    python -m tools.realfaces --lfw ../shared/realfaces/lfw --rows eigenfaces verify-ce verify-arcface
    python -m tools.realfaces --lfw ../shared/realfaces/lfw --quick           # tiny: the tool's own test

Identification: LFW's 158 people with >= 10 images, split as `data.py split` does it; each row's
test accuracy. Verification, LFW View 1: trained on the people of peopleDevTrain.txt, scored by
`predict.py verify` on people never trained on. Every network row is run_training.main with its
flags from ROWS. The markdown is rewritten after each row, so a stopped run keeps the rows it
finished. The recipe ablation that chose `--preset small` is docs/realfaces.md.
"""

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
# run as a module from the repository root, as the other tools; `python tools/realfaces.py` (the
# issue's command) finds the project's modules too
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import predict  # noqa: E402
import run_training  # noqa: E402
from cli import ArgumentParser, UserError, at_least, atomic_write, check_outputs, run  # noqa: E402
from data import FaceFolder, TestImages, compute_mean_std, identity_folders, split_identities  # noqa: E402

SIZE_AND_BATCH = ["--image-size", "64", "--batch-size", "32"]
ORIGINAL = [*SIZE_AND_BATCH, "--epochs", "30"]  # the original's recipe: run_training's defaults otherwise


class Row(NamedTuple):
    task: str  # "identification" or "verification": which split it trains on and which table it is in
    flags: list[str] | None  # run_training.py flags; None for eigenfaces, which is not a network
    init_from: str | None = None  # the row whose best checkpoint this one fine-tunes


# Every row the tool can measure, in the order it measures them.
ROWS = {
    "original": Row("identification", ORIGINAL),
    "small": Row("identification", ["--preset", "small"]),
    "convnext": Row("identification", [*ORIGINAL, "--backbone", "convnext"]),
    "eigenfaces": Row("identification", None),
    "verify-ce": Row("verification", ORIGINAL),
    "verify-arcface": Row("verification", [*SIZE_AND_BATCH, "--epochs", "10", "--loss", "arcface"],
                          init_from="verify-ce"),
}
# data.py split's settings for each task, and the LFW file that names the people it may take
SPLITS = {
    "identification": dict(people="lfw-names.txt", min_images=10, cap=60, dev=0.2, test=0.2, seed=0),
    "verification": dict(people="peopleDevTrain.txt", min_images=2, cap=None, dev=0.1, test=0.0, seed=0),
}
PAIRS = "pairsDevTest.txt"  # View 1's test pairs: people of peopleDevTest.txt, none of them trained on
COMMON = ["--accelerator", "cpu", "--wandb", "off"]  # after every network row's flags, with those of parse_args
IMAGE_SIZE = 64  # what the mean/std are measured at, and eigenfaces' grey images
# the SVM's C, and its gamma as a multiple of scikit-learn's "scale" (1 / (features x variance)), chosen on dev
EIGENFACES = dict(components=150, C=(1, 10, 100, 1000), gamma=(0.03, 0.1, 0.3, 1, 3))
# --quick: small enough for a test, the same code path
QUICK = dict(people=20, epochs=2, image_size=32, flags=["--widths", "8,16,24,32", "--depths", "1,1,1,1"])


def prepare_split(lfw: Path, task: str, work: Path, image_size: int, people: int | None) -> dict:
    """data.py split of the people the task may train on, through a folder of links to their LFW
    folders (data.py split reads a folder of identity folders; the split of each person depends on
    the seed and the person alone, so it equals the split of all of LFW's images/ for those people).
    `people` keeps the first that many by name (--quick). The split's counts, its folder and the
    normalisation its networks train at: made once, shared by the task's rows."""
    settings = dict(SPLITS[task])
    # LFW's people files: `name count` lines, and lines of one number (the counts of lines or folds)
    listed = [line.split() for line in (lfw / settings.pop("people")).read_text().splitlines()]
    chosen = sorted(row[0] for row in listed if len(row) == 2 and int(row[1]) >= settings["min_images"])[:people]
    source = work / f"{task}-people"
    source.mkdir(parents=True)  # --work is new or empty
    for name in chosen:
        (source / name).symlink_to((lfw / "images" / name).resolve())
    folder = work / f"{task}-split"
    counts = split_identities(source, folder, **settings, link=True)
    mean, std = compute_mean_std(folder / "train", image_size=image_size)
    return dict(counts, folder=folder, mean=mean, std=std)


def network_row(args, name: str, split: dict, results: dict) -> dict:
    """run_training.main with the row's flags (fine-tuning its init_from row's best checkpoint where it
    has one), and its best checkpoint scored: identification by predict.py submit + evaluate, test
    accuracy; verification by View 1's 10-fold accuracy, ROC AUC and EER on pairs of people it never saw."""
    row, out = ROWS[name], args.work / name
    argv = [f"--data-dir={split['folder']}", f"--out={out}", "--overwrite", *row.flags, *args.after,
            "--mean", *map(str, split["mean"]), "--std", *map(str, split["std"])]
    argv += ["--init-from", str(results[row.init_from]["checkpoint"])] if row.init_from else []
    print("python run_training.py " + shlex.join(argv), flush=True)
    run_training.main(argv)
    checkpoint = out / "best.ckpt"
    if row.task == "identification":
        predict.submit(checkpoint, split["folder"] / "test", out / "submission.csv", num_workers=args.workers,
                       device="cpu")
        score = predict.score_submission(out / "submission.csv", split["folder"] / "test_labels.csv", checkpoint)
        return dict(accuracy=score["accuracy"])
    result = predict.verify(checkpoint, args.lfw / PAIRS, args.lfw / "images", lfw=True, num_workers=args.workers,
                            device="cpu")
    return dict(checkpoint=checkpoint, **{key: result[key] for key in ("fold_accuracy", "fold_std", "auc", "eer")})


def eigenfaces_row(folder: Path, image_size: int) -> dict:
    """Eigenfaces (Turk and Pentland 1991) as scikit-learn's face recognition example runs them:
    each grey image a vector, PCA to 150 whitened components, an RBF SVM with C and gamma chosen on
    dev (their grid search, on the dev split rather than by cross-validation, as the networks pick
    their best epoch). The floor that shows what the networks add."""
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    grey = v2.Compose([v2.Resize((image_size, image_size)), v2.Grayscale(), v2.ToDtype(torch.float32, scale=True)])
    classes = identity_folders(folder / "train")
    truth = predict.read_labels(folder / "test_labels.csv")

    def vectors(dataset, label):
        items = [dataset[i] for i in range(len(dataset))]
        return np.stack([image.flatten().numpy() for image, _ in items]), np.array([label(key) for _, key in items])

    x_train, y_train = vectors(FaceFolder(folder / "train", classes, grey), int)
    x_dev, y_dev = vectors(FaceFolder(folder / "dev", classes, grey), int)
    x_test, y_test = vectors(TestImages(folder / "test", grey), lambda name: classes.index(truth[name]))
    pca = PCA(min(EIGENFACES["components"], *x_train.shape), whiten=True, svd_solver="randomized", random_state=0)
    x_train, x_dev, x_test = pca.fit_transform(x_train), pca.transform(x_dev), pca.transform(x_test)
    scale = 1 / (x_train.shape[1] * x_train.var())
    svms = {(c, g): SVC(C=c, gamma=g * scale, class_weight="balanced").fit(x_train, y_train)
            for c in EIGENFACES["C"] for g in EIGENFACES["gamma"]}
    c, g = max(svms, key=lambda key: svms[key].score(x_dev, y_dev))  # the first of equals: the smallest C and gamma
    return dict(accuracy=svms[c, g].score(x_test, y_test), C=c, gamma=g, image_size=image_size)


def measured(function, *args, **kwargs) -> dict:
    """function's result with the wall-clock and CPU minutes it took (the CPU's: this process's
    threads and the data workers it waited for)."""
    start, cpu = time.perf_counter(), sum(os.times()[:4])
    result = function(*args, **kwargs)
    return dict(result, wall_min=(time.perf_counter() - start) / 60, cpu_min=(sum(os.times()[:4]) - cpu) / 60)


def measure(args, write) -> dict:
    """Each requested row in ROWS order, calling write(results) after each: name -> result dict,
    or a string saying why the row was not run."""
    splits, results = {}, {}
    for name in [name for name in ROWS if name in args.rows]:
        task = ROWS[name].task
        if ROWS[name].flags is None and not find_spec("sklearn"):  # eigenfaces
            results[name] = "not available: needs scikit-learn (pip install -r requirements.txt)"
        else:
            if task not in splits:
                people = QUICK["people"] if args.quick else None
                splits[task] = prepare_split(args.lfw, task, args.work, args.image_size, people)
                write(results, splits)
            if ROWS[name].flags is None:
                results[name] = measured(eigenfaces_row, splits[task]["folder"], args.image_size)
            else:
                results[name] = measured(network_row, args, name, splits[task], results)
        write(results, splits)
    return results


# -----------------------------------------------------------------------------
# the markdown

def how(name: str, result) -> str:
    """What a row runs, for its table."""
    row = ROWS[name]
    if row.flags is None:
        size, chosen = IMAGE_SIZE, ""
        if isinstance(result, dict):
            size, chosen = result["image_size"], f"; C {result['C']}, gamma {result['gamma']} x scale, chosen on dev"
        return (f"eigenfaces: PCA to {EIGENFACES['components']} whitened components + RBF SVM (scikit-learn{chosen}), "
                f"{size} px grey")
    init = f" --init-from {row.init_from}/best.ckpt" if row.init_from else ""
    return f"`{shlex.join(row.flags)}{init}`"


def cells(name: str, result) -> list[str]:
    """A row's measured cells: its task's columns, then wall and CPU minutes; or why it has none."""
    width = len(HEADERS[ROWS[name].task])
    if isinstance(result, str):
        return [result] + [""] * (width - 1)
    if ROWS[name].task == "identification":
        scores = [f"{result['accuracy']:.1%}"]
    else:
        scores = [f"{result['fold_accuracy']:.1%} ± {result['fold_std']:.1%}", f"{result['auc']:.3f}",
                  f"{result['eer']:.3f}"]
    return scores + [f"{result['wall_min']:.2f}", f"{result['cpu_min']:.2f}"]


HEADERS = {
    "identification": ("test accuracy", "wall min", "CPU min"),
    "verification": ("10-fold accuracy", "ROC AUC", "EER", "wall min", "CPU min"),
}
TASK_TEXT = {
    "identification": (
        "## Identification: LFW's people with >= 10 images\n\n"
        "`python data.py split LFW/images OUT --min-images 10 --cap 60 --dev 0.2 --test 0.2 --seed 0`{split}. "
        "Each network trains on train/, keeps its best dev checkpoint and is scored on test/ "
        "(`predict.py submit` + `evaluate --submission`)."),
    "verification": (
        "## Verification: LFW View 1\n\n"
        "Trained on the people of `peopleDevTrain.txt` with >= 2 images (`data.py split` of just them, "
        "`--min-images 2 --dev 0.1 --test 0`{split}), scored with `predict.py verify --lfw-pairs pairsDevTest.txt` "
        "on 500 same and 500 different pairs of people it never saw: the 10-fold accuracy (each fold at the "
        "threshold best on the other nine, mean ± std), ROC AUC and EER of the cosine similarity."),
}


def markdown(args, argv: list[str], results: dict, splits: dict) -> str:
    """The whole document, from the rows measured so far: every row of ROWS, each measured one with
    its numbers."""
    lines = [
        "# Real faces: the benchmark",
        "",
        f"Written by `python -m tools.realfaces {shlex.join(argv)}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}; 1-minute load average "
        f"{args.load:.1f} at the start, {os.getloadavg()[0]:.1f} when written), torch {torch.__version__}, "
        f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}, every row measured in this one run, one after "
        "the other. Every network row is `run_training.py` with its flags below, then "
        f"`{shlex.join(args.after)}` and its split's own `--mean/--std` (`data.compute_mean_std`)"
        + (f"; `--quick` takes {QUICK['people']} people of each split" if args.quick else "")
        + ". Wall and CPU minutes are the row's own: training and scoring, not the split. "
        "The recipe ablation behind `--preset small` is in [realfaces.md](realfaces.md).",
    ]
    for task, headers in HEADERS.items():
        split = splits.get(task)
        about = (f": {split['identities']:,} people; {split['train']:,} train, "
                 f"{split['dev']:,} dev, {split['test']:,} test images; mean {fmt(split['mean'])}, "
                 f"std {fmt(split['std'])}" if split else "")
        lines += ["", TASK_TEXT[task].format(split=about), "",
                  "| row | what | " + " | ".join(headers) + " |", "|---" * (len(headers) + 2) + "|"]
        for name in [name for name in ROWS if ROWS[name].task == task]:  # all of them: what is left shows
            result = results.get(name, "not measured yet" if name in args.rows else "not in this run's --rows")
            lines.append(f"| {name} | {how(name, result)} | " + " | ".join(cells(name, result)) + " |")
    return "\n".join(lines) + "\n"


def fmt(values) -> str:
    return "(" + ", ".join(f"{value:.4f}" for value in values) + ")"


# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lfw", type=Path, required=True,
                   help="LFW: images/ and the protocol files (../shared/realfaces/lfw)")
    p.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS), metavar="ROW",
                   help=f"the rows to measure (default all), in this order: {', '.join(ROWS)}")
    p.add_argument("--epochs", type=at_least(1), help="every network row trains this many epochs (default: its own)")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny: {QUICK['people']} people per split, {QUICK['epochs']} epochs, "
                        f"{QUICK['image_size']} px, small widths (what the tests run)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "realfaces-benchmark.md", help="the markdown to write")
    p.add_argument("--work", type=Path,
                   help="a new or empty folder for the splits and checkpoints (default: a temporary one, removed)")
    args = p.parse_args(argv)
    for name in args.rows:
        if ROWS[name].init_from and ROWS[name].init_from not in args.rows:
            p.error(f"--rows {name} fine-tunes the checkpoint of {ROWS[name].init_from}: ask for both")
    if args.quick and not args.epochs:
        args.epochs = QUICK["epochs"]
    # the image size, the data workers, and the flags every network row gets after its own
    args.image_size, args.workers = (QUICK["image_size"], 0) if args.quick else (IMAGE_SIZE, 1)
    args.after = [*COMMON, "--num-workers", str(args.workers)]
    args.after += [*QUICK["flags"], "--image-size", str(args.image_size)] if args.quick else []
    args.after += ["--epochs", str(args.epochs)] if args.epochs else []
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    needed = ["images", "lfw-names.txt", "peopleDevTrain.txt", PAIRS]
    if absent := [name for name in needed if not (args.lfw / name).exists()]:
        raise UserError(f"{args.lfw}: no {absent[0]} (expected LFW's images/ and protocol files, "
                        "as in ../shared/realfaces/lfw)")
    check_outputs({"--out": args.out}, {"--lfw": args.lfw})
    if args.work is not None and args.work.exists() and (not args.work.is_dir() or any(args.work.iterdir())):
        raise UserError(f"--work {args.work}: not empty (expected a new or empty folder for the splits and "
                        "checkpoints)")
    args.load = os.getloadavg()[0]  # other processes' share of the cores, for reading the minutes
    with tempfile.TemporaryDirectory(prefix="realfaces-") as tmp:
        args.work = args.work or Path(tmp)

        def write(results, splits):
            with atomic_write(args.out) as f:
                f.write(markdown(args, argv, results, splits))

        write({}, {})
        results = measure(args, write)
    print(f"wrote {args.out}: {sum(isinstance(result, dict) for result in results.values())} rows measured")
    return 0


if __name__ == "__main__":
    run(main)
