"""The LightningModule: FaceNN plus the seed's recipe (AdamW, warm-up + cosine, label smoothing,
mixup), or a margin loss (ArcFace, CosFace) on its embedding, the modern regularisers as options
(EMA of the weights, CutMix), and the plot of a run's curves.

A checkpoint alone rebuilds the model: the hyperparameters hold the architecture, image size and
normalisation, and the checkpoint carries the class mapping (index -> identity folder name).
"""

import csv
import inspect
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from architecture import NUM_CLASSES, WIDTHS, FaceNN, convnext_baseline, train_flops
from cli import option
from data import KAGGLE_MEAN, KAGGLE_STD


def warmup_cosine_lr(epoch, warmup_epochs=10, max_epochs=60, warmup_start_lr=3e-4, peak_lr=1e-3, min_lr=1e-5):
    """The seed's learning rate at `epoch`: lightning-bolts' LinearWarmupCosineAnnealingLR in
    closed form. The warm-up reaches the peak at epoch `warmup_epochs - 1` (bolts divides by
    `warmup_epochs - 1`) and the cosine starts again from the peak at `warmup_epochs`, ending at
    `min_lr` at `max_epochs`. A pure function of its arguments, so a run extended to more epochs
    is the same schedule with a larger `max_epochs`."""
    if epoch < warmup_epochs:
        return warmup_start_lr + epoch * (peak_lr - warmup_start_lr) / max(1, warmup_epochs - 1)
    progress = (epoch - warmup_epochs) / (max_epochs - warmup_epochs)
    return min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2


class WarmupCosine(LambdaLR):
    """`warmup_cosine_lr` as a per-epoch scheduler, peaking at the optimiser's lr.

    Its checkpoint state is the epoch count: the formula comes from the arguments of the run
    that loads it, and loading sets the optimiser's lr by that formula (Lightning loads the
    optimiser first), so a run resumed with more epochs follows the schedule over its new total
    from its first epoch on."""

    def __init__(self, optimizer, warmup_epochs=10, max_epochs=60, warmup_start_lr=3e-4, min_lr=1e-5):
        peak_lr = optimizer.param_groups[0]["lr"]

        def factor(epoch):
            return warmup_cosine_lr(epoch, warmup_epochs, max_epochs, warmup_start_lr, peak_lr, min_lr) / peak_lr

        super().__init__(optimizer, factor)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._last_lr = [base * factor(self.last_epoch) for base, factor in zip(self.base_lrs, self.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


BACKBONES = {"facenn": FaceNN, "convnext": convnext_baseline}
CLASSIFIERS = {"facenn": "head.classifier", "convnext": "classifier.2"}  # what maps the embedding to logits
MARGINS = {"arcface": 0.5, "cosface": 0.35}  # the papers' margins (ArcFace: an angle, in radians)


class MarginHead(nn.Module):
    """Logits of a margin loss: the cosine between the normalised embedding and each normalised
    class weight, times `scale`; in training the true class's cosine first gets the margin, so
    that a class must win by it: ArcFace cos(theta + m) (Deng et al. 2019), CosFace cos(theta) - m
    (Wang et al. 2018). Written out rather than taken from a library so that the logits go through
    the same cross-entropy (label smoothing included) as the plain head's, and validation and
    `submit` read the same logits without the margin."""

    def __init__(self, in_features: int, num_classes: int, loss: str = "arcface", margin: float = 0.5,
                 scale: float = 64.0):
        super().__init__()
        if loss not in MARGINS:
            raise ValueError(f"margin loss must be one of {', '.join(MARGINS)}, got {loss!r}")
        self.loss, self.margin, self.scale = loss, margin, scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # cosines near 1 need float32, fp16 rounds them
            cosine = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.weight.float(), dim=1))
            if labels is None:
                return self.scale * cosine
            target = cosine.gather(1, labels[:, None])
            if self.loss == "cosface":
                margined = target - self.margin
            else:  # cos(theta + m), for theta + m <= pi; past it cos would rise again, so fall linearly (InsightFace's)
                sine = (1 - target.square()).clamp_min(0).sqrt()
                margined = torch.where(target > math.cos(math.pi - self.margin),
                                       target * math.cos(self.margin) - sine * math.sin(self.margin),
                                       target - self.margin * math.sin(math.pi - self.margin))
            return self.scale * cosine.scatter(1, labels[:, None], margined)


