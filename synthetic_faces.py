"""Synthetic face data set in the layout of the Kaggle 11-785 HW2P2 classification data.

The real faces cannot be shipped, so this draws cartoon faces instead. Identity lives in facial
geometry and traits (face shape, eyes, brows, nose, mouth, hair, ears, glasses, beard), while every
image varies in pose, expression, lighting, background, noise and JPEG quality. That split is what
lets a CNN learn the identities while a linear model on raw pixels stays far behind: the point of
the demo. Same arguments, same bytes, whatever the number of workers.

    python synthetic_faces.py --out data/synthetic --identities 50

writes train/<identity>/*.jpg, dev/<identity>/*.jpg, test/*.jpg, test_labels.csv (id,label) and
mislabelled.csv (path,label: train images filed under a wrong identity, with the true one). With
--verification-identities K it also writes verification/ in the layout of the sibling Kaggle task
(11-785-f23-hw2p2-verification), of identities absent from train:

    verification/known/<identity>/*.jpg     K identities, --test-per-identity images each
    verification/unknown_dev/*.jpg          --unknown-per-identity images of each unknown identity:
    verification/unknown_test/*.jpg         the K known ones and about K/8 that known/ lacks
    verification/verification_dev.csv       id,label: the identity, or n000000 when not in known/
    verification/verification_test.csv      the same for unknown_test (Kaggle keeps this one)
    verification/verification_pairs.csv     img1,img2,same: --pairs pairs of known/ images
"""

import functools
import json
import math
import os
import time
from argparse import SUPPRESS
from collections import namedtuple
from contextlib import nullcontext
from itertools import product
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from cli import NO_MATCH, ArgumentParser, UserError, atomic_folder, run, write_csv

MARKER = ".synthetic_faces.json"
FORMAT_VERSION = 2  # bump whenever the drawing changes, so that old sets are not taken for new ones
SPLIT_STREAMS = {"train": 1, "dev": 2, "test": 3, "known": 4, "unknown_dev": 5, "unknown_test": 6}  # RNG streams
TRAIT_STREAM, NAME_STREAM, MISLABEL_STREAM, PAIR_STREAM = 10, 11, 12, 13

HAIR_COLOURS = [(25, 20, 20), (60, 40, 25), (110, 70, 40), (200, 165, 100), (160, 65, 30), (150, 150, 150)]
HAIR_STYLES = ["bald", "short", "fringe", "side", "mohawk", "long", "afro"]
EYE_COLOURS = [(60, 40, 25), (40, 90, 150), (70, 120, 60), (110, 110, 110)]


def identity_name(identity):
    """Zero-padded so that sorted order, and thus ImageFolder's class index, is numeric order."""
    return f"n{identity + 1:06d}"


def absent_identities(known: int) -> int:
    """Unknown identities that known/ lacks: one in nine of them, as in the real set (120 of 1,080)."""
    return max(1, round(known / 8)) if known else 0


# -----------------------------------------------------------------------------
# drawing

def rgb(values, k=1):
    """A colour as PIL takes it, a tuple of ints; k below 1 darkens it."""
    return tuple(int(v * k) for v in values)


