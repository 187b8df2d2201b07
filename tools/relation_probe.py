"""Does a model condition on the relation of two objects? Measured on its denoising loss, no sampling.

    .venv/bin/python tools/relation_probe.py [--model FILE] [--checkpoint DIR] [--n 128] [--seed 1234] [--suite 0]
                                             [--decode 0]
    .venv/bin/python tools/relation_probe.py --text RUN/export      # a text stage's export: its states only

Renders `n` fresh two-object scenes, encodes them with the model's VAE (posterior mean) and, at
fixed timesteps and noise, measures the U-Net's x0 error (mean squared, from its eps prediction)
for three captions of each scene: the objects with their TRUE relation ("a red circle to the left
of a blue square on a white background"), with the INVERSE relation, and with each object's CELL
as well. A model that uses the relation has a lower error with the true one at the noisy timesteps
where the layout is decided; CELL shows how much knowing where the objects are is worth there.
Also prints how far the text encoder's states move when only the relation word changes (cosine
similarity of the true and inverse captions' states at the relation word, the word after it, the
second object's shape word and the end-of-text token), and the grounding loss of
`stablediff.train.grounding` with the true and the inverse captions (1 - the share of each object
word's cross-attention inside the object's box, squared; uniform attention gives 0.899 at 8x8,
tools/grounding_bound.py): attention that follows the relation is better grounded with the true one.

`--decode N`: also train linear probes on the text states of N captions naming both cells: how
well the relation and each object's colour can be read from the second object's words (present,
however faintly, for the U-Net's attention to pick up?).

`--suite N`: also generate the first N prompts of the relation suite (DPM++ 2M, Karras, 20 steps,
guidance 7.5, as `stablediff eval`) and print the judge's accuracies in %.

`--checkpoint`: a training checkpoint folder of the model (`ema.safetensors` of a unet or finetune
run, with `text_encoder.*` keys when the text encoder trained too) loaded over `--model`.
"""

from __future__ import annotations

import argparse
import contextlib
import random

import torch
import torch.nn.functional as F

from stablediff import GenerationParams, load_pipeline
from stablediff.eval import evaluate
from stablediff.image import image_to_tensor
from stablediff.shapes import (
    INVERSE_RELATION,
    ObjectSpec,
    SceneSpec,
    canonical_caption,
    caption_regions,
    layout,
    render,
    sample_scene,
)
from stablediff.shapes.captions import CELL_PHRASES
from stablediff.train.exports import TEXT_PART, load_tokenizer, read_part
from stablediff.train.grounding import cross_attention_maps, grounding_loss, token_boxes
from stablediff.weights.io import read_state_dict

TIMESTEPS = (950, 850, 750, 600, 400, 200)


def load(model: str | None, checkpoint: str | None):
    pipe = load_pipeline(model)
    if checkpoint:
        weights = read_state_dict(f"{checkpoint}/ema.safetensors")
        if any(k.startswith("text_encoder.") for k in weights):
            for name in ("unet", "text_encoder"):
                part = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
                getattr(pipe, name).load_state_dict(part)
        else:
            pipe.unet.load_state_dict(weights)
    return pipe


