"""Why does a world model ignore an attribute? Probe each stage of the chain for one attribute.

    python -m shortft.world.probe [--model FOLDER] [--attribute position]

For one caption and each value of the attribute (everything else fixed) it prints:
1. the VAE: the attribute read back by the evaluator from reconstructions of real held-out images
   (can the latent carry it at all?);
2. the text encoder: how far the token features move when only that word changes, next to changing
   the colour (does the text carry it?);
3. the UNet: how far epsilon moves at several timesteps when only that word changes, next to the
   colour and to the empty caption (does the UNet listen?);
4. samples: the attribute the evaluator reads from 50-step CFG samples of the same 8 noises per value
   (does it come out?).

    python -m shortft.world.probe --splice [--model FOLDER]

Which token states carry shape and colour to the UNet? Every held-out prompt is encoded twice, as it is
and with its colour word changed to red (seen with every shape); samples from the held-out encoding
with some positions taken from the red one tell which positions the UNet reads shape from. A last row
builds every state from train pairs, as an additive text tower would give it.
"""

from __future__ import annotations

import argparse

import torch

from .evaluate_world import generate, load_pipeline
from .evaluator import prompt_fidelity, read_attributes
from .scenes import (
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    caption,
    is_heldout,
    parse_prompt,
    prompt_split,
    render,
    sample_scenes,
)

ATTRS = ("position", "size")  # the attributes this probe varies (one word or phrase of the caption)


def _captions(attribute: str) -> tuple[list[str], list[str], str]:
    """Captions of a large red circle on black that differ only in `attribute`, their values, and the
    same caption with the colour changed (the reference for a word the model does use)."""
    base = dict(shape="circle", colour="red", size="large", position="left", background="black")
    values = list(POSITION_PHRASES) if attribute == "position" else list(SIZES)
    caps = [caption(Scene(**{**base, attribute: v}), 0) for v in values]
    return caps, values, caption(Scene(**{**base, "colour": "green"}), 0)