@functools.lru_cache(maxsize=None)  # each worker draws many images of each identity
def identity_traits(seed, identity):
    """The stable look of one identity; sizes are fractions of the face's half-axes or canvas."""
    rng = np.random.default_rng([seed, TRAIT_STREAM, identity])
    u = rng.uniform
    pick = lambda options: options[rng.integers(len(options))]
    skin = np.array([255, 222, 194]) + u(0, 1) * np.array([-150, -155, -150])  # light to dark
    hair = np.clip(np.array(pick(HAIR_COLOURS)) + rng.integers(-15, 16, 3), 0, 255)
    return dict(
        face_w=u(0.19, 0.26), face_h=u(0.25, 0.32), squareness=u(2.0, 4.0), chin=u(0.0, 0.45),
        skin=rgb(skin + rng.integers(-10, 11, 3)), hair=rgb(hair), hair_style=pick(HAIR_STYLES), hairline=u(0.35, 0.7),
        part=pick([-1, 1]), ear=u(0.12, 0.26), ear_y=u(-0.15, 0.1),
        eye_y=u(-0.05, 0.3), eye_gap=u(0.28, 0.55), eye_w=u(0.13, 0.24), eye_h=u(0.3, 0.75),
        eye_tilt=u(-0.35, 0.35), eye_colour=pick(EYE_COLOURS), iris=u(0.45, 0.8), liner=rng.random() < 0.3,
        brow_gap=u(0.1, 0.3), brow_w=u(0.8, 1.4), brow_thick=u(0.008, 0.03), brow_arch=u(-0.04, 0.1),
        brow_tilt=u(-0.3, 0.3),
        nose_style=pick(["triangle", "button", "nostrils", "hook"]), nose_y=u(0.1, 0.35), nose_len=u(0.15, 0.4),
        nose_w=u(0.1, 0.3),
        mouth_style=pick(["line", "lips", "open"]), mouth_y=u(0.48, 0.7), mouth_w=u(0.25, 0.6),
        mouth_curve=u(-0.08, 0.14), lip=rgb(rng.integers([130, 30, 40], [220, 90, 100])),
        glasses=pick([None, None, None, "round", "square", "shades"]), frame=rgb(rng.integers(0, 200, 3)),
        beard=pick([None, None, None, "full", "goatee", "moustache"]),
        mole=(u(-0.6, 0.6), u(-0.2, 0.6)) if rng.random() < 0.35 else None,
        blush=rng.random() < 0.3,
    )


def face_outline(cx, cy, a, b, squareness, chin, n=64):
    """A superellipse (squareness 2 = ellipse) whose lower half narrows towards the chin."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = np.sign(np.cos(t)) * np.abs(np.cos(t)) ** (2 / squareness)
    y = np.sign(np.sin(t)) * np.abs(np.sin(t)) ** (2 / squareness)
    x = x * (1 - chin * np.clip(y, 0, 1) ** 2)
    return list(zip(cx + a * x, cy + b * y))


def rotated(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in points]


# where this image's face lies on the c x c canvas: centre, half-axes, the centre line of the inner
# features (turning the head by `yaw` slides it sideways) and the width of thin lines
Head = namedtuple("Head", "c cx cy a b yaw fx line")


def draw_face(draw, t, rng, c):
    """One face on a c x c canvas, back to front, with this image's pose, shirt and expression."""
    cx, cy, a = 0.5 * c, 0.46 * c, t["face_w"] * c
    yaw = rng.uniform(-0.15, 0.15)
    head = Head(c, cx, cy, a, t["face_h"] * c, yaw, fx=cx + yaw * a, line=max(1, int(0.012 * c)))
    draw_body(draw, t, head, shirt=rgb(rng.integers(0, 256, 3)))
    draw_skin(draw, t, head)
    draw_hair(draw, t, head)
    openness = 0.15 if rng.random() < 0.05 else rng.uniform(0.6, 1.1)  # a blink now and then
    draw_eyes(draw, t, head, openness, gaze=rng.uniform(-0.35, 0.35), brow_raise=rng.uniform(-0.03, 0.05))
    draw_nose(draw, t, head)
    draw_mouth(draw, t, head, smile=rng.uniform(-0.04, 0.04))
    draw_mole(draw, t, head)
    draw_glasses(draw, t, head)


def draw_body(draw, t, head, shirt):
    """Behind the head: long hair or an afro, then a shirt and the neck."""
    cx, cy, a, b, c = head.cx, head.cy, head.a, head.b, head.c
    if t["hair_style"] == "long":
        draw.rounded_rectangle((cx - 1.25 * a, cy - 1.1 * b, cx + 1.25 * a, cy + 1.35 * b), radius=a, fill=t["hair"])
    if t["hair_style"] == "afro":
        draw.ellipse((cx - 1.55 * a, cy - 1.4 * b, cx + 1.55 * a, cy + 0.6 * b), fill=t["hair"])
    draw.ellipse((cx - 0.48 * c, cy + 0.9 * b, cx + 0.48 * c, cy + 0.9 * b + 0.6 * c), fill=shirt)
    draw.rectangle((cx - 0.42 * a, cy + 0.4 * b, cx + 0.42 * a, cy + 1.05 * b), fill=rgb(t["skin"], 0.75))


