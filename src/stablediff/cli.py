"""The `stablediff` command line: generate, img2img, inpaint, info, convert.

Every image written is a PNG carrying its parameters (A1111's `parameters` text and our JSON), so
`stablediff generate --from image.png` reproduces it exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from dataclasses import fields, replace
from pathlib import Path

from tqdm import tqdm

from stablediff.cli_addons import apply_addons
from stablediff.cli_options import DTYPES, OPTION_FIELDS, add_generation_args
from stablediff.cli_sdxl import check_sdxl_options, generate_refined, refiner_choice
from stablediff.diffusion import PREDICTION_TYPES
from stablediff.errors import printable
from stablediff.image import read_png_metadata, unique_path
from stablediff.loading import (
    BUNDLED_NAME,
    LAYOUTS,
    PRESETS,
    default_model,
    load_pipeline,
    model_metadata,
    read_spec,
    save,
)
from stablediff.memory import check_fits, estimate_generation
from stablediff.outputs import ImageWriter
from stablediff.params import GenerationParams, file_name
from stablediff.prompt_list import process_rank, read_prompt_file, shard
from stablediff.train.stages import STAGES, get_stage
from stablediff.version import __version__

EXAMPLES = """examples:
  stablediff generate "a red circle above a blue square" --seed 1
  stablediff generate "a castle, (sunset:1.3)" --model v1-5-pruned-emaonly.safetensors --steps 30 \\
      --sampler dpmpp_2m --schedule karras --width 512 --height 768
  stablediff img2img "a watercolour painting" --init photo.jpg --strength 0.6
  stablediff inpaint "a cat" --init room.png --mask mask.png
  stablediff generate --from outputs/00003-1234.png          # the same image again
  stablediff generate "a lighthouse" --model sdxl-base-folder --refiner sdxl-refiner-folder --switch-at 0.8
  stablediff info outputs/00003-1234.png
  stablediff convert model.ckpt model-diffusers --layout diffusers --dtype fp16
  stablediff dataset shapes --n 50000 --out data/shapes
  stablediff train vae --data data/shapes --out runs/vae --model=shapes-small --steps=2000
  stablediff train unet --data data/shapes --out runs/unet --vae=runs/vae --text=runs/text --resume
  stablediff train recipe shapes --out runs/shapes --package model.safetensors
  stablediff eval --model model.safetensors --n 200 --sweep
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablediff",
        description="Stable Diffusion from the ground up.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stablediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for kind, text in (("generate", "text to image"), ("img2img", "image to image"), ("inpaint", "repaint a mask")):
        add_generation_args(
            sub.add_parser(kind, help=text, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter), kind
        )
    info = sub.add_parser("info", help="print the parameters stored in a PNG")
    info.add_argument("image")
    conv = sub.add_parser("convert", help="single-file <-> diffusers folder, dtype cast, EMA extraction")
    conv.add_argument("source", help="checkpoint file or diffusers folder")
    conv.add_argument("target")
    conv.add_argument("--layout", choices=LAYOUTS, default="single-file")
    conv.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights (default: keep each dtype)")
    conv.add_argument(
        "--no-ema",
        dest="use_ema",
        action="store_false",
        help="keep the trained U-Net weights even when an EMA copy exists",
    )
    conv.add_argument("--prediction-type", choices=tuple(PREDICTION_TYPES), default=None)
    conv.add_argument("--overwrite", action="store_true", help="replace a model (file or diffusers folder) at TARGET")
    data = sub.add_parser("dataset", help="write a training data set")
    kinds = data.add_subparsers(dest="kind", required=True)
    shapes = kinds.add_parser("shapes", help="the procedural captioned shapes world")
    shapes.add_argument("--n", type=int, default=50000, help="number of images")
    shapes.add_argument("--out", required=True, help="output folder (a captioned folder)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument(
        "--split",
        choices=("train", "heldout"),
        default="train",
        help="heldout scenes contain the colour-shape pairs training never shows",
    )
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels")
    usage = (
        "stablediff train STAGE --data DIR --out RUN [--key=value ...] [--resume]\n"
        "stablediff train lora --base MODEL --data DIR --out RUN [--lora_rank=16 ...]\n"
        "stablediff train embedding --base MODEL --data DIR --token WORD --init-word WORD --out RUN\n"
        "stablediff train recipe NAME --out RUN [--package FILE]\n\n"
        "Any TrainConfig field is an option: --lr=2e-4 --steps=5000 --batch_size=32 (see "
        "stablediff/train/config.py). Under torchrun the same command trains on several processes."
    )
    tr = sub.add_parser(
        "train",
        help="train a part from scratch, fine-tune, or run a whole recipe",
        description=usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("stage", choices=(*STAGES, "recipe"))
    tr.add_argument("recipe", nargs="?", default=None, help="recipe: a packaged recipe name or a .toml file")
    tr.add_argument("--data", default=None, help="captioned image folder, latent cache, or 'shapes'")
    tr.add_argument("--out", required=True, help="the run folder")
    tr.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint (or a checkpoint folder)",
    )
    tr.add_argument("--package", default=None, help="recipe: write the finished, evaluated model to this file")
    tr.add_argument(
        "--base", default=None, help="finetune, lora, embedding: the model to start from (a file or folder)"
    )
    tr.add_argument("--token", default=None, help="embedding: the new word (not a word of the vocabulary)")
    tr.add_argument(
        "--init-word", dest="init_word", default=None, help="embedding: the word whose token embedding it starts from"
    )
    ev = sub.add_parser("eval", help="how well images follow shapes-world prompts (judged programmatically)")
    ev.add_argument("--model", default=None, help="default: $STABLEDIFF_MODEL or the bundled model")
    ev.add_argument("--suites", default="single,heldout,relation", help="comma-separated: single,heldout,relation")
    ev.add_argument("--n", type=int, default=200, help="prompts per suite")
    ev.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--sampler", default="dpmpp_2m")
    ev.add_argument("--schedule", default="karras")
    ev.add_argument("--cfg", type=float, default=7.5)
    ev.add_argument("--sweep", action="store_true", help="also sweep samplers x steps (4, 8, 20, 50) and guidance")
    ev.add_argument("--sweep-n", type=int, default=50, help="prompts per suite in each sweep setting")
    ev.add_argument("--out", default="eval", help="report folder (eval.json, eval.md, sweep.*, sweep.png)")
    srv = sub.add_parser("serve", help="a web server: native JSON API and an AUTOMATIC1111-compatible API")
    srv.add_argument("--model", default=None, help="model at start (default: $STABLEDIFF_MODEL or the bundled model)")
    srv.add_argument("--models", default=None, help="a folder of checkpoints and diffusers folders to offer")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs --api-key)")
    srv.add_argument("--port", type=int, default=7860)
    srv.add_argument("--outputs", default="outputs", help="images, uploads and jobs.sqlite3 (default: outputs)")
    srv.add_argument("--api-key", default=None, help="require this key (X-API-Key or Authorization: Bearer)")
    srv.add_argument("--allow-host", action="append", default=[], help="another Host header name to accept")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--lora-dir", default=None, help="the folder of LoRA files prompts' <lora:name:w> tags name")
    srv.add_argument("--embeddings-dir", default=None, help="a folder of embeddings, loaded when a prompt names one")
    return parser


