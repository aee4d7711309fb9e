"""Train FaceNN with the seed's recipe. A config in (config.py), Trainer out: no ML logic lives here.

    python run_training.py                        # Kaggle data under data/, 60 epochs
    python run_training.py --full                 # the seed's final run: train+dev, no validation
    python run_training.py --resume               # continue checkpoint/last.ckpt
    python run_training.py --demo                 # synthetic faces, CPU, a few minutes; prints how to score it
    python run_training.py --loss arcface --init-from checkpoint/best.ckpt --epochs 10 --out checkpoint/arcface
    python run_training.py --data-dir my_people --init-from checkpoint/best.ckpt --epochs 10 --out checkpoint/mine
    python run_training.py --config checkpoint/config.yaml --out checkpoint/again   # the same run again

Writes into --out: last.ckpt, best.ckpt (best dev accuracy), metrics.csv, curves.png, config.yaml (the
run's settings, config.py's) and, with --wandb, an offline or online wandb run.
"""

import importlib.util
import math
import os
import shlex
import signal
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

import config
import synthetic_faces
from architecture import count_parameters
from cli import UserError, folder_lock, keep_freed_memory, overlaps, run
from config import Config
from data import DataError, FaceDataModule
from residual_blocks import ConvNeXtBlock
from callbacks import EpochSeed, ResumableCSVLogger, ThroughputMonitor
from checkpoints import AtomicCheckpointIO, model_from_checkpoint, read_checkpoint
from training import FaceClassifier, plot_curves, warmup_cosine_lr

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
# --demo's settings, a preset: defaults under the flags given, as a --config file's are
DEMO_ARGS = dict(
    data_dir=Path("demo_data"), out=Path("checkpoint/demo"), epochs=15, warmup_epochs=1, batch_size=64,
    lr=2e-3, widths="32,64,128,256", depths="1,1,3,1", accelerator="cpu", num_workers=1, wandb="off",
)


class Resumed(NamedTuple):
    path: Path
    checkpoint: dict
    model: FaceClassifier


class Outcome(NamedTuple):
    """What a run leaves: its last checkpoint and, where it validated, its best and that one's dev accuracy."""
    last: Path
    best: Path | None
    best_dev_acc: float | None


def parse_args(argv=None) -> Config:
    return config.parse_args(argv, __doc__, presets={"preset": config.PRESETS, "demo": DEMO_ARGS})


def build_model(cfg: Config, data: FaceDataModule, resumed: FaceClassifier | None = None) -> FaceClassifier:
    """The FaceClassifier to train, in training mode: a fresh one from the settings, or the resumed
    one, given its run's new length (Lightning then restores the rest of the run)."""
    if resumed is not None:
        model = resumed
        model.hparams.max_epochs = cfg.recipe.epochs
    else:
        model = FaceClassifier(
            num_classes=data.num_classes, class_names=data.class_names, architecture=cfg.architecture.network(),
            backbone=cfg.architecture.backbone, image_size=cfg.data.image_size, crop=cfg.data.crop, mean=cfg.data.mean,
            std=cfg.data.std,
            **cfg.recipe.model(),
        )
        if cfg.run.init_from:  # fine-tuning: another run's weights, this run's optimiser and schedule
            try:
                kept = model.init_from(model_from_checkpoint(cfg.run.init_from, read_checkpoint(cfg.run.init_from)))
            except ValueError as error:
                raise UserError(f"--init-from {cfg.run.init_from}: {error}") from error
            rank_zero_info(f"--init-from {cfg.run.init_from}: {kept}")
    if cfg.run.recompute_gelu:  # memory for time, not architecture: for this run only, fresh or resumed
        blocks = [block for block in model.modules() if isinstance(block, ConvNeXtBlock)]
        if not blocks:
            raise UserError(f"--recompute-gelu: the {model.hparams.backbone} backbone has no FaceNN ConvNeXt blocks")
        for block in blocks:
            block.recompute_gelu = True
    return model


