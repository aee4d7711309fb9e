"""Train FaceNN with the seed's recipe. Arguments in, Trainer out: no ML logic lives here.

    python run_training.py                        # Kaggle data under data/, 60 epochs
    python run_training.py --full                 # the seed's final run: train+dev, no validation
    python run_training.py --resume               # continue checkpoint/last.ckpt
    python run_training.py --demo                 # synthetic faces, CPU, a few minutes
    python run_training.py --loss arcface --init-from checkpoint/best.ckpt --epochs 10 --out checkpoint/arcface
    python run_training.py --data-dir my_people --init-from checkpoint/best.ckpt --epochs 10 --out checkpoint/mine

Writes into --out: last.ckpt, best.ckpt (best dev accuracy), metrics.csv, curves.png and, with
--wandb, an offline or online wandb run.
"""

import argparse
import importlib.util
import inspect
import math
import os
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from architecture import DEPTHS, MIN_IMAGE_SIZE, WIDTHS, count_parameters
from callbacks import EpochSeed, ResumableCSVLogger, ThroughputMonitor
from checkpoints import AtomicCheckpointIO, model_from_checkpoint, read_checkpoint
from cli import (ArgumentParser, UserError, at_least, finite_float, folder_lock, keep_freed_memory, overlaps, pick_device,
                 run)
from data import AUTO_AUGMENT, KAGGLE_MEAN, KAGGLE_STD, DataError, FaceDataModule
from residual_blocks import ConvNeXtBlock
from training import BACKBONES, MARGINS, FaceClassifier, default_warmup, plot_curves, warmup_cosine_lr

RECIPE = {name: p.default for name, p in inspect.signature(FaceClassifier.__init__).parameters.items()}
# The flags whose values a checkpoint keeps, and where: a resumed run takes them from there, and
# one given with another value contradicts it. flag -> (part of the checkpoint, name there).
RUN_SETTINGS = {
    **{flag: ("model", flag) for flag in (
        "backbone", "image_size", "mean", "std", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "mixup_alpha",
        "loss", "margin", "scale", "cutmix_alpha")},
    "ema": ("model", "ema_decay"),
    **{flag: ("architecture", flag) for flag in ("stem", "head_layers", "widths", "depths", "drop_path")},
    **{flag: ("data", flag) for flag in (
        "data_dir", "batch_size", "subset_classes", "full", "seed", "auto_augment", "random_erasing")},
    "patience": ("early stopping", "patience"),
}
# the checkpoint's unless given: the data may have moved, a smaller GPU may need a smaller batch
CHANGEABLE_ON_RESUME = {"data_dir", "batch_size"}
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
LOG_EVERY_N_STEPS = 10
DEMO_ARGS = dict(
    data_dir=Path("demo_data"), out=Path("checkpoint/demo"), epochs=15, warmup_epochs=1, batch_size=64,
    lr=2e-3, widths="32,64,128,256", depths="1,1,3,1", accelerator="cpu", num_workers=1, wandb="off",
)


def int_list(text):
    values = tuple(int(v) for v in text.split(","))
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text}")
    return values


