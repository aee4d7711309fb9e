"""One run of run_training.py as one object: its settings grouped as they travel (the data module's,
the network's, the recipe's, this invocation's), each with its flag, default and help; the rules
between them and the recipe's policy (warm-up, a margin loss's defaults, where to augment, which
precision) decided here alone. A config.yaml (--config) or a preset (--demo) gives defaults, the
flags typed override them; a resumed run keeps its checkpoint's settings."""

import argparse
import inspect
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from architecture import DEPTHS, MIN_IMAGE_SIZE, WIDTHS
from cli import ArgumentParser, UserError, at_least, atomic_write, finite_float, option, overlaps, pick_device
from data import AUTO_AUGMENT, KAGGLE_MEAN, KAGGLE_STD
from residual_blocks import NORM_POSITIONS, NORMS
from training import BACKBONES, MARGINS, FaceClassifier

RECIPE = {name: p.default for name, p in inspect.signature(FaceClassifier.__init__).parameters.items()}
# --preset's named sets of defaults (small: docs/realfaces.md); the defaults stay the original's, for the Kaggle run
PRESETS = {
    "small": dict(image_size=64, crop=0.75, rotation=10, mixup_alpha=0.0, widths="32,64,128,256", depths="1,1,3,1",
                  epochs=45, batch_size=32),
}
MODEL_NAMES = {"epochs": "max_epochs", "ema": "ema_decay"}  # flag -> FaceClassifier's name, where they differ


def fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def int_list(text):
    values = tuple(int(v) for v in text.split(","))
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text}")
    return values


def flag(default=None, help=None, **argparse_options):
    """A setting and its command-line flag (--name-with-dashes): argparse's options ride along."""
    return field(default=default, metadata=dict(help=help, **argparse_options))


@dataclass
class Data:
    """FaceDataModule's settings; a checkpoint keeps them (image size and normalisation with the model)."""
    data_dir: Path = flag(Path("data"), "holds train/, dev/ and test/", type=Path)
    batch_size: int = flag(256, "per device", type=at_least(1))
    image_size: int | None = flag(None, "resize images to this (default: as stored)", type=at_least(MIN_IMAGE_SIZE))
    crop: float = flag(1.0, "keep the centre FRACTION of each side before resizing, in training and inference (1: all)",
                       type=fraction, metavar="FRACTION")
    rotation: float = flag(30.0, "largest angle of the train images' random rotation (the original's 30)",
                           type=at_least(0.0, float), metavar="DEG")
    subset_classes: int | None = flag(None, "prototype on the first N identities", type=at_least(1))
    full: bool = flag(False, "train on train+dev, without validation", action="store_true")
    mean: tuple = flag(KAGGLE_MEAN, "normalisation (python data.py stats DIR/train)", type=finite_float, nargs=3)
    std: tuple = flag(KAGGLE_STD, type=at_least(1e-6, float), nargs=3)
    seed: int = flag(0, type=int)
    auto_augment: str = flag("none", "add TrivialAugmentWide (trivial) or RandAugment (rand) to the CPU train "
                             "transform", choices=tuple(AUTO_AUGMENT))
    random_erasing: float = flag(0.0, "chance of blanking a random box of each train image (CPU transform)",
                                 type=at_least(0.0, float, below=1), metavar="P")

    def cpu_augmentation(self) -> bool:
        """Whether the run asks for steps that only the CPU train transform has."""
        return self.auto_augment != "none" or self.random_erasing > 0