@torch.no_grad()
def probe(model=None, attribute: str = "position", noises: int = 8, seed: int = 0) -> dict:
    if attribute not in ATTRS:
        raise ValueError(f"attribute {attribute!r} not in {list(ATTRS)}")
    pipe = load_pipeline(model)
    caps, values, recoloured = _captions(attribute)
    out: dict = {"captions": caps}

    scenes = sample_scenes(64, "heldout", seed=3)
    x = render(scenes) * 2 - 1
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    read = read_attributes(((rec + 1) / 2).clamp(0, 1))
    out["vae_readback"] = sum(r[attribute] == getattr(s, attribute) for r, s in zip(read, scenes)) / len(scenes)

    tok = pipe.tokenizer
    ids = tok(caps + [recoloured, ""], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    h = pipe.text_encoder(ids).last_hidden_state  # (V+2, L, D)
    moved = lambda i: float((h[i] - h[0]).norm(dim=-1).mean())  # noqa: E731  mean over tokens
    out["text_moved"] = {v: moved(i) for i, v in enumerate(values[1:], 1)}
    out["text_moved_colour"] = moved(len(caps))
    out["text_norm"] = float(h[0].norm(dim=-1).mean())

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(1, 4, 8, 8, generator=g)  # a latent of unit scale, like the scaled VAE latents
    acp = pipe.scheduler.alphas_cumprod
    out["eps_moved"] = {}
    for t in (981, 801, 601, 401, 201, 41):
        xt = acp[t].sqrt() * x0 + (1 - acp[t]).sqrt() * torch.randn(1, 4, 8, 8, generator=g)
        e = pipe.unet(xt.repeat(len(h), 1, 1, 1), torch.full((len(h),), t), encoder_hidden_states=h).sample
        d = [float((e[i] - e[0]).norm()) for i in range(len(h))]
        out["eps_moved"][t] = {"attribute (mean)": sum(d[1:len(caps)]) / (len(caps) - 1),
                               "colour": d[len(caps)], "empty caption": d[-1]}

    out["samples"] = {}
    for v, c in zip(values, caps):
        read = read_attributes(generate(pipe, [c] * noises, 50, 5.0, seed, batch=noises))
        out["samples"][v] = [r[attribute] for r in read]
    return out


SPLICES = ("none", "shape word", "words after the colour", "words after the colour + end-of-text and padding",
           "additive: (shape, red) + (other shape, colour) - (other shape, red)")


@torch.no_grad()
def splice(model=None, donor: str = "red", seed: int = 0, batch: int = 30, count: int = 90
           ) -> dict[str, dict[str, float]]:
    """Evaluator fidelity on the first `count` held-out prompts (CFG 5, 50 steps, noise seeds seed + i, as
    `generate`) when the token states at some positions come from the same prompt with the colour word
    `donor` instead; and with every state built from train pairs, h(s, donor) + h(s', k) - h(s', donor),
    where s' is another shape seen in colour k (exact if the text tower were additive in shape and colour)."""
    from .pretrain import summary_mask, word_ids

    pipe = load_pipeline(model)
    tok, text = pipe.tokenizer, pipe.text_encoder
    prompts = prompt_split("heldout")[:count]

    def recaption(p: str, shape: str | None = None, colour: str | None = None) -> str:
        a = parse_prompt(p)
        return p.replace(a["colour"], colour or a["colour"]).replace(a["shape"], shape or a["shape"])

    def other_shape(p: str) -> str:
        a = parse_prompt(p)
        return next(s for s in SHAPES if s != a["shape"] and not is_heldout(s, a["colour"]))

    encode = lambda ps: tok(ps, padding="max_length", max_length=tok.model_max_length, truncation=True,  # noqa: E731
                            return_tensors="pt").input_ids
    ids, ids2 = encode(prompts), encode([recaption(p, colour=donor) for p in prompts])
    if not (ids != ids2).sum(1).eq(1).all():
        raise ValueError(f"colour {donor!r} is not a one-token swap of every held-out prompt's colour")
    states = lambda ps: text(encode(ps)).last_hidden_state  # noqa: E731
    h, h2, neg = text(ids).last_hidden_state, text(ids2).last_hidden_state, states([""])
    additive = (h2 + states([recaption(p, shape=other_shape(p)) for p in prompts])
                - states([recaption(p, shape=other_shape(p), colour=donor) for p in prompts]))
    pos = torch.arange(ids.shape[1])[None]
    after = pos > (ids != ids2).float().argmax(1)[:, None]  # after the colour word
    shape_ids = word_ids(tok, SHAPES)
    summary = summary_mask(ids, tok.eos_token_id)
    masks = (after & (ids[..., None] == shape_ids).any(-1), after & ~summary, after)
    contexts = dict(zip(SPLICES, [h, *(torch.where(m[..., None], h2, h) for m in masks), additive]))
    out = {}
    for name, ctx in contexts.items():
        imgs = []
        for i in range(0, len(prompts), batch):
            c = ctx[i:i + batch]
            gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(c))]
            imgs.append(pipe(prompt_embeds=c, negative_prompt_embeds=neg.expand(len(c), -1, -1), num_inference_steps=50,
                             guidance_scale=5.0, generator=gens, height=64, width=64, output_type="pt").images.float())
        out[name] = prompt_fidelity(torch.cat(imgs).clamp(0, 1), prompts)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers folder (default: the shipped world model)")
    ap.add_argument("--attribute", default="position", choices=ATTRS)
    ap.add_argument("--noises", type=int, default=8, help="sample noises per value")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--splice", action="store_true", help="which token states carry shape and colour (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.splice:
        print("held-out prompts, 50-step CFG-5 samples; token states taken from the prompt recoloured red at: "
              "shape / colour (evaluator)")
        for name, f in splice(args.model).items():
            print(f"   {name:>68}: {f['shape']:.3f} / {f['colour']:.3f}")
        return
    r = probe(args.model, args.attribute, args.noises)
    print(f"1. VAE: {args.attribute} read back from reconstructions of 64 real held-out images: {r['vae_readback']:.3f}")
    moved = ", ".join(f"{v} {d:.2f}" for v, d in r["text_moved"].items())
    print(f"2. text features moved vs {r['captions'][0]!r} (mean token L2; token norm {r['text_norm']:.2f}): "
          f"{moved}; colour red->green {r['text_moved_colour']:.2f}")
    print(f"3. UNet epsilon moved (L2 over 4x8x8) when only the {args.attribute} changes / the colour / the caption "
          "is empty:")
    for t, d in r["eps_moved"].items():
        print(f"   t={t:4d}: {d['attribute (mean)']:.3f} / {d['colour']:.3f} / {d['empty caption']:.3f}")
    print(f"4. {args.attribute} the evaluator reads from 50-step CFG-5 samples (same {args.noises} noises per row):")
    for v, read in r["samples"].items():
        hits = sum(x == v for x in read)
        print(f"   asked {v:>6}: {hits}/{len(read)} right; read {read}")


if __name__ == "__main__":
    main()