def below_one(text):
    value = at_least(0.0, float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be < 1, got {text}")
    return value


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.demo:  # the demo's settings, unless given on the command line
        p.set_defaults(**DEMO_ARGS)
        args = p.parse_args(argv)
    widths, depths = (args.widths or WIDTHS), (args.depths or DEPTHS)
    if len(widths) != len(depths):
        p.error(f"--widths {widths} and --depths {depths} need one value per stage each")
    if args.warmup_epochs is None:
        args.warmup_epochs = default_warmup(args.epochs)
    if args.warmup_epochs >= args.epochs:
        p.error(f"--warmup-epochs {args.warmup_epochs} must be less than --epochs {args.epochs}, so that the run anneals")
    if args.augment_on_device == "on" and cpu_augmentation(args):
        p.error("--auto-augment and --random-erasing run in the CPU workers: not with --augment-on-device on")
    unset = object()
    bare = parser()  # the same flags, all defaulting to `unset`: the others the command line gave
    bare.set_defaults(**dict.fromkeys(vars(args), unset))
    args.given = {flag for flag, value in vars(bare.parse_args(argv)).items() if value is not unset}
    if args.loss != "ce":  # the papers' recipe: neither mixup (refused) nor label smoothing, unless given
        if "mixup_alpha" in args.given and args.mixup_alpha:
            p.error(f"--mixup-alpha {args.mixup_alpha} with --loss {args.loss}: mixup mixes two classes, the margin "
                    "needs one true class (leave mixup out)")
        args.mixup_alpha = 0.0
        if args.cutmix_alpha:
            p.error(f"--cutmix-alpha {args.cutmix_alpha} with --loss {args.loss}: CutMix mixes two classes, the margin "
                    "needs one true class (leave CutMix out)")
        args.label_smoothing = args.label_smoothing if "label_smoothing" in args.given else 0.0
    elif args.margin is not None:
        p.error("--margin is for --loss arcface or cosface")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out, --overwrite replaces it: pick one")
    if args.resume and args.resume != "last" and "out" not in args.given:
        args.out = Path(args.resume).parent  # a run continues in its own folder
    if args.init_from and args.resume:
        p.error("--init-from starts a new run from a checkpoint's weights, --resume continues one: pick one")
    if args.init_from and overlaps(args.init_from, args.out):
        p.error(f"--init-from {args.init_from} lies in --out {args.out}, whose run this one replaces: give another --out")
    return args


def parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="holds train/, dev/ and test/")
    p.add_argument("--out", type=Path, default=Path("checkpoint"), help="checkpoints, logs and plots")
    p.add_argument("--epochs", type=at_least(1), default=RECIPE["max_epochs"])
    p.add_argument("--warmup-epochs", type=at_least(0),
                   help="linear warm-up from 3e-4 to --lr (default: the seed's share, round(epochs / 6): 10 of 60)")
    p.add_argument("--batch-size", type=at_least(1), default=256, help="per device")
    p.add_argument("--lr", type=at_least(1e-12, float), default=RECIPE["lr"], help="peak learning rate")
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=RECIPE["weight_decay"])
    p.add_argument("--label-smoothing", type=at_least(0.0, float), default=RECIPE["label_smoothing"],
                   help="with a margin loss 0 unless given, as in its paper")
    p.add_argument("--mixup-alpha", type=at_least(0.0, float), default=RECIPE["mixup_alpha"],
                   help="0 turns mixup off (as a margin loss does: it refuses mixup)")
    p.add_argument("--loss", choices=("ce", *MARGINS), default="ce",
                   help="ce: cross-entropy on the head's logits; arcface/cosface: a margin loss on the normalised "
                        "embedding (best as fine-tuning: --init-from a ce checkpoint)")
    p.add_argument("--margin", type=at_least(0.0, float),
                   help="of --loss arcface (an angle, radians) or cosface (a cosine); default the paper's: "
                        + ", ".join(f"{loss} {m}" for loss, m in MARGINS.items()))
    p.add_argument("--scale", type=at_least(1e-3, float), default=RECIPE["scale"], help="of a margin loss's cosine logits")
    p.add_argument("--init-from", type=Path, metavar="CKPT",
                   help="start from this checkpoint's weights (same architecture flags), with a new optimiser and "
                        "schedule; a head of another --loss starts fresh, and so does the classifier if CKPT was "
                        "trained on other identities (fine-tuning a face model to other people)")
    regularisers = p.add_argument_group("regularisers beyond the original's recipe (all off by default)")
    regularisers.add_argument("--ema", type=below_one, metavar="DECAY",
                              help="validate, checkpoint and finish with an exponential moving average of the weights, "
                                   "updated every step (horizon ~1/(1-DECAY) steps: 0.999 for the Kaggle set, 0.99 for the demo)")
    regularisers.add_argument("--drop-path", type=below_one, default=0.0, metavar="RATE",
                              help="stochastic depth: the last block's chance of skipping its branch, linear from 0 over the blocks")
    regularisers.add_argument("--cutmix-alpha", type=at_least(0.0, float), default=RECIPE["cutmix_alpha"], metavar="A",
                              help="CutMix with Beta(A, A) box areas: each batch gets CutMix or mixup, 50/50 (CutMix alone "
                                   "with --mixup-alpha 0; not with a margin loss)")
    regularisers.add_argument("--random-erasing", type=below_one, default=0.0, metavar="P",
                              help="chance of blanking a random box of each train image (CPU transform)")
    regularisers.add_argument("--auto-augment", choices=tuple(AUTO_AUGMENT), default="none",
                              help="add TrivialAugmentWide (trivial) or RandAugment (rand) to the CPU train transform")
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
    p.add_argument("--compile", action="store_true", help="torch.compile the model (measure first: python -m tools.bench)")
    p.add_argument("--patience", type=at_least(1), default=20, help="early stopping on dev loss")
    p.add_argument("--resume", nargs="?", const="last", type=str,
                   help="continue from a checkpoint (default OUT/last.ckpt) with its settings; --epochs N extends it")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--num-nodes", type=at_least(1), default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--num-workers", type=at_least(0), help="data loading processes per device")
    p.add_argument("--augment-on-device", choices=("auto", "on", "off"), default="auto",
                   help="decode and augment train batches where the model is, workers only read files "
                        "(auto: on when training on CUDA, where CPU augmentation cannot keep up)")
    p.add_argument("--mean", type=finite_float, nargs=3, default=KAGGLE_MEAN, help="normalisation (python data.py stats DIR/train)")
    p.add_argument("--std", type=at_least(1e-6, float), nargs=3, default=KAGGLE_STD)
    p.add_argument("--precision", help="default: 16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", choices=("off", "offline", "online"), default="offline")
    p.add_argument("--demo", action="store_true", help="generate synthetic faces and train on them on CPU")
    return p


