"""Recipes: parsing (base inheritance, errors) and a whole tiny recipe run, resumed, packaged, loaded."""

from __future__ import annotations

import json

import pytest
import torch

from stablediff import GenerationParams, load_pipeline
from stablediff.shapes import inverse_relation_caption
from stablediff.train.recipe import (
    _latent_cache,
    evaluate_packaged,
    final_export,
    package_model,
    phases,
    read_recipe,
    run_recipe,
    stage_config,
    training_seconds,
)
from stablediff.weights.io import read_metadata, read_state_dict

TINY = """
base = "shapes"
finetune = false
polish = false
[common]
model = "tiny"
shapes_size = 256
eval_size = 8
log_every = 2
[vae]
steps = 3
batch_size = 4
save_every = 3
eval_every = 3
[text]
steps = 3
batch_size = 8
save_every = 3
eval_every = 3
[latents]
scenes = 32
[unet]
steps = 3
batch_size = 4
save_every = 3
sample_every = 0
[eval]
n = 2
steps = 2
"""


def test_gpu_recipe_inherits_the_cpu_recipe():
    cpu, _ = read_recipe("shapes")
    gpu, text = read_recipe("shapes-gpu")
    assert gpu["unet"]["batch_size"] == 128 and gpu["unet"]["min_snr_gamma"] == cpu["unet"]["min_snr_gamma"]
    assert gpu["eval"] == cpu["eval"] and gpu["common"]["num_workers"] == 6 and gpu["name"] == "shapes-gpu"
    assert gpu["vae"]["recon_focus"] == cpu["vae"]["recon_focus"]
    assert "base recipe 'shapes'" in text and 'base = "shapes"' in text


def test_a_gpu_recipe_finetune_phase_inherits_the_unet_phase(tmp_path):
    gpu, _ = read_recipe("shapes-gpu")
    config = stage_config(gpu, "finetune", tmp_path)
    assert config.train_text_encoder and (config.steps, config.batch_size, config.lr) == (3600, 64, 2e-4)
    assert config.min_snr_gamma == gpu["unet"]["min_snr_gamma"] and config.ema_decay == gpu["unet"]["ema_decay"]
    assert config.base == str(tmp_path / "unet" / "export" / "model.safetensors")


def test_a_gpu_recipe_relations_phase_continues_the_finetune_phase_on_the_pair_cache(tmp_path):
    gpu, _ = read_recipe("shapes-gpu")
    config = stage_config(gpu, "relations", tmp_path)
    assert config.stage == "finetune" and config.out == str(tmp_path / "relations")
    assert (config.steps, config.batch_size, config.lr, config.high_noise_fraction) == (3500, 512, 3e-4, 0.3)
    assert config.train_text_encoder and config.ema_decay == gpu["unet"]["ema_decay"] and config.num_workers == 6
    assert config.base == str(tmp_path / "finetune" / "export" / "model.safetensors")
    assert config.data == str(tmp_path / "latents-pairs.safetensors")


