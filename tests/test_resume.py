"""A resumed run trains the model an uninterrupted one would: every module in training mode,
BatchNorm statistics advancing, the callbacks' state of the right epoch, the same weights; it
takes its settings from the checkpoint, extends with --epochs, and says when nothing is left.
And --out is one run's at a time."""

import csv
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import config
import predict
import run_training
from callbacks import ResumableCSVLogger
from checkpoints import AtomicCheckpointIO
from cli import UserError, folder_lock
from data import DataError, FaceDataModule
from training import FaceClassifier, epoch_metrics, warmup_cosine_lr
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = ["--epochs", "4", "--lr", "3e-3"]  # 4 steps an epoch at FAST's batch 8 on the tiny set
BATCH_NORM_STEPS = "model.stem.layers.2.num_batches_tracked"


def train(data_dir, out, *flags):
    return run_training.main(["--data-dir", str(data_dir), "--out", str(out), *FAST, *EPOCHS, *flags])


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def callback_state(checkpoint, kind: str) -> dict:
    """The state of the one callback whose state key starts with `kind` (EarlyStopping, or the
    ModelCheckpoint that monitors val_acc)."""
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith(kind)]
    return state


def rows(metrics_csv: Path) -> list[dict]:
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


class Watch:
    """Records, at each training step, whether every module is in training mode, and raises
    KeyboardInterrupt (what Ctrl-C raises) at step `stop_at`."""

    def __init__(self, monkeypatch):
        self.modes, self.stop_at = [], None
        step = FaceClassifier.training_step

        def training_step(model, batch, batch_idx):
            self.modes.append(all(module.training for module in model.modules()))
            if model.global_step == self.stop_at:
                raise KeyboardInterrupt
            return step(model, batch, batch_idx)

        monkeypatch.setattr(FaceClassifier, "training_step", training_step)


@pytest.fixture
def watch(monkeypatch):
    return Watch(monkeypatch)