def captions(scene) -> dict[str, str]:
    a, b = scene.objects
    relation, inverse = scene.relation, INVERSE_RELATION[scene.relation]
    specs = {
        "true": ((ObjectSpec(a.shape, a.color), ObjectSpec(b.shape, b.color)), relation),
        "inverse": ((ObjectSpec(a.shape, a.color), ObjectSpec(b.shape, b.color)), inverse),
        "cell": ((ObjectSpec(a.shape, a.color, None, a.cell), ObjectSpec(b.shape, b.color, None, b.cell)), relation),
        "swapped": ((ObjectSpec(a.shape, a.color, None, b.cell), ObjectSpec(b.shape, b.color, None, a.cell)), inverse),
    }
    return {kind: canonical_caption(SceneSpec(scene.background, objs, rel)) for kind, (objs, rel) in specs.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder whose EMA weights replace the model's")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--suite", type=int, default=0, help="relation-suite prompts to generate and judge")
    parser.add_argument("--text", default=None, help="a text stage export folder: measure its states only")
    parser.add_argument("--decode", type=int, default=0, help="captions for the linear probes of the text states")
    args = parser.parse_args()
    pipe = load(args.model, args.checkpoint)
    if args.text:  # its U-Net partner does not exist yet: the text states are all there is to probe
        pipe.text_encoder, pipe.tokenizer = read_part(TEXT_PART, args.text), load_tokenizer(args.text)
    rng = random.Random(args.seed)
    scenes = [sample_scene(rng, "train", n_objects=2) for _ in range(args.n)]
    jitter_seeds = [rng.randrange(2**32) for _ in scenes]
    pairs = list(zip(scenes, jitter_seeds, strict=True))
    images = torch.cat([image_to_tensor(render(s, 64, random.Random(j))) for s, j in pairs])
    per_scene = [captions(s) for s in scenes]
    texts = {kind: [c[kind] for c in per_scene] for kind in per_scene[0]}
    ids = {kind: torch.tensor(pipe.tokenizer(t), dtype=torch.long) for kind, t in texts.items()}
    context = {kind: pipe.text_encoder(i) for kind, i in ids.items()}
    print(f"e.g. {texts['true'][0]!r} / {texts['inverse'][0]!r}")

    eos = (ids["true"] == pipe.tokenizer.eos_id).int().argmax(1)
    rows = torch.arange(args.n)
    relation_word = (ids["true"] != ids["inverse"]).int().argmax(1)  # the first token that differs
    # Canonical captions end "... SHAPE on a COLOUR background": the second object's shape word is
    # 5 tokens before the end of text (every word of the language is one token).
    places = {
        "relation word": relation_word,
        "word after it": relation_word + 1,
        "second object's shape word": eos - 5,
        "end of text": eos,
    }
    for name, at in places.items():
        cos = F.cosine_similarity(context["true"][rows, at], context["inverse"][rows, at], dim=-1)
        print(f"text states at the {name}: cosine true vs inverse relation {cos.mean():.4f}")
    if args.decode:
        decodability(pipe, args.decode, args.seed)
    if args.text:
        return

    x0 = pipe.vae.encode(images).mean
    alphas = pipe.noise_schedule().alphas_cumprod.float()
    generator = torch.Generator().manual_seed(args.seed)
    placements = [layout(s, 64, random.Random(j)) for s, j in pairs]
    targets = {}  # the object words' boxes, for the captions whose grounding is measured
    for kind in ("true", "inverse"):
        tokens = [
            token_boxes(pipe.tokenizer, c[kind], caption_regions(c[kind], s, p, 64))
            for c, s, p in zip(per_scene, scenes, placements, strict=True)
        ]
        targets[kind] = torch.stack([b for b, _ in tokens]), torch.stack([g for _, g in tokens])
    print(
        "t    SNR     x0 error: true   inverse  cell    swapped  worse than true / cell: inverse  swapped"
        "  grounding: true  inverse"
    )
    for t in TIMESTEPS:
        a = alphas[t]
        noise = torch.randn(x0.shape, generator=generator)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        errors, ground = {}, {}
        for kind, c in context.items():
            with cross_attention_maps(pipe.unet) if kind in targets else contextlib.nullcontext() as maps:
                eps = pipe.unet(x_t, torch.full((args.n,), float(t)), c)
            errors[kind] = ((x_t - (1 - a).sqrt() * eps) / a.sqrt() - x0).pow(2).flatten(1).mean(1)
            if kind in targets:
                ground[kind] = grounding_loss(maps, *targets[kind], tuple(x0.shape[-2:])).mean()
        inverse_worse = (errors["inverse"] > errors["true"]).float().mean() * 100
        swapped_worse = (errors["swapped"] > errors["cell"]).float().mean() * 100
        print(
            f"{t:<4} {float(a / (1 - a)):<7.3f} {errors['true'].mean():>15.4f} {errors['inverse'].mean():>8.4f} "
            f"{errors['cell'].mean():>7.4f} {errors['swapped'].mean():>8.4f}  {inverse_worse:>30.0f}% "
            f"{swapped_worse:>7.0f}% {ground['true']:>16.3f} {ground['inverse']:>8.3f}"
        )
    if args.suite:
        judge_suite(pipe, args.suite)


def decodability(pipe, n: int, seed: int) -> None:
    """Is the relation (or the first object) in the second object's text states, however faintly?
    A linear classifier of standardised states, trained on 80% of `n` canonical two-object captions
    with both cells named and tested on the rest; accuracies in %."""
    rng = random.Random(seed + 1)
    scenes = [sample_scene(rng, "train", n_objects=2) for _ in range(n)]
    texts = [captions(s)["cell"] for s in scenes]
    ids = torch.tensor(pipe.tokenizer(texts), dtype=torch.long)
    states = torch.cat([pipe.text_encoder(ids[i : i + 256]) for i in range(0, n, 256)])
    eos = (ids == pipe.tokenizer.eos_id).int().argmax(1)
    rows = torch.arange(n)
    # "... SHAPE CELL-PHRASE on a COLOUR background": the last cell word is 5 tokens before the end
    # of text; the second object's shape word is before its cell phrase.
    cell_words = torch.tensor([len(CELL_PHRASES[s.objects[1].cell][0].split()) for s in scenes])
    at = {"the second object's shape word": eos - 5 - cell_words, "its last cell word": eos - 5, "the end of text": eos}
    targets = {
        "relation": [s.relation for s in scenes],
        "first object's colour": [s.objects[0].color for s in scenes],
        "second object's colour": [s.objects[1].color for s in scenes],
    }
    for place, index in at.items():
        found = {name: linear_probe(states[rows, index], labels) for name, labels in targets.items()}
        print(f"decodable from {place}: " + ", ".join(f"{k} {v:.1f}" for k, v in found.items()))


def linear_probe(features: torch.Tensor, labels: list[str]) -> float:
    """Held-out accuracy (%) of a multinomial logistic regression on standardised `features`."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    split = int(0.8 * len(y))
    x = (features - features[:split].mean(0)) / (features[:split].std(0) + 1e-6)
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    with torch.enable_grad():
        for _ in range(300):
            optimizer.zero_grad()
            loss = F.cross_entropy(x[:split] @ weight + bias, y[:split]) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    return float(((x[split:] @ weight + bias).argmax(1) == y[split:]).float().mean()) * 100


def judge_suite(pipe, n: int) -> None:
    def generate(prompt: str, seed: int):
        params = GenerationParams(
            prompt, width=64, height=64, steps=20, sampler="dpmpp_2m", schedule="karras", guidance_scale=7.5, seed=seed
        )
        return pipe.generate(params)[0]

    metrics = evaluate(generate, suites=("relation",), n=n, judge_n=0)["suites"]["relation"]
    print(
        f"relation suite, first {n} prompts:",
        ", ".join(f"{k} {v * 100:.1f}" for k, v in metrics.items() if v is not None),
    )


if __name__ == "__main__":
    main()
