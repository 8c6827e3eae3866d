"""A small generated scene (shapes with digits) whose answer box is known: the offline demo's input."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from crop.region import Region

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")


@dataclass
class Scene:
    image: Image.Image
    question: str
    answer: str
    region: Region


def make_scene(seed: int = 0, size: int = 336) -> Scene:
    """Four objects in a 3x3 layout, each with a digit; the question asks for the digit on one of them."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=size // 14)
    cell = size // 3
    places = rng.sample(range(9), k=len(COLOURS))
    objects = []
    for colour, place in zip(COLOURS, places, strict=True):
        shape = rng.choice(SHAPES)
        digit = str(rng.randrange(10))
        x0 = (place % 3) * cell + cell // 6
        y0 = (place // 3) * cell + cell // 6
        x1, y1 = x0 + 2 * cell // 3, y0 + 2 * cell // 3
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        draw.text(((x0 + x1) // 2, (y0 + 2 * y1) // 3), digit, fill=(255, 255, 255), font=font, anchor="mm")
        objects.append((colour, shape, digit, (x0, y0, x1, y1)))
    colour, shape, digit, (x0, y0, x1, y1) = rng.choice(objects)
    box = Region(x0 / size, y0 / size, x1 / size, y1 / size)
    return Scene(image, f"what digit is on the {colour} {shape} ?", digit, Region.from_grid(box.to_grid()))