def test_a_resumed_run_trains_the_same_model_as_an_uninterrupted_one(tiny_faces, tmp_path, watch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train(tiny_faces, whole) == 0
    watch.stop_at = 9  # in epoch 2: epochs 0 and 1 are in last.ckpt
    with pytest.raises(KeyboardInterrupt):
        train(tiny_faces, parts)
    interrupted = load(parts / "last.ckpt")
    assert interrupted["epoch"] == 1
    log_before = rows(parts / "metrics.csv")

    watch.stop_at, watch.modes = None, []
    assert train(tiny_faces, parts, "--resume") == 0
    assert len(watch.modes) == 8 and all(watch.modes)  # epochs 2 and 3, all of the network training
    resumed, uninterrupted = load(parts / "last.ckpt"), load(whole / "last.ckpt")
    assert resumed["epoch"] == 3
    assert resumed["state_dict"][BATCH_NORM_STEPS] == interrupted["state_dict"][BATCH_NORM_STEPS] + 8 == 16
    for name, tensor in uninterrupted["state_dict"].items():  # same seed, same data order: the same model
        assert torch.equal(resumed["state_dict"][name], tensor), name
    for name, tensor in load(whole / "best.ckpt")["state_dict"].items():
        assert torch.equal(load(parts / "best.ckpt")["state_dict"][name], tensor), name
    # the log goes on from the interrupted run's rows (new columns may join), and has every epoch once
    log_after = rows(parts / "metrics.csv")
    assert [{key: row[key] for key in log_before[0]} for row in log_after[: len(log_before)]] == log_before
    assert [epoch for epoch, _ in epoch_metrics(parts / "metrics.csv")["val_acc"]] == [0, 1, 2, 3]


def test_last_checkpoint_holds_the_best_score_and_patience_of_its_own_epoch(tiny_faces, tmp_path, monkeypatch):
    saved = []  # (epoch, best val_acc, early-stopping best val_loss, its wait count) of each last.ckpt
    save = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if Path(path).name == "last.ckpt":
            checkpoint = load(path)
            stopping = callback_state(checkpoint, "EarlyStopping")
            best = callback_state(checkpoint, "ModelCheckpoint{'monitor': 'val_acc'")
            saved.append((checkpoint["epoch"], best["best_model_score"], stopping["best_score"], stopping["wait_count"]))

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    assert train(tiny_faces, tmp_path / "run") == 0
    series = epoch_metrics(tmp_path / "run" / "metrics.csv")
    accuracy, loss = [value for _, value in series["val_acc"]], [value for _, value in series["val_loss"]]
    assert [epoch for epoch, *_ in saved] == [0, 1, 2, 3]
    for epoch, best_accuracy, best_loss, wait in saved:
        assert best_accuracy == pytest.approx(max(accuracy[: epoch + 1]))
        assert best_loss == pytest.approx(min(loss[: epoch + 1]))
        assert wait == epoch - loss.index(min(loss[: epoch + 1]))


def test_extending_a_finished_run_follows_the_schedule_of_the_new_total(tiny_faces, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_faces, out) == 0
    finished = (out / "last.ckpt").read_bytes()
    assert train(tiny_faces, out, "--resume") == 0  # finished: says so, changes nothing
    assert "nothing left to train" in capsys.readouterr().out
    assert (out / "last.ckpt").read_bytes() == finished

    assert train(tiny_faces, out, "--resume", "--epochs", "6") == 0
    last = load(out / "last.ckpt")
    assert last["epoch"] == 5 and last["hyper_parameters"]["max_epochs"] == 6
    expected = [warmup_cosine_lr(epoch, warmup_epochs=1, max_epochs=6, peak_lr=3e-3) for epoch in range(6)]
    (lr_name,) = [name for name in epoch_metrics(out / "metrics.csv") if name.startswith("lr")]
    logged = dict(epoch_metrics(out / "metrics.csv")[lr_name])
    assert [logged[epoch] for epoch in (4, 5)] == pytest.approx(expected[4:])


def test_early_stopped_run_has_nothing_left_to_train(trained_run, tiny_faces, tmp_path, capsys):
    out = shutil.copytree(trained_run, tmp_path / "run")
    checkpoint = load(out / "last.ckpt")
    callback_state(checkpoint, "EarlyStopping")["wait_count"] = 20  # as after 20 epochs without progress
    torch.save(checkpoint, out / "last.ckpt")
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), *FAST, "--batch-size", "4", "--resume", "--epochs", "12"]) == 0
    assert "stopped early" in capsys.readouterr().out


def test_resume_takes_the_checkpoints_settings_and_a_flag_that_repeats_one(tiny_faces, tmp_path, watch):
    out = tmp_path / "run"
    watch.stop_at = 4  # the start of epoch 1
    settings = ["--image-size", "40", "--mean", "0.5", "0.4", "0.3", "--std", "0.2", "0.2", "0.2"]
    with pytest.raises(KeyboardInterrupt):
        train(tiny_faces, out, *settings)
    watch.stop_at = None
    assert train(tiny_faces, out, "--resume", "--image-size", "40", "--mean", "0.5", "0.4", "0.3") == 0  # repeating one is fine
    hp = load(out / "last.ckpt")["hyper_parameters"]
    assert hp["image_size"] == 40 and tuple(hp["mean"]) == (0.5, 0.4, 0.3) and hp["max_epochs"] == 4


