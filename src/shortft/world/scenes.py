"""A procedurally generated captioned image world: one object on a plain background, 64x64 RGB.

Every image is fully determined by its `Scene`; every list of scenes by a seed. The held-out split
holds shape/colour compositions that never appear in the train split (nor in any pretraining), so
prompt fidelity on it measures compositional generalisation rather than memory.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass

import torch

RESOLUTION = 64
MAX_TOKENS = 32  # tokenizer length of the world models: the longest caption is under 20 CLIP tokens

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # RGB in [0, 1]; chosen far apart so a nearest-colour read is unambiguous
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.80),
    "white": (0.95, 0.95, 0.95),
}
BACKGROUNDS = {
    "black": (0.03, 0.03, 0.03),
    "gray": (0.50, 0.50, 0.50),
    "navy": (0.05, 0.07, 0.35),
}
SIZES = {"small": 8.0, "large": 14.0}  # radius of the circumscribed circle in pixels
POSITIONS = {  # object centre (x, y) in pixels; y grows downwards
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Shape/colour pairs never seen in training: each shape and each colour is still seen elsewhere.
HELDOUT_PAIRS = frozenset({("circle", "purple"), ("square", "yellow"), ("triangle", "green")})
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
JITTER = 2.0  # max centre offset in pixels, so positions are regions rather than single points

TEMPLATES = (
    "a {size} {colour} {shape} {pos} on a {background} background",
    "{pos}, a {size} {colour} {shape} on {background}",
    "{pos} of a {background} image, a {colour} {shape}, {size}",
    "a {background} background with a {size} {colour} {shape} {pos}",
    "a picture of a {colour} {shape}, {size}, {pos}, {background} background",
)


@dataclass(frozen=True)
class Scene:
    """One object on a plain background. dx, dy: small deterministic jitter of the centre (px)."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r}; valid: {sorted(valid)}")

    def attributes(self) -> dict[str, str]:
        d = asdict(self)
        return {k: d[k] for k in ATTRIBUTES}


def is_heldout(shape: str, colour: str) -> bool:
    return (shape, colour) in HELDOUT_PAIRS


def all_compositions(split: str) -> list[tuple[str, str, str, str, str]]:
    """Every (shape, colour, size, position, background) of a split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; valid: ['heldout', 'train']")
    out = []
    for combo in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS):
        if is_heldout(combo[0], combo[1]) == (split == "heldout"):
            out.append(combo)
    return out


def sample_scenes(n: int, split: str = "train", seed: int = 0) -> list[Scene]:
    """n scenes drawn uniformly from the split's compositions, with jitter; deterministic in seed."""
    combos = all_compositions(split)
    rng = random.Random(f"{split}-{seed}")
    return [
        Scene(*rng.choice(combos), dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER))
        for _ in range(n)
    ]


def caption(scene: Scene, template_index: int = 0) -> str:
    """The scene described by template `template_index` (modulo the number of templates)."""
    return TEMPLATES[template_index % len(TEMPLATES)].format(
        size=scene.size,
        colour=scene.colour,
        shape=scene.shape,
        pos=POSITION_PHRASES[scene.position],
        background=scene.background,
    )


def prompt_split(split: str) -> list[str]:
    """Fixed prompt sets: 'heldout' = every held-out composition once (90 prompts, fixed shuffled order);
    'train' = 120 train compositions drawn with a fixed seed. Templates cycle."""
    if split == "heldout":  # shuffled once, so that any first-N subset mixes shapes, colours and positions
        combos = random.Random("prompt-split-heldout").sample(all_compositions("heldout"), 90)
    elif split == "train":
        combos = random.Random("prompt-split-train").sample(all_compositions("train"), 120)
    else:
        raise ValueError(f"split={split!r}; valid: ['heldout', 'train']")
    return [caption(Scene(*c), i) for i, c in enumerate(combos)]