def draw_skin(draw, t, head):
    """The ears, the far one smaller, then the face and its blush."""
    cx, cy, a, b, fx = head.cx, head.cy, head.a, head.b, head.fx
    ew, eh, ey = t["ear"] * a, 1.1 * t["ear"] * b, cy + t["ear_y"] * b
    for side in (-1, 1):
        w = ew * (1 + side * head.yaw * 2)
        draw.ellipse((cx + side * a - w, ey - eh, cx + side * a + w, ey + eh), fill=rgb(t["skin"], 0.75))
    draw.polygon(face_outline(cx, cy, a, b, t["squareness"], t["chin"]), fill=t["skin"])
    if t["blush"]:
        for side in (-1, 1):
            x, y = fx + side * 0.55 * a, cy + 0.3 * b
            draw.ellipse((x - 0.15 * a, y - 0.08 * b, x + 0.15 * a, y + 0.08 * b), fill=(230, 130, 130))


def draw_hair(draw, t, head):
    """A cap down to the hairline, shaped by the style."""
    cx, cy, a, b, style, hair = head.cx, head.cy, head.a, head.b, t["hair_style"], t["hair"]
    top = cy - t["hairline"] * b
    if style not in ("bald", "mohawk"):
        draw.chord((cx - 1.08 * a, cy - 1.12 * b, cx + 1.08 * a, 2 * top - (cy - 1.12 * b)), 180, 360, fill=hair)
    if style == "fringe":
        teeth = np.linspace(cx - 0.85 * a, cx + 0.85 * a, 9)
        draw.polygon([(cx - 0.9 * a, top - 0.05 * b)] + [(x, top + (0.25 if i % 2 else 0.1) * b)
                     for i, x in enumerate(teeth)] + [(cx + 0.9 * a, top - 0.05 * b)], fill=hair)
    if style == "side":
        p = t["part"]
        draw.polygon([(cx + p * 0.2 * a, top - 0.2 * b), (cx - p * 1.0 * a, top - 0.1 * b),
                      (cx - p * 0.95 * a, top + 0.45 * b)], fill=hair)
    if style == "mohawk":
        spikes = np.linspace(-0.35 * a, 0.35 * a, 5)
        draw.polygon([(cx - 0.4 * a, cy - 0.85 * b)] + [(cx + x, cy - (1.35 if i % 2 == 0 else 1.1) * b)
                     for i, x in enumerate(spikes)] + [(cx + 0.4 * a, cy - 0.85 * b)], fill=hair)


def eye_line(t, head):
    """The eyes' height, their gap from the centre line, and their centres, left and right: turning
    the head brings the far eye closer to the centre line."""
    gap = t["eye_gap"] * head.a
    return head.cy - t["eye_y"] * head.b, gap, [head.fx + side * gap * (1 - side * head.yaw) for side in (-1, 1)]


def draw_eyes(draw, t, head, openness, gaze, brow_raise):
    """Eyes and brows, mirrored, with this image's openness, gaze and brow raise."""
    w, b = t["eye_w"] * head.a, head.b
    h, gaze, brow_raise = w * t["eye_h"], gaze * w, brow_raise * b
    ey, _, centres = eye_line(t, head)
    x = np.linspace(-1, 1, 12)
    for side, ex in zip((-1, 1), centres):
        upper = [(w * v, -h * openness * (1 - v * v) ** 0.7) for v in x]
        lower = [(w * v, 0.6 * h * openness * (1 - v * v) ** 0.9) for v in x[::-1]]
        eye = rotated(upper + lower, ex, ey, -side * t["eye_tilt"])
        draw.polygon(eye, fill=(245, 245, 240), outline=(20, 20, 20) if t["liner"] else None, width=head.line)
        r = h * t["iris"] * min(1.0, openness * 1.3)
        draw.ellipse((ex + gaze - r, ey - r, ex + gaze + r, ey + r), fill=t["eye_colour"])
        draw.ellipse((ex + gaze - r / 2.5, ey - r / 2.5, ex + gaze + r / 2.5, ey + r / 2.5), fill=(10, 10, 10))
        by, bw = ey - h - t["brow_gap"] * b - brow_raise, w * t["brow_w"]
        brow = [(-bw, 0), (0, -t["brow_arch"] * b), (bw, 0)]
        draw.line(rotated(brow, ex, by, -side * t["brow_tilt"]), fill=rgb(t["hair"], 0.7),
                  width=max(1, int(t["brow_thick"] * head.c)), joint="curve")