@dataclass
class Architecture:
    """The network: FaceClassifier's backbone and architecture (in the checkpoint's hyperparameters)."""
    backbone: str = flag("facenn", "convnext: torchvision's, for comparison", choices=tuple(BACKBONES))
    stem: str = flag("classic", choices=("classic", "patchify"))
    head_layers: int = flag(2, type=int, choices=(1, 2))
    widths: tuple | None = flag(None, "comma-separated stage widths (default 80,160,320,640)", type=int_list)
    depths: tuple | None = flag(None, "comma-separated stage depths (default 2,2,6,2)", type=int_list)
    drop_path: float = flag(0.0, "stochastic depth: the last block's chance of skipping its branch, linear from 0 over "
                            "the blocks", type=at_least(0.0, float, below=1), metavar="RATE")
    norm: str = flag("batch", "the ConvNeXt blocks' norm: BatchNorm (the original's) or ConvNeXt's channel LayerNorm",
                     choices=tuple(NORMS))
    norm_position: str = flag("after_dwconv", "where the blocks' norm sits: after the depthwise conv (the original's "
                              "and ConvNeXt's), before it, or after the 1x1 expansion", choices=NORM_POSITIONS)
    layer_scale: float | None = flag(None, "ConvNeXt's layer scale: each block's branch times a learned per-channel "
                                     "factor starting at this value (off, as in the original)",
                                     type=at_least(1e-12, float))

    def network(self) -> dict:
        """The backbone's keyword arguments: widths and depths where given, drop_path always (a resumed run
        compares)."""
        network = dict(stem=self.stem, head_layers=self.head_layers, norm=self.norm, norm_position=self.norm_position,
                       layer_scale=self.layer_scale) if self.backbone == "facenn" else {}
        network.update({k: v for k, v in (("widths", self.widths), ("depths", self.depths)) if v})
        return {**network, "drop_path": self.drop_path}


@dataclass
class Recipe:
    """The optimisation: FaceClassifier's hyperparameters (defaults its own), and early stopping's patience."""
    epochs: int = flag(RECIPE["max_epochs"], type=at_least(1))
    warmup_epochs: int | None = flag(None, "linear warm-up from 3e-4 to --lr (default: the seed's share, round(epochs "
                                     "/ 6): 10 of 60)", type=at_least(0))
    lr: float = flag(RECIPE["lr"], "peak learning rate", type=at_least(1e-12, float))
    weight_decay: float = flag(RECIPE["weight_decay"], type=at_least(0.0, float))
    label_smoothing: float = flag(RECIPE["label_smoothing"], "with a margin loss 0 unless given, as in its paper",
                                  type=at_least(0.0, float))
    mixup_alpha: float = flag(RECIPE["mixup_alpha"], "0 turns mixup off (as a margin loss does: it refuses mixup)",
                              type=at_least(0.0, float))
    loss: str = flag("ce", "ce: cross-entropy on the head's logits; arcface/cosface: a margin loss on the normalised "
                     "embedding (best as fine-tuning: --init-from a ce checkpoint)", choices=("ce", *MARGINS))
    margin: float | None = flag(None, "of --loss arcface (an angle, radians) or cosface (a cosine); default the "
                                "paper's: " + ", ".join(f"{loss} {m}" for loss, m in MARGINS.items()),
                                type=at_least(0.0, float))
    scale: float = flag(RECIPE["scale"], "of a margin loss's cosine logits", type=at_least(1e-3, float))
    cutmix_alpha: float = flag(RECIPE["cutmix_alpha"], "CutMix with Beta(A, A) box areas: each batch gets CutMix or "
                               "mixup, 50/50 (CutMix alone with --mixup-alpha 0; not with a margin loss)",
                               type=at_least(0.0, float), metavar="A")
    ema: float | None = flag(None, "validate, checkpoint and finish with an exponential moving average of the weights, "
                             "updated every step (horizon ~1/(1-DECAY) steps: 0.999 for the Kaggle set, 0.99 for the "
                             "demo)", type=at_least(0.0, float, below=1), metavar="DECAY")
    patience: int = flag(20, "early stopping on dev loss", type=at_least(1))

    def model(self) -> dict:
        """FaceClassifier's keyword arguments of the recipe."""
        return {MODEL_NAMES.get(k, k): v for k, v in asdict(self).items() if k != "patience"}