_WORDS = {
    "shape": {s: s for s in SHAPES},
    "colour": {c: c for c in COLOURS},
    "size": {s: s for s in SIZES},
    "position": {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center"},
    "background": {b: b for b in BACKGROUNDS},
}


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """Attributes a prompt asks for, by keyword; None where the prompt does not say."""
    words = re.findall(r"[a-z]+", prompt.lower())
    out: dict[str, str | None] = {}
    for attr, table in _WORDS.items():
        hits = [table[w] for w in words if w in table]
        out[attr] = hits[0] if hits else None
    return out


def nearest_colour(rgb: torch.Tensor) -> list[str]:
    """The palette colour names nearest (RGB distance) to each row of (B, 3) `rgb`: the evaluator's colour
    rule, so random VAE colours are checked against exactly what the evaluator would read."""
    palette = torch.tensor(list(COLOURS.values()))
    return [list(COLOURS)[int(i)] for i in torch.cdist(rgb, palette).argmin(1)]


def random_colours(scenes: list[Scene], generator: torch.Generator) -> torch.Tensor:
    """(B, 3) uniform random RGB object colours, redrawn wherever the nearest palette colour would make
    a held-out shape/colour pair with the scene's shape: augmented images stay inside the train split."""
    out = torch.rand(len(scenes), 3, generator=generator)
    while True:
        bad = [i for i, (s, c) in enumerate(zip(scenes, nearest_colour(out))) if is_heldout(s.shape, c)]
        if not bad:
            return out
        out[bad] = torch.rand(len(bad), 3, generator=generator)


def _triangle_sdf(px: torch.Tensor, py: torch.Tensor, cx, cy, r) -> torch.Tensor:
    """Signed distance (px, negative inside; exact inside, approximate outside) to an upright
    isosceles triangle inscribed in the circle (cx, cy, r), apex at the top."""
    # Vertices: apex (cx, cy - r), base corners (cx -+ 0.95 r, cy + 0.75 r).
    ax, ay = cx, cy - r
    bx, by = cx + 0.95 * r, cy + 0.75 * r
    qx, qy = cx - 0.95 * r, cy + 0.75 * r
    d = None
    for (x0, y0), (x1, y1) in (((ax, ay), (bx, by)), ((bx, by), (qx, qy)), ((qx, qy), (ax, ay))):
        ex, ey = x1 - x0, y1 - y0
        norm = torch.sqrt(ex * ex + ey * ey)
        # outward normal of a clockwise-in-screen-space edge list: (ey, -ex)
        dist = ((px - x0) * ey - (py - y0) * ex) / norm
        d = dist if d is None else torch.maximum(d, dist)
    return d


def render(scenes: list[Scene], colours: torch.Tensor | None = None) -> torch.Tensor:
    """Rasterise scenes with anti-aliased edges. Returns (B, 3, 64, 64) float in [0, 1].
    colours: optional (B, 3) RGB that replaces each scene's object colour (VAE augmentation)."""
    b = len(scenes)
    coords = torch.arange(RESOLUTION, dtype=torch.float32) + 0.5
    py = coords.view(1, -1, 1).expand(b, RESOLUTION, RESOLUTION)  # (B, H, W)
    px = coords.view(1, 1, -1).expand(b, RESOLUTION, RESOLUTION)
    cx = torch.tensor([POSITIONS[s.position][0] + s.dx for s in scenes]).view(b, 1, 1)
    cy = torch.tensor([POSITIONS[s.position][1] + s.dy for s in scenes]).view(b, 1, 1)
    r = torch.tensor([SIZES[s.size] for s in scenes]).view(b, 1, 1)
    circle = torch.sqrt((px - cx) ** 2 + (py - cy) ** 2) - r
    half = 0.886 * r  # same area as the circle
    qx, qy = (px - cx).abs() - half, (py - cy).abs() - half
    square = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.maximum(qx, qy).clamp(max=0)
    triangle = _triangle_sdf(px, py, cx, cy, 1.15 * r)
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes]).view(b, 1, 1)
    sdf = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    alpha = (0.5 - sdf).clamp(0.0, 1.0).unsqueeze(1)  # (B, 1, H, W): pixel coverage
    fg = torch.tensor([COLOURS[s.colour] for s in scenes]) if colours is None else colours
    fg = fg.view(b, 3, 1, 1)
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes]).view(b, 3, 1, 1)
    return bg + alpha * (fg - bg)


ALTERNATIVES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
                 "background": tuple(BACKGROUNDS)}


def one_attribute_wrong(scene: Scene, rng) -> Scene:
    """The same scene with exactly one attribute changed (background never equal to the colour)."""
    attr = rng.choice(ATTRIBUTES)
    choices = [v for v in ALTERNATIVES[attr] if v != getattr(scene, attr)]
    d = scene.attributes()
    d[attr] = rng.choice(choices)
    return Scene(**d)
