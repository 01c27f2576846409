"""Prompt sets: a text file (one prompt per line) or a built-in set.

Built-in: `simple-animals` (the 45 animal names of DDPO/AlignProp-style experiments), and the embedded
world's `world-train` / `world-heldout` (held-out compositions never seen in pretraining).
"""

from __future__ import annotations

from pathlib import Path

from shortft.errors import ConfigError, MissingFileError

HERE = Path(__file__).parent


def _world(split: str):
    def load() -> list[str]:
        from shortft.world.scenes import prompt_split

        return prompt_split(split)

    return load


PROMPT_SETS = {
    "simple-animals": lambda: (HERE / "simple-animals.txt").read_text().split("\n"),
    "world-train": _world("train"),
    "world-heldout": _world("heldout"),
}


def load_prompts(spec: str) -> list[str]:
    """A built-in set's prompts, or the non-empty lines of a text file; clear errors otherwise."""
    if spec in PROMPT_SETS:
        prompts = PROMPT_SETS[spec]()
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MissingFileError(f"prompt file {spec!r} does not exist; give a text file with one prompt per "
                                    f"line or a built-in set: {', '.join(PROMPT_SETS)}")
        prompts = path.read_text().split("\n")
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ConfigError(f"prompt source {spec!r} holds no prompts")
    return prompts
