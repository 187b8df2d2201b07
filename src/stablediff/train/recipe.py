"""Recipes: a whole model trained by the project's own stages, from nothing, in one command.

A recipe is a TOML file (`src/stablediff/recipes/NAME.toml`): a `[common]` table of TrainConfig
fields shared by every stage, then one table per stage (`tokenizer`, `vae`, `text`, `unet`), and
optionally later U-Net phases, each continuing the phase before it with the `unet` table's
settings except those it sets itself (another batch size or learning rate, or training the text
encoder too): `finetune`, on the same latent cache, then `relations`, on that cache followed by
`[latents] pair_scenes` two-object scenes (seed `pair_seed`).
A recipe may start with `base = "NAME"` (a packaged recipe or a path relative to the file): it
then inherits every table of that recipe and overrides only the fields it sets (the GPU variant of
a CPU recipe, say). `run_recipe` trains the stages in that order, each in `OUT/STAGE/`, handing
each stage the exports of the ones before it; a stage whose export exists is skipped and one with
checkpoints resumes, so an interrupted recipe continues where it stopped. `package_model` then
writes the finished model as one half-precision safetensors file that carries the recipe, every
stage's configuration and step count, the data seed and the evaluation results in its metadata;
`evaluate_packaged` adds the evaluation to such a file.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import time
import tomllib
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

from stablediff.train.config import TrainConfig
from stablediff.train.stages import get_stage
from stablediff.train.stages.tokenizer import TOKENIZER_DIR
from stablediff.train.stages.unet import MODEL_FILE
from stablediff.train.trainer import EXPORT_DIR, train
from stablediff.weights.io import read_metadata

logger = logging.getLogger(__name__)

STAGE_ORDER = ("tokenizer", "vae", "text", "unet", "finetune", "relations")
LATER_PHASES = ("finetune", "relations")  # optional U-Net phases that continue the one before them
LATENT_CACHE = "latents.safetensors"
PAIR_CACHE = "latents-pairs.safetensors"  # the [relations] phase's: the scenes, then two-object scenes
Progress = Callable[[int, int, dict], None]


def read_recipe(name_or_path: str | Path, _chain: tuple[str, ...] = ()) -> tuple[dict, str]:
    """(the parsed recipe, its text) from a file path or a packaged recipe name; a recipe with a
    `base` is merged into its base recipe, and the text then holds both files."""
    if str(name_or_path) in _chain:
        raise ValueError(f"recipe base chain loops: {' -> '.join((*_chain, str(name_or_path)))}")
    text, folder = _recipe_text(name_or_path)
    recipe = tomllib.loads(text)
    unknown = set(recipe) - {"base", "common", "name", "description", "eval", "latents", *STAGE_ORDER}
    if unknown:
        allowed = ", ".join(("base", "common", "latents", "eval", *STAGE_ORDER))
        raise ValueError(f"recipe has unknown tables {sorted(unknown)}; allowed: {allowed}")
    if "base" in recipe:
        base_name = str(recipe.pop("base"))
        local = folder / f"{base_name}.toml" if folder is not None else None
        chain = (*_chain, str(name_or_path))
        base, base_text = read_recipe(local if local is not None and local.is_file() else base_name, chain)
        for key, value in recipe.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        recipe, text = base, f"{text}\n# ---- base recipe {base_name!r} ----\n{base_text}"
    return recipe, text


def _recipe_text(name_or_path: str | Path) -> tuple[str, Path | None]:
    """The text of a recipe file (and its folder), or of the packaged recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path.read_text(), path.parent
    recipes = resources.files("stablediff").joinpath("recipes")
    packaged = recipes.joinpath(f"{name_or_path}.toml")
    if not packaged.is_file():
        names = sorted(p.name.removesuffix(".toml") for p in recipes.iterdir() if p.name.endswith(".toml"))
        raise ValueError(f"no recipe file {name_or_path!r} and no packaged recipe of that name; packaged: {names}")
    return packaged.read_text(), None


