"""Diffusers backends (SD1.x, SDXL, SD3, Flux) on tiny random pipelines saved to tmp_path: loading, the
env in noise and latent modes, exactness against the plain pipeline, the policy's log-prob, one GRPO
update that touches only LoRA weights, and the diffusers-format LoRA round trip."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffenv import DiffusionSteerVectorEnv  # noqa: E402
from diffenv.models import load_backend  # noqa: E402
from diffenv.models.diffusers_backend import load_pipeline, parse_model_spec  # noqa: E402
from diffenv.models.prompts import load_prompts, prompt_splits  # noqa: E402
from diffenv.models.tiny import save_tiny_pipeline  # noqa: E402

FAMILIES = ("sd", "sdxl", "sd3", "flux")
PROMPTS = ["a red cat", "a blue dog", "a green tree"]
T5_KWARGS = {"sd3": {"max_sequence_length": 16}, "flux": {"max_sequence_length": 16}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {family: save_tiny_pipeline(family, root / family) for family in FAMILIES}


def make_backend(folders, family, **kwargs):
    return load_backend(f"{family}:{folders[family]}", prompts=PROMPTS, height=64, width=64,
                        **T5_KWARGS.get(family, {}), **kwargs)


def plain_pipeline(folders, family):
    return load_pipeline(family, str(folders[family]))


def brightness(images, conditions):
    return images.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------- loading and the interface


def test_spec_parsing_and_loading_errors(folders, tmp_path):
    assert parse_model_spec("sd:/m/sd15?prompts=p.txt&height=512&torch_dtype=fp16") == (
        "sd", "/m/sd15", {"prompts": "p.txt", "height": 512, "torch_dtype": "fp16"})
    with pytest.raises(ValueError, match="expected '<kind>:<path or hub id>'"):
        parse_model_spec("sd4:/x")
    with pytest.raises(ValueError, match="bad option 'color=red'"):
        parse_model_spec("sd:/x?color=red")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_backend(f"sd:{tmp_path / 'missing'}", prompts=PROMPTS)
    with pytest.raises(FileNotFoundError, match="model_index.json is missing"):
        load_backend(f"sd:{tmp_path}", prompts=PROMPTS)
    with pytest.raises(ValueError, match="use 'sdxl:"):
        load_backend(f"sd:{folders['sdxl']}", prompts=PROMPTS)
    with pytest.raises(ValueError, match="pass prompts="):
        load_backend(f"sd:{folders['sd']}")
    with pytest.raises(ValueError, match="not supported"):
        load_backend(f"sd:{folders['sd']}", prompts=PROMPTS, torch_dtype="float8")


def test_prompt_sets(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# a comment\na red cat\n\n  a blue dog  \n")
    assert load_prompts(f) == ["a red cat", "a blue dog"]
    assert load_prompts(["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="appears twice"):
        load_prompts(["x", "x"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(empty)
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.txt")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"a cat\n\xff\xfe\x00\x81")
    for read in (load_prompts, prompt_splits):
        with pytest.raises(ValueError, match=rf"prompt file '{binary}' is not UTF-8 text \(byte 6: invalid start"):
            read(binary)


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_interface(folders, family):
    backend = make_backend(folders, family)
    assert backend.family == ("ddpm" if family in ("sd", "sdxl") else "flow")
    assert backend.prediction_type == ("epsilon" if family in ("sd", "sdxl") else "flow")
    assert backend.latent_shape == (4, 32, 32) and backend.condition_names == PROMPTS
    assert backend.null_condition == 3 and backend.pipe.text_encoder is None  # cached, encoders freed
    x = torch.randn(4, *backend.latent_shape)
    t = torch.full((4,), 500.0)
    c = torch.tensor([0, 1, 2, 3])
    out = backend.forward_model(x, t, c)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])  # different prompts, different outputs
    images = backend.decode(x[:2])
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    if family == "sdxl":  # force_zeros_for_empty_prompt: the null condition is all zeros, as in the pipeline
        assert backend._cond["prompt_embeds"][3].abs().max() == 0
    chunked = make_backend(folders, family, micro_batch_size=1)
    torch.testing.assert_close(chunked.forward_model(x, t, c), out, atol=1e-5, rtol=1e-4)


def test_flux_dynamic_shift_is_resolved_to_a_static_shift(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    backend = make_backend(folders, "flux")
    assert backend.scheduler_config["use_dynamic_shifting"] is False
    assert backend.scheduler_mu == pytest.approx(calculate_shift(16 * 16, 256, 4096, 0.5, 1.15))
    grid = [1.0, 0.75, 0.5, 0.25]
    dynamic = FlowMatchEulerDiscreteScheduler.from_config(plain_pipeline(folders, "flux").scheduler.config)
    dynamic.set_timesteps(sigmas=grid, mu=backend.scheduler_mu)
    static = FlowMatchEulerDiscreteScheduler.from_config(backend.scheduler_config)
    static.set_timesteps(sigmas=grid)
    torch.testing.assert_close(static.sigmas, dynamic.sigmas)


def test_half_precision_weights_float32_outputs(folders):
    backend = make_backend(folders, "sd", torch_dtype="bf16")
    assert backend.denoiser.dtype == torch.bfloat16
    out = backend.forward_model(torch.randn(2, 4, 32, 32), torch.full((2,), 999.0), torch.tensor([0, 3]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ---------------------------------------------------------------- the env


@pytest.mark.parametrize("family", FAMILIES)
def test_env_noise_mode_reproduces_the_plain_pipeline_with_cfg(folders, family):
    """Deterministic sampler, CFG 2: the env's final latents equal the diffusers pipeline's own loop."""
    from diffusers import DDIMScheduler

    backend = make_backend(folders, family)
    steps = 3  # Flux: the backend hands the env FluxPipeline's own sigma grid, linspace(1, 1/K, K)
    env = DiffusionSteerVectorEnv(num_envs=2, model=backend, reward=None, num_steps=steps, sampler="ode",
                                  guidance_scale=2.0, seed=0)
    obs, _ = env.reset(options={"conditions": [0, 2]})
    x_T = obs["latent"].clone()
    for _ in range(steps):
        obs, _, terminated, _, info = env.step(torch.randn(2, *backend.latent_shape))
    assert terminated.all() and (info["nfe"] == 2 * steps).all()

    pipe = plain_pipeline(folders, family)
    kwargs = dict(prompt=[PROMPTS[0], PROMPTS[2]], num_inference_steps=steps, output_type="latent",
                  height=64, width=64, latents=x_T, **T5_KWARGS.get(family, {}))
    if family in ("sd", "sdxl"):  # the env's DDIM(η=0) == DDIMScheduler on the backend's config
        pipe.scheduler = DDIMScheduler.from_config(backend.scheduler_config)
        kwargs.update(guidance_scale=2.0, eta=0.0)
    elif family == "sd3":
        kwargs.update(guidance_scale=2.0)
    else:  # Flux: true CFG against the negative prompt; the distilled guidance embedding stays at 3.5
        kwargs.update(true_cfg_scale=2.0, negative_prompt="", guidance_scale=3.5,
                      latents=pipe._pack_latents(x_T, 2, 4, 32, 32))
    expected = pipe(**kwargs).images
    if family == "flux":
        expected = pipe._unpack_latents(expected, 64, 64, pipe.vae_scale_factor)
    torch.testing.assert_close(env.latents, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_policy_log_prob_grpo_update_and_diffusers_lora_round_trip(folders, family, tmp_path):
    from agents import DiffusionPolicy
    from agents.algos.grpo import GRPO, GRPOConfig
    from agents.losses import total_loss
    from agents.rollout import collect_rollout
    from diffenv.models.lora import adapter_disabled
    from diffenv.samplers import gaussian_log_prob

    backend = make_backend(folders, family)
    policy = DiffusionPolicy(backend, num_steps=2, lora_rank=4, lora_alpha=8)
    base = {k: v.clone() for k, v in backend.denoiser.state_dict().items()}

    # 1. noise mode: the policy's log-prob of the env's transition is the env sampler's
    env = DiffusionSteerVectorEnv(num_envs=2, reward=brightness, seed=1, **policy.env_kwargs())
    obs, _ = env.reset()
    x, k, c = obs["latent"].clone(), env.step_index.clone(), obs["condition"].clone()
    eps = torch.randn(2, *backend.latent_shape, generator=torch.Generator().manual_seed(0))
    env.step(eps)
    std = env.sampler.stds[0].expand(2)
    mean = env.latents - std.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(policy.log_prob(env.latents, x, k, c), gaussian_log_prob(env.latents, mean, std),
                               atol=1e-3, rtol=1e-5)

    # 2. latent mode: a rollout and one GRPO update change the LoRA weights and nothing else
    env = DiffusionSteerVectorEnv(num_envs=2, action_mode="latent", reward=brightness, group_size=2, seed=2,
                                  **policy.env_kwargs())
    rollout = collect_rollout(policy, env, torch.Generator().manual_seed(3))
    assert rollout["latents"].shape == (2, 3, *backend.latent_shape) and torch.isfinite(rollout["log_probs"]).all()
    algo = GRPO(policy, GRPOConfig(group_size=2, kl_coef=0.01))
    with torch.no_grad():
        items = algo.prepare(rollout)
    out = algo.loss(items)
    assert out["ratio_mean"].item() == pytest.approx(1.0, abs=1e-3)  # at the old parameters (float32 noise)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    total_loss(out).backward()
    optimizer.step()
    after = backend.denoiser.state_dict()
    changed = {name for name in after if not torch.equal(after[name], base[name])}
    assert changed and all("lora_" in name for name in changed)

    # 3. export in diffusers' format; a plain pipeline with load_lora_weights gives the tuned outputs
    written = backend.export_lora(tmp_path / "lora")
    assert written.is_file()
    pipe = plain_pipeline(folders, family)
    pipe.load_lora_weights(tmp_path / "lora")
    plain = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    x = torch.randn(2, *backend.latent_shape)
    inputs = backend.denoiser_inputs(x, torch.full((2,), 700.0), torch.tensor([1, 2]))
    with torch.no_grad():
        tuned = backend.denoiser(**inputs, return_dict=False)[0]
        loaded = plain(**inputs, return_dict=False)[0]
        with adapter_disabled(backend.denoiser):
            untuned = backend.denoiser(**inputs, return_dict=False)[0]
    assert (tuned - untuned).abs().max() > 1e-4  # the update is visible ...
    torch.testing.assert_close(loaded, tuned, atol=1e-5, rtol=1e-4)  # ... and survives the export


# ---------------------------------------------------------------- the A/B command


def test_ab_command_writes_grid_and_reports(folders, tmp_path, capsys):
    from agents.cli import main
    from diffenv.models.lora import add_lora, save_lora

    backend = make_backend(folders, "sd")
    config = add_lora(backend.denoiser, rank=2, init_lora_weights=False)  # a random, non-zero adapter
    backend.export_lora(tmp_path / "lora")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    grid = tmp_path / "ab.png"
    rc = main(["ab", "--model", f"sd:{folders['sd']}", "--lora", str(tmp_path / "lora"), "--prompts", str(prompts),
                  "--seeds", "0", "1", "--num-steps", "2", "--guidance-scale", "3", "--height", "64",
                  "--width", "64", "--reward", "jpeg_compressibility", "--out", str(grid)])
    text = capsys.readouterr().out
    assert rc == 0 and grid.is_file()
    assert "base+CFG" in text and "LoRA" in text and "NFE" in text

    # a trainer's own LoRA file (save_lora format) is converted on the fly
    save_lora(backend.denoiser, tmp_path / "lora.safetensors", config)
    rc = main(["ab", "--model", f"sd:{folders['sd']}", "--lora", str(tmp_path / "lora.safetensors"),
                  "--prompts", str(prompts), "--seeds", "0", "--num-steps", "1", "--height", "64", "--width", "64",
                  "--out", str(tmp_path / "ab2.png")])
    assert rc == 0 and (tmp_path / "ab2.png").is_file()
    assert main(["ab", "--model", f"sd:{folders['sd']}", "--lora", str(tmp_path / "none"), "--prompts", str(prompts),
                    "--num-steps", "1", "--height", "64", "--width", "64", "--out", str(tmp_path / "x.png")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_cli_prompts_flag_samples_and_trains_a_text_to_image_model(folders, tmp_path, capsys):
    from agents.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    model = f"sd:{folders['sd']}?height=64&width=64"
    out = tmp_path / "s.npz"
    assert main(["sample", "--model", model, "--prompts", str(prompts), "--reward", "none", "--num-steps", "2",
                 "--n", "3", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (3, 3, 64, 64)
    run = tmp_path / "run"
    assert main(["train", "--algo", "grpo", "--model", model, "--prompts", str(prompts), "--reward",
                 "jpeg_compressibility", "--num-steps", "2", "--images", "4", "--out", str(run), "--no-progress",
                 "--set", "images_per_epoch=4", "--set", "group_size=2", "--grid-every", "0"]) == 0
    assert main(["sample", "--model", model, "--prompts", str(prompts), "--reward", "none", "--num-steps", "2",
                 "--n", "2", "--lora", str(run / "lora.safetensors")]) == 0
    assert "NFE per image: 2" in capsys.readouterr().out
    prompts.write_bytes(bytes(range(256)))  # a binary file: one line naming it, exit 2
    assert main(["sample", "--model", model, "--prompts", str(prompts), "--num-steps", "2", "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"prompt file '{prompts}' is not UTF-8 text" in err, err