def draw_nose(draw, t, head):
    fx, cy, a, b, line, dark = head.fx, head.cy, head.a, head.b, head.line, rgb(t["skin"], 0.75)
    ny, nl, nw = cy + t["nose_y"] * b, t["nose_len"] * b, t["nose_w"] * a
    if t["nose_style"] == "triangle":
        draw.line([(fx, ny - nl), (fx - nw, ny), (fx + nw, ny)], fill=dark, width=line)
    elif t["nose_style"] == "button":
        draw.ellipse((fx - nw, ny - 0.5 * nw, fx + nw, ny + 0.5 * nw), fill=dark)
    elif t["nose_style"] == "nostrils":
        draw.line([(fx, ny - nl), (fx, ny - 0.2 * nl)], fill=dark, width=line)
        for side in (-1, 1):
            x = fx + side * 0.5 * nw
            draw.ellipse((x - 0.25 * nw, ny - 0.15 * nw, x + 0.25 * nw, ny + 0.15 * nw), fill=(60, 30, 30))
    else:
        draw.line([(fx - 0.2 * nw, ny - nl), (fx + 0.3 * nw, ny - 0.2 * nl), (fx + 0.6 * nw, ny),
                   (fx - 0.3 * nw, ny)], fill=dark, width=line, joint="curve")


def draw_mouth(draw, t, head, smile):
    """The beard under the mouth, then the mouth with this image's smile."""
    cx, cy, a, b, c, fx, hair = head.cx, head.cy, head.a, head.b, head.c, head.fx, t["hair"]
    my, mw = cy + t["mouth_y"] * b, t["mouth_w"] * a
    curve = (t["mouth_curve"] + smile) * b
    if t["beard"] == "full":
        outline = face_outline(cx, cy, a, b, t["squareness"], t["chin"])
        draw.polygon([p for p in outline if p[1] > cy + 0.2 * b], fill=hair)
    elif t["beard"] == "goatee":
        draw.ellipse((fx - 0.3 * mw, my + 0.05 * b, fx + 0.3 * mw, my + 0.35 * b), fill=hair)
    if t["beard"] in ("full", "moustache"):
        draw.line([(fx - 0.9 * mw, my), (fx, my - 0.12 * b), (fx + 0.9 * mw, my)], fill=hair,
                  width=max(1, int(0.03 * c)), joint="curve")
    x = np.linspace(-1, 1, 12)
    lips = [(fx + mw * v, my + curve * (v * v - 1)) for v in x]
    if t["mouth_style"] == "line":
        draw.line(lips, fill=(90, 30, 30), width=max(1, int(0.014 * c)), joint="curve")
    else:
        depth = (0.12 if t["mouth_style"] == "lips" else 0.22) * b
        lower = [(fx + mw * v, my + curve * (v * v - 1) + depth * (1 - v * v)) for v in x[::-1]]
        draw.polygon(lips + lower, fill=t["lip"] if t["mouth_style"] == "lips" else (50, 10, 10))


def draw_mole(draw, t, head):
    if t["mole"]:
        x, y, r = head.fx + t["mole"][0] * head.a, head.cy + t["mole"][1] * head.b, 0.012 * head.c
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(50, 30, 20))


def draw_glasses(draw, t, head):
    """Over everything, so drawn last."""
    if not t["glasses"]:
        return
    (ey, gap, centres), r, frame = eye_line(t, head), t["eye_w"] * head.a * 1.35, t["frame"]
    for ex in centres:
        box = (ex - r, ey - 0.8 * r, ex + r, ey + 0.8 * r)
        if t["glasses"] == "round":
            draw.ellipse(box, outline=frame, width=head.line)
        else:
            draw.rectangle(box, outline=frame, width=head.line, fill=(20, 20, 25) if t["glasses"] == "shades" else None)
    draw.line([(head.fx - gap + r, ey), (head.fx + gap - r, ey)], fill=frame, width=head.line)