def stage_config(recipe: dict, stage: str, out: Path) -> TrainConfig:
    """The TrainConfig of one stage: common fields, the stage's table, and links to earlier stages."""
    links = {"tokenizer": str(out / "tokenizer" / TOKENIZER_DIR)}
    tables = [recipe.get(stage, {})]
    if stage == "unet":
        links.update(vae=str(out / "vae"), text=str(out / "text"))
    elif stage in LATER_PHASES:  # the phase before's model carries the VAE, the text encoder and the tokenizer
        links["base"] = str(out / _phase_before(recipe, stage) / EXPORT_DIR / MODEL_FILE)
        tables.insert(0, recipe.get("unet", {}))
    if stage in ("unet", *LATER_PHASES) and "latents" in recipe:
        links["data"] = str(out / (PAIR_CACHE if stage == "relations" else LATENT_CACHE))
    fields = {**recipe.get("common", {}), **(links if stage != "tokenizer" else {})}
    for table in tables:
        fields.update(table)
    return TrainConfig(stage="finetune" if stage in LATER_PHASES else stage, out=str(out / stage), **fields)


def _phase_before(recipe: dict, stage: str) -> str:
    earlier = STAGE_ORDER[STAGE_ORDER.index("unet") : STAGE_ORDER.index(stage)]
    return next(name for name in reversed(earlier) if name in recipe)


def run_recipe(name_or_path: str | Path, out_dir: str | Path, progress_factory: Callable[[str], Progress] | None = None
               ) -> dict:  # fmt: skip
    """Train every stage of the recipe into `out_dir`; returns {stage: {"export", "seconds", "config"}}."""
    recipe, _ = read_recipe(name_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    for stage in STAGE_ORDER:
        if stage not in recipe:
            if stage in LATER_PHASES:
                continue
            raise ValueError(f"recipe lacks a [{stage}] table")
        if stage == "unet" and "latents" in recipe:
            _latent_cache(recipe, out)
        if stage == "relations":
            _latent_cache(recipe, out, pairs=True)
        config = stage_config(recipe, stage, out)
        start = time.perf_counter()
        if stage == "tokenizer":
            export = out / "tokenizer" / TOKENIZER_DIR
            if not (export / "vocab.json").is_file():
                get_stage("tokenizer")(config).fit(out / "tokenizer")
        else:
            export = _existing_export(out / stage)
            if export is None:
                progress = progress_factory(stage) if progress_factory else None
                export = train(config.stage, config, resume="auto", progress=progress)
        seconds = _training_seconds(out / stage) or (time.perf_counter() - start)
        logger.info("recipe stage %s: %s (%.0f s)", stage, export, seconds)
        done[stage] = {"export": str(export), "seconds": seconds, "config": json.loads(config.to_json())}
    return done


def _latent_cache(recipe: dict, out: Path, pairs: bool = False) -> Path:
    """Encode `[latents] scenes` training images once with the trained VAE (the U-Net then trains
    on posterior samples of the cache instead of running the encoder every step); `pairs`: the
    same scenes followed by `pair_scenes` two-object scenes of seed `pair_seed`."""
    from torch.utils.data import ConcatDataset

    from stablediff.train.latents import encode_latent_cache
    from stablediff.train.stages.vae import ShapesPairs, image_text_data, load_vae_export

    latents = recipe.get("latents", {})
    cache = out / (PAIR_CACHE if pairs else LATENT_CACHE)
    if cache.is_file():
        return cache
    if "scenes" not in latents or pairs and not {"pair_scenes", "pair_seed"} <= latents.keys():
        needed = "scenes, pair_scenes and pair_seed" if pairs else "scenes"
        raise ValueError(f"the recipe's [latents] table must set {needed}; it has {sorted(latents)}")
    config = stage_config(recipe, "vae", out)
    config.shapes_size = int(latents["scenes"])
    images, _ = image_text_data(config, regions=True)  # stored for a U-Net phase with a grounding loss
    if pairs:
        images = ConcatDataset([images, ShapesPairs(int(latents["pair_scenes"]), int(latents["pair_seed"]),
                                                    config.resolution, regions=True, n_objects=2)])  # fmt: skip
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer would run too
    encode_latent_cache(images, load_vae_export(out / "vae" / EXPORT_DIR, device), cache, batch_size=64, device=device)
    logger.info("recipe: encoded %d images to %s (%.0f s)", len(images), cache, time.perf_counter() - start)
    return cache


def final_export(stages: dict) -> str:
    """The finished model of a `run_recipe` result: the last U-Net phase's export."""
    return stages[next(name for name in reversed(STAGE_ORDER) if name in stages)]["export"]


def _training_seconds(run: Path) -> float | None:
    """Wall time a stage's training took, from its metrics log (also when this process resumed or
    skipped it): the time between consecutive log lines, extrapolated to the steps before the first
    one. An interval slower than 10x the median step is a pause (a run stopped and resumed later)
    and counts at the median rate."""
    log = run / "metrics.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time" in r and "step" in r]
    spans = [(b["time"] - a["time"], b["step"] - a["step"]) for a, b in itertools.pairwise(rows)]
    spans = [(dt, ds) for dt, ds in spans if ds > 0]
    if not spans:
        return None
    median = statistics.median(dt / ds for dt, ds in spans)
    seconds = sum(dt if dt <= 10 * median * ds else median * ds for dt, ds in spans)
    return seconds * rows[-1]["step"] / sum(ds for _, ds in spans)


