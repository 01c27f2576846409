"""Model-based rewards on tiny random-weight models of the real architecture families (open_clip ViT for
HPS v2, transformers CLIPModel for PickScore / world_clip / aesthetic), written to disk in the authors'
formats and loaded back through the reward's own loading code.

Parity tolerance (bicubic resize: torch's antialiased kernel on floats vs PIL/torchvision on uint8,
which rounds and clips): preprocessed pixels agree to a mean absolute difference < 0.005 (normalised
units, ~1/4 of a uint8 step), and scores to |Δ| <= 0.01 · (|score| + 1).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from shortft.rewards import RewardSettings, RewardWeightsError, build_reward
from shortft.rewards.hps import HPSReward
from shortft.rewards.jpeg import procedural_images
from shortft.rewards.testing import (
    TINY_OPEN_CLIP,
    make_tiny_aesthetic_mlp,
    make_tiny_clip,
    make_tiny_hps,
)

PROMPTS = ["a red circle on the left", "a photo of a cat", "two dogs in the snow", "x"]


@pytest.fixture(scope="module")
def tiny_rewards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return {
        "hps": make_tiny_hps(root / "hps"),
        "pick": make_tiny_clip(root / "pick"),  # OPENAI mean/std, 224, like the laion processor
        "world": make_tiny_clip(root / "world", image_size=64, patch=8, mean=(0.5,) * 3, std=(0.5,) * 3),
        "aes_clip": make_tiny_clip(root / "aes_clip", projection_dim=768),
        "aes_mlp": make_tiny_aesthetic_mlp(root / "aes" / "sac+logos+ava1-l14-linearMSE.pth"),
        "root": root,
    }


def settings(t) -> RewardSettings:
    return RewardSettings(paths={"pickscore": str(t["pick"]), "pickscore_processor": str(t["pick"]),
                                 "world_clip": str(t["world"]), "aesthetic": str(t["aes_mlp"].parent),  # a folder holding the named file
                                 "aesthetic_clip": str(t["aes_clip"])})


def images(size: int = 512, h: int | None = None, n: int = 4) -> torch.Tensor:
    """uint8-exact images (so the PIL path starts from the same pixels) in [0, 1]."""
    x = (procedural_images(n, size, seed=3) * 255).round() / 255
    return x[:, :, : (h or size)]


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in x]


def all_rewards(t):
    s = settings(t)
    out = {"hpsv2": HPSReward.load(t["hps"], arch=TINY_OPEN_CLIP)}
    for name in ("pickscore", "world_clip", "aesthetic", "symmetry", "compressibility", "incompressibility"):
        out[name] = build_reward(name, s)
    return out


def test_every_reward_gradient_reaches_images_and_weights_stay_frozen(tiny_rewards):
    for name, reward in all_rewards(tiny_rewards).items():
        modules = [m for m in vars(reward).values() if isinstance(m, torch.nn.Module)]
        before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
        x = images(128, h=96, n=2).requires_grad_(True)
        scores = reward(x, PROMPTS[:2])
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
        scores.sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name
        for m, b in zip(modules, before):
            assert all(p.grad is None and not p.requires_grad for p in m.parameters()), name
            assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items()), name


def test_hps_parity_with_open_clip_transform(tiny_rewards):
    import open_clip

    reward = HPSReward.load(tiny_rewards["hps"], arch=TINY_OPEN_CLIP)
    _, _, preprocess = open_clip.create_model_and_transforms(TINY_OPEN_CLIP)  # the authors' eval transform
    tok = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    for x in (images(512), images(512, h=384)):  # square SD-size and non-square (crop path)
        pix = torch.stack([preprocess(p) for p in to_pil(x)])
        assert (pix - reward.preprocess(x)).abs().mean() < 0.005
        with torch.no_grad():  # official score: both features normalised, diagonal, x100
            img = reward.model.encode_image(pix, normalize=True)
            txt = reward.model.encode_text(tok(PROMPTS), normalize=True)
            official = 100 * (img @ txt.T).diagonal()
        ours = reward(x, PROMPTS)
        assert (ours - official).abs().max() <= 0.01 * (official.abs().max() + 1), (ours, official)


@pytest.mark.parametrize("which,size", [("pick", 512), ("world", 64)])
def test_clip_preference_parity_with_processor(tiny_rewards, which, size):
    from transformers import CLIPImageProcessor, CLIPTokenizer

    name = "pickscore" if which == "pick" else "world_clip"
    reward = build_reward(name, settings(tiny_rewards))
    proc = CLIPImageProcessor.from_pretrained(tiny_rewards[which])
    tok = CLIPTokenizer.from_pretrained(tiny_rewards[which])
    for x in (images(size), images(size, h=size * 3 // 4)):
        pix = proc(images=to_pil(x), return_tensors="pt").pixel_values
        assert pix.shape[-2:] == reward.preprocess(x).shape[-2:]
        assert (pix - reward.preprocess(x)).abs().mean() < 0.005
        with torch.no_grad():  # PickScore's published inference code
            ids = tok(PROMPTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
            img = reward.model.get_image_features(pixel_values=pix)
            txt = reward.model.get_text_features(**ids)
            img, txt = (getattr(o, "pooler_output", o) for o in (img, txt))
            img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
            official = (reward.model.logit_scale.exp() * txt @ img.T).diagonal()
        ours = reward(x, PROMPTS)
        assert (ours - official).abs().max() <= 0.01 * (official.abs().max() + 1), (ours, official)


def test_aesthetic_parity_and_mlp_layout(tiny_rewards):
    from transformers import CLIPImageProcessor, CLIPModel

    reward = build_reward("aesthetic", settings(tiny_rewards))
    assert sorted(reward.mlp.state_dict()) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("bias", "weight")]
    x = images(512)
    pix = CLIPImageProcessor.from_pretrained(tiny_rewards["aes_clip"])(images=to_pil(x), return_tensors="pt").pixel_values
    clip = CLIPModel.from_pretrained(tiny_rewards["aes_clip"]).eval()
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=pix)
        emb = getattr(emb, "pooler_output", emb)
        official = reward.mlp(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    ours = reward(x, PROMPTS)
    assert (ours - official).abs().max() <= 0.01 * (official.abs().max() + 1)


def test_world_clip_reads_processor_config(tiny_rewards):
    reward = build_reward("world_clip", settings(tiny_rewards))
    assert reward.cfg == {"size": 64, "crop": (64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3}


def test_combined_equals_weighted_sum_and_regulariser(tiny_rewards):
    from shortft.rewards import WeightedSum, build_regularised_reward

    s = settings(tiny_rewards)
    combined = build_reward("pickscore=10,world_clip=2,aesthetic=0.05", s)
    assert isinstance(combined, WeightedSum)
    x = images(128, n=2)
    parts = {n: build_reward(n, s)(x, PROMPTS[:2]) for n in ("pickscore", "world_clip", "aesthetic")}
    expect = 10 * parts["pickscore"] + 2 * parts["world_clip"] + 0.05 * parts["aesthetic"]
    torch.testing.assert_close(combined(x, PROMPTS[:2]), expect, rtol=1e-5, atol=1e-4)
    # regulariser: main + lam * (1 * hpsv2 + 10 * pickscore); the main reward's pickscore is reused
    mix = (("world_clip", 1.0), ("pickscore", 10.0))  # tiny stand-in for hpsv2: world_clip
    reg = build_regularised_reward(combined, 0.5, s, mix=mix)
    assert [n for n, _, _ in reg.parts][-2:] == ["reg:world_clip", "reg:pickscore"]
    assert reg.parts[-1][2] is combined.parts[0][2]  # same object: loaded once
    torch.testing.assert_close(reg(x, PROMPTS[:2]), expect + 0.5 * (parts["world_clip"] + 10 * parts["pickscore"]),
                               rtol=1e-5, atol=1e-4)


def test_bad_weights_are_clear_errors(tiny_rewards, tmp_path):
    import open_clip  # noqa: F401  (tiny config registered by the fixture)

    with pytest.raises(RewardWeightsError, match="does not exist"):
        HPSReward.load(tmp_path / "nope" / "HPS_v2_compressed.pt", arch=TINY_OPEN_CLIP)
    with pytest.raises(RewardWeightsError, match=r"holds none of \['HPS_v2_compressed.pt'\]"):
        HPSReward.load(tmp_path, arch=TINY_OPEN_CLIP)
    bad = tmp_path / "bad.pt"
    state = torch.load(tiny_rewards["hps"], weights_only=True)["state_dict"]
    torch.save({k.replace("visual.", "vision."): v for k, v in state.items()}, bad)
    with pytest.raises(RewardWeightsError, match="missing keys"):
        HPSReward.load(bad, arch=TINY_OPEN_CLIP)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardWeightsError, match="not a loadable"):
        HPSReward.load(tmp_path / "junk.pt", arch=TINY_OPEN_CLIP)
    mlp = tmp_path / "mlp.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, mlp)
    s = settings(tiny_rewards)
    with pytest.raises(RewardWeightsError, match="missing keys"):
        build_reward("aesthetic", RewardSettings(paths={**s.paths, "aesthetic": str(mlp)}))
    with pytest.raises(RewardWeightsError, match="does not exist"):
        build_reward("pickscore", RewardSettings(paths={**s.paths, "pickscore": str(tmp_path / "none")}))
    # a CLIP that is not ViT-L/14-sized for the MLP
    with pytest.raises(RewardWeightsError, match="ViT-L/14"):
        build_reward("aesthetic", RewardSettings(paths={**s.paths, "aesthetic_clip": str(tiny_rewards["pick"])}))
    # a CLIP folder with a weight missing: transformers would initialise it at random
    from safetensors.torch import load_file, save_file

    broken = make_tiny_clip(tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "visual_projection" not in k}, broken / "model.safetensors")
    with pytest.raises(RewardWeightsError, match="lacks"):
        build_reward("pickscore", RewardSettings(paths={"pickscore": str(broken), "pickscore_processor": str(broken)}))


def test_low_precision_images_keep_their_gradient(tiny_rewards):
    """A bf16 decode (mixed precision) is scored in fp32 and the gradient comes back in bf16."""
    reward = build_reward("world_clip", settings(tiny_rewards))
    x = images(64, n=2).to(torch.bfloat16).requires_grad_(True)
    reward(x, PROMPTS[:2]).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0
