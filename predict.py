"""Inference from a run_training.py checkpoint: a Kaggle submission, accuracy on labelled images,
embeddings, face verification by cosine similarity, and open-set identification against known faces.

    python predict.py submit --checkpoint checkpoint/best.ckpt --test-dir data/test --out submission.csv
    python predict.py evaluate --checkpoint checkpoint/best.ckpt --data-dir data/dev
    python predict.py evaluate --submission submission.csv --labels data/test_labels.csv --checkpoint CKPT
    python predict.py embed --checkpoint CKPT --images data/verification --out emb.npy
    python predict.py verify --checkpoint CKPT --pairs V/verification_pairs.csv --images V/known --roc roc.png
    python predict.py verify --checkpoint CKPT --lfw-pairs lfw/pairs.txt --images lfw/images [--tta]  # 10-fold accuracy
    python predict.py identify --checkpoint CKPT --known V/known --unknown V/unknown_test --out verification.csv \\
        --calibrate V/unknown_dev --labels V/verification_dev.csv

The checkpoint alone rebuilds the model (architecture, image size, normalisation, class names), so
none of these needs the training data. A submission's label is the class index the model was
trained with (the identity folder's position in sorted order); --label-names writes the folder
name instead. `identify` writes the sibling Kaggle task's submission (11-785-f23-hw2p2-verification):
each unknown image's known identity, or n000000 when it matches none well enough. `verify` names
images by their path under --images (or file name) and reads LFW's own pairs files; see
docs/verification.md. Every output is written beside its target and renamed into place, so a failed or
interrupted run leaves an earlier file as it was.
"""

import argparse
import csv
import logging
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import (binary_auroc, binary_roc, binary_sensitivity_at_specificity,
                                                    multiclass_accuracy)

from checkpoints import load_model, read_checkpoint
from cli import (NO_MATCH, ArgumentParser, at_least, atomic_write, check_outputs, finite_float, keep_freed_memory, run,
                 write_csv)
from data import (DEFAULT_WORKERS, DataError, FaceFolder, TestImages, collate_same_size, eval_transform, find_images,
                  identity_folders)
from training import FaceClassifier

FALSE_ACCEPT_RATES = (1e-3, 1e-2)  # where face verification papers quote the true accept rate


# -----------------------------------------------------------------------------
# the model and running it

def model_transform(model: FaceClassifier):
    """The images as the model saw them in validation: its centre crop, size and normalisation."""
    return eval_transform(model.hparams.mean, model.hparams.std, model.hparams.image_size, model.hparams.crop)


def run_model(model, dataset, embed=False, tta=False, batch_size=256, num_workers=DEFAULT_WORKERS, desc="inference"):
    """The logits (or with embed=True, the L2-normalised embeddings; tta: with the mirror images') of
    every (image, key) of `dataset` in order: FaceClassifier.predict_step, which a Trainer runs on the
    model's device, fp16 on CUDA. Returns (float32 outputs, keys, images per second)."""
    device = model.device
    cuda = device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=cuda,
                        collate_fn=collate_same_size)
    model.predict_embeddings, model.predict_tta = embed, tta
    with quiet_lightning():
        trainer = L.Trainer(accelerator=device.type, devices=1, precision="16-mixed" if cuda else "32-true",
                            logger=False, enable_checkpointing=False, enable_model_summary=False,
                            callbacks=[InferenceBar(desc)])
        start = time.perf_counter()
        batches = trainer.predict(model, loader)
        seconds = time.perf_counter() - start
    model.to(device)  # the Trainer's teardown left it on the CPU: the next pass runs where this one did
    keys = [key for _, batch in batches for key in (batch.tolist() if torch.is_tensor(batch) else batch)]
    return torch.cat([outputs for outputs, _ in batches]), keys, len(keys) / seconds


class InferenceBar(TQDMProgressBar):
    """Lightning's bar, named for its pass, on stderr where a terminal shows it (stdout holds the results)."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc

    def init_predict_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.desc, disable=None, leave=True, dynamic_ncols=True, file=sys.stderr, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.has_dataloader_changed(dataloader_idx):  # keeps desc, not Lightning's "Predicting DataLoader 0"
            self.predict_progress_bar.reset(total=self.total_predict_batches_current_dataloader)


@contextmanager
def quiet_lightning():
    """The Trainer without its start-up lines (devices available, LOCAL_RANK) and its hints on an
    unused GPU and few data workers (the user chose --device and --num-workers): stderr holds a
    command's one-line errors."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PossibleUserWarning)
            yield
    finally:
        logger.setLevel(level)