def schedule_summary(hp) -> str:
    """The run's learning rate per epoch, and the regularisers it uses beyond the seed's recipe."""
    last_lr = warmup_cosine_lr(hp.max_epochs - 1, hp.warmup_epochs, hp.max_epochs, hp.warmup_start_lr, hp.lr, hp.min_lr)
    regularisers = (("ema", hp.ema_decay), ("drop-path", (hp.architecture or {}).get("drop_path")),
                    ("cutmix", hp.cutmix_alpha))
    extras = [f"{name} {value:g}" for name, value in regularisers if value]
    return (f"schedule: warm-up {hp.warmup_epochs} epochs from {hp.warmup_start_lr:g} to peak {hp.lr:g}, cosine to "
            f"{hp.min_lr:g} at epoch {hp.max_epochs} (last epoch's lr {last_lr:.3g})"
            + (f" | {', '.join(extras)}" if extras else ""))


def resume(cfg: Config) -> tuple[Config, Resumed | None]:
    """The run to train: a new one as configured, or the one --resume continues, with its checkpoint's
    settings; refuses to write over an earlier run unless asked."""
    out, resume = cfg.run.out, cfg.run.resume
    earlier = sorted(out.glob("*.ckpt")) if out.is_dir() else []
    if not resume:
        if earlier and not cfg.run.overwrite and not (cfg.run.demo and demo_run(earlier[0], cfg.data.data_dir)):
            raise UserError(f"{out} already holds a run ({earlier[0].name}); pass --resume to continue it, "
                            "--overwrite to replace it, or another --out")
        return cfg, None
    path = out / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise UserError(f"no checkpoint to resume at {path}")
    if earlier and not any(overlaps(path, checkpoint) for checkpoint in earlier):
        raise UserError(f"--out {out} holds another run ({earlier[0].name}): resuming {path} would write over "
                        "it (leave out --out to continue in the checkpoint's folder, or give an empty one)")
    checkpoint = read_checkpoint(path)
    model = model_from_checkpoint(path, checkpoint)  # first: a damaged or foreign file is one line
    cfg = config.resumed(cfg, checkpoint, path)
    if not cfg.data.data_dir.is_dir():
        raise DataError(f"no data directory at {cfg.data.data_dir} (where {path} was trained): pass "
                        "--data-dir where the data is now")
    return cfg, Resumed(path, checkpoint, model)


def demo_run(checkpoint: Path, demo_data: Path) -> bool:
    """Whether a checkpoint is of a run on the demo's data: one --demo may replace without --overwrite."""
    try:
        trained_on = read_checkpoint(checkpoint).get("datamodule_hyper_parameters", {}).get("data_dir")
    except UserError:
        return False
    return trained_on is not None and overlaps(Path(trained_on), demo_data)


def nothing_left(cfg: Config, data: FaceDataModule, resumed: Resumed) -> str | None:
    """Why a resumed run has no epoch left to train, or None; refuses one that cannot go on."""
    path, epochs, warmup = resumed.path, cfg.recipe.epochs, cfg.recipe.warmup_epochs
    if resumed.model.class_names != data.class_names:
        raise DataError(f"{path} was trained on other identities than {cfg.data.data_dir}/train")
    done = resumed.checkpoint["epoch"] + 1
    if done >= epochs:
        return (f"{path} has trained {done} epochs of {epochs}: nothing left to train "
                f"(pass --epochs N with N > {done} to train it longer)")
    for key, state in resumed.checkpoint.get("callbacks", {}).items():
        if key.startswith("EarlyStopping") and state["wait_count"] >= state["patience"]:
            return (f"{path} stopped early after epoch {done - 1} ({state['patience']} epochs without a better "
                    "dev loss): nothing left to train")
    if warmup >= epochs:
        raise UserError(f"--epochs {epochs} ends within {path}'s warm-up of {warmup} epochs, so the run would not "
                        "anneal (give --epochs above it)")
    return None


def check_trainable(cfg: Config, data: FaceDataModule, model: FaceClassifier, world: int) -> None:
    """Refuse, before anything is written, a run that could not train a single step."""
    share = math.ceil(len(data.train_dataset) / world)  # images per device (the sampler pads shares)
    if share < 2:
        raise DataError(f"{cfg.data.data_dir}/train: {len(data.train_dataset)} images for {world} devices make no "
                        "training batch (expected at least 2 images a device)")
    if cfg.data.batch_size == 1 and model.hparams.backbone == "facenn":
        # BatchNorm cannot train on one value per channel: at batch 1 the last stage must be over 1x1
        model.eval()
        with torch.no_grad():
            last_stage = model.model.body(model.model.stem(model.example_input_array))
        model.train()
        if last_stage.shape[-2:].numel() < 2:
            raise UserError(f"--batch-size 1 with {model.example_input_array.shape[-1]} px images: BatchNorm has one "
                            "value a channel to train on in the last stage (use --batch-size 2 or more, or larger "
                            "--image-size)")


