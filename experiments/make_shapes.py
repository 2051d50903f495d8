"""A CIFAR-shaped image folder for the default-recipe evidence (issue 12): 10 classes of 32x32 RGB PNG files,
drawn unlike kdcli's built-in synthetic set. Each image shows one object of its class (a shape drawn at 64x64 with a
random colour, size, position and rotation) over a random gradient background cluttered with two smaller objects
of other classes, then downsampled to 32x32 (antialiased, as photographs are) with pixel noise.

    python experiments/make_shapes.py OUT [--train 4000] [--val 1000] [--seed 0]

writes OUT/train/<class>/*.png and OUT/val/<class>/*.png.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["disc", "square", "triangle", "cross", "ring", "star", "bars", "chevron", "crescent", "dots"]
CANVAS = 64


def polygon(center, radius, angle, points):
    return [(center[0] + radius * math.cos(angle + 2 * math.pi * i / points),
             center[1] + radius * math.sin(angle + 2 * math.pi * i / points)) for i in range(points)]


def draw_object(draw: ImageDraw.ImageDraw, kind: int, center, radius: float, angle: float, colour, rng) -> None:
    x, y = center
    box = [x - radius, y - radius, x + radius, y + radius]
    name = CLASSES[kind]
    if name == "disc":
        draw.ellipse(box, fill=colour)
    elif name == "square":
        draw.polygon(polygon(center, radius, angle, 4), fill=colour)
    elif name == "triangle":
        draw.polygon(polygon(center, radius, angle, 3), fill=colour)
    elif name == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = radius * math.cos(a), radius * math.sin(a)
            draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=colour, width=max(2, int(radius / 3)))
    elif name == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(radius / 3.5)))
    elif name == "star":
        outer, inner = polygon(center, radius, angle, 5), polygon(center, radius * 0.4, angle + math.pi / 5, 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=colour)
    elif name == "bars":
        for offset in (-0.6, 0.0, 0.6):
            ox, oy = offset * radius * math.cos(angle + math.pi / 2), offset * radius * math.sin(angle + math.pi / 2)
            dx, dy = radius * math.cos(angle), radius * math.sin(angle)
            draw.line([(x + ox - dx, y + oy - dy), (x + ox + dx, y + oy + dy)], fill=colour,
                      width=max(1, int(radius / 5)))
    elif name == "chevron":
        tip = (x + radius * math.cos(angle), y + radius * math.sin(angle))
        ends = [(x + radius * math.cos(angle + s * 2.4), y + radius * math.sin(angle + s * 2.4)) for s in (-1, 1)]
        draw.line([ends[0], tip, ends[1]], fill=colour, width=max(2, int(radius / 3)), joint="curve")
    elif name == "crescent":
        draw.ellipse(box, fill=colour)
        shift = 0.45 * radius
        cx, cy = x + shift * math.cos(angle), y + shift * math.sin(angle)
        draw.ellipse([cx - radius * 0.85, cy - radius * 0.85, cx + radius * 0.85, cy + radius * 0.85],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    else:  # dots
        for point in polygon(center, radius * 0.6, angle, 4):
            r = radius * 0.25
            draw.ellipse([point[0] - r, point[1] - r, point[0] + r, point[1] + r], fill=colour)


def image(label: int, rng: np.random.Generator) -> Image.Image:
    top, bottom = rng.integers(0, 256, (2, 3))
    ramp = np.linspace(0, 1, CANVAS)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp) * np.ones((CANVAS, CANVAS, 3))
    canvas = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    other = int(rng.choice([k for k in range(len(CLASSES)) if k != label]))  # clutter: a smaller object
    draw_object(draw, other, rng.uniform(4, CANVAS - 4, 2), rng.uniform(4, 7), rng.uniform(0, 2 * math.pi),
                tuple(int(c) for c in rng.integers(0, 256, 3)), rng)
    draw_object(draw, label, rng.uniform(22, CANVAS - 22, 2), rng.uniform(14, 21), rng.uniform(0, 2 * math.pi),
                tuple(int(c) for c in rng.integers(0, 256, 3)), rng)
    small = np.asarray(canvas.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float32)
    noisy = small + rng.normal(0, 6, small.shape)
    return Image.fromarray(noisy.clip(0, 255).round().astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for split, count, seed in (("train", args.train, args.seed), ("val", args.val, args.seed + 1)):
        rng = np.random.default_rng(seed)
        for index in range(count):
            label = index % len(CLASSES)
            folder = args.out / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image(label, rng).save(folder / f"{index:05d}.png")


if __name__ == "__main__":
    main()