@dataclass
class Run:
    """This invocation: where it writes, what it starts from, the hardware; a resumed run takes these
    anew. The last five are the command's actions, not settings: config.yaml leaves them out."""
    out: Path = flag(Path("checkpoint"), "checkpoints, logs and plots", type=Path)
    init_from: Path | None = flag(None, "start from this checkpoint's weights (same architecture flags), with a new "
                                  "optimiser and schedule; a head of another --loss starts fresh, and so does the "
                                  "classifier if CKPT was trained on other identities (fine-tuning a face model to "
                                  "other people)", type=Path, metavar="CKPT")
    accelerator: str = flag("auto")
    devices: str = flag("auto")
    num_nodes: int = flag(1, type=at_least(1))
    strategy: str = flag("auto")
    precision: str | None = flag(None, "default: 16-mixed on CUDA, 32-true on CPU")
    num_workers: int | None = flag(None, "data loading processes per device", type=at_least(0))
    augment_on_device: str = flag("auto", "decode and augment train batches where the model is, workers only read "
                                  "files (auto: on when training on CUDA, where CPU augmentation cannot keep up)",
                                  choices=("auto", "on", "off"))
    recompute_gelu: bool = flag(False, "less memory, a little slower: backward recomputes FaceNN's GELUs (this run "
                                "only)", action="store_true")
    compile: bool = flag(False, "torch.compile the model (measure first: python -m tools.bench)", action="store_true")
    wandb: str = flag("offline", choices=("off", "offline", "online"))
    config: Path | None = flag(None, "take the settings of this config.yaml (a run's OUT/config.yaml); flags given "
                               "with it override them", type=Path, metavar="FILE")
    resume: str | None = flag(None, "continue from a checkpoint (default OUT/last.ckpt) with its settings; --epochs N "
                              "extends it", nargs="?", const="last")
    overwrite: bool = flag(False, "replace the run already in --out", action="store_true")
    preset: str | None = flag(None, "a named set of defaults that the flags typed override; small: the recipe measured "
                              "best on real photos in a CPU budget (docs/realfaces.md)", choices=tuple(PRESETS))
    demo: bool = flag(False, "generate synthetic faces and train on them on CPU", action="store_true")


ACTIONS = ("config", "resume", "overwrite", "preset", "demo")
GROUPS = {"data": Data, "architecture": Architecture, "recipe": Recipe, "run": Run}
FIELDS = {f.name: f for group in GROUPS.values() for f in fields(group)}
GROUP_OF = {f.name: name for name, group in GROUPS.items() for f in fields(group)}
KEPT = [f.name for group in (Data, Architecture, Recipe) for f in fields(group)]  # what a checkpoint keeps
CHANGEABLE_ON_RESUME = {"data_dir", "batch_size", "epochs"}  # the data may move, a smaller GPU need a smaller batch


@dataclass
class Config:
    data: Data
    architecture: Architecture
    recipe: Recipe
    run: Run
    given: frozenset = frozenset()  # the flags typed on the command line

    def __getattr__(self, name):
        """A setting by its flag's name, whichever group holds it (flags are one namespace)."""
        if name in FIELDS:
            return getattr(self.__dict__[GROUP_OF[name]], name)
        raise AttributeError(name)

    def write(self, path: Path) -> None:
        """The run as config.yaml: by group, plain YAML values, the command's actions left out."""
        plain = lambda v: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
        settings = {name: {k: plain(v) for k, v in asdict(getattr(self, name)).items() if k not in ACTIONS}
                    for name in GROUPS}
        with atomic_write(path) as f:
            yaml.safe_dump(settings, f, sort_keys=False)

    def hardware(self) -> tuple[str, str, bool]:
        """(accelerator, precision, augment on the device): --accelerator, --precision and
        --augment-on-device auto decided for this machine. On a GPU, whose training outruns a few CPU
        workers' augmentation, augment there, unless the run asks for a CPU-only augmentation."""
        accelerator = pick_device().type if self.run.accelerator == "auto" else self.run.accelerator
        gpu, choice = accelerator in ("cuda", "gpu"), self.run.augment_on_device
        on_device = choice == "on" or (choice == "auto" and gpu and not self.data.cpu_augmentation())
        return accelerator, self.run.precision or ("16-mixed" if gpu else "32-true"), on_device