def clear_earlier_run(out: Path) -> None:
    """A new run's --out holds no earlier run's files: they go only once the new run is ready to
    start (with --overwrite, or a demo's earlier run; otherwise there is no checkpoint to lose)."""
    for path in [*out.glob("*.ckpt"), out / "metrics.csv", out / "hparams.yaml"]:
        path.unlink(missing_ok=True)


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


def train(cfg: Config) -> Outcome | None:
    """The run `cfg` describes: its Outcome, or None where a resumed run had nothing left to train."""
    keep_freed_memory()
    if cfg.run.demo:
        synthetic_faces.generate(cfg.data.data_dir, **DEMO_DATA, seed=cfg.data.seed)
    if not cfg.data.data_dir.is_dir() and not cfg.run.resume:  # a resumed run finds its data in the checkpoint
        raise DataError(f"no data directory at {cfg.data.data_dir}: {KAGGLE_HELP}")
    writes_out = rank_zero_only.rank == 0 and int(os.environ.get("NODE_RANK", 0)) == 0  # not DDP's other ranks
    with folder_lock(cfg.run.out, "run_training.py") if writes_out else nullcontext():
        return fit_run(cfg)


def fit_run(cfg: Config) -> Outcome | None:
    """The run itself, once --out is this process's alone."""
    L.seed_everything(cfg.data.seed, workers=True, verbose=False)
    cfg, resumed = resume(cfg)
    accelerator, precision, on_device = cfg.hardware()
    data = FaceDataModule(**vars(cfg.data), num_workers=cfg.run.num_workers, augment_on_device=on_device)
    data.setup("fit")
    model = build_model(cfg, data, resumed.model if resumed else None)
    if resumed is not None and (reason := nothing_left(cfg, data, resumed)):
        print(reason)
        return None
    model.example_input_array = torch.zeros(1, *data.image_shape)  # the summary's shapes and FLOPs
    # leave a core to each data worker (oversubscribed cores thrash), unless OMP_NUM_THREADS decides
    if accelerator == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - data.num_workers))
    trainer = make_trainer(cfg, accelerator, precision)
    check_trainable(cfg, data, model, trainer.world_size)
    report_start(cfg, data, model, trainer, (accelerator, precision), resumed)
    if resumed is None:  # --overwrite, a demo's earlier run, or what a run left before its first checkpoint
        clear_earlier_run(cfg.run.out)
    if rank_zero_only.rank == 0:
        cfg.write(cfg.run.out / "config.yaml")
    if cfg.run.compile:  # the network alone: in place, so the checkpoint's keys stay those of the plain model
        model.model.compile()
    fit(trainer, model, data, cfg.run.out, resumed.path if resumed else None)
    return report_end(cfg, trainer)


def make_trainer(cfg: Config, accelerator: str, precision: str) -> L.Trainer:
    """The Trainer with the run's callbacks and loggers; a bad Trainer flag is one line."""
    out, validate = cfg.run.out, not cfg.data.full
    # two callbacks: Lightning's save_last only follows epochs that improved the monitored metric
    last = ModelCheckpoint(dirpath=out, filename="last", enable_version_counter=False)
    best = ModelCheckpoint(dirpath=out, filename="best", monitor="val_acc", mode="max", enable_version_counter=False)
    # the bar reads the loss from the GPU when it redraws: on a GPU only at the steps the loggers write
    bar = TQDMProgressBar(refresh_rate=1 if accelerator == "cpu" else LOG_EVERY_N_STEPS)
    callbacks = [LearningRateMonitor("epoch"), ThroughputMonitor(), EpochSeed(cfg.data.seed), bar]
    if validate:
        callbacks += [EarlyStopping("val_loss", patience=cfg.recipe.patience), best]
    callbacks.append(last)  # the last to save, so that it holds every other callback's state of its epoch
    loggers = [ResumableCSVLogger(out)]
    if cfg.run.wandb != "off":
        if importlib.util.find_spec("wandb") is None:  # an optional package (the GPU machine lacks it)
            raise UserError(f"--wandb {cfg.run.wandb} needs the wandb package (pip install wandb, as requirements.txt "
                            "pins it), or pass --wandb off")
        loggers.append(WandbLogger(project="FaceClassifier", save_dir=out, offline=cfg.run.wandb == "offline"))
    try:
        return L.Trainer(
            accelerator=accelerator, devices=cfg.run.devices, num_nodes=cfg.run.num_nodes, strategy=cfg.run.strategy,
            precision=precision, max_epochs=cfg.recipe.epochs, callbacks=callbacks, logger=loggers,
            default_root_dir=out, benchmark=True, log_every_n_steps=LOG_EVERY_N_STEPS,
            plugins=[AtomicCheckpointIO()],  # each checkpoint written whole or not at all
        )
    except (MisconfigurationException, ValueError) as error:  # --accelerator, --devices, --strategy, --precision
        raise UserError(" ".join(str(error).split())) from error


