"""The asset factory on the tiny preset: the real tokenizer; a few optimisation steps of each part lower its
loss and write folders that load through diffusers/transformers; the shipped preset builds the shipped
networks; checkpoints resume exactly and refuse pickled code."""

import argparse
import hashlib
import json
import pathlib
import shutil

import open_clip
import pytest
import torch

from shortft import config
from shortft.cli import main
from shortft.errors import ConfigError
from shortft.factory import clip as C
from shortft.factory import resume
from shortft.factory import unet as U
from shortft.factory import vae as V
from shortft.factory.config import PART_NAMES, PretrainConfig, build_config
from shortft.factory.pretrain import PARTS, run_pretrain
from shortft.factory.tokenizer import load_tokenizer, tokenize
from shortft.files import CorruptCheckpoint
from shortft.world import ASSETS
from shortft.world.scenes import MAX_TOKENS, caption, prompt_split, render, sample_scenes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run many times faster on one thread than on two shared ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(root, **overrides) -> PretrainConfig:
    """The tiny preset writing below `root`; overrides use dotted keys: tiny_cfg(root, **{"vae.steps": 5})."""
    return build_config("tiny", {"out": str(root / "assets"), "work_dir": str(root / "work"), **overrides})


def copy_assets(cfg: PretrainConfig, root, **overrides) -> PretrainConfig:
    """A copy of cfg's assets below `root` and the tiny config that writes there."""
    new = tiny_cfg(root, **overrides)
    shutil.copytree(cfg.root, new.root)
    return new


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """Every part but the shortcut on the tiny preset (4 steps each): the tiny preset's `--part all` inputs."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("world"))
    for part in ("tokenizer", "vae", "clip", "unet", "vae_decoder"):
        run_pretrain(cfg, part)
    return cfg


def _first_last(losses, k):
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def test_tokenizer_ids_equal_open_clip(tiny_assets):
    tok = load_tokenizer(tiny_assets.root / "model" / "tokenizer")
    caps = [caption(s, i) for i, s in enumerate(sample_scenes(100, "train", seed=0))] + prompt_split("heldout")
    ids = tokenize(tok, caps)  # (N, 32), padded with <|endoftext|>
    ref = open_clip.tokenize(caps, context_length=MAX_TOKENS)  # padded with 0
    n = (ref != 0).sum(1)
    assert int(n.max()) < MAX_TOKENS
    for i in range(len(caps)):
        assert torch.equal(ids[i, : n[i]], ref[i, : n[i]]), caps[i]
    assert tok.vocab_size == 49408
    for folder in ("model/tokenizer", "clip"):  # what ships: vocab.json + merges.txt, byte for byte
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            assert (tiny_assets.root / folder / name).read_bytes() == (ASSETS / folder / name).read_bytes()
        assert not (tiny_assets.root / folder / "tokenizer.json").exists()


def test_shipped_preset_builds_the_shipped_networks():
    """The shipped preset's networks have the configs of the shipped weights."""
    from transformers import CLIPTextConfig

    cfg = build_config("shipped")
    assert cfg == PretrainConfig() and cfg.root == ASSETS and cfg.unet.text == "clip-tuned"
    assert (cfg.vae.steps, cfg.decoder.steps, cfg.unet.steps, cfg.clip.steps) == (3000, 2000, 5000, 1000)
    shipped = {part: json.loads((ASSETS / part / "config.json").read_text())
               for part in ("model/vae", "model/unet", "model/text_encoder", "clip")}
    for key, value in V.vae_config(cfg.vae.tiny).items():
        assert shipped["model/vae"][key] == (list(value) if isinstance(value, tuple) else value), key
    for key, value in U.unet_config(cfg.unet.tiny, 48).items():
        assert shipped["model/unet"][key] == (list(value) if isinstance(value, tuple) else value), key
    clip = C.clip_config(cfg.clip.tiny).to_dict()
    for tower in ("text_config", "vision_config"):
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            assert clip[tower].get(key) == shipped["clip"][tower].get(key), (tower, key)
    assert clip["projection_dim"] == shipped["clip"]["projection_dim"]
    text = CLIPTextConfig(**shipped["model/text_encoder"])  # clip-tuned: the UNet's encoder is the CLIP's tower
    assert text.hidden_size == clip["text_config"]["hidden_size"] == shipped["model/unet"]["cross_attention_dim"]