def test_training_time_leaves_out_the_pause_of_a_resumed_run(tmp_path):
    # 2 s per 10 steps, the first log line at step 10; stopped after step 30, resumed an hour later.
    rows = [{"step": s, "time": 1000.0 + 0.2 * s} for s in (10, 20, 30)]
    rows += [{"step": s, "time": 4600.0 + 0.2 * s} for s in (40, 50)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_seconds(tmp_path) == pytest.approx(10.0)  # 50 steps at 0.2 s
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert training_seconds(tmp_path) is None  # one line: no rate


def test_the_cpu_recipe_freezes_the_text_encoder_then_trains_it_and_the_gpu_recipe_drops_its_polish():
    cpu, _ = read_recipe("shapes")
    gpu, _ = read_recipe("shapes-gpu")
    assert phases(cpu) == ["finetune", "polish"] and phases(gpu) == ["finetune", "relations"]
    assert not cpu["unet"].get("train_text_encoder") and cpu["finetune"]["train_text_encoder"]
    assert cpu["polish"]["continues"] == "finetune" and "polish" not in gpu


def test_a_false_table_leaves_out_the_base_table(tmp_path):
    (tmp_path / "parent.toml").write_text('[common]\nseed = 3\n[vae]\nsteps = 5\n[extra]\ncontinues = "unet"\n')
    (tmp_path / "child.toml").write_text('base = "parent"\nextra = false\n[common]\nseed = 4\n')
    recipe, _ = read_recipe(tmp_path / "child.toml")
    assert recipe == {"common": {"seed": 4}, "vae": {"steps": 5}}


def test_base_is_looked_up_next_to_the_file_first(tmp_path):
    (tmp_path / "parent.toml").write_text("[common]\nseed = 3\nresolution = 32\n[vae]\nsteps = 5\n")
    (tmp_path / "child.toml").write_text('base = "parent"\n[common]\nseed = 4\n')
    recipe, _ = read_recipe(tmp_path / "child.toml")
    assert recipe["common"] == {"seed": 4, "resolution": 32} and recipe["vae"] == {"steps": 5}


def test_recipe_errors(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b"\n')
    (tmp_path / "b.toml").write_text('base = "a"\n')
    with pytest.raises(ValueError, match="loops"):
        read_recipe(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text("[optimiser]\nlr = 1\n")
    with pytest.raises(ValueError, match=r"unknown tables \['optimiser'\]"):
        read_recipe(tmp_path / "c.toml")
    with pytest.raises(ValueError, match="no packaged recipe of that name; packaged: .*'shapes'"):
        read_recipe("no-such-recipe")


def test_tiny_recipe_trains_every_stage_resumes_and_packages(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    out = tmp_path / "run"
    stages = run_recipe(path, out)
    assert list(stages) == ["tokenizer", "vae", "text", "unet"]
    assert (out / "latents.safetensors").is_file()
    assert stage_config(read_recipe(path)[0], "unet", out).data == str(out / "latents.safetensors")
    # A second run finds every export and trains nothing.
    mtime = (out / "unet" / "metrics.jsonl").stat().st_mtime
    again = run_recipe(path, out)
    assert again["unet"]["export"] == stages["unet"]["export"]
    assert (out / "unet" / "metrics.jsonl").stat().st_mtime == mtime
    _, text = read_recipe(path)
    model = package_model(stages["unet"]["export"], tmp_path / "model.safetensors", text, stages)
    meta = read_metadata(model)
    assert json.loads(meta["stablediff.steps"]) == {"vae": 3, "text": 3, "unet": 3}
    assert meta["stablediff.recipe"].startswith(TINY) and "stablediff.eval" not in meta
    # Evaluated afterwards (as a model trained on another machine is): same weights, eval added.
    evaluated = evaluate_packaged(model, path, tmp_path / "evaluated.safetensors", tmp_path / "report")
    meta2 = read_metadata(evaluated)
    summary = json.loads(meta2.pop("stablediff.eval"))
    assert meta2 == meta and set(summary["suites"]) == {"single", "heldout", "relation"}
    assert summary["settings"]["n"] == 2 and (tmp_path / "report" / "eval.json").is_file()
    weights, shipped = read_state_dict(model), read_state_dict(evaluated)
    assert weights.keys() == shipped.keys() and all(torch.equal(weights[k], shipped[k]) for k in weights)
    pipe = load_pipeline(evaluated)
    image = pipe.generate(GenerationParams("a red circle", width=64, height=64, steps=2, seed=0))[0]
    assert image.size == (64, 64)


def test_later_phases_continue_the_phase_before_and_the_last_is_the_packaged_model(tmp_path):
    path = tmp_path / "tiny.toml"
    phase = "steps = 2\nlr = 1e-2\nwarmup_steps = 1\ntrain_text_encoder = true\n"
    path.write_text(
        TINY
        + "[latents.pairs]\nextra_scenes = 8\nobjects = 2\nseed = 11\n"
        + '[joint]\ncontinues = "unet"\n'
        + phase
        + '[relations]\ncontinues = "joint"\ncache = "pairs"\n'
        + phase
    )
    out = tmp_path / "run"
    recipe, text = read_recipe(path)
    config = stage_config(recipe, "joint", out)
    assert config.base == str(out / "unet" / "export" / "model.safetensors")
    assert config.data == str(out / "latents.safetensors") and config.batch_size == 4 and config.steps == 2
    assert stage_config(recipe, "relations", out).base == str(out / "joint" / "export" / "model.safetensors")
    stages = run_recipe(path, out)
    assert list(stages) == ["tokenizer", "vae", "text", "unet", "joint", "relations"]
    assert final_export(stages) == stages["relations"]["export"] != stages["joint"]["export"]
    scenes, pairs = (
        json.loads(read_metadata(out / name)["captions"])
        for name in ("latents.safetensors", "latents-pairs.safetensors")
    )
    assert pairs[:32] == scenes and len(pairs) == 40
    assert all(inverse_relation_caption(c) for c in pairs[32:])  # the appended scenes all have two objects
    model = package_model(final_export(stages), tmp_path / "model.safetensors", text, stages)
    assert json.loads(read_metadata(model)["stablediff.steps"]) == {
        "vae": 3,
        "text": 3,
        "unet": 3,
        "joint": 2,
        "relations": 2,
    }
    phases = [load_pipeline(stages[name]["export"]) for name in ("unet", "joint", "relations")]
    shipped = load_pipeline(model)
    for name in ("unet", "text_encoder"):  # both networks trained on in each later phase, and shipped
        a, b, c, d = (getattr(p, name).state_dict() for p in (*phases, shipped))
        assert any(not torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(b[k], c[k]) for k in b), name
        assert all(torch.equal(c[k].half().float(), d[k]) for k in c), name


def test_a_phase_continues_an_earlier_phase_on_a_described_cache(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY + '[relations]\ncontinues = "unet"\nsteps = 2\n')
    recipe, _ = read_recipe(path)
    assert stage_config(recipe, "relations", tmp_path).base == str(tmp_path / "unet" / "export" / "model.safetensors")
    path.write_text(TINY + '[latents.pairs]\nextra_scenes = 8\n[relations]\ncontinues = "unet"\ncache = "pairs"\n')
    recipe, _ = read_recipe(path)
    with pytest.raises(ValueError, match="must set pairs.objects, pairs.seed"):
        _latent_cache(recipe, tmp_path, "pairs")
    path.write_text(TINY + '[relations]\ncontinues = "unet"\ncache = "pairs"\n')
    with pytest.raises(ValueError, match=r"no \[latents.pairs\]"):
        read_recipe(path)
    path.write_text(TINY + '[relations]\ncontinues = "finetune"\n')
    with pytest.raises(ValueError, match="continues 'finetune', which is not 'unet' or a phase before it"):
        read_recipe(path)


def test_train_recipe_command_packages_an_evaluated_model(tmp_path, capsys):
    from stablediff.cli import main

    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    target = tmp_path / "model.safetensors"
    assert main(["train", "recipe", str(path), "--out", str(tmp_path / "run"), "--package", str(target)]) == 0
    assert capsys.readouterr().out.strip().endswith(str(target))
    summary = json.loads(read_metadata(target)["stablediff.eval"])
    assert summary["settings"]["n"] == 2 and summary["judge"]["clean"]["overall"] >= 0.99
    assert (tmp_path / "run" / "eval" / "eval.md").is_file()
    assert main(["train", "recipe", str(path), "--out", str(tmp_path / "run"), "--lr=1"]) == 2
    assert "a recipe takes its settings from its file" in capsys.readouterr().err
