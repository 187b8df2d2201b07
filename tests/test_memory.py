"""Memory estimates before a run (stablediff.memory), `generate --dry-run`, and a run refused before
it loads anything when it would not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import stablediff.cli as cli
from stablediff.loading import load_pipeline, read_spec, save
from stablediff.memory import GIB, check_fits, estimate_generation, weight_bytes
from stablediff.params import GenerationParams
from stablediff.presets import PRESETS

SD15 = PRESETS["sd15"]


def test_weights_are_counted_from_the_configs():
    assert weight_bytes(SD15, 4) == pytest.approx(1.066e9 * 4, rel=0.01)  # 860M + 84M + 123M parameters
    assert weight_bytes(SD15, 2) * 2 == weight_bytes(SD15, 4)
    pipe = load_pipeline("tiny")
    assert weight_bytes(pipe.spec, 4) == sum(
        t.numel() * 4 for net in (pipe.unet, pipe.vae, pipe.text_encoder) for t in net.state_dict().values()
    )


def test_estimate_grows_with_size_and_tiles_when_it_would_not_fit():
    plenty = 1000 * GIB
    small = estimate_generation(SD15, GenerationParams("a", width=512, height=512), available=plenty)
    large = estimate_generation(SD15, GenerationParams("a", width=2048, height=2048), available=plenty)
    assert small.weights == large.weights and large.peak > small.peak
    assert not large.tiled["VAE decode"]  # everything fits: untiled
    assert large.stages["VAE decode"] == max(large.stages.values())  # the VAE decode is the peak at 2048
    tight = estimate_generation(SD15, GenerationParams("a", width=2048, height=2048), available=9 * GIB)
    assert tight.tiled["VAE decode"] and tight.peak < 9 * GIB  # auto tiles: it fits
    check_fits(tight)
    never = estimate_generation(
        SD15, GenerationParams("a", width=2048, height=2048), available=9 * GIB, vae_tiling="never"
    )
    with pytest.raises(ValueError) as caught:
        check_fits(never)
    text = str(caught.value)
    assert f"{never.peak / GIB:.2f} GiB" in text and "9.00 GiB is available" in text
    assert "--vae-tiling always" in text and "--dtype bf16" in text and "smaller width" in text
    half = estimate_generation(SD15, GenerationParams("a", width=512, height=512), torch.bfloat16, available=plenty)
    assert half.weights * 2 == small.weights


def test_batches_count_on_cuda_only():
    params = GenerationParams("a", width=512, height=512, batch_size=4)
    cpu = estimate_generation(SD15, params, available=100 * GIB)
    cuda = estimate_generation(SD15, params, available=100 * GIB, device="meta", batch_images=True)
    assert cuda.stages["U-Net"] == 4 * cpu.stages["U-Net"]


def test_img2img_counts_the_encode():
    params = GenerationParams("a", width=1024, height=1024, init_image="x.png")
    est = estimate_generation(SD15, params, available=100 * GIB)
    assert est.stages["VAE encode"] > 0 and "VAE encode (untiled) activations:" in "\n".join(est.lines())


def test_read_spec_without_the_weights(tmp_path):
    pipe = load_pipeline("tiny")
    assert read_spec("tiny") == PRESETS["tiny"]
    assert read_spec("shapes").name.startswith("stablediff")  # the bundled model's stored spec
    ours = save(pipe, tmp_path / "ours.safetensors")
    assert read_spec(ours) == pipe.spec
    save_file(load_file(ours), tmp_path / "foreign.safetensors")  # no metadata: shapes only
    foreign = read_spec(tmp_path / "foreign.safetensors")
    assert foreign.unet.channel_mult == pipe.spec.unet.channel_mult and foreign.vae.ch == pipe.spec.vae.ch
    folder = save(pipe, tmp_path / "folder", layout="diffusers")
    assert read_spec(folder).unet == pipe.spec.unet
    torch.save({"state_dict": {}}, tmp_path / "pickled.ckpt")
    assert read_spec(tmp_path / "pickled.ckpt") is None  # known only once read


def test_dry_run_prints_and_loads_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("--dry-run loaded the model"))
    code = cli.main(["generate", "a cat", "--model", "sd15", "--width", "2048", "--height", "2048", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory estimate for 2048x2048" in out and "estimated peak:" in out and "available:" in out
    assert "VAE decode" in out and not (tmp_path / "outputs").exists()


def test_a_run_that_would_not_fit_fails_before_loading(monkeypatch, capsys, tmp_path):
    import stablediff.memory as memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 2 * GIB)
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    code = cli.main(["generate", "a cat", "--model", "sd15", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "needs an estimated" in err and "2.00 GiB is available" in err and "--dtype bf16" in err


def test_vae_tiling_flag_reaches_the_pipeline(monkeypatch, tmp_path, capsys):
    seen = {}
    real = cli.load_pipeline

    def load(*a, **k):
        pipe = real(*a, **k)
        original = pipe.generate

        def generate(params, **kw):
            seen["tiling"] = pipe.vae_tiling
            return original(params, **kw)

        pipe.generate = generate
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load)
    code = cli.main(
        ["generate", "a cat", "--model", "tiny", "--steps", "1", "--vae-tiling", "always", "--out", str(tmp_path)]
    )
    assert code == 0 and seen["tiling"] == "always"
    capsys.readouterr()
