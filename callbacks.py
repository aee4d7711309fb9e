"""What the Trainer runs beside the FaceClassifier, through Lightning's public API: the callbacks
(the epoch's random seed, the throughput) and the CSV log that a resumed run goes on writing."""

import csv
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from cli import write_csv
from data import seed_of

# the dtype the GPU computes in under each precision, for its peak FLOP/s (float32 otherwise)
COMPUTE_DTYPES = {"16-mixed": torch.half, "16-true": torch.half, "bf16-mixed": torch.bfloat16,
                  "bf16-true": torch.bfloat16, "64-true": torch.double}


class EpochSeed(L.Callback):
    """Seeds the random state of the training steps (mixup, drop-path, augmentation on the device)
    at the start of each epoch from (seed, epoch), so that an epoch draws the same whether the run
    got there in one go or was resumed from a checkpoint. The data's order and augmentation have
    seeds of their own (data.EpochShuffle, data.EpochSeeded)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def on_train_epoch_start(self, trainer, pl_module):
        torch.manual_seed(seed_of(self.seed, trainer.current_epoch))


class ThroughputMonitor(L.Callback):
    """Images/s and FLOP/s (by the module's `flops_per_image`) of training, summed over devices: per
    epoch (train_img_per_s, train_flop_per_s, train_images; data loading included, validation not),
    and Lightning's rolling Throughput (train/..., such as train/device/mfu) at the steps the loggers
    write.

    The clock is read only at those steps and at each epoch's last one, so that the host can queue
    each step while the GPU works on the one before (Lightning's own ThroughputMonitor synchronises
    at every step)."""

    @rank_zero_only
    def on_train_start(self, trainer, pl_module):
        peak = get_available_flops(trainer.strategy.root_device, COMPUTE_DTYPES.get(trainer.precision, torch.float32))
        self.rolling = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=4)
        self.trained = 0.0  # seconds of training in the epochs before this one: the rolling clock
        self.batches = self.images = 0
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts in one

    @rank_zero_only
    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.epoch_images, self.unclocked_flops = time.perf_counter(), 0, 0

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches, self.images = self.batches + 1, self.images + len(batch[1])
        self.epoch_images += len(batch[1])
        self.unclocked_flops += (pl_module.flops_per_image or 0) * len(batch[1])
        # global_step has counted this step: the loggers write when it is a multiple, as for the loss
        logging = trainer.log_every_n_steps > 0 and trainer.global_step % trainer.log_every_n_steps == 0
        last = batch_idx + 1 == trainer.num_training_batches
        if not (logging or last):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the clock reads when the GPU has finished the steps it counts
        seconds = time.perf_counter() - self.epoch_start
        self.rolling.update(time=self.trained + seconds, batches=self.batches, samples=self.images,
                            flops=self.unclocked_flops or None)
        self.unclocked_flops = 0
        if logging:
            rolling = {f"train/{name}": float(value) for name, value in self.rolling.compute().items()}
            pl_module.log_dict(rolling, on_step=True, on_epoch=False, rank_zero_only=True)
        if last:
            self.trained += seconds
            self.log_epoch(trainer, pl_module, seconds)

    def log_epoch(self, trainer, pl_module, seconds: float) -> None:
        world, rate = trainer.world_size, self.epoch_images / seconds
        log = dict(on_step=False, on_epoch=True, rank_zero_only=True)
        pl_module.log("train_img_per_s", world * rate, prog_bar=True, **log)
        pl_module.log("train_images", float(world * self.epoch_images), **log)
        if pl_module.flops_per_image:
            pl_module.log("train_flop_per_s", world * rate * pl_module.flops_per_image, **log)


class ResumableCSVLogger(Logger):
    """metrics.csv in `folder`: a row per log call (columns epoch, step and the metrics' names,
    sorted), written by global rank zero at once, so that a killed run keeps its log. A resumed run
    appends to the file it finds, under its header; a new column rewrites the file beside itself
    and renames it into place, so that a run killed meanwhile keeps the old one. Hyperparameters
    are not logged here: the checkpoint holds them."""

    name = version = ""  # no experiment folders: the file lies in `folder`

    def __init__(self, folder):
        super().__init__()
        self.path = Path(folder) / "metrics.csv"
        self.columns: list[str] | None = None  # the file's header, read at the first row (after --overwrite clears it)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = {name: value.item() if isinstance(value, torch.Tensor) else value for name, value in metrics.items()}
        row["step"] = step
        if self.columns is None:  # the header of the file a resumed run goes on with, if any
            self.columns = self.read()[0]
        if new := row.keys() - set(self.columns):  # the file again, under the new header
            columns, rows = sorted([*self.columns, *new]), self.read()[1]
            write_csv(self.path, [columns, *([earlier.get(name) for name in columns] for earlier in rows)])
            self.columns = columns
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def read(self) -> tuple[list[str], list[dict]]:
        if not self.path.is_file():
            return [], []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
