"""Checkpoint I/O: the Trainer's checkpoint writes, each whole or not at all, and a run_training.py
checkpoint read back, checked, as the FaceClassifier it describes."""

from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cli import UserError, pick_device
from training import FaceClassifier

CHECKPOINT_HELP = "expected a .ckpt written by run_training.py"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint file I/O (a Trainer plugin), writing each checkpoint beside its target
    and renaming it into place, so that a failed or interrupted write (a full disk, a kill) leaves
    the previous file whole. Only global rank zero writes, so no DDP rank races the rename.

    A checkpoint from before this plugin keeps its ModelCheckpoints' state under AtomicCheckpoint{...}
    (a ModelCheckpoint subclass that wrote this way): read as ModelCheckpoint's, a resumed run keeps
    its best score."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        partial = Path(f"{path}.partial")
        try:
            super().save_checkpoint(checkpoint, partial, storage_options)
            partial.replace(path)
        finally:
            partial.unlink(missing_ok=True)

    def load_checkpoint(self, *args, **kwargs) -> dict:
        checkpoint = super().load_checkpoint(*args, **kwargs)
        if "callbacks" in checkpoint:
            checkpoint["callbacks"] = {key.replace("AtomicCheckpoint{", "ModelCheckpoint{", 1): state
                                       for key, state in checkpoint["callbacks"].items()}
        return checkpoint


def read_checkpoint(path) -> dict:
    """A run_training.py checkpoint's contents, checked: a missing, damaged or foreign file is a
    UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found ({CHECKPOINT_HELP})")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in many ways: zip, pickle, EOF, key errors
        reason = ": ".join(filter(None, [type(error).__name__, str(error).strip().split("\n")[0].split(". ")[0]]))
        raise UserError(f"{path}: cannot read checkpoint ({reason}); {CHECKPOINT_HELP}") from error
    keys = ("hyper_parameters", "class_names", "state_dict")
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in keys):
        raise UserError(f"{path}: not a FaceClassifier checkpoint, no {'/'.join(keys)} ({CHECKPOINT_HELP})")
    return checkpoint


def model_from_checkpoint(path, checkpoint: dict) -> FaceClassifier:
    """The FaceClassifier a checkpoint describes, with its weights, in training mode as a new module is."""
    try:
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k != "channels_last"}  # an older flag
        model = FaceClassifier(**hparams, class_names=checkpoint["class_names"])
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{path}: its weights or settings do not fit FaceClassifier ({CHECKPOINT_HELP})") from error
    return model


def load_model(path, device: str = "auto") -> FaceClassifier:
    """The model a checkpoint describes, for inference: in eval mode on `device`, whatever device it
    was saved from."""
    return model_from_checkpoint(path, read_checkpoint(path)).to(pick_device(device)).eval()