def background(rng, size):
    """A blend of four random corner colours, cluttered with random shapes half the time."""
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.uint8)
    image = Image.fromarray(corners).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(3, 12)):
            (x0, x1), (y0, y1) = np.sort(rng.uniform(-0.2, 1.2, (2, 2)) * size)
            colour = rgb(rng.integers(0, 256, 3))
            [draw.rectangle, draw.ellipse][rng.integers(2)]((x0, y0, x1, y1), fill=colour)
    return image


def pose(rng, size):
    """Affine map from an output pixel to the face drawn at twice the size: a random rotation,
    scale and shift, and the halving, which antialiases the drawn shapes."""
    angle, scale = rng.uniform(-0.35, 0.35), rng.uniform(0.8, 1.15)
    tx, ty = rng.uniform(-0.12, 0.12, 2) * size
    cos, sin = 2 * math.cos(angle) / scale, 2 * math.sin(angle) / scale
    o = size / 2
    return (cos, sin, size - cos * (o + tx) - sin * (o + ty), -sin, cos, size + sin * (o + tx) - cos * (o + ty))


def render(traits, rng, size):
    """One photo of an identity: a face on a background, posed, lit, blurred and noisy."""
    image = background(rng, size)
    face = Image.new("RGBA", (2 * size, 2 * size))
    draw_face(ImageDraw.Draw(face), traits, rng, 2 * size)
    face = face.convert("RGBa").transform((size, size), Image.AFFINE, pose(rng, size), Image.BILINEAR).convert("RGBA")
    image.paste(face, (0, 0), face)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0) * size / 64))
    if rng.random() < 0.1:
        image = image.convert("L").convert("RGB")
    # lighting: white balance, brightness and contrast, light from one side, sensor noise
    x = np.asarray(image, np.float32) / 255 * rng.uniform(0.75, 1.25, 3).astype(np.float32)
    x = (x - 0.5) * rng.uniform(0.7, 1.3) + 0.5 + rng.uniform(-0.15, 0.15)
    angle, ramp = rng.uniform(0, 2 * np.pi), np.linspace(-1, 1, size, dtype=np.float32)
    x *= 1 + rng.uniform(0, 0.4) * (ramp[None, :, None] * math.cos(angle) + ramp[:, None, None] * math.sin(angle))
    x += rng.uniform(0.01, 0.05) * rng.standard_normal(x.shape, dtype=np.float32)
    return Image.fromarray((np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8))


def write_image(job):
    """Pool worker: the image's RNG comes from its own coordinates, so workers never share state."""
    path, seed, split, identity, index, size = job
    rng = np.random.default_rng([seed, SPLIT_STREAMS[split], identity, index])
    render(identity_traits(seed, identity), rng, size).save(path, quality=int(rng.integers(30, 96)))


# -----------------------------------------------------------------------------
# the data set

def check_arguments(identities, train_per_identity, dev_per_identity, test_per_identity, image_size, seed,
                    mislabel_rate, verification_identities, pairs, unknown_per_identity):
    given = locals()
    for name, least in [("identities", 2), ("image_size", 32), ("train_per_identity", 1), ("dev_per_identity", 0),
                        ("test_per_identity", 0), ("seed", 0), ("verification_identities", 0), ("pairs", 0)]:
        if given[name] < least:
            rule = f"be at least {least}" if least else "not be negative"
            raise UserError(f"{name} must {rule}, got {given[name]}")
    if not 0 <= mislabel_rate < 1:
        raise UserError(f"mislabel_rate must be in [0, 1), got {mislabel_rate}")
    if pairs and verification_identities < 2:
        raise UserError("pairs need verification_identities of at least 2, to form different pairs")
    if pairs and test_per_identity < 2:
        raise UserError("pairs need test_per_identity (the known images of each identity) of at least 2")
    if verification_identities and (test_per_identity < 1 or unknown_per_identity < 1):
        raise UserError("verification identities need test_per_identity and unknown_per_identity of at least 1")


