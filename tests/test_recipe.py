"""The training recipe: the seed's schedule to the letter, shortened runs that anneal, and the
optional regularisers (EMA, drop-path, CutMix, random erasing, auto-augment), each shown acting."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import config
import run_training
from data import FaceDataModule, train_transform
from checkpoints import load_model
from training import FaceClassifier, epoch_metrics
from tests.conftest import FAST

TINY_NET = dict(widths=(8, 16, 24, 32), depths=(1, 1, 1, 1))


def bolts_lr(epoch, warmup, max_epochs, start, peak, eta_min):
    """lightning-bolts' LinearWarmupCosineAnnealingLR._get_closed_form_lr, written out."""
    if epoch < warmup:
        return start + epoch * (peak - start) / max(1, warmup - 1)
    return eta_min + 0.5 * (peak - eta_min) * (1 + math.cos(math.pi * (epoch - warmup) / (max_epochs - warmup)))


def epoch_lrs(module, epochs):
    """The lr of each epoch from the module's own optimiser and scheduler, stepped per epoch."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs, optimizer, scheduler


def test_every_epoch_of_the_seeds_schedule_is_bolts_closed_form():
    module = FaceClassifier(num_classes=3, architecture=TINY_NET)  # the seed's recipe by default
    lrs, _, _ = epoch_lrs(module, 60)
    expected = [bolts_lr(e, 10, 60, 3e-4, 1e-3, 1e-5) for e in range(60)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)  # the peak twice, as in bolts
    assert lrs[5] == pytest.approx(3e-4 + 5 * 7e-4 / 9)


@pytest.mark.parametrize("warmup, epochs", [(0, 5), (1, 8), (2, 12), (10, 11)])
def test_schedule_matches_bolts_for_short_and_edge_warmups(warmup, epochs):
    module = FaceClassifier(num_classes=3, architecture=TINY_NET, lr=2e-3, warmup_epochs=warmup, max_epochs=epochs)
    lrs, _, _ = epoch_lrs(module, epochs)
    assert lrs == pytest.approx([bolts_lr(e, warmup, epochs, 3e-4, 2e-3, 1e-5) for e in range(epochs)], rel=1e-12)


def test_resumed_schedule_continues_and_an_extended_run_is_the_formula_over_the_new_total():
    module = FaceClassifier(num_classes=3, architecture=TINY_NET, warmup_epochs=2, max_epochs=12)
    _, optimizer, scheduler = epoch_lrs(module, 5)
    state = scheduler.state_dict()
    for max_epochs in (12, 20):  # resumed as planned, and extended to 20 epochs
        resumed = FaceClassifier(num_classes=3, architecture=TINY_NET, warmup_epochs=2, max_epochs=max_epochs)
        config = resumed.configure_optimizers()
        config["optimizer"].load_state_dict(optimizer.state_dict())
        config["lr_scheduler"]["scheduler"].load_state_dict(state)
        lrs = []
        for _ in range(5, max_epochs):
            lrs.append(config["optimizer"].param_groups[0]["lr"])
            config["optimizer"].step()
            config["lr_scheduler"]["scheduler"].step()
        assert lrs == pytest.approx([bolts_lr(e, 2, max_epochs, 3e-4, 1e-3, 1e-5) for e in range(5, max_epochs)], rel=1e-12)


def test_logged_lr_of_a_real_run_is_bolts_closed_form(trained_run):
    lrs = dict(epoch_metrics(trained_run / "metrics.csv")["lr-AdamW"])  # the fixture: 8 epochs, warm-up 1, lr 3e-3
    assert [lrs[e] for e in range(8)] == pytest.approx([bolts_lr(e, 1, 8, 3e-4, 3e-3, 1e-5) for e in range(8)], rel=1e-6)


def test_preset_small_sets_exactly_its_values_and_a_given_flag_wins():
    default, small = run_training.parse_args([]), run_training.parse_args(["--preset", "small"])
    preset = config.parse_args(config.as_flags(config.PRESETS["small"]))  # the preset's values, typed as flags
    changed = lambda a, b: {name for name in config.FIELDS if getattr(a, name) != getattr(b, name)}
    assert changed(small, default) - {"warmup_epochs", "preset"} == set(config.PRESETS["small"])  # and nothing else
    assert changed(small, preset) == {"preset"}
    assert small.warmup_epochs == round(45 / 6)  # the warm-up follows the preset's --epochs
    overridden = run_training.parse_args(["--preset", "small", "--epochs", "3"])
    assert overridden.epochs == 3 and overridden.widths == (32, 64, 128, 256)


def test_warmup_is_the_seeds_share_of_the_run_unless_given():
    assert run_training.parse_args([]).warmup_epochs == 10
    assert run_training.parse_args(["--epochs", "12"]).warmup_epochs == 2
    assert run_training.parse_args(["--epochs", "3"]).warmup_epochs == 0  # round(0.5): straight to the cosine
    assert run_training.parse_args(["--epochs", "12", "--warmup-epochs", "5"]).warmup_epochs == 5
    lrs, _, _ = epoch_lrs(FaceClassifier(num_classes=3, architecture=TINY_NET, warmup_epochs=2, max_epochs=12), 12)
    assert lrs[-1] < 0.05 * max(lrs)  # a shortened run anneals


# --- EMA ---

def test_ema_run_validates_and_saves_the_averaged_weights(tiny_faces, tmp_path, caplog):
    out = tmp_path / "ema"
    assert run_training.main(["--data-dir", str(tiny_faces), "--out", str(out), "--epochs", "3", "--ema", "0.9",
                              *FAST, "--lr", "1e-2", "--warmup-epochs", "0", "--batch-size", "4"]) == 0
    assert "schedule: warm-up 0 epochs from 0.0003 to peak 0.01, cosine to 1e-05 at epoch 3" in caplog.text
    assert "| ema 0.9" in caplog.text
    data = FaceDataModule(tiny_faces, batch_size=4, num_workers=0)
    data.setup("fit")
    logged = dict(epoch_metrics(out / "metrics.csv")["val_loss"])
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(out / name, map_location="cpu", weights_only=False)
        averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
        assert any(not torch.equal(v, raw[k]) for k, v in averaged.items() if v.is_floating_point())
        model = load_model(out / name, "cpu")  # what predict.py uses: the average
        for key, tensor in model.state_dict().items():
            assert torch.equal(tensor, averaged[key])

        def dev_loss(state):
            model.load_state_dict(state)
            with torch.no_grad():
                losses = [F.cross_entropy(model(x), y, reduction="sum") for x, y in data.val_dataloader()]
            return (sum(losses) / len(data.val_dataset)).item()

        # validation ran on the averaged weights: theirs is the dev loss logged for the checkpoint's epoch
        assert dev_loss(averaged) == pytest.approx(logged[checkpoint["epoch"]], rel=2e-6)
        assert dev_loss(raw) != pytest.approx(logged[checkpoint["epoch"]], rel=1e-4)


def test_resume_keeps_the_ema_average(tiny_faces, tmp_path):
    seen = {}

    class Record(L.Callback):
        def on_train_start(self, trainer, pl_module):
            ema = next(c for c in trainer.callbacks if isinstance(c, L.pytorch.callbacks.EMAWeightAveraging))
            seen["average"] = {k: v.clone() for k, v in ema._average_model.module.state_dict().items()}
            seen["current"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def fit(epochs, ckpt_path=None):
        module = FaceClassifier(num_classes=4, architecture=TINY_NET, mixup_alpha=0, warmup_epochs=0,
                                max_epochs=epochs, ema_decay=0.5)
        trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Record()], default_root_dir=tmp_path)
        trainer.fit(module, datamodule=FaceDataModule(tiny_faces, batch_size=4, num_workers=0), ckpt_path=ckpt_path)
        return trainer

    fit(1).save_checkpoint(tmp_path / "one.ckpt")
    saved = torch.load(tmp_path / "one.ckpt", map_location="cpu", weights_only=False)
    fit(2, tmp_path / "one.ckpt")
    for name, value in saved["state_dict"].items():
        assert torch.equal(seen["average"][name], value), name
    for name, value in saved["current_model_state"].items():
        assert torch.equal(seen["current"][name], value), name


# --- drop-path ---

@pytest.mark.parametrize("backbone", ["facenn", "convnext"])
def test_drop_path_changes_training_outputs_not_eval_outputs(backbone):
    torch.manual_seed(0)
    plain = FaceClassifier(3, architecture=dict(TINY_NET), backbone=backbone)
    dropping = FaceClassifier(3, architecture=dict(TINY_NET, drop_path=0.5), backbone=backbone)
    dropping.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 64, 64)
    plain.train(), dropping.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(plain(x), dropping(x))  # (ConvNeXt: its layer scale starts at 1e-6, so barely)
    dropping.load_state_dict(plain.state_dict())  # the same BatchNorm statistics again
    plain.eval(), dropping.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), dropping(x), rtol=0, atol=0)


def test_drop_path_flag_reaches_the_network(tiny_faces):
    data = FaceDataModule(tiny_faces, batch_size=4, num_workers=0)
    data.setup("fit")
    for backbone in ("facenn", "convnext"):
        args = run_training.parse_args(["--data-dir", str(tiny_faces), *FAST, "--drop-path", "0.2", "--backbone", backbone])
        model = run_training.build_model(args, data, None)
        rates = [m.p for m in model.modules() if type(m).__name__ == "StochasticDepth"]
        assert max(rates) == pytest.approx(0.2) and min(rates) == 0  # linear over the blocks


# --- CutMix ---

def is_cutmix(mixed, images):
    """Every pixel is either the image's own or the batch neighbour's (CutMix pastes a box)."""
    other = images.roll(1, 0)
    return bool(((mixed == images) | (mixed == other)).all())


def test_cutmix_switches_with_mixup_per_batch():
    torch.manual_seed(0)
    module = FaceClassifier(num_classes=5, architecture=TINY_NET, cutmix_alpha=1.0)
    assert isinstance(module.mixup, v2.RandomChoice)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    kinds = {is_cutmix(module.mixup(images, labels)[0], images) for _ in range(20)}
    assert kinds == {True, False}  # both CutMix and MixUp batches


def test_cutmix_alone_pastes_boxes_with_area_targets():
    torch.manual_seed(0)
    module = FaceClassifier(num_classes=5, architecture=TINY_NET, mixup_alpha=0, cutmix_alpha=1.0)
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    for _ in range(5):
        mixed, targets = module.mixup(images, labels)
        assert is_cutmix(mixed, images)
        own = (mixed == images).all(dim=1).float().mean((1, 2))  # share of each image left as it was
        assert targets[torch.arange(8), labels] == pytest.approx(own.tolist(), abs=1e-6)


# --- random erasing and auto-augment (CPU transform) ---

def test_random_erasing_blanks_a_box_to_the_mean():
    image = v2.functional.to_pil_image(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    torch.manual_seed(0)
    assert not (train_transform()(image) == 0).all(dim=0).any()
    erased = [train_transform(random_erasing=1.0)(image) for _ in range(5)]
    assert all((x == 0).all(dim=0).sum() > 0 for x in erased)  # a box at the normalised mean, 0


@pytest.mark.parametrize("name, kind", [("trivial", v2.TrivialAugmentWide), ("rand", v2.RandAugment)])
def test_auto_augment_is_in_the_train_transform_only(tiny_faces, name, kind):
    data = FaceDataModule(tiny_faces, batch_size=4, num_workers=0, auto_augment=name, random_erasing=0.25)
    data.setup("fit")
    train_steps = [type(t) for t in data.train_dataset.transform.transforms]
    assert kind in train_steps and v2.RandomErasing in train_steps
    assert kind not in [type(t) for t in data.val_dataset.transform.transforms]
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    augment = next(t for t in data.train_dataset.transform.transforms if isinstance(t, kind))
    torch.manual_seed(0)
    assert sum(not torch.equal(augment(image), image) for _ in range(10)) >= 5  # it changes the uint8 image


# --- the comparison script ---

def test_compare_recipes_trains_both_recipes_and_writes_table_and_plot(tiny_faces, tmp_path):
    from tools import compare_recipes

    rows = [compare_recipes.train(tiny_faces, tmp_path / recipe, "facenn", recipe, 0, epochs=2) for recipe in ("original", "modern")]
    assert [row["epochs"] for row in rows] == [2, 2] and all(0 <= row["best_dev_acc"] <= 1 for row in rows)
    modern = torch.load(tmp_path / "modern" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" in modern  # EMA on
    assert modern["hyper_parameters"]["architecture"]["drop_path"] == 0.1 and modern["hyper_parameters"]["cutmix_alpha"] == 1
    assert modern["datamodule_hyper_parameters"]["auto_augment"] == "trivial"
    original = torch.load(tmp_path / "original" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" not in original and original["hyper_parameters"]["cutmix_alpha"] == 0
    compare_recipes.plot(rows, tmp_path / "recipes.png")
    assert (tmp_path / "recipes.png").stat().st_size > 10_000


def test_augment_on_device_auto_stays_on_the_cpu_for_cpu_only_augmentations():
    def on_a_gpu(*flags):
        return run_training.parse_args(["--accelerator", "cuda", *flags]).hardware()

    assert on_a_gpu() == ("cuda", "16-mixed", True)
    assert on_a_gpu("--random-erasing", "0.25")[2] is False and on_a_gpu("--auto-augment", "rand")[2] is False