def _existing_export(run: Path) -> Path | None:
    folder = run / EXPORT_DIR
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    return files[0] if files else None


def package_model(model_path: str | Path, target: str | Path, recipe_text: str, stages: dict,
                  evaluation: dict | None = None, dtype: torch.dtype = torch.float16) -> Path:  # fmt: skip
    """Write the trained model as one `dtype` safetensors file with its provenance in metadata."""
    from stablediff.loading import load_pipeline, save

    pipe = load_pipeline(model_path)
    meta = {
        "stablediff.recipe": recipe_text,
        "stablediff.stages": json.dumps({k: {"config": v["config"], "seconds": round(v["seconds"], 1)}
                                         for k, v in stages.items()}),  # fmt: skip
        "stablediff.data_seed": str(stages["unet"]["config"]["seed"]),
        "stablediff.steps": json.dumps({k: v["config"]["steps"] for k, v in stages.items() if k != "tokenizer"}),
    }
    if evaluation is not None:
        meta["stablediff.eval"] = json.dumps(evaluation)
    return save(pipe, target, dtype=dtype, overwrite=True, metadata=meta)


def evaluate_model(model_path: str | Path, settings: dict, report_dir: str | Path,
                   progress: Callable[[int, int], None] | None = None) -> dict:  # fmt: skip
    """Run the shapes prompt suites on a model (settings: the recipe's [eval] table) and write the
    report; returns the summary stored with the model (no per-prompt records)."""
    from stablediff.eval import evaluate, write_report
    from stablediff.loading import load_pipeline
    from stablediff.params import GenerationParams

    pipe = load_pipeline(model_path)
    size = pipe.spec.default_size

    def generate(prompt: str, seed: int):
        params = GenerationParams(prompt, width=size, height=size, steps=settings.get("steps", 20),
                                  sampler=settings.get("sampler", "dpmpp_2m"),
                                  schedule=settings.get("schedule", "karras"),
                                  guidance_scale=settings.get("guidance_scale", 7.5), seed=seed)  # fmt: skip
        return pipe.generate(params)[0]

    result = evaluate(generate, n=settings.get("n", 200), progress=progress)
    result["settings"] = {**settings, "size": size}
    write_report(result, report_dir)
    return {k: v for k, v in result.items() if k != "records"}


def build_bundled_model(name_or_path: str | Path, out_dir: str | Path, target: str | Path,
                        progress_factory: Callable[[str], Progress] | None = None) -> Path:  # fmt: skip
    """The whole recipe: train every stage, write the half-precision model, evaluate exactly those
    weights, and write `target` with the evaluation in its metadata."""
    out = Path(out_dir)
    stages = run_recipe(name_or_path, out, progress_factory)
    _, text = read_recipe(name_or_path)
    shipped = package_model(final_export(stages), out / "model-fp16.safetensors", text, stages)
    return evaluate_packaged(shipped, name_or_path, target, out / "eval")


def evaluate_packaged(model_path: str | Path, recipe: str | Path, target: str | Path, report_dir: str | Path,
                      progress: Callable[[int, int], None] | None = None) -> Path:  # fmt: skip
    """Evaluate a model written by `package_model` with `recipe`'s [eval] settings and write it to
    `target` with the evaluation added to its metadata (the weights are unchanged). Also for a model
    trained on another machine (a GPU) and evaluated here."""
    meta = read_metadata(model_path)
    if "stablediff.stages" not in meta or "stablediff.recipe" not in meta:
        raise ValueError(f"{model_path} was not written by package_model: it has no recipe or stage metadata")
    settings = read_recipe(recipe)[0].get("eval", {})
    summary = evaluate_model(model_path, settings, report_dir, progress)
    stages = json.loads(meta["stablediff.stages"])
    return package_model(model_path, target, meta["stablediff.recipe"], stages, evaluation=summary)