def _params_from_args(args: argparse.Namespace) -> tuple[dict, str | None, list[dict], str | None, float]:
    """GenerationParams fields from the flags, over those of --from PNG when given; the model; the
    LoRAs the PNG's record says were used; the SDXL refiner (or None) and its switch."""
    values: dict = {}
    model = refiner = refiner_file = None
    loras: list[dict] = []
    if args.from_png:
        stored = read_png_metadata(args.from_png)["stablediff"]
        if stored is None:  # A1111's "parameters" text alone: say what it does not reproduce
            params, unmapped = GenerationParams.from_png(args.from_png)
            for item in unmapped:
                where = printable(args.from_png)
                print(f"stablediff {args.command}: warning: {where}: {printable(item)}", file=sys.stderr)
        else:
            params, stored_model = GenerationParams.from_record(stored, args.from_png)
            if stored["params"].get("latents_given"):
                raise ValueError(f"{args.from_png} was made from explicit latents, which a PNG cannot hold")
            model, loras = stored_model["model_file"], stored_model["loras"]
            refiner = stored_model["refiner"] if args.command == "generate" else None  # img2img: no --refiner
        values = {f.name: getattr(params, f.name) for f in fields(GenerationParams) if f.name != "latents"}
    given = {k: v for k, v in vars(args).items() if k in values or k in (*OPTION_FIELDS, "init_image", "mask")}
    values.update({k: v for k, v in given.items() if v is not None})
    if args.from_png:  # the files the PNG names, where the command line names none
        for name, flag in (("init_image", "--init"), ("mask", "--mask")):
            if given.get(name) is None and isinstance(values.get(name), str):
                values[name] = _file_from_png(args.from_png, name, values[name], flag)
        if model is not None and not args.model:
            model = _file_from_png(args.from_png, "model", model, "--model")
        if refiner is not None and args.refiner is None:
            refiner_file = _file_from_png(args.from_png, "refiner", refiner["model_file"], "--refiner")
    refiner, switch = refiner_choice(args, refiner, refiner_file)
    if args.prompt is not None:
        values["prompt"] = args.prompt
    if "prompt" not in values:
        raise ValueError("a prompt is needed (or --from IMAGE.png)")
    if values.get("seed") is None:
        values["seed"] = secrets.randbelow(2**32)
    return values, args.model or model, loras, refiner, switch