def images(seed, split, identities, per_identity):
    """(identity, index, file name) of each image of a split; the names are shuffled numbers, so
    that their order does not follow the identities."""
    order = np.random.default_rng([seed, NAME_STREAM, SPLIT_STREAMS[split]]).permutation(len(identities) * per_identity)
    return [(i, k, f"{n:06d}.jpg") for (i, k), n in zip(product(identities, range(per_identity)), order)]


def plan(root, seed, identities, train_per_identity, dev_per_identity, test_per_identity, image_size,
         mislabel_rate, verification_identities, pairs, unknown_per_identity):
    """Every image to draw as a worker job, and the rows of the csv files that describe them."""
    jobs, tables = [], {"test_labels.csv": [("id", "label")], "mislabelled.csv": [("path", "label")]}
    train = images(seed, "train", range(identities), train_per_identity)
    rng = np.random.default_rng([seed, MISLABEL_STREAM])
    wrong = rng.choice(len(train), round(mislabel_rate * len(train)), replace=False)
    folders = [identity for identity, _, _ in train]
    for j, shift in zip(wrong, rng.integers(1, identities, len(wrong))):
        folders[j] = (folders[j] + shift) % identities
    for (identity, k, name), folder in zip(train, folders):
        path = f"train/{identity_name(folder)}/{name}"
        jobs.append((path, "train", identity, k))
        if folder != identity:
            tables["mislabelled.csv"].append((path, identity_name(identity)))
    for identity, k, name in images(seed, "dev", range(identities), dev_per_identity):
        jobs.append((f"dev/{identity_name(identity)}/{name}", "dev", identity, k))
    for identity, k, name in sorted(images(seed, "test", range(identities), test_per_identity), key=lambda row: row[2]):
        jobs.append((f"test/{name}", "test", identity, k))
        tables["test_labels.csv"].append((name, identity_name(identity)))
    if verification_identities:
        jobs += verification_plan(seed, identities, test_per_identity, verification_identities, pairs,
                                  unknown_per_identity, tables)
    return [(str(root / path), seed, split, identity, k, image_size) for path, split, identity, k in jobs], tables


def verification_plan(seed, identities, known_per_identity, verification_identities, pairs, unknown_per_identity,
                      tables) -> list:
    """The jobs of verification/ (adding its csv files to `tables`): its identities are numbered
    after the training ones, so no one in train appears there."""
    known = range(identities, identities + verification_identities)
    absent = range(known.stop, known.stop + absent_identities(verification_identities))
    names = {(identity, k): name for identity, k, name in images(seed, "known", known, known_per_identity)}
    jobs = [(f"verification/known/{identity_name(identity)}/{name}", "known", identity, k)
            for (identity, k), name in names.items()]
    for split in ("unknown_dev", "unknown_test"):
        rows = tables[f"verification/verification_{split.removeprefix('unknown_')}.csv"] = [("id", "label")]
        unknown = images(seed, split, [*known, *absent], unknown_per_identity)
        for identity, k, name in sorted(unknown, key=lambda row: row[2]):
            jobs.append((f"verification/{split}/{name}", split, identity, k))
            rows.append((name, identity_name(identity) if identity in known else NO_MATCH))
    if pairs:
        rng = np.random.default_rng([seed, PAIR_STREAM])
        rows = tables["verification/verification_pairs.csv"] = [("img1", "img2", "same")]
        for p in range(pairs):
            if p % 2 == 0:  # alternate same and different, for a balanced set
                i, (k1, k2) = rng.integers(verification_identities), rng.choice(known_per_identity, 2, replace=False)
                rows.append((names[known[i], k1], names[known[i], k2], 1))
            else:
                i1, i2 = rng.choice(verification_identities, 2, replace=False)
                k1, k2 = rng.integers(known_per_identity, size=2)
                rows.append((names[known[i1], k1], names[known[i2], k2], 0))
    return jobs