def report_start(cfg: Config, data: FaceDataModule, model, trainer: L.Trainer, device: tuple, resumed) -> None:
    """What the run is about to do: device, data, schedule."""
    world, batch = trainer.world_size, cfg.data.batch_size
    dev = f"{len(data.val_dataset):,} dev images" if data.val_dataset is not None else "dev merged into train (--full)"
    lines = [
        f"device: {device[0]} x {world} | precision: {device[1]} | parameters: {count_parameters(model):,}",
        f"data: {len(data.train_dataset):,} train images, {dev}, {data.num_classes:,} identities | batch {batch} per "
        f"device, {batch * world} global | {data.num_workers} data workers per device"
        + (", decoding and augmenting on the device" if data.hparams.augment_on_device else ""),
        schedule_summary(model.hparams),
    ]
    if resumed:
        lines.append(f"resuming {resumed.path} at epoch {resumed.checkpoint['epoch'] + 1} of {cfg.recipe.epochs}")
    rank_zero_info("\n".join(lines))


def fit(trainer: L.Trainer, model, data, out: Path, resume_from: Path | None) -> None:
    """trainer.fit; a run stopped by Ctrl-C or SIGTERM says how to continue it."""
    try:
        with warnings.catch_warnings():  # --out is this run's: earlier runs were refused or cleared
            warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
            trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    except SystemExit as stop:  # how Lightning ends a run after Ctrl-C or SIGTERM, once it has shut down the workers
        last = out / "last.ckpt"
        hint = f"continue from {last} with --resume" if last.is_file() else "no epoch finished"
        if isinstance(stop.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt(hint) from None
        if isinstance(stop, SIGTERMException):  # its own exit status 0 would pass for success
            print(f"terminated (SIGTERM): {hint}", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


def report_end(cfg: Config, trainer: L.Trainer) -> Outcome:
    """The run's Outcome, which rank zero reports: dev accuracy, peak GPU memory, curves, and for the
    demo the commands that score it."""
    out, validated = cfg.run.out, not cfg.data.full
    best, last = trainer.checkpoint_callbacks[0], trainer.checkpoint_callbacks[-1]
    outcome = Outcome(Path(last.best_model_path), Path(best.best_model_path) if validated else None,
                      float(best.best_model_score) if validated else None)
    if not trainer.is_global_zero:
        return outcome
    if trainer.strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device)
        print(f"peak GPU memory (torch.cuda.max_memory_allocated): {peak / 1e9:.2f} GB")
    plot_curves(out / "metrics.csv", out / "curves.png")
    if validated:
        print(f"best dev accuracy {outcome.best_dev_acc:.4f}: {outcome.best}")
    print(f"last checkpoint: {outcome.last}; curves: {out / 'curves.png'}")
    if cfg.run.demo:
        print(demo_scoring(outcome.best or outcome.last, cfg.data.data_dir, out))
    return outcome


def demo_scoring(checkpoint: Path, data_dir: Path, out: Path) -> str:
    """The predict.py commands that score the demo's test split, for a newcomer to type next."""
    submission = out / "submission.csv"
    commands = [["submit", "--checkpoint", checkpoint, "--test-dir", data_dir / "test", "--out", submission],
                ["evaluate", "--submission", submission, "--labels", data_dir / "test_labels.csv", "--checkpoint",
                 checkpoint]]
    return "score it (make demo runs these, then verify and identify; docs/demo.md):\n" + "\n".join(
        shlex.join(["python", "predict.py", *map(str, command)]) for command in commands)


if __name__ == "__main__":
    run(main)
