"""The world generator: deterministic, captions say what the image shows, held-out stays held out."""

import pytest
import torch

from shortft.world.evaluator import prompt_fidelity, read_attributes
from shortft.world.scenes import (
    ATTRIBUTES,
    HELDOUT_PAIRS,
    POSITIONS,
    TEMPLATES,
    Scene,
    all_compositions,
    caption,
    nearest_colour,
    parse_prompt,
    prompt_split,
    random_colours,
    render,
    sample_scenes,
)


def test_sampling_and_rendering_are_deterministic():
    a, b = sample_scenes(50, "train", seed=3), sample_scenes(50, "train", seed=3)
    assert a == b
    assert a != sample_scenes(50, "train", seed=4)
    x = render(a)
    assert x.shape == (50, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(x, render(b))


def test_captions_match_scenes_as_read_by_the_evaluator():
    """Every template's caption parses back to the scene, and the evaluator reads the rendered
    image as the caption says (on both splits)."""
    for split in ("train", "heldout"):
        scenes = sample_scenes(300, split, seed=11)
        prompts = [caption(s, i) for i, s in enumerate(scenes)]
        for s, p in zip(scenes, prompts):
            assert parse_prompt(p) == s.attributes(), p
        acc = prompt_fidelity(render(scenes), prompts)
        for a in ATTRIBUTES:
            assert acc[a] >= 0.99, (split, a, acc)


def test_evaluator_is_not_trivially_right():
    """A wrong caption must be scored wrong: swap colours and positions."""
    scenes = sample_scenes(60, "train", seed=5)
    wrong = [Scene(s.shape, "white" if s.colour != "white" else "red", s.size,
                   "left" if s.position != "left" else "right", s.background) for s in scenes]
    acc = prompt_fidelity(render(scenes), [caption(w) for w in wrong])
    assert acc["colour"] == 0.0 and acc["position"] == 0.0 and acc["shape"] >= 0.99
    blank = read_attributes(torch.zeros(2, 3, 64, 64))
    assert blank[0]["background"] == "black"


def test_heldout_compositions_never_in_train():
    train = sample_scenes(5000, "train", seed=0)
    assert not any((s.shape, s.colour) in HELDOUT_PAIRS for s in train)
    held = sample_scenes(500, "heldout", seed=0)
    assert all((s.shape, s.colour) in HELDOUT_PAIRS for s in held)
    for p in prompt_split("train"):
        a = parse_prompt(p)
        assert (a["shape"], a["colour"]) not in HELDOUT_PAIRS, p
    heldout = prompt_split("heldout")
    assert len(heldout) == len(all_compositions("heldout")) == 90
    assert len(set(heldout)) == 90
    assert prompt_split("train") == prompt_split("train") and len(prompt_split("train")) == 120


def test_templates_and_errors():
    s = Scene("triangle", "purple", "large", "bottom", "navy")
    texts = {caption(s, i) for i in range(len(TEMPLATES))}
    assert len(texts) == len(TEMPLATES)
    assert parse_prompt("a square") == dict(shape="square", colour=None, size=None, position=None, background=None)
    with pytest.raises(ValueError, match="colour='pink'"):
        Scene("circle", "pink", "small", "left", "black")
    with pytest.raises(ValueError, match="split='test'"):
        sample_scenes(1, "test")


def test_random_colours_recolour_the_object_but_never_make_a_heldout_pair():
    """The VAE's colour augmentation: the object takes the given RGB, the rest of the image is the
    scene's; no random colour is one the evaluator would read as a held-out pair with the shape."""
    scenes = sample_scenes(400, "train", seed=2)
    g = torch.Generator().manual_seed(0)
    rgb = random_colours(scenes, g)
    assert rgb.shape == (400, 3) and len(set(nearest_colour(rgb))) == 6  # every palette region is drawn
    assert not any((s.shape, c) in HELDOUT_PAIRS for s, c in zip(scenes, nearest_colour(rgb)))
    palette = torch.tensor([[0.90, 0.10, 0.10]] * 4)
    red = [Scene(s.shape, "red", s.size, s.position, s.background, s.dx, s.dy) for s in scenes[:4]]
    assert torch.equal(render(scenes[:4], palette), render(red))  # an override equal to a palette colour
    x = render(scenes[:4], rgb[:4])
    centre = [x[i, :, int(POSITIONS[s.position][1] + s.dy), int(POSITIONS[s.position][0] + s.dx)]
              for i, s in enumerate(scenes[:4])]
    assert torch.allclose(torch.stack(centre), rgb[:4])


