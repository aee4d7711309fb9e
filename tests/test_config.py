"""One run configuration: every run writes OUT/config.yaml, --config FILE trains the same model as
the flags did, and a flag given with it overrides the file (a bad file: tests/test_commands.py)."""

import torch
import yaml

import config
import run_training
from tests.conftest import FAST


def state(out):
    return torch.load(out / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_a_run_from_its_config_yaml_trains_the_same_model(tiny_faces, tmp_path):
    flags = ["--data-dir", str(tiny_faces), *FAST, "--epochs", "2", "--lr", "3e-3", "--loss", "cosface", "--scale", "16"]
    assert run_training.main([*flags, "--out", str(tmp_path / "flags")]) == 0
    written = yaml.safe_load((tmp_path / "flags" / "config.yaml").read_text())
    assert written["recipe"]["warmup_epochs"] == 0 and written["recipe"]["label_smoothing"] == 0  # resolved
    assert written["architecture"]["widths"] == [8, 16, 24, 32] and "resume" not in written["run"]
    assert written["recipe"]["margin"] == 0.35  # the paper's
    # the checkpoint carries them, each once (the model's, the data module's, early stopping's): what --resume keeps
    kept = config.kept_settings(torch.load(tmp_path / "flags" / "last.ckpt", map_location="cpu", weights_only=True))
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in kept.items()} == {
        k: v for group in ("data", "architecture", "recipe") for k, v in written[group].items()}
    assert run_training.main(["--config", str(tmp_path / "flags" / "config.yaml"), "--out", str(tmp_path / "file")]) == 0
    flagged, filed = state(tmp_path / "flags"), state(tmp_path / "file")
    assert flagged.keys() == filed.keys() and all(torch.equal(flagged[k], filed[k]) for k in flagged)
    assert yaml.safe_load((tmp_path / "file" / "config.yaml").read_text()) == {
        **written, "run": {**written["run"], "out": str(tmp_path / "file")}}


def test_flags_given_with_config_override_it(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"recipe": {"epochs": 12, "lr": 0.01, "ema": 0.9}, "data": {"mean": [0.5, 0.4, 0.3]},
                                    "architecture": {"widths": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}}))
    config = run_training.parse_args(["--config", str(path), "--lr", "0.02"])
    assert (config.recipe.epochs, config.recipe.lr, config.recipe.ema, config.recipe.warmup_epochs) == (12, 0.02, 0.9, 2)
    assert config.data.mean == (0.5, 0.4, 0.3) and config.architecture.widths == (8, 16, 24, 32)
    assert config.given == {"config", "lr"}
    demo = run_training.parse_args(["--demo", "--epochs", "3"])  # a preset is defaults under the flags given
    assert (demo.recipe.epochs, demo.architecture.widths, demo.run.accelerator) == (3, (32, 64, 128, 256), "cpu")


def test_a_checkpoint_of_the_earlier_layout_gives_its_settings():
    """Checkpoints written before config.py kept the image size and normalisation in the data module's
    hyperparameters too: they resume with the same settings."""
    checkpoint = {
        "hyper_parameters": dict(backbone="facenn", image_size=40, mean=[0.5, 0.4, 0.3], std=[0.2] * 3, lr=0.003,
                                 max_epochs=4, ema_decay=None, architecture=dict(widths=[8, 16, 24, 32], drop_path=0.0)),
        "datamodule_hyper_parameters": dict(data_dir="faces", batch_size=8, image_size=40, mean=[0.5, 0.4, 0.3],
                                            augment_on_device=True, num_workers=0, seed=3),
        "callbacks": {"EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": dict(patience=5, wait_count=0)},
    }
    assert config.kept_settings(checkpoint) == dict(
        data_dir="faces", batch_size=8, image_size=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), seed=3,
        backbone="facenn", widths=(8, 16, 24, 32), drop_path=0.0, epochs=4, lr=0.003, ema=None, patience=5)


def test_every_flag_reads_back_as_its_value_from_the_config():
    """Config's attributes are its flags: no method may shadow one (--devices once gave a method)."""
    cfg = run_training.parse_args(["--devices", "2", "--num-nodes", "3"])
    assert (cfg.devices, cfg.num_nodes) == ("2", 3)
    assert all(not callable(getattr(cfg, name)) for name in config.FIELDS)