def test_each_part_trains_and_saves(tiny_assets, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPModel

    # unet.text=joint: the jointly trained text encoder (the next test covers the CLIP tower)
    cfg = copy_assets(tiny_assets, tmp_path, **{"vae.steps": 60, "decoder.steps": 12, "unet.steps": 60,
                                                "clip.steps": 40, "unet.text": "joint"})
    _, losses = V.pretrain_vae(cfg)
    first, last = _first_last(losses, 10)
    assert last < 0.8 * first, (first, last)
    assert 0.05 < AutoencoderKL.from_pretrained(cfg.root / "model" / "vae").config.scaling_factor < 50
    _, losses = V.pretrain_vae_decoder(cfg)
    first, last = _first_last(losses, 4)  # an even count: half the steps decode noisy latents
    assert last < first, (first, last)
    _, _, losses = U.pretrain_unet(cfg)
    first, last = _first_last(losses, 20)
    assert last < first, (first, last)
    pipe = StableDiffusionPipeline.from_pretrained(cfg.root / "model", safety_checker=None,
                                                   requires_safety_checker=False)
    img = pipe(["a red circle on the left"], num_inference_steps=2, height=64, width=64, output_type="pt").images
    assert img.shape == (1, 3, 64, 64)
    _, losses = C.pretrain_clip(cfg)
    first, last = _first_last(losses, 10)
    assert last < first, (first, last)
    assert isinstance(CLIPModel.from_pretrained(cfg.root / "clip"), CLIPModel)


def test_unet_can_use_the_frozen_clip_text_tower(tiny_assets, tmp_path):
    """unet.text=clip: the UNet cross-attends to the world CLIP's text tower, which stays frozen and is
    saved as the model's text encoder; clip-tuned starts from the same tower and trains it."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    cfg = copy_assets(tiny_assets, tmp_path, **{"unet.text": "clip", "unet.steps": 40})
    tower = CLIPModel.from_pretrained(cfg.root / "clip").text_model.state_dict()
    unet, text, losses = U.pretrain_unet(cfg)
    first, last = _first_last(losses, 10)
    assert last < first, (first, last)
    assert unet.config.cross_attention_dim == text.config.hidden_size == 16  # the tiny CLIP's text width
    saved = CLIPTextModel.from_pretrained(cfg.root / "model" / "text_encoder").state_dict()
    assert saved.keys() == tower.keys()
    for k in tower:  # frozen: the shipped text encoder is the CLIP tower (fp16 round trip)
        assert torch.allclose(saved[k].float(), tower[k].float(), atol=1e-2), k
    assert UNet2DConditionModel.from_pretrained(cfg.root / "model" / "unet").config.cross_attention_dim == 16
    with pytest.raises(ConfigError, match="unet.text='frozen' is not one of joint, clip, clip-tuned"):
        tiny_cfg(tmp_path, **{"unet.text": "frozen"})
    tuned_cfg = tiny_cfg(tmp_path, **{"unet.text": "clip-tuned", "unet.steps": 5})
    _, tuned, _ = U.pretrain_unet(tuned_cfg)
    assert tuned.config.hidden_size == 16
    moved = [k for k, v in tuned.state_dict().items() if not torch.equal(v, tower[k].float())]
    assert moved and "embeddings.token_embedding.weight" in moved


def test_unet_trains_on_posterior_means_not_samples(tiny_assets):
    """The encoder's posterior std is untrained (the reconstruction uses the mean, the KL weight is tiny),
    so the UNet's latents must be the means themselves: each drawn latent equals one scene's encoding."""
    from diffusers import AutoencoderKL

    tok = load_tokenizer(tiny_assets.root / "model" / "tokenizer")
    vae = AutoencoderKL.from_pretrained(tiny_assets.root / "model" / "vae").eval()
    mean, ids = U.latent_pool(vae, 8, 5, tok)
    with torch.no_grad():
        ref = vae.encode(render(sample_scenes(8, "train", seed=5)) * 2 - 1).latent_dist
    torch.testing.assert_close(mean, ref.mean)
    x0, _ = U.draw(mean, ids, 16, torch.Generator().manual_seed(0))
    nearest = torch.cdist(x0.flatten(1), mean.flatten(1)).min(1).values
    assert float(nearest.max()) == 0.0


def test_shortcut_part_distils_the_finished_model(tiny_assets, tmp_path):
    """`--part shortcut` runs `shortft distill --preset world` on the model just built and writes an fp16
    diffusers LoRA next to it that loads as ShortFT's shortcut; the model's own files are untouched."""
    from safetensors.torch import load_file

    from shortft import lora
    from shortft.backends import SDBackend

    cfg = copy_assets(tiny_assets, tmp_path)
    before = {f: f.read_bytes() for f in (cfg.root / "model").rglob("*.safetensors")}
    run_pretrain(cfg, "shortcut")
    assert {f: f.read_bytes() for f in (cfg.root / "model").rglob("*.safetensors")} == before
    sd = load_file(cfg.root / "shortcut.safetensors")
    assert sd and {v.dtype for v in sd.values()} == {torch.float16}
    log = json.loads((cfg.work / "shortcut" / "distill.json").read_text())
    assert log["steps_done"] == 3 and log["guidance"] == 5.0
    assert (log["config"]["decay"], log["config"]["student_guidance"], log["config"]["anchor_fraction"]) == (
        "cosine", 5.0, 0.5)
    backend = SDBackend.load(str(cfg.root / "model"))
    lora.load_lora(backend.net, cfg.root / "shortcut.safetensors", "shortcut")
    loaded = lora.lora_state_dict(backend.net, "shortcut")
    assert loaded.keys() == sd.keys()
    for k in sd:  # the distilled weights, not a fresh adapter
        torch.testing.assert_close(loaded[k], sd[k].float())


# --- resuming -------------------------------------------------------------------------------------------
SECTION = {"vae": "vae", "vae_decoder": "decoder", "unet": "unet"}  # part -> its config section


def _train(part: str, cfg: PretrainConfig) -> tuple[dict, list]:
    """Run a long part; (its trained weights, fp32, the losses of the steps this run took)."""
    if part == "unet":
        unet, text, losses = U.pretrain_unet(cfg)
        return {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                **{f"text.{k}": v for k, v in text.state_dict().items()}}, losses
    vae, losses = (V.pretrain_vae if part == "vae" else V.pretrain_vae_decoder)(cfg)
    return vae.state_dict(), losses


class _Stop(Exception):
    pass


@pytest.mark.parametrize("part", list(SECTION))
def test_interrupted_part_resumes_to_the_same_weights(part, tiny_assets, tmp_path, monkeypatch):
    """4 steps in one go, and 4 steps stopped after the checkpoint at step 2 then resumed, end with the same
    weights; resuming with other settings is refused."""
    s = SECTION[part]
    steps = {f"{s}.steps": 4, f"{s}.checkpoint_every": 2, "unet.text": "joint"}
    whole, whole_losses = _train(part, copy_assets(tiny_assets, tmp_path / "whole", **steps))

    cfg = copy_assets(tiny_assets, tmp_path / "split", **steps)
    step_done = resume.Checkpointer.step_done

    def stop_after_2(self, step):
        saved = step_done(self, step)
        if step == 2:
            raise _Stop
        return saved

    monkeypatch.setattr(resume.Checkpointer, "step_done", stop_after_2)
    with pytest.raises(_Stop):
        _train(part, cfg)
    monkeypatch.undo()
    assert json.loads((cfg.work / part / "state.json").read_text())["step"] == 2
    with pytest.raises(ConfigError, match="other settings"):
        _train(part, tiny_cfg(tmp_path / "split", **steps, **{f"{s}.lr": 0.123}))
    resumed, losses = _train(part, cfg)
    assert losses == pytest.approx(whole_losses[2:], abs=1e-6)  # only steps 3 and 4 ran
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], atol=1e-6, rtol=0, msg=k)


class _Payload:
    """A pickle that creates a file when loaded unsafely."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _plant_malicious_checkpoint(folder, marker) -> None:
    """A checkpoint folder whose optimizer.pt runs code when unpickled; its manifest matches (an attacker
    who can write the file can write the manifest), so only the weights_only load stands in the way."""
    folder.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, folder / "tensors.safetensors")
    torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": 1, "settings": {}}))
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                for p in sorted(folder.iterdir())}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("part", list(SECTION))
def test_resume_refuses_a_pickled_payload(part, tiny_assets, tmp_path, capsys):
    """Each resume path loads optimizer.pt with weights_only=True: a payload is refused with a one-line
    error (exit 2), and never runs."""
    cfg = copy_assets(tiny_assets, tmp_path)
    marker = tmp_path / "payload-ran"
    _plant_malicious_checkpoint(cfg.work / part, marker)
    with pytest.raises(CorruptCheckpoint, match="optimizer.pt holds objects other than tensors"):
        _train(part, tiny_cfg(tmp_path, **{f"{SECTION[part]}.checkpoint_every": 2, "unet.text": "joint"}))
    assert not marker.exists()
    capsys.readouterr()
    rc = main(["world", "pretrain", "--preset", "tiny", "--part", part, "--out", str(cfg.root),
               "--work-dir", str(cfg.work), "unet.text=joint"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "refusing to load it" in err and "\n" not in err and not marker.exists()


def test_cli_sets_sections_and_reports_bad_input(tmp_path, capsys):
    """`--section.key V` and `section.key=V` reach the config; bad keys, values and missing inputs exit 2
    with one line."""
    from shortft.factory.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["world", "pretrain", "--vae.steps", "500", "unet.text=joint", "--work-dir", "W"])
    cfg = build_config(args.preset, config.overrides_from_args(PretrainConfig, args))
    assert (cfg.vae.steps, cfg.unet.text, cfg.work_dir, cfg.unet.steps) == (500, "joint", "W", 5000)
    assert tuple(PARTS) == PART_NAMES  # the CLI's choices are the parts, in the order --part all runs them
    with pytest.raises(ConfigError, match="unknown part 'unet2'"):
        run_pretrain(cfg, "unet2")
    for argv, message in ((["vae_steps=5"], "unknown config key 'vae_steps'"),
                          (["--vae.steps", "many"], "'vae.steps' expects int"),
                          (["unet.text=frozen"], "is not one of joint, clip, clip-tuned"),
                          (["--clip.batch", "0"], "clip.batch must be >= 1"),
                          (["--part", "unet", "--out", str(tmp_path / "empty")], "--part tokenizer")):
        assert main(["world", "pretrain", "--preset", "tiny", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)


def test_world_eval_command(tmp_path, capsys):
    """`shortft world eval` on real images only: the evaluator reads them perfectly, the JSON holds what the
    table shows; a missing model folder is a one-line error."""
    out = tmp_path / "eval.json"
    assert main(["world", "eval", "--skip", "model", "clip", "--real", "8", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["real"]["train"]["mean"] == res["real"]["heldout"]["mean"] == 1.0
    assert "| real | heldout | 1.000 |" in capsys.readouterr().out
    assert main(["world", "eval", "--skip", "real", "clip", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(tmp_path / "none") in err and "does not exist" in err and "\n" not in err


def test_the_flow_part_trains_an_sd3_pipeline_folder_that_a_stock_pipeline_loads(tiny_assets, tmp_path):
    """`--part flow`: the transformer's velocity loss falls; flow-model/ loads through the SD 3 backend and a
    stock StableDiffusion3Pipeline (with the folder's max_sequence_length), which give the same images."""
    from diffusers import StableDiffusion3Pipeline

    from shortft.backends import SD3Backend, load_backend
    from shortft.chain import sampling_plan
    from shortft.factory.flow import FLOW_T5_LENGTH, pretrain_flow
    from shortft.sample import generate

    cfg = copy_assets(tiny_assets, tmp_path, **{"flow.steps": 40})
    _, _, losses = pretrain_flow(cfg)
    first, last = _first_last(losses, 10)
    assert last < first, (first, last)
    folder = cfg.root / "flow-model"
    assert json.loads((folder / "shortft.json").read_text()) == {"max_sequence_length": FLOW_T5_LENGTH}
    assert (folder / "tokenizer" / "vocab.json").read_bytes() == (cfg.root / "model" / "tokenizer" / "vocab.json").read_bytes()
    backend = load_backend(str(folder))
    assert isinstance(backend, SD3Backend) and backend.t5 is None and backend.t5_length == FLOW_T5_LENGTH
    prompts = prompt_split("heldout")[:2]
    ours = generate(backend, sampling_plan(backend.timesteps(4), lambda i: (), 3.0), prompts, [0, 1])
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    theirs = pipe(prompts, num_inference_steps=4, guidance_scale=3.0, height=64, width=64, output_type="pt",
                  max_sequence_length=FLOW_T5_LENGTH, generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert ours.shape == (2, 3, 64, 64) and (ours - theirs).abs().max() < 1e-3