def embed_images(model, images_dir, batch_size=256, num_workers=DEFAULT_WORKERS, names_out=None, tta=False, paths=None):
    """(embeddings, file names, images per second) of every image under images_dir, sorted by name, or
    of `paths` in it (find_images); `names_out`, the file the names are to go to, one a line (checked
    before the work)."""
    images = TestImages(images_dir, model_transform(model), paths=paths)
    if names_out is not None:
        check_text([path.name for path in images.paths], names_out, lines=True)
    return run_model(model, images, embed=True, tta=tta, batch_size=batch_size, num_workers=num_workers,
                     desc="embedding")


def identity_templates(model, known_dir, batch_size=256, num_workers=DEFAULT_WORKERS, tta=False):
    """(identity names, one unit embedding per identity) of known_dir/<identity>/*.jpg: the mean of
    its images' embeddings, normalised. One template per identity rather than its best-matching
    image: a single odd photo (profile, blur) of another person then cannot outscore the right one,
    and each unknown image costs one comparison per identity."""
    names = identity_folders(Path(known_dir))
    if NO_MATCH in names:
        raise DataError(f"{Path(known_dir) / NO_MATCH}: {NO_MATCH} means 'none of the known' "
                        "(expected other identity names)")
    images = FaceFolder(known_dir, names, model_transform(model))
    if empty := sorted(set(names) - {names[label] for _, label in images.samples}):
        raise DataError(f"{Path(known_dir) / empty[0]}: no images ({len(empty)} such; expected <identity>/*.jpg)")
    embeddings, labels, _ = run_model(model, images, embed=True, tta=tta, batch_size=batch_size,
                                      num_workers=num_workers, desc="embedding known")
    sums = torch.zeros(len(names), embeddings.shape[1]).index_add_(0, torch.tensor(labels), embeddings)
    return names, F.normalize(sums, dim=1)


def best_matches(embeddings, templates) -> tuple[np.ndarray, np.ndarray]:
    """(cosine similarity, index) of the closest template to each embedding."""
    scores, indices = (embeddings @ templates.T).max(dim=1)
    return scores.double().numpy(), indices.numpy()  # float64: a threshold between float32 scores stays between


# -----------------------------------------------------------------------------
# files