def test_a_second_run_into_a_busy_out_is_refused_until_the_first_ends(tiny_faces, tmp_path):
    out = tmp_path / "run"
    with folder_lock(out, "run_training.py"):
        with pytest.raises(UserError, match="another run_training.py is writing into it"):
            train(tiny_faces, out)
        assert not (out / "metrics.csv").exists()
    holder = subprocess.Popen(  # a run killed while it holds the lock leaves it free
        [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(ROOT)!r}]; import cli, time\n"
         f"with cli.folder_lock(__import__('pathlib').Path({str(out)!r}), 'x'):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="another"):
        train(tiny_faces, out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train(tiny_faces, out, "--epochs", "1") == 0


def test_a_set_too_small_for_one_batch_is_refused_before_training(tiny_faces, tmp_path):
    data = shutil.copytree(tiny_faces, tmp_path / "data")
    for folder in (data / "train").iterdir():  # one image an identity
        for image in sorted(folder.iterdir())[1:]:
            image.unlink()
    args = run_training.parse_args(["--data-dir", str(data), *FAST])
    module = FaceDataModule(data, batch_size=8, num_workers=0)
    module.setup("fit")
    model = run_training.build_model(args, module)
    model.example_input_array = torch.zeros(1, 3, 48, 48)
    run_training.check_trainable(args, module, model, world=2)  # 4 images: 2 a device, one batch each
    with pytest.raises(DataError, match="4 images for 4 devices make no training batch"):
        run_training.check_trainable(args, module, model, world=4)
    for folder in sorted((data / "train").iterdir())[1:]:
        shutil.rmtree(folder)
        shutil.rmtree(data / "dev" / folder.name)
    with pytest.raises(DataError, match="one identity, n000001 .expected at least 2"):
        train(data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resumed_log_keeps_its_line_endings(trained_run, tiny_faces, tmp_path):
    out = shutil.copytree(trained_run, tmp_path / "run")
    before = (out / "metrics.csv").read_bytes()
    assert b"\r\n" in before  # what the csv module writes
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), *FAST, "--batch-size", "4", "--resume", "--epochs", "9"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        assert sum(1 for row in csv.DictReader(f) if row["epoch"] == "8" and row["val_acc"]) == 1
    assert (out / "metrics.csv").read_bytes().startswith(before)


def test_a_new_column_that_fails_to_write_keeps_the_log(tmp_path, monkeypatch):
    log = tmp_path / "metrics.csv"
    earlier = b"epoch,step,val_acc\r\n0,7,0.25\r\n"
    log.write_bytes(earlier)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(csv, "writer", lambda f: SimpleNamespace(writerows=full_disk))
        with pytest.raises(OSError):  # a new column: the file is rewritten
            ResumableCSVLogger(tmp_path).log_metrics({"val_acc": 0.5, "train_loss": 1.0}, step=15)
    assert log.read_bytes() == earlier and sorted(path.name for path in tmp_path.iterdir()) == ["metrics.csv"]
    ResumableCSVLogger(tmp_path).log_metrics({"val_acc": 0.5, "train_loss": 1.0, "epoch": 1}, step=15)
    assert rows(log) == [{"epoch": "0", "step": "7", "train_loss": "", "val_acc": "0.25"},
                         {"epoch": "1", "step": "15", "train_loss": "1.0", "val_acc": "0.5"}]


def test_a_checkpoint_of_the_earlier_atomic_checkpoint_resumes_with_its_best_score(tmp_path):
    """Before AtomicCheckpointIO, a ModelCheckpoint subclass wrote checkpoints, and its state went
    under its own name."""
    key = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val_acc", mode="max").state_key
    old = {"epoch": 3, "callbacks": {key.replace("ModelCheckpoint", "AtomicCheckpoint"): {"best_model_score": 0.75}}}
    torch.save(old, tmp_path / "old.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "old.ckpt")["callbacks"] == {key: {"best_model_score": 0.75}}


def test_resume_continues_in_the_checkpoints_folder_with_its_data(tiny_faces, tmp_path, monkeypatch, watch):
    run, other = tmp_path / "run", tmp_path / "other"
    watch.stop_at = 4  # the start of epoch 1
    with pytest.raises(KeyboardInterrupt):
        train(tiny_faces, run)
    watch.stop_at = None
    assert train(tiny_faces, other, "--epochs", "1") == 0
    kept = {path.name: path.read_bytes() for path in other.glob("*.ckpt")}
    with pytest.raises(UserError, match="holds another run .* would write over it"):
        train(tiny_faces, other, "--resume", str(run / "last.ckpt"))
    assert {path.name: path.read_bytes() for path in other.glob("*.ckpt")} == kept
    monkeypatch.chdir(tmp_path)  # neither --out nor --data-dir: both from the checkpoint
    assert run_training.main([*FAST, "--resume", str(run / "last.ckpt")]) == 0
    assert load(run / "last.ckpt")["epoch"] == 3 and not (tmp_path / "checkpoint").exists()


def test_the_demo_replaces_a_demo_run_only_and_prints_the_commands_that_score_it(tiny_faces, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.setattr("synthetic_faces.generate", lambda *args, **kwargs: None)  # the tiny set stands in
    demo_data = shutil.copytree(tiny_faces, tmp_path / "demo_data")

    def demo(out):
        return run_training.main(["--demo", "--out", str(out), "--data-dir", str(demo_data), *FAST, "--epochs", "2"])

    assert demo(tmp_path / "demo") == 0
    assert demo(tmp_path / "demo") == 0  # a second demo replaces the first
    commands = [shlex.split(line) for line in capsys.readouterr().out.split("score it")[-1].splitlines()[1:]]
    assert [command[:3] for command in commands] == [["python", "predict.py", verb] for verb in ("submit", "evaluate")]
    for command in commands:  # what the user types next
        assert predict.main(command[2:]) == 0
    assert re.search(r"submission.csv: accuracy [01]\.\d{4} \(\d/8\)", capsys.readouterr().out)
    out = tmp_path / "out"
    assert train(tiny_faces, out, "--epochs", "1") == 0  # a run on other data
    before = (out / "last.ckpt").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        demo(out)
    assert (out / "last.ckpt").read_bytes() == before


def test_the_data_order_follows_the_seed_as_well_as_the_epoch(tiny_faces):
    def order(seed):
        module = FaceDataModule(tiny_faces, batch_size=8, num_workers=0, seed=seed)
        module.setup("fit")
        return list(module.train_dataloader().sampler)

    assert order(0) == order(0) and sorted(order(0)) == sorted(order(1))
    assert order(0) != order(1)


def test_resuming_into_less_than_the_runs_warm_up_is_refused(tiny_faces, tmp_path, watch):
    out = tmp_path / "run"
    watch.stop_at = 4  # the start of epoch 1 of 12, warm-up 4
    with pytest.raises(KeyboardInterrupt):
        train(tiny_faces, out, "--epochs", "12", "--warmup-epochs", "4")
    watch.stop_at = None
    with pytest.raises(UserError, match="--epochs 3 ends within .* warm-up of 4 epochs"):
        train(tiny_faces, out, "--resume", "--epochs", "3")


def test_a_preset_run_resumes_with_its_checkpoints_settings_with_or_without_the_preset(tiny_faces, tmp_path, watch):
    out = tmp_path / "run"
    watch.stop_at = 4  # the start of epoch 1
    with pytest.raises(KeyboardInterrupt):
        train(tiny_faces, out, "--preset", "small")  # FAST and EPOCHS, given, win over the preset's values
    watch.stop_at = None
    checkpoint = load(out / "last.ckpt")
    kept, given = config.kept_settings(checkpoint), run_training.parse_args([*FAST, *EPOCHS]).given
    preset = config.parse_args(config.as_flags(config.PRESETS["small"]))
    for name in set(config.PRESETS["small"]) - given:
        assert kept[name] == getattr(preset, name), name
    assert train(tiny_faces, out, "--resume", "--epochs", "5") == 0  # without the preset: the original's defaults lose
    assert train(tiny_faces, out, "--resume", "--epochs", "6", "--preset", "small") == 0
    assert load(out / "last.ckpt")["hyper_parameters"] == {**checkpoint["hyper_parameters"], "max_epochs": 6}