def resolve_accelerator(args) -> tuple[str, str]:
    accelerator = pick_device().type if args.accelerator == "auto" else args.accelerator
    precision = args.precision or ("16-mixed" if accelerator in ("cuda", "gpu") else "32-true")
    return accelerator, precision


def cpu_augmentation(args) -> bool:
    """Whether the run asks for steps that only the CPU train transform has."""
    return args.auto_augment != "none" or args.random_erasing > 0


def augment_on_device(choice: str, accelerator: str, cpu_only: bool = False) -> bool:
    """--augment-on-device auto: on a GPU, whose training outruns a few CPU workers' augmentation,
    unless the run asks for --auto-augment or --random-erasing (CPU transform only)."""
    return choice == "on" or (choice == "auto" and accelerator in ("cuda", "gpu") and not cpu_only)


def build_model(args, data: FaceDataModule, resumed: FaceClassifier | None = None) -> FaceClassifier:
    """The FaceClassifier to train, in training mode: a fresh one from the arguments, or the resumed
    one, given its run's new length (Lightning then restores the rest of the run)."""
    if resumed is not None:
        model = resumed
        if model.class_names != data.class_names:
            raise DataError(f"{args.resume_from} was trained on other identities than {args.data_dir}/train")
        model.hparams.max_epochs = args.epochs
    else:
        architecture = dict(stem=args.stem, head_layers=args.head_layers) if args.backbone == "facenn" else {}
        architecture.update({k: v for k, v in (("widths", args.widths), ("depths", args.depths)) if v})
        architecture["drop_path"] = args.drop_path  # always: a resumed run compares --drop-path with it
        model = FaceClassifier(
            num_classes=data.num_classes, class_names=data.class_names, architecture=architecture,
            backbone=args.backbone, image_size=args.image_size, mean=data.hparams.mean, std=data.hparams.std, lr=args.lr,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, max_epochs=args.epochs,
            label_smoothing=args.label_smoothing, mixup_alpha=args.mixup_alpha, loss=args.loss, margin=args.margin,
            scale=args.scale, cutmix_alpha=args.cutmix_alpha, ema_decay=args.ema,
        )
        if args.init_from:  # fine-tuning: another run's weights, this run's optimiser and schedule
            try:
                kept = model.init_from(model_from_checkpoint(args.init_from, read_checkpoint(args.init_from)))
            except ValueError as error:
                raise UserError(f"--init-from {args.init_from}: {error}") from error
            rank_zero_info(f"--init-from {args.init_from}: {kept}")
    if args.recompute_gelu:  # memory for time, not architecture: for this run only, fresh or resumed
        blocks = [block for block in model.modules() if isinstance(block, ConvNeXtBlock)]
        if not blocks:
            raise UserError(f"--recompute-gelu: the {model.hparams.backbone} backbone has no FaceNN ConvNeXt blocks")
        for block in blocks:
            block.recompute_gelu = True
    return model


