"""Train FaceNN with the seed's recipe. Arguments in, Trainer out: no ML logic lives here.

    python run_training.py                        # Kaggle data under data/, 60 epochs
    python run_training.py --full                 # the seed's final run: train+dev, no validation
    python run_training.py --resume               # continue checkpoint/last.ckpt
    python run_training.py --demo                 # synthetic faces, CPU, a few minutes
    python run_training.py --loss arcface --init-from checkpoint/best.ckpt --epochs 10 --out checkpoint/arcface

Writes into --out: last.ckpt, best.ckpt (best dev accuracy), metrics.csv, curves.png and, with
--wandb, an offline or online wandb run.
"""

import argparse
import inspect
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from architecture import DEPTHS, MIN_IMAGE_SIZE, WIDTHS, count_parameters
from cli import ArgumentParser, at_least, finite_float, keep_freed_memory, run
from data import KAGGLE_MEAN, KAGGLE_STD, DataError, FaceDataModule
from predict import load_model, pick_device
from residual_blocks import ConvNeXtBlock
from training import BACKBONES, MARGINS, FaceClassifier, ResumableCSVLogger, Throughput, plot_curves

RECIPE = {name: p.default for name, p in inspect.signature(FaceClassifier.__init__).parameters.items()}
KAGGLE_HELP = (
    "get the Kaggle data (kaggle competitions download -c 11-785-f23-hw2p2-classification, unzip so that "
    "DIR/train/<id>/*.jpg, DIR/dev/<id>/*.jpg and DIR/test/*.jpg exist), or try the synthetic demo: "
    "python run_training.py --demo"
)
# The demo: a synthetic face set small enough to learn on two CPU cores in a few minutes.
DEMO_DATA = dict(
    identities=50, train_per_identity=40, dev_per_identity=10, test_per_identity=10, image_size=64,
    verification_identities=40, pairs=3000, unknown_per_identity=4,
)
DEMO_ARGS = dict(
    data_dir=Path("demo_data"), out=Path("checkpoint/demo"), epochs=15, warmup_epochs=1, batch_size=64,
    lr=2e-3, widths="32,64,128,256", depths="1,1,3,1", accelerator="cpu", num_workers=1, wandb="off", overwrite=True,
)


class AtomicCheckpoint(ModelCheckpoint):
    """Writes each checkpoint beside its target and renames it into place, so an interrupted
    write never leaves a half-written file as the only copy."""

    def _save_checkpoint(self, trainer, filepath):
        partial = Path(f"{filepath}.partial")
        try:
            super()._save_checkpoint(trainer, str(partial))
            if trainer.is_global_zero:
                partial.replace(filepath)
        finally:  # a failed write leaves the previous checkpoint alone; only rank 0 writes the file,
            if trainer.is_global_zero:  # and another rank deleting it would race rank 0's rename (DDP)
                partial.unlink(missing_ok=True)
        self._last_checkpoint_saved = filepath


