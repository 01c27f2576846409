"""World pretraining code on tiny configs: the real tokenizer, and a few optimisation steps of each
part lower its loss and write folders that load through diffusers/transformers."""

import dataclasses
import json
import shutil

import open_clip
import pytest
import torch

from shortft.factory import pretrain as P
from shortft.world.scenes import caption, prompt_split, sample_scenes


@pytest.fixture(scope="module")
def tiny_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    cfg = P.PretrainConfig(out=root / "assets", work_dir=root / "work", tiny=True)
    tok = P.build_tokenizer(cfg.out / "model" / "tokenizer")
    shutil.copytree(cfg.out / "model" / "tokenizer", cfg.out / "clip")
    return cfg, tok


def test_tokenizer_ids_equal_open_clip(tiny_out):
    _, tok = tiny_out
    caps = [caption(s, i) for i, s in enumerate(sample_scenes(100, "train", seed=0))] + prompt_split("heldout")
    ids = P.tokenize(tok, caps)  # (N, 32), padded with <|endoftext|>
    ref = open_clip.tokenize(caps, context_length=P.MAX_TOKENS)  # padded with 0
    n = (ref != 0).sum(1)
    assert int(n.max()) < P.MAX_TOKENS
    for i in range(len(caps)):
        assert torch.equal(ids[i, : n[i]], ref[i, : n[i]]), caps[i]
    assert tok.vocab_size == 49408


def _first_last(losses, k):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_vae_unet_clip_train_and_save(tiny_out):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel

    cfg, _ = tiny_out
    torch.manual_seed(0)
    cfg.vae_steps, cfg.unet_steps, cfg.clip_steps = 60, 60, 40
    cfg.unet_text = "joint"  # the jointly trained text encoder (the next test covers the frozen CLIP tower)
    vae, losses = P.pretrain_vae(cfg)
    first, last = _first_last(losses, 10)
    assert last < 0.8 * first, (first, last)
    loaded = AutoencoderKL.from_pretrained(cfg.out / "model" / "vae")
    assert 0.05 < loaded.config.scaling_factor < 50
    unet, text, losses = P.pretrain_unet(cfg)
    first, last = _first_last(losses, 20)
    assert last < first, (first, last)
    pipe = StableDiffusionPipeline.from_pretrained(cfg.out / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    img = pipe(["a red circle on the left"], num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert img.shape == (1, 3, 64, 64)
    _, losses = P.pretrain_clip(cfg)
    first, last = _first_last(losses, 10)
    assert last < first, (first, last)
    assert isinstance(CLIPModel.from_pretrained(cfg.out / "clip"), CLIPModel)


def test_unet_can_use_the_frozen_clip_text_tower(tiny_out):
    """unet_text="clip": the UNet cross-attends to the world CLIP's text tower, which stays frozen and is
    saved as the model's text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    base, _ = tiny_out
    cfg = dataclasses.replace(base, unet_text="clip", out=base.out.parent / "assets-clip-text")
    shutil.copytree(base.out, cfg.out)
    cfg.vae_steps, cfg.clip_steps, cfg.unet_steps = 2, 2, 40
    if not (cfg.out / "model" / "vae").is_dir():
        P.pretrain_vae(cfg)
    P.pretrain_clip(cfg)
    tower = CLIPModel.from_pretrained(cfg.out / "clip").text_model.state_dict()
    unet, text, losses = P.pretrain_unet(cfg)
    first, last = _first_last(losses, 10)
    assert last < first, (first, last)
    assert unet.config.cross_attention_dim == text.config.hidden_size == 16  # the tiny CLIP's text width
    saved = CLIPTextModel.from_pretrained(cfg.out / "model" / "text_encoder").state_dict()
    assert saved.keys() == tower.keys()
    for k in tower:  # frozen: the shipped text encoder is the CLIP tower (fp16 round trip)
        assert torch.allclose(saved[k].float(), tower[k].float(), atol=1e-2), k
    assert UNet2DConditionModel.from_pretrained(cfg.out / "model" / "unet").config.cross_attention_dim == 16
    with pytest.raises(ValueError, match="unet_text='frozen'; valid"):
        P.run_pretrain(dataclasses.replace(cfg, unet_text="frozen"), "unet")
    # clip-tuned: the same tower is the starting point and it trains with the UNet
    tuned_cfg = dataclasses.replace(cfg, unet_text="clip-tuned", unet_steps=5, work_dir=cfg.work_dir / "tuned")
    _, tuned, _ = P.pretrain_unet(tuned_cfg)
    assert tuned.config.hidden_size == 16
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, tower[k].float())]
    assert moved and "embeddings.token_embedding.weight" in moved


def test_unet_trains_on_posterior_means_not_samples(tiny_out):
    """The encoder's posterior std is untrained (the reconstruction uses the mean, the KL weight is tiny),
    so the UNet's latents must be the means themselves: each drawn latent equals one scene's encoding."""
    from diffusers import AutoencoderKL

    from shortft.world.scenes import render

    cfg, tok = tiny_out
    if not (cfg.out / "model" / "vae").is_dir():
        P.pretrain_vae(cfg)
    vae = AutoencoderKL.from_pretrained(cfg.out / "model" / "vae").eval()
    mean, ids = P._latent_pool(vae, 8, 5, tok)
    with torch.no_grad():
        ref = vae.encode(render(sample_scenes(8, "train", seed=5)) * 2 - 1).latent_dist
    torch.testing.assert_close(mean, ref.mean)
    x0, _ = P._draw(mean, ids, 16, torch.Generator().manual_seed(0))
    nearest = torch.cdist(x0.flatten(1), mean.flatten(1)).min(1).values
    assert float(nearest.max()) == 0.0


def test_shortcut_part_distils_the_finished_model(tiny_out):
    """`world pretrain --part shortcut` runs `shortft distill` on the model it just built and writes an
    fp16 diffusers LoRA next to it that loads as ShortFT's shortcut; the model's own files are untouched."""
    from safetensors.torch import load_file

    from shortft import lora
    from shortft.backends import SDBackend

    cfg, _ = tiny_out
    if not (cfg.out / "model" / "unet").is_dir():
        P.pretrain_vae(cfg)
        P.pretrain_unet(cfg)
    before = {f: f.read_bytes() for f in (cfg.out / "model").rglob("*.safetensors")}
    P.run_pretrain(cfg, "shortcut")
    assert {f: f.read_bytes() for f in (cfg.out / "model").rglob("*.safetensors")} == before
    sd = load_file(cfg.out / "shortcut.safetensors")
    assert sd and {v.dtype for v in sd.values()} == {torch.float16}
    log = json.loads((cfg.work_dir / "shortcut" / "distill.json").read_text())
    assert log["steps_done"] == 3 and log["guidance"] == 5.0
    assert (log["config"]["decay"], log["config"]["student_guidance"], log["config"]["teacher_steps"]) == ("cosine", 5.0, 0)
    backend = SDBackend.load(str(cfg.out / "model"))
    lora.load_lora(backend.net, cfg.out / "shortcut.safetensors", "shortcut")
    loaded = lora.lora_state_dict(backend.net, "shortcut")
    assert loaded.keys() == sd.keys()
    for k in sd:  # the distilled weights, not a fresh adapter
        torch.testing.assert_close(loaded[k], sd[k].float())