def schedule_summary(hp) -> str:
    """The run's learning rate per epoch, and the regularisers it uses beyond the seed's recipe."""
    last_lr = warmup_cosine_lr(hp.max_epochs - 1, hp.warmup_epochs, hp.max_epochs, hp.warmup_start_lr, hp.lr, hp.min_lr)
    extras = [f"{name} {value:g}" for name, value in (
        ("ema", hp.ema_decay), ("drop-path", (hp.architecture or {}).get("drop_path")), ("cutmix", hp.cutmix_alpha)) if value]
    return (f"schedule: warm-up {hp.warmup_epochs} epochs from {hp.warmup_start_lr:g} to peak {hp.lr:g}, cosine to "
            f"{hp.min_lr:g} at epoch {hp.max_epochs} (last epoch's lr {last_lr:.3g})"
            + (f" | {', '.join(extras)}" if extras else ""))


def checkpoint_to_resume(args) -> Path | None:
    """The checkpoint --resume names; refuses to write over an earlier run unless asked."""
    earlier = sorted(args.out.glob("*.ckpt")) if args.out.is_dir() else []
    if args.resume:
        path = args.out / "last.ckpt" if args.resume == "last" else Path(args.resume)
        if not path.is_file():
            raise UserError(f"no checkpoint to resume at {path}")
        if earlier and not any(overlaps(path, checkpoint) for checkpoint in earlier):
            raise UserError(f"--out {args.out} holds another run ({earlier[0].name}): resuming {path} would write over "
                            "it (leave out --out to continue in the checkpoint's folder, or give an empty one)")
        return path
    if earlier and not args.overwrite and not (args.demo and demo_run(earlier[0], args.data_dir)):
        raise UserError(
            f"{args.out} already holds a run ({earlier[0].name}); pass --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )
    return None


def demo_run(checkpoint: Path, demo_data: Path) -> bool:
    """Whether a checkpoint is of a run on the demo's data: one --demo may replace without --overwrite."""
    try:
        trained_on = read_checkpoint(checkpoint).get("datamodule_hyper_parameters", {}).get("data_dir")
    except UserError:
        return False
    return trained_on is not None and overlaps(Path(trained_on), demo_data)


def take_settings(args, checkpoint: dict, path: Path) -> None:
    """A resumed run's settings are its checkpoint's: each flag of RUN_SETTINGS takes the value the
    checkpoint holds, and one given with another value is refused. --epochs may change (the run's
    new length), and so may CHANGEABLE_ON_RESUME."""
    early_stopping = next((state for key, state in checkpoint.get("callbacks", {}).items()
                           if key.startswith("EarlyStopping")), {})
    parts = {
        "model": checkpoint["hyper_parameters"],
        "architecture": checkpoint["hyper_parameters"].get("architecture") or {},
        "data": checkpoint.get("datamodule_hyper_parameters", {}),
        "early stopping": early_stopping,
    }
    for flag, (part, name) in RUN_SETTINGS.items():
        if name not in parts[part]:
            continue  # the architecture holds widths and depths only where they were given
        kept = parts[part][name]
        kept = tuple(kept) if isinstance(kept, list) else kept
        given = tuple(getattr(args, flag)) if isinstance(getattr(args, flag), list) else getattr(args, flag)
        if flag in args.given and flag in CHANGEABLE_ON_RESUME:
            continue
        if flag in args.given and given != kept:
            option = "--" + flag.replace("_", "-")
            raise UserError(f"{option} {given} contradicts {path}, which was trained "
                            f"{'without it' if kept is None else f'with {kept}'}: a resumed run "
                            f"keeps its settings (leave out {option}, or start a new run in another --out)")
        setattr(args, flag, kept)
    if "epochs" not in args.given:
        args.epochs = checkpoint["hyper_parameters"]["max_epochs"]
    args.data_dir = Path(args.data_dir)  # the checkpoint keeps it as text


def nothing_left(args, checkpoint: dict, path: Path) -> str | None:
    """Why a resumed run has no epoch left to train, or None."""
    done = checkpoint["epoch"] + 1
    if done >= args.epochs:
        return (f"{path} has trained {done} epochs of {args.epochs}: nothing left to train "
                f"(pass --epochs N with N > {done} to train it longer)")
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("EarlyStopping") and state["wait_count"] >= state["patience"]:
            return (f"{path} stopped early after epoch {done - 1} ({state['patience']} epochs without a better "
                    "dev loss): nothing left to train")
    return None


def check_trainable(args, data: FaceDataModule, model: FaceClassifier, world: int) -> None:
    """Refuse, before anything is written, a run that could not train a single step."""
    share = math.ceil(len(data.train_dataset) / world)  # images per device (the sampler pads shares)
    if share < 2:
        raise DataError(f"{args.data_dir}/train: {len(data.train_dataset)} images for {world} devices make no training "
                        "batch (expected at least 2 images a device)")
    if args.batch_size == 1 and model.hparams.backbone == "facenn":
        # BatchNorm cannot train on one value per channel: at batch 1 the last stage must be over 1x1
        model.eval()
        with torch.no_grad():
            last_stage = model.model.body(model.model.stem(model.example_input_array))
        model.train()
        if last_stage.shape[-2:].numel() < 2:
            raise UserError(f"--batch-size 1 with {model.example_input_array.shape[-1]} px images: BatchNorm has one value a "
                            "channel to train on in the last stage (use --batch-size 2 or more, or larger --image-size)")


def clear_earlier_run(out: Path) -> None:
    """A new run's --out holds no earlier run's files: they go only once the new run is ready to
    start (with --overwrite, or a demo's earlier run; otherwise there is no checkpoint to lose)."""
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
    if not args.data_dir.is_dir() and not args.resume:  # a resumed run finds its data in the checkpoint
        raise DataError(f"no data directory at {args.data_dir}: {KAGGLE_HELP}")
    writes_out = rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0  # not DDP's other ranks
    with folder_lock(args.out, "run_training.py") if writes_out else nullcontext():
        return train(args)


def train(args) -> int:
    """The run itself, once --out is this process's alone."""
    L.seed_everything(args.seed, workers=True, verbose=False)
    args.resume_from = checkpoint_to_resume(args)
    resumed = read_checkpoint(args.resume_from) if args.resume_from else None
    if resumed is not None:
        model = model_from_checkpoint(args.resume_from, resumed)  # first: a damaged or foreign file is one line
        take_settings(args, resumed, args.resume_from)
        if not args.data_dir.is_dir():
            raise DataError(f"no data directory at {args.data_dir} (where {args.resume_from} was trained): pass "
                            "--data-dir where the data is now")

    accelerator, precision = resolve_accelerator(args)
    data = FaceDataModule(
        args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers, image_size=args.image_size,
        subset_classes=args.subset_classes, full=args.full, mean=tuple(args.mean), std=tuple(args.std),
        augment_on_device=augment_on_device(args.augment_on_device, accelerator, cpu_augmentation(args)), seed=args.seed,
        auto_augment=args.auto_augment, random_erasing=args.random_erasing,
    )
    data.setup("fit")
    model = build_model(args, data, model if resumed else None)
    if resumed is not None and (reason := nothing_left(args, resumed, args.resume_from)):
        print(reason)
        return 0
    if resumed is not None and args.warmup_epochs >= args.epochs:
        raise UserError(f"--epochs {args.epochs} ends within {args.resume_from}'s warm-up of {args.warmup_epochs} "
                        "epochs, so the run would not anneal (give --epochs above it)")
    model.example_input_array = torch.zeros(1, *data.image_shape)  # the summary's shapes and FLOPs
    # leave a core to each data worker (oversubscribed cores thrash), unless OMP_NUM_THREADS decides
    if accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - data.num_workers))
    validate = not args.full
    # two callbacks: Lightning's save_last only follows epochs that improved the monitored metric
    last = ModelCheckpoint(dirpath=args.out, filename="last", enable_version_counter=False)
    best = ModelCheckpoint(dirpath=args.out, filename="best", monitor="val_acc", mode="max", enable_version_counter=False)
    # the bar reads the loss from the GPU when it redraws: on a GPU only at the steps the loggers write
    bar = TQDMProgressBar(refresh_rate=1 if accelerator == "cpu" else LOG_EVERY_N_STEPS)
    callbacks = [LearningRateMonitor("epoch"), ThroughputMonitor(), EpochSeed(args.seed), bar]
    if validate:
        callbacks += [EarlyStopping("val_loss", patience=args.patience), best]
    callbacks.append(last)  # the last to save, so that it holds every other callback's state of its epoch
    loggers = [ResumableCSVLogger(args.out)]
    if args.wandb != "off":
        if importlib.util.find_spec("wandb") is None:  # an optional package (the GPU machine lacks it)
            raise UserError(f"--wandb {args.wandb} needs the wandb package (pip install wandb, as requirements.txt "
                            "pins it), or pass --wandb off")
        loggers.append(WandbLogger(project="FaceClassifier", save_dir=args.out, offline=args.wandb == "offline"))
    try:
        trainer = L.Trainer(
            accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
            precision=precision, max_epochs=model.hparams.max_epochs, callbacks=callbacks, logger=loggers,
            default_root_dir=args.out, benchmark=True, log_every_n_steps=LOG_EVERY_N_STEPS,
            plugins=[AtomicCheckpointIO()],  # each checkpoint written whole or not at all
        )
    except (MisconfigurationException, ValueError) as error:  # --accelerator, --devices, --strategy, --precision
        raise UserError(" ".join(str(error).split())) from error
    world = trainer.world_size
    check_trainable(args, data, model, world)
    rank_zero_info(
        f"device: {accelerator} x {world} | precision: {precision} | parameters: {count_parameters(model):,}\n"
        f"data: {len(data.train_dataset):,} train images, "
        + (f"{len(data.val_dataset):,} dev images, " if validate else "dev merged into train (--full), ")
        + f"{data.num_classes:,} identities | batch {args.batch_size} per device, {args.batch_size * world} global"
        + f" | {data.num_workers} data workers per device"
        + (", decoding and augmenting on the device\n" if data.hparams.augment_on_device else "\n")
        + schedule_summary(model.hparams)
        + (f"\nresuming {args.resume_from} at epoch {resumed['epoch'] + 1} of {args.epochs}" if resumed else "")
    )
    if resumed is None:  # --overwrite, a demo's earlier run, or what a run left before its first checkpoint
        clear_earlier_run(args.out)
    if args.compile:  # the network alone: in place, so the checkpoint's keys stay those of the plain model
        model.model.compile()
    try:
        trainer.fit(model, datamodule=data, ckpt_path=args.resume_from)
    except SystemExit as stop:  # how Lightning ends a run after Ctrl-C or SIGTERM, once it has shut down the workers
        last = args.out / "last.ckpt"
        hint = f"continue from {last} with --resume" if last.is_file() else "no epoch finished"
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(hint) from None
        if isinstance(stop, SIGTERMException):  # its own exit status 0 would pass for success
            print(f"terminated (SIGTERM): {hint}", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    if not trainer.is_global_zero:
        return 0
    if trainer.strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device)
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak / 1e9:.2f} GB")
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