def _file_from_png(png: str, field: str, value: str, flag: str) -> str:
    """A file a PNG names (its init image, mask or model): used only if it is there as written or,
    by its file name, in the current folder, and said on stderr, since the PNG chose it. A model
    may also be a preset's name (or the bundled model's). Names are shown by repr: escaped."""
    where = f"stablediff: --from {printable(png)}"
    if field in ("model", "refiner") and (value in PRESETS or value == BUNDLED_NAME):
        print(f"{where}: using the model {value!r} named in the PNG", file=sys.stderr)
        return value
    for candidate in dict.fromkeys((value, file_name(value))):
        if candidate and Path(candidate).exists():
            said = "" if candidate == value else f" (the PNG says {value!r})"
            print(f"{where}: using the {field} file {candidate!r}{said} named in the PNG", file=sys.stderr)
            return candidate
    raise ValueError(
        f"{png}: the PNG names the {field} file {value!r}, which is neither there nor in the current folder; "
        f"pass {flag} FILE"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    if getattr(args, "prompts", None):
        return cmd_prompt_list(args)
    values, model, stored_loras, refiner, switch = _params_from_args(args)
    model = model or default_model()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    GenerationParams(**values).validate()  # fail before loading the model
    spec, refiner_spec = read_spec(model), read_spec(refiner) if refiner else None  # None for a pickled checkpoint
    known = spec is not None and (refiner is None or refiner_spec is not None)
    if known and _check_run(args, spec, values, loaded=False, refiner=refiner_spec):
        return 0
    pipe = load_pipeline(model, device=args.device, dtype=DTYPES[args.dtype])
    refined = load_pipeline(refiner, device=args.device, dtype=DTYPES[args.dtype]) if refiner else None
    apply_addons(pipe, args, stored_loras)
    pipe.vae_tiling = args.vae_tiling
    if args.compile:
        for each in filter(None, (pipe, refined)):
            each.compile()
    if not known and _check_run(args, pipe.spec, values, loaded=True, refiner=refined and refined.spec):
        return 0
    # Without --width/--height, the model's own image size (512 for SD 1.x, 64 for the bundled model):
    # the size the pipeline uses, recorded in the PNGs.
    params = pipe.resolve_params(GenerationParams(**values)).validate()
    if params.width % (pipe.spec.vae.downscale) or params.height % pipe.spec.vae.downscale:
        raise ValueError(f"width and height must be multiples of {pipe.spec.vae.downscale} for this model")
    existing = next(p for p in (out, *out.parents) if p.exists())  # checked now, created after sampling
    if not os.access(existing, os.W_OK):
        raise PermissionError(
            f"output folder {out} is not writable"
            if existing == out
            else f"cannot create output folder {out}: {existing} is not writable"
        )
    bar = tqdm(total=params.steps, unit="step", desc="sampling", disable=None)

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    images = generate_refined(pipe, refined, params, switch, progress)
    bar.close()
    out.mkdir(parents=True, exist_ok=True)
    writer = ImageWriter(pipe, refiner=refined, switch_at=switch)
    for k, image in enumerate(images):
        path = unique_path(out, str(params.seed + k))
        print(writer.write(image, params, k, path, args.overwrite))
    return 0


def _check_run(args: argparse.Namespace, spec, values: dict, loaded: bool, refiner=None) -> bool:
    """The SDXL options against the model and refiner; then --dry-run: print the memory estimate
    and say so (True); otherwise refuse a run that would not fit, before it allocates (and, unless
    ``loaded``, before the model is read)."""
    check_sdxl_options(args, spec, refiner)
    params = GenerationParams(**values)
    estimate = estimate_generation(spec, params, DTYPES[args.dtype], args.device, args.vae_tiling, refiner=refiner)
    if args.dry_run:
        where = f"{params.width or spec.default_size}x{params.height or spec.default_size}"
        print(
            f"stablediff {args.command}: memory estimate for {where}, batch {params.batch_size}, {args.dtype}, "
            f"on {args.device}"
        )
        print("\n".join(estimate.lines()))
        return True
    check_fits(estimate, loaded=loaded)
    return False


def cmd_prompt_list(args: argparse.Namespace) -> int:
    """`generate --prompts FILE`: every line's images, this process's share under torchrun."""
    if args.prompt is not None or args.from_png:
        raise ValueError("--prompts takes its prompts from the file: give no prompt and no --from")
    if args.dry_run or args.refiner or args.switch_at is not None:
        raise ValueError("--dry-run, --refiner and --switch-at take one generation: give a prompt, not --prompts")
    rank, world, local_rank = process_rank()
    defaults = {k: v for k, v in vars(args).items() if k in OPTION_FIELDS and v is not None}
    base_seed = defaults.pop("seed", 0)
    jobs = shard(read_prompt_file(args.prompts, defaults, base_seed), rank, world)
    out = Path(args.out)
    todo = [job for job in jobs if args.overwrite or not all(p.exists() for p in job.paths(out))]
    print(f"stablediff generate: {len(todo)} of {len(jobs)} prompts to run (process {rank} of {world})", flush=True)
    if not todo:
        return 0
    device = args.device
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"  # each rank its own GPU
    pipe = load_pipeline(args.model or default_model(), device=device, dtype=DTYPES[args.dtype])
    check_sdxl_options(args, pipe.spec, None)
    apply_addons(pipe, args)
    pipe.vae_tiling = args.vae_tiling
    if args.compile:
        pipe.compile()
    todo = [replace(job, params=pipe.resolve_params(job.params)) for job in todo]
    out.mkdir(parents=True, exist_ok=True)
    writer = ImageWriter(pipe)
    bar = tqdm(total=sum(j.params.steps * j.params.batch_size for j in todo), unit="step", disable=rank != 0 or None)
    for job in todo:
        done = bar.n

        def progress(step: int, total: int, done: int = done) -> None:
            bar.n = done + step
            bar.refresh()

        images = pipe.generate(job.params, callback=progress)
        for k, (image, path) in enumerate(zip(images, job.paths(out), strict=True)):
            if args.overwrite or not path.exists():
                writer.write(image, job.params, k, path, args.overwrite)
    bar.close()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    meta = read_png_metadata(args.image)
    if meta["parameters"] is None and meta["stablediff"] is None:
        raise ValueError(f"{args.image} carries no generation parameters")
    # A stranger's text: terminal escape sequences and other control characters are shown escaped.
    if meta["parameters"] is not None:
        print(printable(meta["parameters"]))
    if meta["stablediff"] is not None:
        print(printable(json.dumps(meta["stablediff"], indent=2, ensure_ascii=False)))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    # Without --dtype every tensor keeps its dtype, and the source's metadata travels along (our
    # spec rewritten by `save` for the new file).
    dtype = DTYPES[args.dtype] if args.dtype else None
    pipe = load_pipeline(args.source, dtype=dtype, use_ema=args.use_ema, prediction_type=args.prediction_type)
    path = save(
        pipe,
        args.target,
        layout=args.layout,
        dtype=dtype,
        overwrite=args.overwrite,
        metadata=model_metadata(pipe.source) if pipe.source else None,
    )
    print(path)
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from stablediff.shapes import write_shapes_folder

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    with tqdm(total=args.n, unit="img", desc="shapes", disable=None) as bar:
        folder = write_shapes_folder(
            args.out,
            args.n,
            seed=args.seed,
            split=args.split,
            size=args.size,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    print(folder)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from stablediff.eval import evaluate, plot_sweep, sweep, write_report, write_sweep

    suites = tuple(s for s in args.suites.split(",") if s)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    pipe = load_pipeline(args.model or default_model())
    size = pipe.spec.default_size

    def make_generate(sampler: str, steps: int, guidance: float):
        def generate(prompt: str, seed: int):
            # no width/height: the model's own size
            params = GenerationParams(
                prompt, steps=steps, sampler=sampler, schedule=args.schedule, guidance_scale=guidance, seed=seed
            )
            return pipe.generate(params)[0]

        return generate

    make_generate(args.sampler, args.steps, args.cfg)("a red circle", 0)  # fail early on bad settings
    with tqdm(total=args.n * len(suites), unit="img", desc="eval", disable=None) as bar:
        result = evaluate(
            make_generate(args.sampler, args.steps, args.cfg),
            suites=suites,
            n=args.n,
            seed=args.seed,
            progress=lambda done, total: bar.update(done - bar.n),
        )
    result["settings"] = {
        "model": pipe.source or pipe.spec.name,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "steps": args.steps,
        "guidance_scale": args.cfg,
        "size": size,
    }
    json_path, md_path = write_report(result, args.out)
    print(md_path.read_text())
    if args.sweep:
        rows = sweep(
            make_generate,
            samplers=("ddim", "euler", "dpmpp_2m", "unipc"),
            steps=(4, 8, 20, 50),
            guidances=(args.cfg,),
            n=args.sweep_n,
            seed=args.seed,
        )
        rows += sweep(
            make_generate,
            samplers=(args.sampler,),
            steps=(args.steps,),
            guidances=(1.0, 2.0, 4.0, 7.5, 10.0, 15.0),
            n=args.sweep_n,
            seed=args.seed,
        )
        write_sweep(rows, args.out)
        plot_sweep(rows, Path(args.out) / "sweep.png", guidance=args.cfg, steps=args.steps)
        print((Path(args.out) / "sweep.md").read_text())
    print(json_path)
    return 0


def _stage_progress(stage: str):
    bar = tqdm(unit="step", desc=stage, disable=None)

    def progress(step: int, total: int, metrics: dict) -> None:
        bar.total = total
        bar.n = step
        if "loss" in metrics:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        bar.refresh()
        if step >= total:
            bar.close()

    return progress


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from stablediff.train.config import TrainConfig, apply_overrides

    # --base, --token and --init-word are TrainConfig fields too, also written --key=value
    named = [f"{key}={getattr(args, key)}" for key in ("base", "token", "init_word") if getattr(args, key) is not None]
    if args.stage == "recipe":
        from stablediff.train.recipe import build_bundled_model, run_recipe

        if not args.recipe:
            raise ValueError("stablediff train recipe needs a recipe name or file, e.g. `train recipe shapes`")
        if overrides or args.data or named:
            raise ValueError("a recipe takes its settings from its file; edit a copy to change them")
        if args.package:
            print(build_bundled_model(args.recipe, args.out, args.package, _stage_progress))
        else:
            print(json.dumps({k: v["export"] for k, v in run_recipe(args.recipe, args.out, _stage_progress).items()}))
        return 0
    if args.recipe:
        raise ValueError(f"unexpected argument {args.recipe!r} (only `train recipe NAME` takes a name)")
    if not args.data:
        raise ValueError(
            f"stablediff train {args.stage} needs --data (a captioned image folder, a latent cache or 'shapes')"
        )
    if args.data != "shapes" and not Path(args.data).exists():
        raise ValueError(f"--data {args.data} does not exist")
    # the stage and its fields arrive together: a lora or embedding config is checked only whole
    config = apply_overrides(TrainConfig(data=args.data, out=args.out), [f"stage={args.stage}", *named, *overrides])
    if args.stage == "tokenizer":
        print(get_stage("tokenizer")(config).fit(args.out))
        return 0
    from stablediff.train.trainer import train

    print(train(args.stage, config, resume=args.resume, progress=_stage_progress(args.stage)))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from stablediff.serve import ServeConfig
        from stablediff.serve.app import create_app, run
    except ImportError as err:
        raise ValueError(f"the server needs the serve extra: pip install 'stablediff[serve]' ({err})") from None
    config = ServeConfig(
        model=args.model,
        models_dir=Path(args.models) if args.models else None,
        host=args.host,
        port=args.port,
        outputs=Path(args.outputs),
        api_key=args.api_key,
        device=args.device,
        extra_hosts=tuple(args.allow_host),
        lora_dir=Path(args.lora_dir) if args.lora_dir else None,
        embeddings_dir=Path(args.embeddings_dir) if args.embeddings_dir else None,
    ).check()  # a refused configuration fails before the model loads
    app = create_app(config)
    host = f"[{config.host}]" if ":" in config.host else config.host
    print(f"stablediff serve: http://{host}:{config.port}/  (API docs at /docs; Ctrl+C stops)", flush=True)
    run(config, app)
    return 0


COMMANDS = {
    "generate": cmd_generate,
    "img2img": cmd_generate,
    "inpaint": cmd_generate,
    "info": cmd_info,
    "convert": cmd_convert,
    "dataset": cmd_dataset,
    "eval": cmd_eval,
    "serve": cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            return cmd_train(args, extra)
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as err:  # bad input and bad files (errors.BadFileError); a bug shows its traceback
        print(f"stablediff {args.command}: error: {printable(str(err))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
