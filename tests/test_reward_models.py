"""Reward models via transformers (CLIP score, aesthetic head, PickScore-style) on a tiny CLIP saved to
tmp_path, and the multi-objective weighted sum with per-component normalisation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import rewards  # noqa: E402
from diffenv.models.tiny import save_tiny_clip  # noqa: E402
from rewards.clip import prompt_list  # noqa: E402
from rewards.heads import LAION_AESTHETIC, MLPHead, save_head  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a green tree"]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def batch(n=4, channels=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g), torch.arange(n) % len(PROMPTS)


# ---------------------------------------------------------------- CLIP score / PickScore


def test_clip_score_loads_locally_and_scores(clip_path):
    reward = rewards.make("clip_score", path=str(clip_path), prompts=PROMPTS)
    assert reward.name == "clip_score" and not reward.differentiable
    for channels, size in ((3, 64), (1, 8), (3, 40)):
        images, conditions = batch(channels=channels, size=size)
        scores = reward(images, conditions)
        assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
        assert scores.abs().max() <= 1.0  # a cosine at scale 1
    with pytest.raises(ValueError, match="prompt ids in 0..2"):
        reward(*batch(n=1)[:1], torch.tensor([3]))


def test_clip_score_is_cosine_of_clip_embeddings(clip_path):
    from transformers import CLIPModel, CLIPTokenizer

    reward = rewards.make("clip_score", path=str(clip_path), prompts=PROMPTS, scale=2.5)
    images, conditions = batch(size=32)  # crop size: preprocessing is only the normalisation
    model = CLIPModel.from_pretrained(clip_path, use_safetensors=True).eval()
    tok = CLIPTokenizer.from_pretrained(clip_path)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.text_projection(model.text_model(**tok).pooler_output)
        pixels = (images - reward.encoder.mean) / reward.encoder.std
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    expected = 2.5 * torch.cosine_similarity(image, text[conditions], dim=-1)
    torch.testing.assert_close(reward(images, conditions), expected, atol=1e-5, rtol=1e-4)


def test_pickscore_uses_the_learned_logit_scale(clip_path):
    clip = rewards.make("clip_score", path=str(clip_path), prompts=PROMPTS)
    pick = rewards.make("pickscore", path=str(clip_path), prompts=PROMPTS)
    scale = clip.encoder.model.logit_scale.exp().item()
    images, conditions = batch()
    torch.testing.assert_close(pick(images, conditions), scale * clip(images, conditions), atol=1e-5, rtol=1e-4)


def test_differentiable_mode_passes_gradients_and_default_mode_does_not(clip_path):
    images, conditions = batch()
    images.requires_grad_(True)
    frozen = rewards.make("clip_score", path=str(clip_path), prompts=PROMPTS)
    assert not frozen(images, conditions).requires_grad
    live = rewards.make("clip_score", path=str(clip_path), prompts=PROMPTS, differentiable=True)
    live(images, conditions).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in live.parameters())  # the CLIP weights stay frozen


def test_prompt_files_are_read_like_the_backends_read_them(tmp_path):
    from diffenv.models.prompts import load_prompts

    f = tmp_path / "prompts.txt"
    f.write_text("# header\n  a red cat \n\na blue dog\n# a comment\na green tree\n")
    assert prompt_list(f) == load_prompts(f) == PROMPTS


# ---------------------------------------------------------------- aesthetic head


def test_aesthetic_loads_a_laion_layout_head(clip_path, tmp_path):
    from safetensors.torch import save_file

    head = MLPHead(**{**LAION_AESTHETIC, "in_dim": 16})
    bare = tmp_path / "laion_head.safetensors"  # a converted LAION v2 file: bare `layers.*` keys, no JSON
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(bare))
    assert sorted({k.split(".")[1] for k in head.state_dict()}) == ["0", "2", "4", "6", "7"]
    reward = rewards.make("aesthetic", path=str(clip_path), head=str(bare))
    images, conditions = batch()
    scores = reward(images, conditions)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    with torch.no_grad():
        torch.testing.assert_close(scores, head.eval()(reward.encoder.image_embeds(images)))


def test_aesthetic_head_errors(clip_path, tmp_path):
    wrong = save_head(MLPHead(768, hidden=[8], activation="gelu"), tmp_path / "head768.safetensors")
    with pytest.raises(ValueError, match="expects 768-dim features, but the feature model gives 16"):
        rewards.make("aesthetic", path=str(clip_path), head=str(wrong))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        rewards.make("aesthetic", path=str(clip_path), head=str(tmp_path / "nope.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        rewards.make("aesthetic", path=str(clip_path), head=str(tmp_path / "junk.safetensors"))


# ---------------------------------------------------------------- loading errors and safety


def test_missing_path_and_wrong_architecture_are_clear_errors(tmp_path):
    from transformers import BertConfig

    with pytest.raises(FileNotFoundError, match="no such folder"):
        rewards.make("clip_score", path=str(tmp_path / "missing"), prompts=PROMPTS)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        rewards.make("clip_score", path=str(tmp_path), prompts=PROMPTS)
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(
        tmp_path / "bert")
    with pytest.raises(ValueError, match="is a 'bert' model.*expected a CLIPModel"):
        rewards.make("clip_score", path=str(tmp_path / "bert"), prompts=PROMPTS)


def test_nothing_loads_with_remote_code_and_weights_are_safetensors(clip_path, tmp_path, monkeypatch):
    """Spy on every from_pretrained the reward models and the diffusers backends call."""
    import diffusers
    import transformers

    from diffenv.models import load_backend
    from diffenv.models.tiny import save_tiny_pipeline

    calls = []

    def spy(cls, name):
        original = getattr(cls, name).__func__

        def wrapped(klass, *args, **kwargs):
            calls.append((klass.__name__, kwargs))
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, name, classmethod(wrapped))

    for cls in (transformers.AutoConfig, transformers.CLIPModel, diffusers.StableDiffusionPipeline):
        spy(cls, "from_pretrained")
    rewards.make("clip_score", path=str(clip_path), prompts=PROMPTS)
    load_backend(f"sd:{save_tiny_pipeline('sd', tmp_path / 'sd')}", prompts=PROMPTS)
    assert {name for name, _ in calls} == {"AutoConfig", "CLIPModel", "StableDiffusionPipeline"}
    assert not any(kwargs.get("trust_remote_code") for _, kwargs in calls)
    assert all(kwargs.get("use_safetensors") is True for name, kwargs in calls if name != "AutoConfig")


def test_clip_score_as_env_reward_on_a_diffusers_backend(clip_path, tmp_path):
    from diffenv import DiffusionSteerVectorEnv
    from diffenv.models import load_backend
    from diffenv.models.tiny import save_tiny_pipeline

    backend = load_backend(f"sd:{save_tiny_pipeline('sd', tmp_path / 'sd')}", prompts=PROMPTS)
    reward = rewards.make("clip_score", path=str(clip_path), prompts=backend.condition_names)
    env = DiffusionSteerVectorEnv(num_envs=2, model=backend, reward=reward, num_steps=1, seed=0)
    env.reset()
    _, r, terminated, _, info = env.step(torch.zeros(2, *backend.latent_shape))
    assert terminated.all() and torch.isfinite(r).all() and set(info["reward_components"]) == {"clip_score"}


# ---------------------------------------------------------------- multi-objective


def _brightness(images, conditions):
    return images.mean(dim=(1, 2, 3))


def _contrast(images, conditions):
    return 100 * images.std(dim=(1, 2, 3))


def test_weighted_sum_normalizes_each_component_by_running_statistics():
    reward = rewards.make("weighted_sum", weights={_brightness: 1.0, _contrast: 0.5}, normalize=True)
    seen = {"_brightness": [], "_contrast": []}
    for seed in range(3):
        images, conditions = batch(n=5, seed=seed)
        images = images * (seed + 1) / 3
        parts = reward.components(images, conditions)
        for k in seen:
            seen[k].append(parts[k])
        assert set(parts) == {"_brightness", "_contrast", "_brightness/normalized", "_contrast/normalized",
                              "weighted_sum"}
    allv = {k: torch.cat(v) for k, v in seen.items()}
    torch.testing.assert_close(reward.running_mean, torch.stack([allv[k].mean() for k in seen]))
    torch.testing.assert_close(reward.running_var, torch.stack([allv[k].var(unbiased=False) for k in seen]))
    reward.eval()  # frozen statistics: the total is the weighted standardised sum
    images, conditions = batch(n=5, seed=9)
    parts = reward.components(images, conditions)
    std = (reward.running_var + reward.eps).sqrt()
    expected = sum(w * (parts[k] - reward.running_mean[i]) / std[i] for i, (k, w) in enumerate(zip(seen, (1.0, 0.5))))
    torch.testing.assert_close(parts["weighted_sum"], expected)
    torch.testing.assert_close(reward(images, conditions), expected)
    assert reward.count.item() == 15


def test_weighted_sum_momentum_and_unnormalized_default():
    plain = rewards.make("weighted_sum", weights={_brightness: 2.0})
    images, conditions = batch()
    torch.testing.assert_close(plain(images, conditions), 2 * _brightness(images, conditions))
    ema = rewards.make("weighted_sum", weights={_brightness: 1.0}, normalize=True, momentum=0.5)
    ema(images, conditions)
    first = ema.running_mean.clone()
    ema(images * 0, conditions)  # batch mean 0: the EMA moves half way
    torch.testing.assert_close(ema.running_mean, first / 2)
    with pytest.raises(ValueError, match="momentum"):
        rewards.make("weighted_sum", weights={_brightness: 1.0}, normalize=True, momentum=2.0)
