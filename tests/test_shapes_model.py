"""The embedded `shapes` model is a real `StableDiffusionPipeline`: it loads in plain diffusers, the env reproduces
the pipeline's own sampling loop, a LoRA tuned in the env round-trips through diffusers' `load_lora_weights`,
and the shapes rewards read rendered images correctly."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import rewards  # noqa: E402
from diffenv import DiffusionSteerVectorEnv  # noqa: E402
from diffenv.models import load_backend  # noqa: E402
from diffenv.models.shapes import SHAPES_DIR  # noqa: E402
from rewards import shapes_task as task  # noqa: E402

PROMPT_IDS = [0, 20, 100, 1200]  # single, counting, binding/relation train, a held-out prompt


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def backend():
    return load_backend("shapes")


def plain_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(SHAPES_DIR, use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)


def test_folder_is_a_stable_diffusion_pipeline_over_the_grammar(backend):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = plain_pipeline()
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.unet.config.cross_attention_dim > 0
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * 4 == 32
    for word in task.WORDS:  # word-level vocabulary: one token per grammar word
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1
    assert backend.condition_names == task.model_prompts()
    assert [backend.condition_names[i] for i in backend.condition_splits["heldout"]] == task.split_prompts("heldout")
    assert backend.default_num_steps == 20 and backend.latent_shape == (4, 8, 8)
    env = DiffusionSteerVectorEnv(num_envs=4, model=backend, reward=None, num_steps=2, seed=0)
    assert env.condition_set.tolist() == backend.condition_splits["train"]  # training prompts by default
    env = DiffusionSteerVectorEnv(num_envs=4, model=backend, reward=None, num_steps=2, conditions="heldout")
    assert env.condition_set.tolist() == backend.condition_splits["heldout"]
    with pytest.raises(ValueError, match="heldout"):  # an unknown split names the known ones
        DiffusionSteerVectorEnv(num_envs=4, model=backend, reward=None, num_steps=2, conditions="held_out")
    with pytest.raises(ValueError, match="fixed prompt set"):
        load_backend("shapes", prompts=["a red circle"])


def run_env(backend, steps, guidance, sampler, noise_seed, **kwargs):
    env = DiffusionSteerVectorEnv(num_envs=len(PROMPT_IDS), model=backend, reward=None, num_steps=steps,
                                  sampler=sampler, guidance_scale=guidance, seed=0, conditions=["train", "heldout"],
                                  **kwargs)
    obs, _ = env.reset(options={"conditions": PROMPT_IDS})
    x_T = obs["latent"].clone()
    gen = torch.Generator().manual_seed(noise_seed)
    for _ in range(steps):
        obs, _, _, _, info = env.step(torch.randn(x_T.shape, generator=gen))
    return x_T, info["final_images"]


@pytest.mark.parametrize("guidance,eta", [(3.0, 0.0), (1.0, 1.0)])
def test_env_noise_mode_reproduces_pipe_images(backend, guidance, eta):
    """Same x_T and the same noise draws: the env's images are `pipe(...)`'s (its own DDIM scheduler)."""
    steps = 6
    x_T, images = run_env(backend, steps, guidance, "ddim" if eta else "ode", noise_seed=5, eta=eta)
    pipe = plain_pipeline()
    out = pipe([backend.condition_names[i] for i in PROMPT_IDS], num_inference_steps=steps, guidance_scale=guidance,
               eta=eta, latents=x_T, generator=torch.Generator().manual_seed(5), output_type="pt").images
    # float32 network + 6 steps: differences are rounding (~1e-6 relative), far below one 8-bit level
    torch.testing.assert_close(images, out, atol=1e-4, rtol=0)


def test_briefly_tuned_lora_exports_to_diffusers(backend, tmp_path):
    """One GRPO update on the verifier reward, exported in diffusers' format: a plain pipeline with
    `load_lora_weights` samples the same images as the env with the tuned adapter, at guidance 1."""
    from agents import DiffusionPolicy
    from agents.algos.grpo import GRPO, GRPOConfig
    from agents.losses import total_loss
    from agents.rollout import collect_rollout

    backend = load_backend("shapes")  # its own copy: the adapter must not leak into other tests
    policy = DiffusionPolicy(backend, num_steps=2, lora_rank=4, lora_alpha=8)
    env = DiffusionSteerVectorEnv(num_envs=4, action_mode="latent", reward="shapes_verifier", group_size=2, seed=2,
                                  **policy.env_kwargs())
    rollout = collect_rollout(policy, env, torch.Generator().manual_seed(3))
    algo = GRPO(policy, GRPOConfig(group_size=2))
    with torch.no_grad():
        items = algo.prepare(rollout)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=5e-2)
    total_loss(algo.loss(items)).backward()
    optimizer.step()
    backend.export_lora(tmp_path / "lora")

    x_T, images = run_env(backend, 4, 1.0, "ode", noise_seed=0)
    base_backend = load_backend("shapes")
    _, base_images = run_env(base_backend, 4, 1.0, "ode", noise_seed=0)
    assert (images - base_images).abs().max() > 1e-3  # the update shows in the images ...
    pipe = plain_pipeline()
    pipe.load_lora_weights(tmp_path / "lora")
    out = pipe([backend.condition_names[i] for i in PROMPT_IDS], num_inference_steps=4, guidance_scale=1.0,
               eta=0.0, latents=x_T, output_type="pt").images
    torch.testing.assert_close(images, out, atol=1e-4, rtol=0)  # ... and survives the export


@pytest.mark.parametrize("name", ["shapes_verifier", "shapes_judge"])
def test_rewards_read_rendered_images(name):
    """Exact prompt satisfaction on a fresh rendered set (positives) and rejection of hard negatives."""
    from retrain.train_shapes_rewards import hard_negative

    reader = rewards.make(name)
    rng = np.random.default_rng(123)
    prompts = task.sample_prompts(400, rng, split="all")
    images, _ = task.render(prompts, seed=123)
    index = {p: i for i, p in enumerate(task.model_prompts())}
    pos = torch.tensor([index[p] for p in prompts])
    neg = torch.tensor([index[hard_negative(p, rng)] for p in prompts])
    x = torch.from_numpy(images)
    assert reader.satisfied(x, pos).float().mean() >= 0.97
    assert (~reader.satisfied(x, neg)).float().mean() >= 0.97
    r_pos, r_neg = reader(x, pos), reader(x, neg)
    assert r_pos.shape == (400,) and ((0 <= r_pos) & (r_pos <= 1)).all()
    assert r_pos.mean() > r_neg.mean() + 0.2  # partial credit still separates right from wrong prompts
    comps = reader.components(x[:8], pos[:8])
    assert set(comps) >= {name, "objects", "nothing_else", "relation", "prompt_prob"}
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        reader(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_sample_command_writes_prompts_and_a_captioned_grid(tmp_path, capsys):
    from agents.cli import main

    out, grid = tmp_path / "x.npz", tmp_path / "g.png"
    assert main(["sample", "--model", "shapes", "--n", "6", "--num-steps", "2", "--guidance-scale", "3",
                 "--conditions", "heldout", "--seed", "7", "--out", str(out), "--grid", str(grid), "--reward",
                 "shapes_verifier", "--threads", "1"]) == 0
    data = np.load(out)  # no pickle needed: prompts are a unicode array
    assert data["images"].shape == (6, 3, 32, 32) and data["prompts"].shape == (6,)
    held = set(task.split_prompts("heldout"))
    assert all(p in held for p in data["prompts"].tolist())
    names = task.model_prompts()
    assert [names[c] for c in data["conditions"].tolist()] == data["prompts"].tolist()
    assert grid.is_file() and "num_steps=2" in capsys.readouterr().out


def test_caption_noise_replaces_the_stated_share_with_training_prompts():
    """`train_shapes --caption-noise q`: each caption is swapped for a random *training* prompt with probability q
    (binomial share within 5 σ), reproducibly; images are untouched (the function only sees captions)."""
    from retrain.train_shapes import noisy_captions

    prompts = task.sample_prompts(20_000, np.random.default_rng(0))
    out = noisy_captions(prompts, 0.15, np.random.default_rng(1))
    assert out == noisy_captions(prompts, 0.15, np.random.default_rng(1)) and out is not prompts
    changed = [o for p, o in zip(prompts, out) if o != p]
    sigma = (0.15 * 0.85 / len(prompts)) ** 0.5
    # a swap can draw its own prompt again (≤ 1/18 per swap, single-object kind), hence the one-sided slack
    assert 0.15 * (1 - 1 / 18) - 5 * sigma < len(changed) / len(prompts) < 0.15 + 5 * sigma
    assert set(changed) <= set(task.split_prompts("train"))
    assert noisy_captions(prompts, 0.0, np.random.default_rng(1)) == prompts
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"caption_noise must be in \[0, 1\)"):
            noisy_captions(prompts, bad, np.random.default_rng(1))
