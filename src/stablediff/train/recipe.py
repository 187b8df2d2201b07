"""Recipes: a whole model trained by the project's own stages, from nothing, in one command.

A recipe is a TOML file (`src/stablediff/recipes/NAME.toml`): a `[common]` table of TrainConfig
fields shared by every stage, then one table per stage (`tokenizer`, `vae`, `text`, `unet`), and
optionally later U-Net phases. A phase is a table that says which phase it `continues` (`"unet"`
or an earlier phase): it starts from that phase's exported model, with the `[unet]` table's
settings except those it sets itself, and trains on the main latent cache or on the named
`cache` of `[latents]`. The `[latents]` table describes the caches: `scenes` training scenes
encoded once (the main cache, the U-Net's data), and each sub-table `[latents.NAME]` another cache
holding those scenes followed by `extra_scenes` scenes of `objects` objects drawn with `seed`.
A recipe may start with `base = "NAME"` (a packaged recipe or a path relative to the file): it
then inherits every table of that recipe and overrides only the fields it sets (the GPU variant of
a CPU recipe, say). `run_recipe` trains the stages, then the phases in file order, each in
`OUT/NAME/`, handing each the exports of the ones before it; a stage whose export exists is
skipped and one with checkpoints resumes, so an interrupted recipe continues where it stopped.
`package_model` then writes the finished model as one half-precision safetensors file that carries
the recipe, every stage's configuration and step count, the data seed and the evaluation results in
its metadata; `evaluate_packaged` adds the evaluation to such a file.
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

from stablediff.eval import evaluate, write_report
from stablediff.loading import load_pipeline, save
from stablediff.params import GenerationParams
from stablediff.train.config import TrainConfig
from stablediff.train.data import ShapesPairs, encode_latent_cache, image_text_data
from stablediff.train.exports import EXPORT_DIR, MODEL_FILE, TOKENIZER_DIR, VAE_PART, read_part
from stablediff.train.stages import ADDONS, STAGES, get_stage
from stablediff.train.trainer import train
from stablediff.weights.io import read_metadata

logger = logging.getLogger(__name__)

PHASE_STAGE = "finetune"  # the stage every later U-Net phase trains with
FIRST_STAGES = tuple(name for name in STAGES if name not in (PHASE_STAGE, *ADDONS))  # each has a table of its name
PHASE_KEYS = ("continues", "cache")  # a phase table's keys that are not TrainConfig fields
CACHE_KEYS = ("extra_scenes", "objects", "seed")  # a named cache's keys
OTHER_TABLES = ("base", "common", "name", "description", "eval", "latents")
Progress = Callable[[int, int, dict], None]


def read_recipe(name_or_path: str | Path, _chain: tuple[str, ...] = ()) -> tuple[dict, str]:
    """(the parsed recipe, its text) from a file path or a packaged recipe name; a recipe with a
    `base` is merged into its base recipe (table by table; a top-level `NAME = false` leaves out the
    base's table NAME), and the text then holds both files."""
    if str(name_or_path) in _chain:
        raise ValueError(f"recipe base chain loops: {' -> '.join((*_chain, str(name_or_path)))}")
    text, folder = _recipe_text(name_or_path)
    recipe = tomllib.loads(text)
    if "base" in recipe:
        base_name = str(recipe.pop("base"))
        local = folder / f"{base_name}.toml" if folder is not None else None
        chain = (*_chain, str(name_or_path))
        base, base_text = read_recipe(local if local is not None and local.is_file() else base_name, chain)
        for key, value in recipe.items():
            if value is False and isinstance(base.get(key), dict):  # `NAME = false` drops the base's table
                del base[key]
            else:
                both = isinstance(value, dict) and isinstance(base.get(key), dict)
                base[key] = {**base[key], **value} if both else value
        recipe, text = base, f"{text}\n# ---- base recipe {base_name!r} ----\n{base_text}"
    unknown = set(recipe) - {*OTHER_TABLES, *FIRST_STAGES, *phases(recipe)}
    if unknown:
        allowed = ", ".join((*OTHER_TABLES[1:], *FIRST_STAGES))
        raise ValueError(
            f"recipe has unknown tables {sorted(unknown)}; allowed: {allowed}, and U-Net phases "
            "(tables that set `continues`)"
        )
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


def phases(recipe: dict) -> list[str]:
    """The recipe's later U-Net phases in file order, each checked to continue "unet" or an
    earlier phase and to train on a cache that `[latents]` describes."""
    found: list[str] = []
    for name, table in recipe.items():
        if not isinstance(table, dict) or "continues" not in table or name in (*OTHER_TABLES, *FIRST_STAGES):
            continue
        if table["continues"] not in ("unet", *found):
            raise ValueError(
                f"recipe phase [{name}] continues {table['continues']!r}, which is not 'unet' or a "
                f"phase before it ({found})"
            )
        cache = table.get("cache")
        if cache is not None and not isinstance(recipe.get("latents", {}).get(cache), dict):
            raise ValueError(f"recipe phase [{name}] trains on cache {cache!r}, but [latents] has no [latents.{cache}]")
        found.append(name)
    return found


def cache_file(name: str | None = None) -> str:
    """The file of the main latent cache (None) or of the named one."""
    return "latents.safetensors" if name is None else f"latents-{name}.safetensors"


def stage_config(recipe: dict, stage: str, out: Path) -> TrainConfig:
    """The TrainConfig of one stage or phase: common fields, its table(s), and links to earlier stages."""
    links = {"tokenizer": str(out / "tokenizer" / TOKENIZER_DIR)}
    table = dict(recipe.get(stage, {}))
    extra = {key: table.pop(key) for key in PHASE_KEYS if key in table}
    tables = [table]
    if stage == "unet":
        links.update(vae=str(out / "vae"), text=str(out / "text"))
    elif "continues" in extra:  # the phase before's model carries the VAE, the text encoder and the tokenizer
        links["base"] = str(out / extra["continues"] / EXPORT_DIR / MODEL_FILE)
        tables.insert(0, recipe.get("unet", {}))
    if (stage == "unet" or "continues" in extra) and "latents" in recipe:
        links["data"] = str(out / cache_file(extra.get("cache")))
    fields = {**recipe.get("common", {}), **(links if stage != "tokenizer" else {})}
    for t in tables:
        fields.update(t)
    return TrainConfig(stage=PHASE_STAGE if "continues" in extra else stage, out=str(out / stage), **fields)


def run_recipe(
    name_or_path: str | Path, out_dir: str | Path, progress_factory: Callable[[str], Progress] | None = None
) -> dict:
    """Train every stage of the recipe into `out_dir`; returns {stage: {"export", "seconds", "config"}}."""
    recipe, _ = read_recipe(name_or_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [stage for stage in FIRST_STAGES if stage not in recipe]
    if missing:
        raise ValueError(f"recipe lacks a [{missing[0]}] table")
    done: dict[str, dict] = {}
    for stage in (*FIRST_STAGES, *phases(recipe)):
        if (stage == "unet" or stage in phases(recipe)) and "latents" in recipe:
            _latent_cache(recipe, out, recipe[stage].get("cache"))
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
        seconds = training_seconds(out / stage) or (time.perf_counter() - start)
        logger.info("recipe stage %s: %s (%.0f s)", stage, export, seconds)
        done[stage] = {"export": str(export), "seconds": seconds, "config": json.loads(config.to_json())}
    return done


def _latent_cache(recipe: dict, out: Path, name: str | None = None) -> Path:
    """Encode the `[latents] scenes` training images once with the trained VAE (the U-Net then
    trains on posterior samples of the cache instead of running the encoder every step); a named
    cache holds the same scenes followed by its own extra scenes."""
    latents = recipe.get("latents", {})
    cache = out / cache_file(name)
    if cache.is_file():
        return cache
    extra = latents.get(name, {}) if name is not None else {}
    missing = [] if "scenes" in latents else ["scenes"]
    missing += [f"{name}.{key}" for key in CACHE_KEYS if name is not None and key not in extra]
    if missing:
        raise ValueError(f"the recipe's [latents] table must set {', '.join(missing)}; it has {sorted(latents)}")
    config = stage_config(recipe, "vae", out)
    prefix = None
    if name is None:
        config.shapes_size = int(latents["scenes"])
        images, _ = image_text_data(config, regions=True)  # stored for a U-Net phase with a grounding loss
    else:  # the main cache's scenes are copied, only the extra ones encoded
        prefix = _latent_cache(recipe, out)
        scenes, seed, objects = (int(extra[key]) for key in ("extra_scenes", "seed", "objects"))
        images = ShapesPairs(scenes, seed, config.resolution, regions=True, n_objects=objects)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the trainer would run too
    vae = read_part(VAE_PART, out / "vae" / EXPORT_DIR, device)
    encode_latent_cache(images, vae, cache, batch_size=64, device=device, prefix=prefix)
    logger.info("recipe: encoded %d images to %s (%.0f s)", len(images), cache, time.perf_counter() - start)
    return cache


def final_export(stages: dict) -> str:
    """The finished model of a `run_recipe` result: the last U-Net phase's export."""
    return list(stages.values())[-1]["export"]


def training_seconds(run: Path) -> float | None:
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


def package_model(
    model_path: str | Path,
    target: str | Path,
    recipe_text: str,
    stages: dict,
    evaluation: dict | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the trained model as one `dtype` safetensors file with its provenance in metadata."""
    pipe = load_pipeline(model_path)
    meta = {
        "stablediff.recipe": recipe_text,
        "stablediff.stages": json.dumps(
            {k: {"config": v["config"], "seconds": round(v["seconds"], 1)} for k, v in stages.items()}
        ),
        "stablediff.data_seed": str(stages["unet"]["config"]["seed"]),
        "stablediff.steps": json.dumps({k: v["config"]["steps"] for k, v in stages.items() if k != "tokenizer"}),
    }
    if evaluation is not None:
        meta["stablediff.eval"] = json.dumps(evaluation)
    return save(pipe, target, dtype=dtype, overwrite=True, metadata=meta)


def evaluate_model(
    model_path: str | Path, settings: dict, report_dir: str | Path, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Run the shapes prompt suites on a model (settings: the recipe's [eval] table) and write the
    report; returns the summary stored with the model (no per-prompt records)."""
    pipe = load_pipeline(model_path)
    size = pipe.spec.default_size

    def generate(prompt: str, seed: int):
        params = GenerationParams(
            prompt,
            width=size,
            height=size,
            steps=settings.get("steps", 20),
            sampler=settings.get("sampler", "dpmpp_2m"),
            schedule=settings.get("schedule", "karras"),
            guidance_scale=settings.get("guidance_scale", 7.5),
            seed=seed,
        )
        return pipe.generate(params)[0]

    result = evaluate(generate, n=settings.get("n", 200), progress=progress)
    result["settings"] = {**settings, "size": size}
    write_report(result, report_dir)
    return {k: v for k, v in result.items() if k != "records"}


def build_bundled_model(
    name_or_path: str | Path,
    out_dir: str | Path,
    target: str | Path,
    progress_factory: Callable[[str], Progress] | None = None,
) -> Path:
    """The whole recipe: train every stage, write the half-precision model, evaluate exactly those
    weights, and write `target` with the evaluation in its metadata."""
    out = Path(out_dir)
    stages = run_recipe(name_or_path, out, progress_factory)
    _, text = read_recipe(name_or_path)
    shipped = package_model(final_export(stages), out / "model-fp16.safetensors", text, stages)
    return evaluate_packaged(shipped, name_or_path, target, out / "eval")


def evaluate_packaged(
    model_path: str | Path,
    recipe: str | Path,
    target: str | Path,
    report_dir: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
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
