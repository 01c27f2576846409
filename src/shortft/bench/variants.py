"""The rows of `shortft bench compare`: every variant it can train, and which rows each table shows."""

# name -> (method, config overrides). Table 1 rows (and LeapAlign beside them), then Table 3's ablations, then
# Table 2's variant.
VARIANTS: dict[str, tuple[str, dict]] = {
    "shortft": ("shortft", {}),
    "draft-lv": ("draft-lv", {}),
    "drtune": ("drtune", {}),
    "alignprop": ("alignprop", {}),
    "draft-k": ("draft", {}),  # K = the config's draft_k (default 1)
    "refl": ("refl", {}),
    "full": ("full", {}),
    "leapalign": ("leapalign", {}),  # LeapAlign (CVPR 2026) at its paper's defaults: alpha 0.3, tau 0.1, any k > j
    "shortft-no-tlora": ("shortft", {"tlora": False}),
    "shortft-no-progressive": ("shortft", {"progressive": False}),
    "shortcut-ft": ("shortcut-ft", {}),
    "shortft-naive-jump": ("shortft", {"shortcut": "none"}),  # no distilled shortcut: the base model's own jump
}
TABLE1 = ["shortft", "draft-lv", "drtune", "alignprop", "draft-k", "refl", "full", "leapalign"]
ABLATIONS = ["shortft", "shortft-no-tlora", "shortft-no-progressive"]
TABLE2 = ["shortft", "shortcut-ft"]
FIDELITY = ["shortft", "shortft-naive-jump"]  # how much the shortcut's fidelity matters
BASES = ("base", "base-shortcut")  # untuned rows: the original chain; the shortcut model on its own chain
