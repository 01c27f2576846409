"""Method registry: every method builds plans for the one chain engine (see shortft.chain)."""

from shortft.methods.alignprop import AlignProp
from shortft.methods.base import Method, Rollout
from shortft.methods.draft import DraftK, DraftLV
from shortft.methods.drtune import DRTune
from shortft.methods.full import Full
from shortft.methods.leapalign import LeapAlign
from shortft.methods.refl import ReFL
from shortft.methods.shortcut_ft import ShortcutFT
from shortft.methods.shortft import ShortFT

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (ShortFT, DraftK, DraftLV, AlignProp, DRTune, ReFL, Full, ShortcutFT, LeapAlign)
}

__all__ = ["METHODS", "Method", "Rollout"]