def check_text(names, out: Path, lines: bool = False) -> None:
    """Refuse, before the work, a file name that `out` cannot hold: one that is not valid UTF-8 (a
    name of raw bytes), or for a file of one name a line, one with a line break in it."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{name!r}: not a valid UTF-8 name, so {out} cannot hold it (rename it)") from None
        if lines and ("\n" in name or "\r" in name):
            raise DataError(f"{name!r}: has a line break, so {out} (one name a line) cannot hold it (rename it)")


def read_csv(path, columns: tuple) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV whose header starts with `columns`; every row has those columns."""
    path = Path(path)
    expected = f"expected a CSV with header {','.join(columns)}"
    if not path.is_file():
        raise DataError(f"{path}: file not found ({expected})")
    try:
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f)) or [[]]
    except (UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: not a readable CSV ({error}); {expected}") from error
    if header[: len(columns)] != list(columns):
        raise DataError(f"{path}: header is {','.join(header)!r} ({expected})")
    for line, row in enumerate(rows, start=2):
        if len(row) < len(columns):
            raise DataError(f"{path}:{line}: {len(row)} columns ({expected})")
    return header, rows


def read_labels(path) -> dict[str, str]:
    """id -> label of a submission-style CSV, refusing repeated ids."""
    _, rows = read_csv(path, ("id", "label"))
    labels = {row[0]: row[1] for row in rows}
    if len(labels) != len(rows):
        raise DataError(f"{path}: {len(rows) - len(labels)} repeated ids (expected one row per image)")
    return labels


def read_pairs(path) -> tuple[list[tuple[str, str]], np.ndarray | None, None]:
    """(pairs, same, folds: None) of a CSV img1,img2[,same]; `same` None unless the header has the column."""
    header, rows = read_csv(path, ("img1", "img2"))
    if not rows:
        raise DataError(f"{path}: no pairs (expected rows img1,img2[,same])")
    pairs = [(row[0], row[1]) for row in rows]
    if header[2:3] != ["same"]:
        return pairs, None, None
    if bad := [row[2] for row in rows if len(row) < 3 or row[2] not in ("0", "1")]:
        raise DataError(f"{path}: 'same' is {bad[0]!r} (expected 0 or 1 in every row)")
    return pairs, np.array([row[2] == "1" for row in rows]), None


def read_lfw_pairs(path) -> tuple[list[tuple[str, str]], np.ndarray, np.ndarray]:
    """(pairs, same, fold of each pair) of one of LFW's pairs files; a pair names its images as
    paths under LFW's images folder, `name i` as name/name_%04d.jpg. View 2's pairs.txt starts
    `10 300`: 10 folds, each 300 same pairs `name i j`, then 300 different ones `name1 i name2 j`.
    View 1's pairsDevTrain.txt and pairsDevTest.txt start with N: N same pairs, then N different
    ones, and no folds of their own; they are split in file order, pair k of each kind to fold
    k * 10 // N, so that every fold holds as many same pairs as different ones (N / 10 of each
    where 10 divides N; N folds of one each if N < 10)."""
    path = Path(path)
    expected = "expected LFW's pairs.txt, first line '10 300', or pairsDev*.txt, first line the count of same pairs"
    if not path.is_file():
        raise DataError(f"{path}: file not found ({expected})")
    try:
        lines = path.read_text().rstrip().splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a text file ({error}); {expected}") from error
    if not lines:
        raise DataError(f"{path}: empty ({expected})")
    head = lines[0].split()
    if not 1 <= len(head) <= 2 or not all(field.isdigit() and int(field) > 0 for field in head):
        raise DataError(f"{path}: line 1 is {lines[0]!r} ({expected})")
    folds, n = (int(head[0]), int(head[1])) if len(head) == 2 else (min(10, int(head[0])), int(head[0]))
    count = 2 * n * (folds if len(head) == 2 else 1)
    if len(lines) - 1 != count:
        raise DataError(f"{path}: {len(lines) - 1} pairs after line 1 (expected {count}: line 1 is {lines[0]!r})")
    if folds < 2:
        raise DataError(f"{path}: 1 fold (expected 2 or more, to choose each fold's threshold on the others)")
    index = np.arange(count)
    fold, same = (index // (2 * n), index % (2 * n) < n) if len(head) == 2 else (index % n * folds // n, index < n)
    pairs = []
    for t, line in enumerate(lines[1:]):
        fields = line.split()
        kind, shape = ("same", "name i j") if same[t] else ("different", "name1 i name2 j")
        if len(fields) != len(shape.split()):
            raise DataError(f"{path}:{t + 2}: {len(fields)} fields (expected {shape}, a {kind} pair)")
        if bad := [i for i in (fields[1:] if same[t] else fields[1::2]) if not i.isdigit() or int(i) == 0]:
            raise DataError(f"{path}:{t + 2}: image number {bad[0]!r} (expected {shape}, numbers from 1)")
        images = [(fields[0], fields[1]), (fields[0], fields[2])] if same[t] else [fields[0:2], fields[2:4]]
        pairs.append(tuple(f"{name}/{name}_{int(i):04d}.jpg" for name, i in images))
    return pairs, same, fold


def read_submission(submission, labels) -> tuple[dict[str, str], dict[str, str]]:
    """(truth, predicted) id -> label, once the submission has a row for every id of the truth and no other."""
    truth, predicted = read_labels(labels), read_labels(submission)
    if missing := sorted(truth.keys() - predicted.keys()):
        raise DataError(f"{submission}: no row for {len(missing)} ids of {labels}, e.g. {missing[0]} "
                        "(expected one per image)")
    if extra := sorted(predicted.keys() - truth.keys()):
        raise DataError(f"{submission}: {len(extra)} ids not in {labels}, e.g. {extra[0]} (expected the same ids)")
    if not truth:
        raise DataError(f"{labels}: no rows (expected id,label for every test image)")
    return truth, predicted


# -----------------------------------------------------------------------------
# the commands

def submit(checkpoint, test_dir, out, batch_size=256, num_workers=DEFAULT_WORKERS, tta=False, label_names=False,
           skip_bad=False, device="auto") -> dict:
    """Writes the Kaggle submission (id,label for every test image, ids sorted); returns the row
    count, the unreadable images left out (skip_bad) and the inference speed."""
    out = Path(out)
    check_outputs({"--out": out}, {"--checkpoint": checkpoint, "--test-dir": test_dir})
    model = load_model(checkpoint, device)
    images = TestImages(test_dir, model_transform(model), skip_bad=skip_bad)
    if not images.paths:
        raise DataError(f"{test_dir}: none of its {len(images.skipped)} images can be read (expected JPEG/PNG)")
    check_text([path.name for path in images.paths] + (model.class_names if label_names else []), out)
    logits, ids, rate = run_model(model, images, tta=tta, batch_size=batch_size, num_workers=num_workers,
                                  desc="predicting")
    predicted = logits.argmax(1).tolist()
    labels = [model.class_names[index] for index in predicted] if label_names else predicted
    write_csv(out, [("id", "label"), *zip(ids, labels)])
    return dict(rows=len(ids), skipped=len(images.skipped), ignored=len(images.ignored), img_per_s=rate,
                device=str(model.device))


def evaluate(checkpoint, data_dir, batch_size=256, num_workers=DEFAULT_WORKERS, tta=False, device="auto") -> dict:
    """Top-1 and top-5 accuracy on a split laid out as <identity>/*.jpg, labelled through the
    checkpoint's class mapping; the split's identities must all be known to the checkpoint."""
    model = load_model(checkpoint, device)
    data_dir = Path(data_dir)
    if unknown := sorted(set(identity_folders(data_dir)) - set(model.class_names)):
        raise DataError(f"{data_dir / unknown[0]}: identity unknown to {checkpoint} "
                        f"({len(unknown)} such; expected identities it was trained on)")
    images = FaceFolder(data_dir, model.class_names, model_transform(model))
    logits, labels, _ = run_model(model, images, tta=tta, batch_size=batch_size, num_workers=num_workers,
                                  desc="evaluating")
    labels, classes = torch.tensor(labels), logits.shape[1]
    top1, top5 = (multiclass_accuracy(logits, labels, classes, top_k=min(k, classes), average="micro").item()
                  for k in (1, 5))
    return dict(images=len(labels), top1=top1, top5=top5)


def score_submission(submission, labels, checkpoint=None, label_names=False, open_set=False) -> dict:
    """Accuracy of a submission against ground truth whose labels are identity names. The
    submission's labels are class indices, which the checkpoint's class names map (what `submit`
    writes), or with label_names=True identity names (`submit --label-names`): decided once for the
    whole file, never guessed from the values (identity folders may be numbers). With open_set, the
    submission is identify's (identity names, NO_MATCH for none of the known): also how often it
    said NO_MATCH of the unknown faces and of the known ones."""
    truth, predicted = read_submission(submission, labels)
    names = read_checkpoint(checkpoint)["class_names"] if checkpoint else None
    if names and (unknown := sorted(set(truth.values()) - set(names))):
        raise DataError(f"{labels}: identity {unknown[0]} unknown to {checkpoint} ({len(unknown)} such)")
    if not (label_names or open_set):
        if names is None:
            raise DataError(f"{submission}: its labels are class indices, as submit writes them: pass --checkpoint "
                            "to map them to identity names (or --label-names if they are names)")
        indices = {str(index): name for index, name in enumerate(names)}
        if bad := sorted(set(predicted.values()) - indices.keys()):
            raise DataError(f"{submission}: label {bad[0]!r} is not a class index of {checkpoint} "
                            f"(0 to {len(names) - 1}; --label-names if the labels are identity names)")
        predicted = {key: indices[value] for key, value in predicted.items()}
    correct = sum(predicted[key] == label for key, label in truth.items())
    result = dict(rows=len(truth), correct=correct, accuracy=correct / len(truth))
    if open_set:
        unknown = {key for key, label in truth.items() if label == NO_MATCH}
        said_unknown = {key for key, label in predicted.items() if label == NO_MATCH}
        result.update(unknown=len(unknown), unknown_said_unknown=len(unknown & said_unknown),
                      known_said_unknown=len(said_unknown - unknown))
    return result


def embed(checkpoint, images, out, batch_size=256, num_workers=DEFAULT_WORKERS, device="auto") -> dict:
    """Writes the (N, D) float32 embeddings of the images (unit rows) to `out` (.npy), and their
    file names, one a line in row order, beside it as .txt."""
    out = Path(out)
    names_out = out.with_suffix(".txt")
    check_outputs({"--out": out, "the file names' list": names_out}, {"--checkpoint": checkpoint, "--images": images})
    embeddings, names, _ = embed_images(load_model(checkpoint, device), images, batch_size, num_workers, names_out)
    with atomic_write(out, "wb") as f:
        np.save(f, embeddings.numpy())
    with atomic_write(names_out) as f:
        f.writelines(f"{name}\n" for name in names)
    return dict(shape=tuple(embeddings.shape), names=names_out)


def verification_metrics(scores, same) -> dict:
    """ROC (torchmetrics) AUC, equal error rate (where false accepts = false rejects, on the ROC's
    straight pieces), the true accept rate at each of FALSE_ACCEPT_RATES, and the best accuracy over
    thresholds with its threshold; `same` holds both kinds."""
    same = np.asarray(same, dtype=bool)
    target = torch.as_tensor(same, dtype=torch.long)
    # torchmetrics takes probabilities: the sigmoid keeps the cosines' order and ties, logit undoes it
    preds = torch.as_tensor(np.asarray(scores, dtype=np.float64)).sigmoid()
    fpr, tpr, thresholds = binary_roc(preds, target)
    fpr, tpr, thresholds = fpr.numpy(), tpr.numpy(), thresholds.logit().numpy()
    gap = (1 - tpr) - fpr  # false rejects minus false accepts: falls from 1 to -1
    i = np.flatnonzero(gap <= 0)[0]
    eer = fpr[i - 1] + gap[i - 1] / (gap[i - 1] - gap[i]) * (fpr[i] - fpr[i - 1])
    correct = tpr * same.sum() + (1 - fpr) * (~same).sum()
    best = correct.argmax()
    tar = {far: binary_sensitivity_at_specificity(preds, target, min_specificity=1 - far)[0].item()
           for far in FALSE_ACCEPT_RATES}
    return dict(auc=binary_auroc(preds, target).item(), eer=float(eer), tar_at_far=tar,
                accuracy=float(correct[best] / len(same)), threshold=float(thresholds[best]),
                fpr=fpr, tpr=tpr)


def best_cut(scores, right_if_accepted, right_if_rejected) -> tuple[float, float]:
    """(threshold, accuracy): the threshold that gets the most items right, each accepted when its
    score is >= threshold. Every cut between two neighbouring distinct scores is tried (midway
    between them; for "accept all" or "reject all", midway to the cosine's bound, -1 or 1), so the
    accuracy is the exact best, where a grid of thresholds can step over it; among equally good
    cuts, the highest."""
    scores = np.asarray(scores, dtype=float)
    order = np.argsort(-scores, kind="stable")
    scores, hit, miss = scores[order], np.asarray(right_if_accepted)[order], np.asarray(right_if_rejected)[order]
    # accepting the j best-scoring items (j = 0..n): those right accepted, and those right rejected
    correct = np.r_[0, np.cumsum(hit)] + np.r_[np.cumsum(miss[::-1])[::-1], 0]
    cuts = np.flatnonzero(np.r_[True, scores[:-1] > scores[1:], True])  # never between equal scores
    j = cuts[correct[cuts].argmax()]
    bounds = np.r_[max(1.0, np.nextafter(scores[0], np.inf)), scores, min(-1.0, scores[-1])]  # cosines lie in [-1, 1]
    threshold = (bounds[j] + bounds[j + 1]) / 2  # between the lowest accepted score and the highest rejected one
    return float(threshold), float(correct[j] / len(scores))


def calibrate_threshold(scores, matches, truth) -> tuple[float, float]:
    """(threshold, accuracy): the similarity threshold under which an image is called NO_MATCH that
    makes the most of `matches` (each image's closest identity) right against `truth` (best_cut)."""
    matches, truth = np.asarray(matches), np.asarray(truth)
    return best_cut(scores, matches == truth, truth == NO_MATCH)


def fold_accuracy(scores, same, folds) -> tuple[float, float, list[float]]:
    """LFW's verification protocol: (mean, standard deviation, per fold) of each fold's accuracy at
    the threshold best on the other folds (best_cut: an exact sweep over their scores), as
    insightface's verification.py and facenet's lfw.py compute it (they sweep a fixed grid).
    The standard deviation is the population's (ddof 0), as their np.std."""
    scores, same, folds = np.asarray(scores, dtype=float), np.asarray(same, dtype=bool), np.asarray(folds)
    accuracies = []
    for fold in np.unique(folds):
        test = folds == fold
        threshold, _ = best_cut(scores[~test], same[~test], ~same[~test])
        accuracies.append(float(((scores[test] >= threshold) == same[test]).mean()))
    return float(np.mean(accuracies)), float(np.std(accuracies)), accuracies


def plot_roc(metrics: dict, out_png: Path) -> None:
    """The ROC curve of verification_metrics, against chance, with its equal error rate marked."""
    from matplotlib.figure import Figure  # not pyplot: no backend or global figure to set up and close

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    ax.plot(metrics["fpr"], metrics["tpr"], label=f"ROC, AUC {metrics['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.plot(metrics["eer"], 1 - metrics["eer"], "o", label=f"EER {metrics['eer']:.3f}")
    ax.set(xlabel="false accept rate", ylabel="true accept rate", title="face verification", xlim=(0, 1), ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    with atomic_write(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def verify(checkpoint, pairs, images, out=None, roc=None, lfw=False, tta=False, batch_size=256,
           num_workers=DEFAULT_WORKERS, device="auto") -> dict:
    """Cosine similarity of the embeddings of each pair of `pairs`, a CSV img1,img2[,same] of
    images under `images` (read_pairs), or with lfw=True one of LFW's pairs files (read_lfw_pairs):
    written to `out` (img1,img2,score[,same]). With ground truth, also the ROC metrics and, with
    `roc`, the ROC curve as a PNG; for LFW the fold accuracy. Only the images the pairs name are
    read, and all of them are checked before the model is loaded."""
    rows, same, folds = (read_lfw_pairs if lfw else read_pairs)(pairs)
    check_outputs({"--out": out, "--roc": roc},
                  {"--checkpoint": checkpoint, "--lfw-pairs" if lfw else "--pairs": pairs, "--images": images})
    if same is None and (roc or not out):
        raise DataError(f"{pairs}: no 'same' column, so nothing to score against: pass --out for the scores alone")
    if same is not None and (same.all() or not same.any()):
        raise DataError(f"{pairs}: only {'same' if same.all() else 'different'} pairs (expected both, for ROC)")
    names = list(dict.fromkeys(name for row in rows for name in row))
    paths = find_images(images, names, pairs)
    model = load_model(checkpoint, device)
    embeddings, _, _ = embed_images(model, images, batch_size, num_workers, tta=tta, paths=paths)
    index = {name: i for i, name in enumerate(names)}
    first, second = (embeddings[[index[row[k]] for row in rows]] for k in (0, 1))
    scores = (first * second).sum(1).numpy()
    if out:
        columns = ["img1", "img2", "score"] + (["same"] if same is not None else [])
        truth = [[int(s)] for s in same] if same is not None else [[] for _ in rows]
        write_csv(Path(out), [columns] + [[*row, float(score), *s] for row, score, s in zip(rows, scores, truth)])
    result = dict(pairs=len(rows), scores=scores)
    if same is not None:
        result.update(verification_metrics(scores, same))
        if roc:
            plot_roc(result, Path(roc))
    if folds is not None:
        mean, std, per_fold = fold_accuracy(scores, same, folds)
        result.update(fold_accuracy=mean, fold_std=std, folds=per_fold)
    return result


def identify(checkpoint, known, unknown, out, threshold=None, calibrate=None, labels=None, tta=False,
             batch_size=256, num_workers=DEFAULT_WORKERS, device="auto") -> dict:
    """Writes the verification task's submission (id,label for every image of `unknown`, ids
    sorted): the closest identity of `known` by cosine similarity to its template
    (identity_templates), or NO_MATCH when that similarity is under `threshold`. With `calibrate`
    (a dev folder) and `labels` (its truth) the threshold is instead the one best on that folder."""
    out = Path(out)
    check_outputs({"--out": out}, {"--checkpoint": checkpoint, "--known": known, "--unknown": unknown,
                                   "--calibrate": calibrate, "--labels": labels})
    if (threshold is None) == (calibrate is None) or (calibrate is None) != (labels is None):
        raise ValueError("identify takes a threshold, or calibrate and labels")
    model = load_model(checkpoint, device)
    loading = dict(batch_size=batch_size, num_workers=num_workers, tta=tta)
    names, templates = identity_templates(model, known, **loading)
    result = {}
    if calibrate is not None:
        truth = read_labels(labels)
        embeddings, ids, _ = embed_images(model, calibrate, **loading)
        if sorted(truth) != ids:
            raise DataError(f"{labels}: its ids are not the images of {calibrate} (expected one row per image)")
        if strangers := sorted(set(truth.values()) - set(names) - {NO_MATCH}):
            raise DataError(f"{labels}: identity {strangers[0]} is not in {known} ({len(strangers)} such; "
                            f"expected identities of {known} or {NO_MATCH})")
        scores, indices = best_matches(embeddings, templates)
        threshold, accuracy = calibrate_threshold(scores, [names[i] for i in indices], [truth[key] for key in ids])
        result.update(dev_images=len(ids), dev_accuracy=accuracy)
    embeddings, ids, rate = embed_images(model, unknown, **loading)
    scores, indices = best_matches(embeddings, templates)
    predicted = [names[i] if score >= threshold else NO_MATCH for score, i in zip(scores, indices)]
    check_text(ids + names, out)
    write_csv(out, [("id", "label"), *zip(ids, predicted)])
    return dict(result, rows=len(ids), identities=len(names), threshold=threshold,
                said_unknown=predicted.count(NO_MATCH), img_per_s=rate)


# -----------------------------------------------------------------------------
# command line

LOADING = [  # every command's
    ("--batch-size", dict(type=at_least(1), default=256)),
    ("--num-workers", dict(type=at_least(0), default=DEFAULT_WORKERS, help="image decoding processes")),
    ("--device", dict(choices=("auto", "cpu", "cuda"), default="auto")),
]
CHECKPOINT = dict(type=Path, help="a .ckpt written by run_training.py")
TTA = "average the {} of each image and its mirror image"
# command: (add_parser's help and description, its flags in --help's order); a list of flags is a
# group of which exactly one must be given
COMMANDS = {
    "submit": (dict(help="write a Kaggle submission CSV (id,label)"), [
        ("--checkpoint", dict(CHECKPOINT, required=True)),
        ("--test-dir", dict(type=Path, default=Path("data/test"), help="test images, flat or in subfolders")),
        ("--out", dict(type=Path, default=Path("submission.csv"))),
        ("--tta", dict(action="store_true", help=TTA.format("logits"))),
        ("--label-names", dict(action="store_true", help="write identity folder names, not class indices")),
        ("--skip-bad", dict(action="store_true", help="leave out unreadable images instead of failing")),
    ]),
    "evaluate": (dict(help="accuracy on a labelled split, or of a submission"), [
        [("--data-dir", dict(type=Path, help="a labelled split, <identity>/*.jpg (needs --checkpoint)")),
         ("--submission", dict(type=Path, help="a submission CSV to score (needs --labels)"))],
        ("--labels", dict(type=Path, help="ground truth CSV id,label with identity names")),
        ("--label-names", dict(action="store_true", help="the submission's labels are identity names "
                                                         "(submit --label-names), not class indices")),
        ("--open-set", dict(action="store_true", help=f"the submission is identify's: identity names, {NO_MATCH} for "
                                                      f"none of the known; also counts the faces said {NO_MATCH}")),
        ("--checkpoint", CHECKPOINT),
        ("--tta", dict(action="store_true", help=TTA.format("logits"))),
    ]),
    "embed": (dict(help="L2-normalised embeddings of a folder of images, as .npy"), [
        ("--checkpoint", dict(CHECKPOINT, required=True)),
        ("--images", dict(type=Path, required=True, help="images, flat or in subfolders")),
        ("--out", dict(type=Path, required=True, help="the .npy; file names go beside it as .txt")),
    ]),
    "verify": (dict(help="cosine similarity of image pairs; ROC AUC, EER, TAR@FAR"), [
        ("--checkpoint", dict(CHECKPOINT, required=True)),
        [("--pairs", dict(type=Path, help="CSV img1,img2[,same] of paths under --images (or file names in it)")),
         ("--lfw-pairs", dict(type=Path, help="LFW's pairs.txt or pairsDev*.txt; adds the 10-fold accuracy"))],
        ("--images", dict(type=Path, required=True, help="the folder the pairs' paths start from (LFW: its images/)")),
        ("--out", dict(type=Path, help="CSV of the scores")),
        ("--roc", dict(type=Path, help="PNG of the ROC curve")),
        ("--tta", dict(action="store_true", help=TTA.format("embeddings"))),
    ]),
    "identify": (dict(help=f"map unknown faces to known identities or {NO_MATCH} (Kaggle's verification task)",
                      description="Each image of --unknown gets the identity of --known whose mean embedding is "
                      f"closest by cosine similarity, or {NO_MATCH} when that similarity is under the threshold. "
                      "Writes id,label for every image."), [
        ("--checkpoint", dict(CHECKPOINT, required=True)),
        ("--known", dict(type=Path, required=True, help="the known faces, <identity>/*.jpg")),
        ("--unknown", dict(type=Path, required=True, help="the images to identify (e.g. unknown_test)")),
        ("--out", dict(type=Path, default=Path("verification_submission.csv"), help="the submission CSV")),
        [("--threshold", dict(type=finite_float, help=f"cosine similarity under which a face is {NO_MATCH}")),
         ("--calibrate", dict(type=Path, help="labelled images (e.g. unknown_dev) to choose the threshold on; "
                                              "prints it and the accuracy there (needs --labels)"))],
        ("--labels", dict(type=Path, help="truth of --calibrate, CSV id,label (e.g. verification_dev.csv)")),
        ("--tta", dict(action="store_true", help=TTA.format("embeddings"))),
    ]),
}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (about, flags) in COMMANDS.items():
        command = commands.add_parser(name, **about)
        for flag in [*LOADING, *flags]:
            group = command.add_mutually_exclusive_group(required=True) if isinstance(flag, list) else command
            for option, settings in flag if isinstance(flag, list) else [flag]:
                group.add_argument(option, **settings)
    args = parser.parse_args(argv)
    if args.command == "evaluate" and args.data_dir and not args.checkpoint:
        parser.error("evaluate --data-dir needs --checkpoint")
    if args.command == "evaluate" and args.submission and not args.labels:
        parser.error("evaluate --submission needs --labels")
    if args.command == "evaluate" and args.open_set and (args.data_dir or args.checkpoint or args.label_names):
        parser.error("evaluate --open-set scores an identify submission by name: --submission and --labels only")
    if args.command == "identify" and (args.calibrate is None) != (args.labels is None):
        parser.error("identify --calibrate and --labels go together")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    loading = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    if args.command == "submit":
        result = submit(args.checkpoint, args.test_dir, args.out, tta=args.tta, label_names=args.label_names,
                        skip_bad=args.skip_bad, **loading)
        left_out = f", leaving out {result['skipped']} unreadable images" if args.skip_bad else ""
        left_out += f", leaving out {result['ignored']} entries that are not images" if result["ignored"] else ""
        print(f"wrote {result['rows']} rows to {args.out}{left_out}")
        print(f"inference: {result['img_per_s']:.1f} img/s on {result['device']}, decoding included")
    elif args.command == "evaluate" and args.data_dir:
        result = evaluate(args.checkpoint, args.data_dir, tta=args.tta, **loading)
        print(f"{args.data_dir}: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} on {result['images']} images")
    elif args.command == "evaluate":
        result = score_submission(args.submission, args.labels, args.checkpoint, args.label_names, args.open_set)
        said = ""
        if args.open_set:
            known = result["rows"] - result["unknown"]
            said = (f"; said {NO_MATCH} of {result['unknown_said_unknown']}/{result['unknown']} unknown faces and "
                    f"of {result['known_said_unknown']}/{known} known ones")
        print(f"{args.submission}: {'open-set ' if args.open_set else ''}accuracy {result['accuracy']:.4f} "
              f"({result['correct']}/{result['rows']}){said}")
    elif args.command == "embed":
        result = embed(args.checkpoint, args.images, args.out, **loading)
        rows, width = result["shape"]
        print(f"wrote {rows} x {width} embeddings to {args.out}, file names to {result['names']}")
    elif args.command == "verify":
        result = verify(args.checkpoint, args.pairs or args.lfw_pairs, args.images, args.out, args.roc,
                        lfw=args.lfw_pairs is not None, tta=args.tta, **loading)
        print_verification(result, args.out, args.roc)
    else:
        result = identify(args.checkpoint, args.known, args.unknown, args.out, args.threshold, args.calibrate,
                          args.labels, tta=args.tta, **loading)
        if args.calibrate:
            print(f"calibrated on {args.calibrate}: threshold {result['threshold']:.6f}, "
                  f"open-set accuracy {result['dev_accuracy']:.4f} on {result['dev_images']} images")
        print(f"wrote {result['rows']} rows to {args.out}: {result['rows'] - result['said_unknown']} matched to "
              f"{result['identities']} known identities, {result['said_unknown']} {NO_MATCH}")
    return 0


def print_verification(result: dict, out: Path | None, roc: Path | None) -> None:
    """What verify wrote and measured: ROC AUC, EER, TAR@FAR and the best accuracy; for LFW the fold accuracy."""
    if out:
        print(f"wrote {result['pairs']} scores to {out}")
    if "auc" in result:
        tar = ", ".join(f"TAR@FAR={far:g} {rate:.4f}" for far, rate in result["tar_at_far"].items())
        print(f"{result['pairs']} pairs: ROC AUC {result['auc']:.4f}, EER {result['eer']:.4f}, {tar}, "
              f"accuracy {result['accuracy']:.4f} at cosine >= {result['threshold']:.4f}")
    if "folds" in result:
        print(f"LFW {len(result['folds'])}-fold accuracy {result['fold_accuracy']:.4f} +- {result['fold_std']:.4f} "
              "(each fold at the threshold best on the others)")
    if roc:
        print(f"ROC curve: {roc}")


if __name__ == "__main__":
    run(main)