class FaceClassifier(L.LightningModule):
    """Trains FaceNN (or, for comparison, torchvision's ConvNeXt) on identity labels.
    `architecture` holds the backbone's keyword arguments (the seed's network when empty;
    `drop_path` there is stochastic depth).

    loss "ce" classifies with the backbone's own head; "arcface" and "cosface" replace that head by
    a MarginHead on the embedding (`margin` None: the paper's), so that training shapes exactly what
    `embed` returns. Mixup and CutMix are refused with a margin loss: their targets are two classes
    at once, and the margin belongs to one true class.

    Off by default, so that the defaults stay the original's recipe: cutmix_alpha > 0 picks CutMix
    or MixUp at random for each batch (CutMix alone when mixup_alpha is 0); ema_decay validates,
    checkpoints and finishes with an exponential moving average of the weights, updated every
    optimiser step (Lightning's EMAWeightAveraging; its horizon is about 1 / (1 - decay) steps).
    Both are hyperparameters, so a resumed run keeps them."""

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        class_names: list[str] | None = None,
        architecture: dict | None = None,
        backbone: str = "facenn",
        image_size: int | None = None,
        crop: float = 1.0,
        mean: tuple = KAGGLE_MEAN,
        std: tuple = KAGGLE_STD,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: int = 10,
        warmup_start_lr: float = 3e-4,
        min_lr: float = 1e-5,
        max_epochs: int = 60,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 1.0,
        loss: str = "ce",
        margin: float | None = None,
        scale: float = 64.0,
        cutmix_alpha: float = 0.0,
        ema_decay: float | None = None,
    ):
        super().__init__()
        # the class names go into the checkpoint itself (on_save_checkpoint), not into every
        # logger's hyperparameters: 7001 of them would flood wandb's config
        self.save_hyperparameters(ignore=["class_names"])
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.model = BACKBONES[backbone](num_classes, **(architecture or {}))
        self.margin_head = None
        if loss != "ce":
            if mixup_alpha > 0 or cutmix_alpha > 0:
                raise ValueError(f"mixup and CutMix have no one true class to put {loss}'s margin on: "
                                 "use mixup_alpha 0 and cutmix_alpha 0")
            self.hparams.margin = MARGINS[loss] if margin is None else margin  # the checkpoint records the value used
            self.model.set_submodule(CLASSIFIERS[backbone], nn.Identity())  # the embedding comes out instead of logits
            embedding = (architecture or {}).get("widths", WIDTHS)[-1]  # both backbones embed at the last width
            self.margin_head = MarginHead(embedding, num_classes, loss, self.hparams.margin, scale)
        # the one place that decides the memory layout, for training and inference alike
        self.model.to(memory_format=torch.channels_last)
        mixes = [v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []
        mixes += [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else []
        self.mixup = (mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)) if mixes else None
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.flops_per_image: int | None = None  # counted at the first training batch, when its size is known
        self.first_bad_loss: torch.Tensor | None = None  # step, epoch and value; see watch_loss
        # what predict_step returns: logits or embeddings, with or without the mirror image (predict.py sets them)
        self.predict_embeddings, self.predict_tta = False, False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits; with a margin loss, `labels` put the margin on the true classes (training)."""
        output = self.model(x.contiguous(memory_format=torch.channels_last))
        return output if self.margin_head is None else self.margin_head(output, labels)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled features, for verification by cosine similarity."""
        return F.normalize(self.model.forward_features(x.contiguous(memory_format=torch.channels_last)), dim=1)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.flops_per_image is None:
            self.flops_per_image = self.count_flops(images.shape[1:])
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)  # soft targets
        logits = self(images, labels)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        self.watch_loss(loss)
        # the step value is this device's own: syncing it would cost an all-reduce every step under
        # DDP; the epoch value is accumulated on the device and all-reduced once, at the epoch's end
        log = dict(prog_bar=True, batch_size=len(labels))
        self.log("train_loss_step", loss, on_step=True, on_epoch=False, **log)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, **log)
        return loss

    def count_flops(self, image_shape) -> int:
        """FLOPs of a training step (forward and backward) per image, counted on a copy of the
        network on the meta device: nothing is computed and the real network is left alone."""
        hp = self.hparams
        with torch.device("meta"):
            model = BACKBONES[hp.backbone](hp.num_classes, **(hp.architecture or {}))
            images, labels = torch.empty(2, *image_shape), torch.zeros(2, dtype=torch.long)
        return train_flops(model, images, labels) // 2  # two images: BatchNorm cannot train on one

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Keeps the step, epoch and value of the first loss that is not finite, on the loss's own
        device: testing it in a Python `if` would make the host wait for the GPU every step.
        raise_if_diverged reads it where the host waits anyway."""
        loss = loss.detach().double()
        if self.first_bad_loss is None:
            self.first_bad_loss = torch.full((3,), -1.0, dtype=torch.float64, device=loss.device)
        now = torch.stack([torch.full_like(loss, self.global_step), torch.full_like(loss, self.current_epoch), loss])
        first = (self.first_bad_loss[0] < 0) & ~torch.isfinite(loss)
        self.first_bad_loss = torch.where(first, now, self.first_bad_loss)

    def raise_if_diverged(self) -> None:
        """The one-line error for a loss that went NaN or infinite, naming the step where it did."""
        if self.first_bad_loss is None:
            return
        step, epoch, loss = self.first_bad_loss.tolist()
        if step >= 0:
            raise FloatingPointError(
                f"training loss is {loss} at step {int(step)} (epoch {int(epoch)}): lower --lr, or check the data"
            )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # at the steps the loggers write, which wait for the GPU to read the loss anyway
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            self.raise_if_diverged()

    def on_train_epoch_end(self) -> None:
        self.raise_if_diverged()
        # what the run used (tools/gpu_check.py reads them): data workers per device and, on a GPU, the
        # peak memory so far, validation included, of the device that needed the most
        log = dict(sync_dist=True, reduce_fx="max")
        self.log("data_workers", float(self.trainer.train_dataloader.num_workers), **log)
        if self.device.type == "cuda":
            self.log("peak_gpu_memory", float(torch.cuda.max_memory_allocated(self.device)), **log)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        metrics = {"val_loss": F.cross_entropy(logits, labels), "val_acc": self.val_top1, "val_top5": self.val_top5}
        self.log_dict(metrics, prog_bar=True, batch_size=len(labels), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        """(outputs, keys) of a batch of (images, keys): the logits, or the embeddings with
        predict_embeddings; with predict_tta, the mean of each image's and its mirror image's
        (embeddings normalised again). float32 on the host, where a test set's outputs can pile up."""
        images, keys = batch
        forward = self.embed if self.predict_embeddings else self
        output = forward(images)
        if self.predict_tta:
            output = (output + forward(images.flip(-1))) / 2
        output = output.float()
        if self.predict_embeddings and self.predict_tta:
            output = F.normalize(output, dim=1)
        return output.cpu(), keys

    def configure_optimizers(self):
        hp = self.hparams
        # fused: one kernel for all parameters instead of a loop of small ones
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=True)
        scheduler = WarmupCosine(optimizer, hp.warmup_epochs, hp.max_epochs, hp.warmup_start_lr, hp.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def configure_callbacks(self):
        return [] if self.hparams.ema_decay is None else [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def init_from(self, source: "FaceClassifier") -> str:
        """Start from the weights of `source`, of the same network: all of them, but a head of another
        loss (cross-entropy, then margin fine-tuning) and, if `source` was trained on other identities,
        its layer with one output per identity: those stay as initialised, so that a face model
        fine-tunes to other people. Returns what was kept, in words, for the run's log."""
        if difference := self.network_difference(source):
            raise ValueError(f"its network differs from this one: {difference}")
        other_people = source.class_names != self.class_names
        weights = source.state_dict()
        if other_people:
            weights = {key: value for key, value in weights.items() if not key.startswith(source.classes_layer())}
        heads = ("margin_head.", f"model.{CLASSIFIERS[self.hparams.backbone]}.")
        try:
            missing, unexpected = self.load_state_dict(weights, strict=False)
        except RuntimeError as error:  # a tensor of another shape, which network_difference missed
            raise ValueError("its network differs from this one (pass the same --backbone, --stem, --head-layers, "
                             "--widths and --depths)") from error
        if off := [key for key in missing + unexpected if not key.startswith(heads)]:
            raise ValueError(f"its network differs from this one ({off[0]}; pass the same architecture flags)")
        if not missing:
            return f"all weights kept, classifier included (the same {len(self.class_names)} identities)"
        new = "classifier" if self.margin_head is None else f"{self.hparams.loss} head"
        if any(not key.startswith(self.classes_layer()) for key in missing):
            new = "head (hidden layer and classifier)"
        if other_people:
            return (f"network kept, new {new} for {len(self.class_names)} identities "
                    f"(it was trained on {len(source.class_names)} others)")
        return f"network kept, new {new} (it was trained with --loss {source.hparams.loss})"

    def classes_layer(self) -> str:
        """The state-dict prefix of the layer with one output per identity: the margin head, or the
        network's last Linear (the classifier's, after the head's hidden layer where it has one)."""
        if self.margin_head is not None:
            return "margin_head."
        return [name for name, module in self.named_modules() if isinstance(module, nn.Linear)][-1] + "."

    def network_difference(self, source: "FaceClassifier") -> str | None:
        """The first architecture flag whose value in `source` gives other weights than here, in
        words, or None. Stochastic depth has no weights, and a margin head none of the head's layers."""
        settings = []
        for model in (source, self):
            hp = model.hparams
            defaults = {name: p.default for name, p in inspect.signature(BACKBONES[hp.backbone]).parameters.items()}
            setting = {"backbone": hp.backbone, **defaults, **(hp.architecture or {})}
            # each value as its flag takes it: 8,16,24,32 for a list
            settings.append({name: ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
                             for name, value in setting.items()})
        ignored = {"num_classes", "drop_path", "recompute_gelu"}
        if source.margin_head is not None or self.margin_head is not None:
            ignored.add("head_layers")
        for name in [name for name in settings[0] if name not in ignored]:  # the backbone first
            theirs, ours = (setting.get(name) for setting in settings)
            if theirs != ours:
                return f"it has {option(name)} {theirs}, this run {ours} (pass {option(name)} {theirs})"
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.raise_if_diverged()  # no checkpoint holds the weights of a diverged run
        checkpoint["class_names"] = self.class_names

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.class_names = checkpoint["class_names"]


def epoch_metrics(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series from a run's metrics.csv (callbacks.ResumableCSVLogger's):
    {metric: [(epoch, value), ...]}.

    Rows logged at an epoch's start (the learning rate) carry no epoch: they count for the epoch
    of the next row that does."""
    series: dict[str, dict[int, float]] = {}
    pending: dict[str, float] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            pending.update({name: float(value) for name, value in row.items()
                            if name not in ("epoch", "step") and value and not name.endswith("_step")})
            if row.get("epoch"):
                for name, value in pending.items():
                    series.setdefault(name, {})[int(float(row["epoch"]))] = value
                pending = {}
    return {name: sorted(values.items()) for name, values in series.items()}


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """Loss, accuracy and learning rate against epoch, side by side, as a PNG."""
    from matplotlib.figure import Figure  # not pyplot: no backend or global figure to set up and close

    series = epoch_metrics(metrics_csv)
    panels = [
        ("loss", ["train_loss_epoch", "val_loss"]),
        ("accuracy", ["val_acc", "val_top5"]),
        ("learning rate", [name for name in series if name.startswith("lr")]),
    ]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for ax, (title, names) in zip(axes, panels):
        for name in names:
            if name in series:
                ax.plot(*zip(*series[name]), marker="o", markersize=3, label=name)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