def parser(description=None, error=None, defaults=True) -> ArgumentParser:
    """The command line: one flag a setting, in its group's section of --help. Without `defaults`
    it sets only the flags typed."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if error:
        p.error = error
    for name, group in GROUPS.items():
        section = p.add_argument_group(name)
        for f in fields(group):
            section.add_argument(option(f.name), default=f.default if defaults else argparse.SUPPRESS, **f.metadata)
    return p


def as_flags(settings: dict) -> list[str]:
    """Settings (flag name -> value, as YAML or a preset holds them) as the command line that gives them."""
    argv = []
    for name, value in settings.items():
        if value is True:
            argv.append(option(name))
        elif isinstance(value, (list, tuple)):
            nargs = FIELDS[name].metadata.get("nargs")  # a word a value, else comma-separated
            argv += [option(name), *map(str, value)] if nargs else [f"{option(name)}={','.join(map(str, value))}"]
        elif value is not None and value is not False:
            argv.append(f"{option(name)}={value}")
    return argv


def read_settings(path: Path) -> dict:
    """A config.yaml's settings by flag name; a missing or malformed file, or an unknown setting,
    is a ValueError naming it."""
    try:
        groups = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        reason = " ".join(str(getattr(error, "strerror", None) or error).split())
        raise ValueError(f"cannot read it ({reason})") from error
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise ValueError(f"expected groups of settings ({', '.join(GROUPS)}), as run_training.py writes it")
    if unknown := [f"{group}.{name}" for group, values in groups.items() for name in values
                   if GROUP_OF.get(name) != group or name in ACTIONS]:
        raise ValueError(f"unknown setting {unknown[0]}")
    return {name: value for group in groups.values() for name, value in group.items()}


def parse_args(argv=None, description=None, presets=None) -> Config:
    """The run the command line describes. `presets` (flag -> the settings it applies when on, as
    --demo; for a flag with a value, value -> settings) and --config FILE give defaults, the flags
    typed override them."""
    p = parser(description, defaults=False)
    given = vars(p.parse_args(argv))
    defaults = {}
    for name, settings in (presets or {}).items():
        if chosen := given.get(name):
            defaults.update(settings[chosen] if isinstance(chosen, str) else settings)
    config_file = given.get("config")
    source = f"--config {config_file}: " if config_file else ""
    if config_file:
        try:
            defaults.update(read_settings(config_file))
        except ValueError as error:
            p.error(source + str(error))
    # the defaults parsed as flags, so that a file's bad value is refused as the flag's would be
    values = vars(parser(error=lambda message: p.error(source + message)).parse_args(as_flags(defaults)))
    values = {name: tuple(v) if isinstance(v, list) else v for name, v in {**values, **given}.items()}
    groups = {name: group(**{f.name: values[f.name] for f in fields(group)}) for name, group in GROUPS.items()}
    try:
        return resolve(Config(**groups, given=frozenset(given)))
    except ValueError as error:
        p.error(str(error))


def resolve(config: Config) -> Config:
    """The rules between settings, and the recipe's defaults that depend on others; a ValueError
    for a run that cannot be."""
    data, network, recipe, run, given = config.data, config.architecture, config.recipe, config.run, config.given
    widths, depths = network.widths or WIDTHS, network.depths or DEPTHS
    if len(widths) != len(depths):
        raise ValueError(f"--widths {widths} and --depths {depths} need one value per stage each")
    if network.backbone != "facenn" and (facenn_only := {"norm", "norm_position", "layer_scale"} & given):
        raise ValueError(f"{option(min(facenn_only))} is a FaceNN block option, not for --backbone {network.backbone}")
    if recipe.warmup_epochs is None:  # the seed's share, 10 of 60 epochs, so that a shorter run still anneals
        recipe.warmup_epochs = round(recipe.epochs / 6)
    if recipe.warmup_epochs >= recipe.epochs:
        raise ValueError(f"--warmup-epochs {recipe.warmup_epochs} must be less than --epochs {recipe.epochs}, so that "
                         "the run anneals")
    if run.augment_on_device == "on" and data.cpu_augmentation():
        raise ValueError("--auto-augment and --random-erasing run in the CPU workers: not with --augment-on-device on")
    if recipe.loss != "ce":  # the papers' recipe: neither mixup (refused) nor label smoothing, unless given
        for name, what in (("mixup_alpha", "mixup"), ("cutmix_alpha", "CutMix")):
            if getattr(recipe, name) and (name in given or name == "cutmix_alpha"):
                raise ValueError(f"{option(name)} {getattr(recipe, name)} with --loss {recipe.loss}: {what} mixes "
                                 f"two classes, the margin needs one true class (leave {what} out)")
        recipe.mixup_alpha = 0.0
        recipe.label_smoothing = recipe.label_smoothing if "label_smoothing" in given else 0.0
        recipe.margin = MARGINS[recipe.loss] if recipe.margin is None else recipe.margin
    elif "margin" in given:
        raise ValueError("--margin is for --loss arcface or cosface")
    else:
        recipe.margin = None  # a file's margin, of its margin loss
    if run.resume and run.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: pick one")
    if run.resume and run.resume != "last" and "out" not in given:
        run.out = Path(run.resume).parent  # a run continues in its own folder
    if run.init_from and run.resume:
        raise ValueError("--init-from starts a new run from a checkpoint's weights, --resume continues one: pick one")
    if run.init_from and overlaps(run.init_from, run.out):
        raise ValueError(f"--init-from {run.init_from} lies in --out {run.out}, whose run this one replaces: give "
                         "another --out")
    return config


def kept_settings(checkpoint: dict) -> dict:
    """The settings a checkpoint keeps, by flag name, each where it is stored once: the model's
    hyperparameters (the network, the recipe, the input's size and normalisation), the data
    module's, and early stopping's patience. Widths and depths are there only where given."""
    model = checkpoint["hyper_parameters"]
    stored = {**checkpoint.get("datamodule_hyper_parameters", {}), **model, **(model.get("architecture") or {}),
              **{flag: model[name] for flag, name in MODEL_NAMES.items() if name in model},
              **{"patience": state["patience"] for key, state in checkpoint.get("callbacks", {}).items()
                 if key.startswith("EarlyStopping") and "patience" in state}}
    return {name: tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
            for name in KEPT if name in stored}


def resumed(config: Config, checkpoint: dict, path: Path) -> Config:
    """The run a checkpoint continues: its settings, refusing a flag given with another value.
    --epochs (the run's new length), --data-dir and --batch-size may change."""
    groups = {name: replace(getattr(config, name)) for name in GROUPS}  # copies, to take the kept settings
    for name, kept in kept_settings(checkpoint).items():
        if name in config.given and name in CHANGEABLE_ON_RESUME:
            continue
        if name in config.given and getattr(config, name) != kept:
            raise UserError(f"{option(name)} {getattr(config, name)} contradicts {path}, which was trained "
                            f"{'without it' if kept is None else f'with {kept}'}: a resumed run "
                            f"keeps its settings (leave out {option(name)}, or start a new run in another --out)")
        setattr(groups[GROUP_OF[name]], name, kept)
    groups["data"].data_dir = Path(groups["data"].data_dir)  # the checkpoint keeps it as text
    return replace(config, **groups)
