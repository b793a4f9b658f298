"""`pyalexnet demo-data OUT`: a small synthetic ImageFolder, so that prepare -> train -> eval runs end to end in
minutes on the CPU emulator. Ten classes of drawn shapes and textures, JPEG, random colours, sizes, positions and
background noise; each class leans towards its own hue, so a small network learns it within a few epochs.

    OUT/train/<class>/<class>_NNNN.jpg
    OUT/val/<name>.jpg + OUT/val/labels.txt       (the flat validation layout, "<file> <class>" per line)
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

CLASSES = ["circle", "square", "triangle", "hstripes", "vstripes", "checker", "cross", "ring", "diagonal", "dots"]


def _colour(rng, hue):
    h = (hue + rng.normal(0, 0.04)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def draw(kind: str, rng: np.random.Generator, size: int = 96):
    """One image of class `kind` as a PIL RGB image."""
    from PIL import Image, ImageDraw

    noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + rng.integers(0, 80, 3, dtype=np.uint8)
    im = Image.fromarray(noise.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    fg = _colour(rng, CLASSES.index(kind) / len(CLASSES))
    r = int(rng.uniform(0.22, 0.4) * size)
    cx, cy = (int(rng.uniform(r, size - r)) for _ in range(2))
    box = (cx - r, cy - r, cx + r, cy + r)
    period = int(rng.integers(6, 14))
    if kind == "circle":
        d.ellipse(box, fill=fg)
    elif kind == "square":
        d.rectangle(box, fill=fg)
    elif kind == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif kind == "hstripes":
        for y in range(int(rng.integers(0, period)), size, period):
            d.rectangle((0, y, size, y + period // 2 - 1), fill=fg)
    elif kind == "vstripes":
        for x in range(int(rng.integers(0, period)), size, period):
            d.rectangle((x, 0, x + period // 2 - 1, size), fill=fg)
    elif kind == "checker":
        for y in range(0, size, period):
            for x in range((y // period % 2) * period, size, 2 * period):
                d.rectangle((x, y, x + period - 1, y + period - 1), fill=fg)
    elif kind == "cross":
        t = max(3, r // 3)
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fg)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fg)
    elif kind == "ring":
        d.ellipse(box, outline=fg, width=max(3, r // 4))
    elif kind == "diagonal":
        for o in range(-size, size, period):
            d.line((o, 0, o + size, size), fill=fg, width=max(2, period // 3))
    elif kind == "dots":
        for _ in range(int(rng.integers(8, 20))):
            x, y, s = int(rng.integers(0, size)), int(rng.integers(0, size)), int(rng.integers(3, 7))
            d.ellipse((x - s, y - s, x + s, y + s), fill=fg)
    else:
        raise ValueError(f"unknown class {kind!r}")
    return im


def write_demo_data(out, train_per_class: int = 80, val_per_class: int = 20, size: int = 96, seed: int = 0) -> dict:
    """Writes the folder; returns {"train": n, "val": n, "classes": [...]}."""
    if train_per_class < 1 or val_per_class < 0 or size < 16:
        raise ValueError("expected train_per_class >= 1, val_per_class >= 0, size >= 16")
    out = Path(out)
    rng = np.random.default_rng(seed)
    labels = []
    for c in CLASSES:
        folder = out / "train" / c
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            draw(c, rng, size).save(folder / f"{c}_{i:04d}.jpg", quality=90)
    (out / "val").mkdir(parents=True, exist_ok=True)
    for c in CLASSES:
        for i in range(val_per_class):
            name = f"val_{c}_{i:04d}.jpg"
            draw(c, rng, size).save(out / "val" / name, quality=90)
            labels.append(f"{name} {c}")
    (out / "val" / "labels.txt").write_text("\n".join(labels) + "\n")
    return {"train": train_per_class * len(CLASSES), "val": val_per_class * len(CLASSES), "classes": list(CLASSES)}