def write_set(root: Path, arguments: dict, workers: int) -> dict:
    """Draw every image and write the csv files and the marker into root; return the counts."""
    jobs, tables = plan(root, **arguments)
    for path in {Path(job[0]).parent for job in jobs}:
        path.mkdir(parents=True, exist_ok=True)
    with Pool(workers) if workers > 1 else nullcontext() as pool:
        done = pool.imap_unordered(write_image, jobs, chunksize=16) if pool else map(write_image, jobs)
        for _ in tqdm(done, total=len(jobs), desc="drawing faces", unit="img", disable=None):
            pass
    for name, rows in tables.items():
        write_csv(root / name, rows)
    counts = {split: sum(job[2] == split for job in jobs) for split in SPLIT_STREAMS}
    counts.update(pairs=arguments["pairs"], mislabelled=len(tables["mislabelled.csv"]) - 1)
    (root / MARKER).write_text(json.dumps(dict(version=FORMAT_VERSION, arguments=arguments, counts=counts), indent=1))
    return counts


def generate(out_dir, identities=50, train_per_identity=40, dev_per_identity=10, test_per_identity=10,
             image_size=112, seed=0, mislabel_rate=0.0, verification_identities=0, pairs=0, unknown_per_identity=1,
             workers=None):
    """Write the data set to out_dir and return its counts; if out_dir already holds the same set,
    return at once. Raises UserError for bad arguments or an out_dir holding anything else."""
    arguments = dict(identities=int(identities), train_per_identity=int(train_per_identity),
                     dev_per_identity=int(dev_per_identity), test_per_identity=int(test_per_identity),
                     image_size=int(image_size), seed=int(seed), mislabel_rate=float(mislabel_rate),
                     verification_identities=int(verification_identities), pairs=int(pairs),
                     unknown_per_identity=int(unknown_per_identity))
    check_arguments(**arguments)
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    workers = workers or os.cpu_count() or 1
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        return existing_set(out_dir, arguments)

    try:
        with atomic_folder(out_dir) as tmp:
            return write_set(tmp, arguments, workers)
    except OSError:
        if not (out_dir / MARKER).is_file():
            raise
        # another process (a rank of a multi-process launch) finished the same set first
        return existing_set(out_dir, arguments)


def existing_set(out_dir: Path, arguments: dict) -> dict:
    """The counts of the set already in out_dir, if it was made with these arguments."""
    if not (out_dir / MARKER).is_file():
        raise UserError(f"{out_dir} is not empty and holds no synthetic face set; choose another directory")
    try:
        stored = json.loads((out_dir / MARKER).read_text())
    except ValueError as error:  # not text, or not JSON
        raise UserError(error) from error
    if stored["version"] != FORMAT_VERSION or stored["arguments"] != arguments:
        differ = [f"{k}={v} (wanted {arguments[k]})" for k, v in stored["arguments"].items()
                  if arguments.get(k) != v]
        raise UserError(f"{out_dir} holds a synthetic face set made with other arguments "
                         f"({', '.join(differ) or 'older version'}); choose another directory or delete it")
    return stored["counts"]


def main(argv=None):
    # flags left out are left out of the call too: generate's defaults are the command's
    parser = ArgumentParser(description="Draw a synthetic face data set in the HW2P2 layout.",
                            argument_default=SUPPRESS)
    parser.add_argument("--out", dest="out_dir", metavar="OUT", required=True, type=Path,
                        help="directory to create (or reuse, if identical)")
    parser.add_argument("--identities", type=int)
    parser.add_argument("--train-per-identity", type=int)
    parser.add_argument("--dev-per-identity", type=int)
    parser.add_argument("--test-per-identity", type=int,
                        help="also the number of known/ images of each verification identity")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--mislabel-rate", type=float, help="fraction of train images filed wrongly")
    parser.add_argument("--verification-identities", type=int,
                        help="known identities of verification/, absent from train (about 1 in 8 more are unknown)")
    parser.add_argument("--unknown-per-identity", type=int,
                        help="images of each identity in verification/unknown_dev and again in unknown_test")
    parser.add_argument("--pairs", type=int, help="verification pairs of known/ images, half same, half different")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = generate(**vars(args))
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"{args.out_dir}: {summary} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    run(main)
