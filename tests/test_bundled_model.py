"""The bundled model: it is the default, it loads from the package, it generates, and it carries
its provenance. Its quality is measured by `make eval` (docs/model-card.md), not here."""

from __future__ import annotations

import json

from stablediff import GenerationParams, load_pipeline
from stablediff.eval import judge
from stablediff.loading import bundled_model_path
from stablediff.shapes import parse_caption
from stablediff.weights.io import read_metadata


def test_bundled_model_is_small_and_describes_itself():
    path = bundled_model_path()
    assert path.stat().st_size <= 25 * 2**20
    meta = read_metadata(path)
    assert {
        "stablediff.spec",
        "stablediff.tokenizer",
        "stablediff.recipe",
        "stablediff.stages",
        "stablediff.steps",
        "stablediff.data_seed",
        "stablediff.eval",
    } <= set(meta)
    assert json.loads(meta["stablediff.steps"]) == {
        "vae": 2600,
        "text": 1100,
        "unet": 2700,
        "finetune": 3600,
        "relations": 3500,
    }
    assert 'name = "shapes-gpu"' in meta["stablediff.recipe"]
    evaluation = json.loads(meta["stablediff.eval"])
    assert evaluation["judge"]["clean"]["overall"] >= 0.99 and set(evaluation["suites"]) == {
        "single",
        "heldout",
        "relation",
    }


def test_default_model_generates_what_the_prompt_asks():
    """Prompt 0 of the evaluation's single-object suite, with its seed and settings, which the
    model gets entirely right (docs/eval/eval.md: 189 of 200 prompts are). A regression test of the
    whole chain — weights and vocabulary from the package, pipeline, VAE, judge."""
    pipe = load_pipeline()
    assert pipe.spec.default_size == 64 and pipe.tokenizer.vocab_size == 667
    prompt = "a small orange cross on the left on a gray background"
    params = GenerationParams(
        prompt, width=64, height=64, steps=20, sampler="dpmpp_2m", schedule="karras", guidance_scale=7.5, seed=0
    )
    image = pipe.generate(params)[0]
    assert image.size == (64, 64)
    verdict = judge(image, parse_caption(prompt))
    assert verdict.all_correct, verdict.errors()


def test_default_model_places_two_objects_as_the_relation_asks():
    """Prompt 1 of the evaluation's relation suite with its seed (162 of 200 are entirely right):
    both objects, and the heart to the right of the circle."""
    pipe = load_pipeline()
    prompt = "an orange heart to the right of a red circle on a gray background"
    params = GenerationParams(
        prompt, width=64, height=64, steps=20, sampler="dpmpp_2m", schedule="karras", guidance_scale=7.5, seed=1
    )
    verdict = judge(pipe.generate(params)[0], parse_caption(prompt))
    assert verdict.relation and verdict.all_correct, verdict.errors()