def int_list(text):
    values = tuple(int(v) for v in text.split(","))
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text}")
    return values


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="holds train/, dev/ and test/")
    p.add_argument("--out", type=Path, default=Path("checkpoint"), help="checkpoints, logs and plots")
    p.add_argument("--epochs", type=at_least(1), default=RECIPE["max_epochs"])
    p.add_argument("--warmup-epochs", type=at_least(0), default=RECIPE["warmup_epochs"])
    p.add_argument("--batch-size", type=at_least(1), default=256, help="per device")
    p.add_argument("--lr", type=at_least(1e-12, float), default=RECIPE["lr"], help="peak learning rate")
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=RECIPE["weight_decay"])
    p.add_argument("--label-smoothing", type=at_least(0.0, float),
                   help=f"default {RECIPE['label_smoothing']}, or 0 with a margin loss (as its paper)")
    p.add_argument("--mixup-alpha", type=at_least(0.0, float),
                   help=f"0 turns mixup off (default {RECIPE['mixup_alpha']}; off with a margin loss, which refuses it)")
    p.add_argument("--loss", choices=("ce", *MARGINS), default="ce",
                   help="ce: cross-entropy on the head's logits; arcface/cosface: a margin loss on the normalised "
                        "embedding (best as fine-tuning: --init-from a ce checkpoint)")
    p.add_argument("--margin", type=at_least(0.0, float),
                   help="of --loss arcface (an angle, radians) or cosface (a cosine); default the paper's: "
                        + ", ".join(f"{loss} {m}" for loss, m in MARGINS.items()))
    p.add_argument("--scale", type=at_least(1e-3, float), default=RECIPE["scale"], help="of a margin loss's cosine logits")
    p.add_argument("--init-from", type=Path, metavar="CKPT",
                   help="start from this checkpoint's weights (same identities and architecture flags), with a new "
                        "optimiser and schedule; a head of another --loss starts fresh")
    p.add_argument("--image-size", type=at_least(MIN_IMAGE_SIZE), help="resize images to this (default: as stored)")
    p.add_argument("--subset-classes", type=at_least(1), help="prototype on the first N identities")
    p.add_argument("--full", action="store_true", help="train on train+dev, without validation")
    p.add_argument("--backbone", choices=tuple(BACKBONES), default="facenn", help="convnext: torchvision's, for comparison")
    p.add_argument("--stem", choices=("classic", "patchify"), default="classic")
    p.add_argument("--head-layers", type=int, choices=(1, 2), default=2)
    p.add_argument("--widths", type=int_list, help="comma-separated stage widths (default 80,160,320,640)")
    p.add_argument("--depths", type=int_list, help="comma-separated stage depths (default 2,2,6,2)")
    p.add_argument("--recompute-gelu", action="store_true",
                   help="less memory, a little slower: backward recomputes FaceNN's GELUs (this run only)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (measure first: python bench.py)")
    p.add_argument("--patience", type=at_least(1), default=20, help="early stopping on dev loss")
    p.add_argument("--resume", nargs="?", const="last", type=str, help="continue from a checkpoint (default OUT/last.ckpt)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=at_least(1), default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--num-workers", type=at_least(0), help="data loading processes per device")
    p.add_argument("--augment-on-device", action="store_true", help="workers only decode; augment batches on the GPU")
    p.add_argument("--mean", type=finite_float, nargs=3, default=KAGGLE_MEAN, help="normalisation (python data.py stats DIR/train)")
    p.add_argument("--std", type=at_least(1e-6, float), nargs=3, default=KAGGLE_STD)
    p.add_argument("--precision", help="default: 16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="offline")
    p.add_argument("--demo", action="store_true", help="generate synthetic faces and train on them on CPU")
    args = p.parse_args(argv)
    if args.demo:  # the demo's settings, unless given on the command line
        p.set_defaults(**DEMO_ARGS)
        args = p.parse_args(argv)
    if args.loss != "ce" and args.mixup_alpha:
        p.error(f"--mixup-alpha {args.mixup_alpha} with --loss {args.loss}: mixup mixes two classes, the margin needs "
                "one true class (leave mixup out)")
    if args.loss == "ce" and args.margin is not None:
        p.error("--margin is for --loss arcface or cosface")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run from a checkpoint's weights, --resume continues one: pick one")
    for name in ("mixup_alpha", "label_smoothing"):  # the seed's recipe for ce, the papers' (neither) for a margin loss
        if getattr(args, name) is None:
            setattr(args, name, RECIPE[name] if args.loss == "ce" else 0.0)
    widths, depths = (args.widths or WIDTHS), (args.depths or DEPTHS)
    if len(widths) != len(depths):
        p.error(f"--widths {widths} and --depths {depths} need one value per stage each")
    return args


def resolve_accelerator(args) -> tuple[str, str]:
    accelerator = pick_device().type if args.accelerator == "auto" else args.accelerator
    precision = args.precision or ("16-mixed" if accelerator in ("cuda", "gpu") else "32-true")
    return accelerator, precision


def build_model(args, data: FaceDataModule, resume_from: Path | None) -> FaceClassifier:
    """A fresh model from the arguments, or the one a checkpoint describes."""
    if resume_from is not None:
        model = load_model(resume_from, device="cpu")  # checked: a damaged or foreign file is one line
        if model.class_names != data.class_names:
            raise DataError(f"{resume_from} was trained on other identities than {args.data_dir}/train")
    else:
        architecture = dict(stem=args.stem, head_layers=args.head_layers) if args.backbone == "facenn" else {}
        architecture.update({k: v for k, v in (("widths", args.widths), ("depths", args.depths)) if v})
        model = FaceClassifier(
            num_classes=data.num_classes, class_names=data.class_names, architecture=architecture,
            backbone=args.backbone, image_size=args.image_size, mean=data.hparams.mean, std=data.hparams.std, lr=args.lr,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, max_epochs=args.epochs,
            label_smoothing=args.label_smoothing, mixup_alpha=args.mixup_alpha, loss=args.loss, margin=args.margin,
            scale=args.scale,
        )
        if args.init_from:  # fine-tuning: the weights of another run, this run's optimiser and schedule
            try:
                model.init_from(load_model(args.init_from, device="cpu"))
            except ValueError as error:
                raise DataError(f"--init-from {args.init_from}: {error}") from error
    if args.recompute_gelu:  # memory for time, not architecture: for this run only, fresh or resumed
        blocks = [block for block in model.modules() if isinstance(block, ConvNeXtBlock)]
        if not blocks:
            raise DataError(f"--recompute-gelu: the {model.hparams.backbone} backbone has no FaceNN ConvNeXt blocks")
        for block in blocks:
            block.recompute_gelu = True
    return model


def checkpoint_to_resume(args) -> Path | None:
    """The checkpoint --resume names; refuses to write over an earlier run unless asked."""
    if args.resume:
        path = args.out / "last.ckpt" if args.resume == "last" else Path(args.resume)
        if not path.is_file():
            raise DataError(f"no checkpoint to resume at {path}")
        return path
    earlier = sorted(args.out.glob("*.ckpt")) if args.out.is_dir() else []
    if earlier and not args.overwrite:
        raise DataError(
            f"{args.out} already holds a run ({earlier[0].name}); pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )
    return None


def clear_earlier_run(out: Path) -> None:
    """--overwrite: the earlier run's files go only once the new run is ready to start."""
    for path in [*out.glob("*.ckpt"), out / "metrics.csv", out / "hparams.yaml"]:
        path.unlink(missing_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    if args.demo:
        from synthetic_faces import generate

        try:
            generate(args.data_dir, **DEMO_DATA, seed=args.seed)
        except ValueError as error:  # e.g. the folder holds something else: the user's files stay
            raise DataError(str(error)) from error
    if not args.data_dir.is_dir():
        raise DataError(f"no data directory at {args.data_dir}: {KAGGLE_HELP}")
    L.seed_everything(args.seed, workers=True, verbose=False)
    resume_from = checkpoint_to_resume(args)

    data = FaceDataModule(
        args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers, image_size=args.image_size,
        subset_classes=args.subset_classes, full=args.full, mean=tuple(args.mean), std=tuple(args.std),
        augment_on_device=args.augment_on_device,
    )
    data.setup("fit")
    model = build_model(args, data, resume_from)
    accelerator, precision = resolve_accelerator(args)
    # leave a core to each data worker (oversubscribed cores thrash), unless OMP_NUM_THREADS decides
    if accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - data.num_workers))
    validate = not args.full
    # two callbacks: Lightning's save_last only follows epochs that improved the monitored metric
    last = AtomicCheckpoint(dirpath=args.out, filename="last", enable_version_counter=False)
    best = AtomicCheckpoint(dirpath=args.out, filename="best", monitor="val_acc", mode="max", enable_version_counter=False)
    callbacks = [last, LearningRateMonitor("epoch"), Throughput()]
    if validate:
        callbacks += [best, EarlyStopping("val_loss", patience=args.patience)]
    # flushed at every log call, so a killed run keeps its log
    loggers = [ResumableCSVLogger(args.out, resume=resume_from is not None, flush_logs_every_n_steps=1)]
    if args.wandb != "off":
        loggers.append(WandbLogger(project="FaceClassifier", save_dir=args.out, offline=args.wandb == "offline"))
    try:
        trainer = L.Trainer(
            accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
            precision=precision, max_epochs=model.hparams.max_epochs, callbacks=callbacks, logger=loggers,
            default_root_dir=args.out, benchmark=True, log_every_n_steps=10,
        )
    except (MisconfigurationException, ValueError) as error:  # --accelerator, --devices, --strategy, --precision
        raise DataError(" ".join(str(error).split())) from error
    world = trainer.world_size
    rank_zero_info(
        f"device: {accelerator} x {world} | precision: {precision} | parameters: {count_parameters(model):,}\n"
        f"data: {len(data.train_dataset):,} train images, "
        + (f"{len(data.val_dataset):,} dev images, " if validate else "dev merged into train (--full), ")
        + f"{data.num_classes:,} identities | batch {args.batch_size} per device, {args.batch_size * world} global"
    )
    if args.overwrite and resume_from is None:
        clear_earlier_run(args.out)
    if args.compile:  # the network alone: in place, so the checkpoint's keys stay those of the plain model
        model.model.compile()
    try:
        trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    except SystemExit as stop:  # how Lightning ends a run after Ctrl-C or SIGTERM, once it has shut down the workers
        last = args.out / "last.ckpt"
        hint = f"continue from {last} with --resume" if last.is_file() else "no epoch finished"
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(hint) from None
        if isinstance(stop, SIGTERMException):  # its own exit status 0 would pass for success
            print(f"terminated (SIGTERM): {hint}", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    if world > 1 and validate:  # every rank reports: synced metrics agree across ranks
        print(f"rank {trainer.global_rank}: dev accuracy {trainer.callback_metrics['val_acc']:.6f}")
    if not trainer.is_global_zero:
        return 0
    plot_curves(args.out / "metrics.csv", args.out / "curves.png")
    if validate:
        print(f"best dev accuracy {best.best_model_score:.4f}: {best.best_model_path}")
    print(f"last checkpoint: {last.best_model_path}; curves: {args.out / 'curves.png'}")
    if args.demo:
        score_demo(Path(best.best_model_path), args.data_dir, args.out, args.num_workers)
    return 0


def score_demo(checkpoint: Path, data_dir: Path, out: Path, num_workers: int) -> None:
    """The demo's last step: the Kaggle submission for its test split, scored against the
    generator's ground truth, then face verification and open-set identification on identities
    never trained on."""
    from predict import identify, score_identification, score_submission, submit, verify

    loading = dict(num_workers=num_workers, device="cpu")
    submission = out / "submission.csv"
    submit(checkpoint, data_dir / "test", submission, **loading)
    score = score_submission(submission, data_dir / "test_labels.csv", checkpoint)
    print(f"demo test accuracy {score['accuracy']:.4f} ({score['correct']}/{score['rows']}): {submission}")
    faces = data_dir / "verification"
    pairs = verify(checkpoint, faces / "verification_pairs.csv", faces / "known", roc=out / "roc.png", **loading)
    tar = ", ".join(f"TAR@FAR={far:g} {rate:.3f}" for far, rate in pairs["tar_at_far"].items())
    print(f"demo verification on unseen identities: ROC AUC {pairs['auc']:.3f}, EER {pairs['eer']:.3f}, {tar}: {out / 'roc.png'}")
    found = identify(checkpoint, faces / "known", faces / "unknown_test", out / "verification.csv",
                     calibrate=faces / "unknown_dev", labels=faces / "verification_dev.csv", **loading)
    score = score_identification(out / "verification.csv", faces / "verification_test.csv")
    print(f"demo identification on unseen identities: open-set accuracy {score['accuracy']:.4f} "
          f"({score['correct']}/{score['rows']}), {score['unknown_said_unknown']}/{score['unknown']} unknown faces "
          f"said unknown, at threshold {found['threshold']:.3f} from unknown_dev: {out / 'verification.csv'}")


if __name__ == "__main__":
    run(main)
