"""Text-to-image diffusers pipelines behind the backend interface (docs/design.md §2): SD1.x/2.x, SDXL, SD3, Flux.

| spec | pipeline class | denoiser | family / prediction | null condition (CFG) |
|---|---|---|---|---|
| `sd:PATH` | `StableDiffusionPipeline` | `unet` | ddpm / ε or v (scheduler config) | negative prompt, default `""` |
| `sdxl:PATH` | `StableDiffusionXLPipeline` | `unet` (+ pooled text, time ids) | ddpm / ε or v | negative prompt, default zeros* |
| `sd3:PATH` | `StableDiffusion3Pipeline` | `transformer` (+ pooled text) | flow / velocity | negative prompt, default `""` |
| `flux:PATH` | `FluxPipeline` | `transformer` (packed 2×2 latents) | flow / velocity | negative prompt, default `""` |

(*) SDXL with `force_zeros_for_empty_prompt`, exactly as the pipeline does it.

`PATH` is a local diffusers folder (with `model_index.json`) or a hub id. Conditions are the prompts of
a prompt set (`prompts=`: a list or a text file, see `diffenv.models.prompts`); condition id
`len(prompts)` is the negative/empty prompt. Every prompt is encoded **once**, by the pipeline's own
`encode_prompt` (so embeddings match the pipeline's bit for bit), and cached on `device`; the text
encoders are then dropped unless `keep_text_encoders=True`. The env state is the VAE latent
`[C, H/f, W/f]` (Flux too: it is packed into 2×2 patches only around the transformer call), and
`decode` applies the VAE's scaling/shift factors and maps to [0, 1].

Flow schedules: a Flux-style config with `use_dynamic_shifting` is resolved here, at the backend's
resolution: `mu = calculate_shift(image_seq_len, ...)` exactly as the pipeline computes it, then the
equivalent static shift (`exp(mu)`, or `mu` for `time_shift_type="linear"`) is written into
`scheduler_config`, so the env's samplers need no `mu`. `FluxPipeline` passes a custom sigma grid
`linspace(1, 1/K, K)`; `sampler_kwargs` hands the same grid to the env's and the policy's samplers.

Precision: weights in `torch_dtype` (fp16/bf16 on GPU), the network output is cast to float32, so all
transition maths and log-probs stay in float32/float64 (docs/design.md §3).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffenv.models.base import DiffusionBackend
from diffenv.models.prompts import load_prompts, prompt_splits

#: spec prefix -> (pipeline class name, family)
KINDS = {"sd": ("StableDiffusionPipeline", "ddpm"), "sdxl": ("StableDiffusionXLPipeline", "ddpm"),
         "sd3": ("StableDiffusion3Pipeline", "flow"), "flux": ("FluxPipeline", "flow")}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
#: keys allowed after "?" in a spec string, with their parsers
SPEC_OPTIONS = {"prompts": str, "negative_prompt": str, "torch_dtype": str, "height": int, "width": int,
                "max_sequence_length": int, "micro_batch_size": int}


def parse_model_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """`"sd:PATH?prompts=FILE&torch_dtype=fp16"` -> ("sd", "PATH", {"prompts": "FILE", ...}).

    The query part lets a plain model *string* (CLI flags, `TrainConfig.model`, checkpoints) carry the
    prompt set; keyword arguments given to the backend override it.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in KINDS or not rest:
        raise ValueError(f"model spec {spec!r}: expected '<kind>:<path or hub id>' with kind in {sorted(KINDS)}")
    path, _, query = rest.partition("?")
    options: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in SPEC_OPTIONS:
            raise ValueError(f"model spec {spec!r}: bad option {item!r}; expected key=value with key in "
                             f"{sorted(SPEC_OPTIONS)}")
        try:
            options[key] = SPEC_OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"model spec {spec!r}: option {key}={value!r} is not a valid "
                             f"{SPEC_OPTIONS[key].__name__}") from None
    return kind, path, options


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"torch_dtype {dtype} is not supported; expected one of float32, float16, bfloat16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"torch_dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _check_source(path: str, kind: str) -> dict | None:
    """model_index.json of a local folder (checked against `kind`), None for a hub id; clear errors otherwise."""
    folder = Path(path).expanduser()
    if folder.exists():
        index = folder / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{kind}:{path}: {index} is missing; expected a diffusers pipeline folder "
                                    f"(written by `save_pretrained`)")
        meta = json.loads(index.read_text())
        expected = KINDS[kind][0]
        if meta.get("_class_name") != expected:
            other = [k for k, (cls, _) in KINDS.items() if cls == meta.get("_class_name")]
            hint = f"; use '{other[0]}:{path}'" if other else ""
            raise ValueError(f"{kind}:{path} holds a {meta.get('_class_name')!r}, expected {expected!r}{hint}")
        return meta
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{kind}:{path}: no such folder (and not a hub id of the form 'org/name')")
    return None


def load_pipeline(kind: str, path: str, torch_dtype: torch.dtype = torch.float32, **pipeline_kwargs: Any):
    """The diffusers pipeline of `kind` from a local folder or hub id: safetensors only, no remote code."""
    import diffusers

    if kind not in KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {sorted(KINDS)}")
    meta = _check_source(path, kind)
    cls = getattr(diffusers, KINDS[kind][0])
    kwargs: dict[str, Any] = {}
    if kind == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if meta is not None:  # optional components a folder does not hold (e.g. SD3 without T5) load as None
        expected, _ = cls._get_signature_keys(cls)
        kwargs.update({name: None for name in expected
                       if meta.get(name, [None, None])[0] is None and name not in pipeline_kwargs})
    kwargs.update(pipeline_kwargs)
    kwargs.pop("trust_remote_code", None)
    try:
        return cls.from_pretrained(path, use_safetensors=True, dtype=torch_dtype, **kwargs)
    except OSError as e:
        offline = " (HF_HUB_OFFLINE is set: download it first or pass a local folder)" \
            if os.environ.get("HF_HUB_OFFLINE") else ""
        raise FileNotFoundError(f"could not load {kind}:{path} with safetensors weights{offline}: {e}") from e


class DiffusersBackend(DiffusionBackend):
    """A diffusers text-to-image pipeline as a backend; build with `DiffusersBackend.load(spec, prompts=...)`.

    Args:
        pipeline: a loaded pipeline (its class picks the kind; see the module table).
        prompts: the prompt set (list or text file); condition id i is prompt i.
        negative_prompt: the null condition's prompt (None = the pipeline's default).
        device: where the weights, cached embeddings and latents live.
        height, width: image size in pixels (default: the pipeline's default size).
        max_sequence_length: T5 tokens (SD3/Flux; default 256/512 as in the pipelines).
        distilled_guidance: Flux-dev's embedded guidance value (ignored without `guidance_embeds`); the
            env's `guidance_scale` is true CFG with the negative prompt, 1 = off.
        micro_batch_size: split network and VAE calls into chunks of this many samples (memory).
        gradient_checkpointing: recompute denoiser activations in backward (memory for RL updates).
        keep_text_encoders: keep the text encoders after encoding (default: free them).
        name: reported name (default: the spec).
    """

    def __init__(self, pipeline, prompts: str | os.PathLike | Sequence[str], *, negative_prompt: str | None = None,
                 device: str | torch.device | None = None, height: int | None = None, width: int | None = None,
                 max_sequence_length: int | None = None, distilled_guidance: float = 3.5,
                 micro_batch_size: int | None = None, gradient_checkpointing: bool = False,
                 keep_text_encoders: bool = False, clip_skip: int | None = None, name: str | None = None):
        kinds = {cls: k for k, (cls, _) in KINDS.items()}
        kind = kinds.get(type(pipeline).__name__)
        if kind is None:
            raise TypeError(f"unsupported pipeline {type(pipeline).__name__}; expected one of {sorted(kinds)}")
        if micro_batch_size is not None and (not isinstance(micro_batch_size, int) or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
        self.kind, self.pipeline_class_name = kind, type(pipeline).__name__
        self.family = KINDS[kind][1]
        self.text_conditioned = True
        self.name = name or f"{kind}:{getattr(pipeline, 'name_or_path', '') or 'pipeline'}"
        self.condition_names = load_prompts(prompts)
        self.negative_prompt = negative_prompt
        self.micro_batch_size = micro_batch_size
        self.distilled_guidance = float(distilled_guidance)
        if device is not None:
            pipeline.to(device)
        self.pipe = pipeline
        for module in pipeline.components.values():
            if isinstance(module, nn.Module):
                module.eval().requires_grad_(False)
        self.vae = pipeline.vae
        self.dtype = self.denoiser.dtype
        if self.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False):
            self.vae.to(torch.float32)  # fp16 VAEs that overflow, as the SDXL pipeline upcasts them
        self.vae_scale_factor = pipeline.vae_scale_factor
        self._set_size(height, width)
        self._set_schedule()
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self._encode_kwargs = {"clip_skip": clip_skip} if kind in ("sd", "sdxl", "sd3") else {}
        if kind in ("sd3", "flux"):
            self._encode_kwargs["max_sequence_length"] = max_sequence_length or (256 if kind == "sd3" else 512)
        elif max_sequence_length is not None:
            raise ValueError(f"max_sequence_length applies to sd3/flux (T5) only, got it for {kind!r}")
        self.set_prompts(prompts, negative_prompt)
        if not keep_text_encoders:
            self.drop_text_encoders()

    @classmethod
    def load(cls, spec: str, prompts=None, device: str | torch.device = "cpu", torch_dtype=None,
             pipeline_kwargs: dict | None = None, **kwargs: Any) -> DiffusersBackend:
        """Build from a spec `"<kind>:<path or hub id>[?key=value&...]"` (see `parse_model_spec`)."""
        kind, path, options = parse_model_spec(spec)
        options.update({k: v for k, v in dict(prompts=prompts, torch_dtype=torch_dtype).items() if v is not None})
        options.update(kwargs)
        if options.get("prompts") is None:
            raise ValueError(f"model {spec!r} is text-conditioned: pass prompts=<list or text file> (or add "
                             f"'?prompts=FILE' to the spec)")
        load_prompts(options["prompts"])  # a bad prompt file fails before the pipeline loads
        dtype = resolve_dtype(options.pop("torch_dtype", None))
        pipe = load_pipeline(kind, path, torch_dtype=dtype, **(pipeline_kwargs or {}))
        return cls(pipe, options.pop("prompts"), device=device, name=f"{kind}:{path}", **options)

    # ------------------------------------------------------------------ set-up
    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet if self.kind in ("sd", "sdxl") else self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def _set_size(self, height: int | None, width: int | None) -> None:
        cfg = self.denoiser.config
        default = (cfg.sample_size if self.kind != "flux" else self.pipe.default_sample_size) * self.vae_scale_factor
        height, width = height or default, width or default
        multiple = self.vae_scale_factor * (1 if self.kind in ("sd", "sdxl") else 2)
        if height % multiple or width % multiple:
            raise ValueError(f"height={height}, width={width} must be multiples of {multiple} for {self.kind}")
        self.height, self.width = int(height), int(width)
        channels = cfg.in_channels // 4 if self.kind == "flux" else cfg.in_channels
        self.latent_shape = (channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _set_schedule(self) -> None:
        config = dict(self.pipe.scheduler.config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.scheduler_mu = None
        if self.family == "ddpm":
            if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
                raise ValueError(f"{self.name}: UNets with time_cond_proj_dim (LCM-distilled) are not supported")
            # DDIMScheduler's default clip_sample=True would clip latents to [-1, 1]: latent models never want it
            config.setdefault("clip_sample", False)
            self.prediction_type = config.get("prediction_type", "epsilon")
        else:
            self.prediction_type = "flow"
            if config.get("use_dynamic_shifting"):
                config, self.scheduler_mu = _static_flow_config(config, self._image_seq_len(),
                                                                1.15 if self.kind == "flux" else 1.16)
        self.scheduler_config = config

    def _image_seq_len(self) -> int:
        _, h, w = self.latent_shape
        patch = 2 if self.kind == "flux" else self.denoiser.config.patch_size
        return (h // patch) * (w // patch)

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def sampler_kwargs(self, num_steps: int) -> dict:
        """FluxPipeline samples on its own grid `linspace(1, 1/K, K)` (before shifting): so does the env."""
        if self.kind == "flux" and not self.scheduler_config.get("use_flow_sigmas"):
            return {"sigmas": [1.0 - i * (1.0 - 1.0 / num_steps) / max(1, num_steps - 1) for i in range(num_steps)]}
        return {}

    def set_prompts(self, prompts, negative_prompt: str | None = None, chunk: int = 64) -> None:
        """Encode and cache a prompt set (needs the text encoders); condition ids follow the new set."""
        names = load_prompts(prompts)
        if self.pipe.text_encoder is None:
            raise RuntimeError("the text encoders were dropped after the first encoding; build the backend with "
                               "keep_text_encoders=True to change prompts")
        parts = [self._encode(names[i:i + chunk], negative_prompt) for i in range(0, len(names), chunk)]
        cond = {k: torch.cat([p[0][k] for p in parts]) for k in parts[0][0]}
        null = parts[0][1]
        self._cond = {k: torch.cat([cond[k], null[k]]).to(self.device, self.dtype) for k in cond}
        self.condition_names, self.negative_prompt = names, negative_prompt
        self.condition_splits = prompt_splits(prompts)
        if self.kind == "flux":
            dev = self.device
            h, w = self.latent_shape[1:]
            self._img_ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, dev, self.dtype)
            self._txt_ids = torch.zeros(self._cond["prompt_embeds"].shape[1], 3, device=dev, dtype=self.dtype)

    def _encode(self, prompts: list[str], negative: str | None) -> tuple[dict, dict]:
        """(conditional embeddings [n, ...] by name, null embeddings [1, ...]) via the pipeline's encode_prompt."""
        pipe, dev, kw = self.pipe, self.device, self._encode_kwargs
        if self.kind == "sd":
            emb, neg = pipe.encode_prompt(prompts, dev, 1, True, negative_prompt=negative, **kw)
            return {"prompt_embeds": emb}, {"prompt_embeds": neg[:1]}
        if self.kind == "flux":
            emb, pooled, _ = pipe.encode_prompt(prompts, device=dev, **kw)
            neg, neg_pooled, _ = pipe.encode_prompt([negative or ""], device=dev, **kw)
            return {"prompt_embeds": emb, "pooled": pooled}, {"prompt_embeds": neg, "pooled": neg_pooled}
        if self.kind == "sdxl":
            emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=dev, negative_prompt=negative,
                                                              do_classifier_free_guidance=True, **kw)
            proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
            size = (self.height, self.width)
            time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype, text_encoder_projection_dim=proj)
            return ({"prompt_embeds": emb, "pooled": pooled, "time_ids": time_ids.expand(len(prompts), -1)},
                    {"prompt_embeds": neg[:1], "pooled": neg_pooled[:1], "time_ids": time_ids})
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, None, None, device=dev, negative_prompt=negative,
                                                          do_classifier_free_guidance=True, **kw)
        return {"prompt_embeds": emb, "pooled": pooled}, {"prompt_embeds": neg[:1], "pooled": neg_pooled[:1]}

    def drop_text_encoders(self) -> None:
        """Free the text encoders (the embeddings are cached); `set_prompts` is unavailable afterwards."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if hasattr(self.pipe, name):
                setattr(self.pipe, name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the network
    def denoiser_inputs(self, latents: torch.Tensor, timesteps: torch.Tensor, conditions: torch.Tensor) -> dict:
        """Keyword arguments of one `denoiser(**kwargs)` call, exactly as the pipeline builds them.

        latents [B, C, H, W] (Flux: packed here), timesteps [B] on the training scale, conditions [B].
        """
        x = latents.to(self.dtype)
        c = conditions.to(self.device, torch.long)
        emb = self._cond["prompt_embeds"][c]
        if self.kind in ("sd", "sdxl"):
            kwargs = {"sample": x, "timestep": timesteps, "encoder_hidden_states": emb}
            if self.kind == "sdxl":
                kwargs["added_cond_kwargs"] = {"text_embeds": self._cond["pooled"][c],
                                               "time_ids": self._cond["time_ids"][c]}
            return kwargs
        if self.kind == "sd3":
            return {"hidden_states": x, "timestep": timesteps, "encoder_hidden_states": emb,
                    "pooled_projections": self._cond["pooled"][c]}
        b, ch, h, w = x.shape
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), self.distilled_guidance, device=x.device, dtype=torch.float32)
        return {"hidden_states": self.pipe._pack_latents(x, b, ch, h, w),
                "timestep": timesteps.to(self.dtype) / 1000, "guidance": guidance,
                "pooled_projections": self._cond["pooled"][c], "encoder_hidden_states": emb,
                "txt_ids": self._txt_ids, "img_ids": self._img_ids}

    def forward_model(self, latents, timesteps, conditions):
        out = [self._forward(*chunk) for chunk in self._chunks(latents, timesteps, conditions)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _forward(self, latents, timesteps, conditions) -> torch.Tensor:
        out = self.denoiser(**self.denoiser_inputs(latents, timesteps, conditions), return_dict=False)[0]
        if self.kind == "flux":
            out = self.pipe._unpack_latents(out, self.height, self.width, self.vae_scale_factor)
        return out.float()  # transition maths and log-probs in float32 whatever the weights' dtype

    def _chunks(self, *tensors):
        n = self.micro_batch_size or len(tensors[0])
        return zip(*(t.split(n) for t in tensors))

    # ------------------------------------------------------------------ images
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode [B, C, h, w] -> [B, 3, H, W] in [0, 1] (differentiable; clamped like the pipelines)."""
        out = [self._decode(chunk) for (chunk,) in self._chunks(latents)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.vae.config
        z = latents.to(self.vae.dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style per-channel statistics
            view = (1, -1, 1, 1)
            z = z * torch.tensor(std, device=z.device, dtype=z.dtype).view(view) / cfg.scaling_factor \
                + torch.tensor(mean, device=z.device, dtype=z.dtype).view(view)
        else:
            z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ LoRA export
    def export_lora(self, save_directory: str | os.PathLike) -> Path:
        """Write this denoiser's LoRA in diffusers' format (`pipe.load_lora_weights(dir)` reads it)."""
        from diffenv.models.lora import export_diffusers_lora

        return export_diffusers_lora(self.denoiser, save_directory, self.pipeline_class_name)


def _static_flow_config(config: dict, image_seq_len: int, default_max_shift: float) -> tuple[dict, float]:
    """Resolve dynamic shifting at one resolution: (an equivalent static-shift config, mu).

    With `time_shift_type="exponential"` the pipeline's shift of sigma t is e^mu / (e^mu + 1/t − 1), which
    is the static shift s·t / (1 + (s − 1) t) with s = e^mu ("linear": s = mu).
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", default_max_shift))
    shift = math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else mu
    return {**config, "use_dynamic_shifting": False, "shift": shift}, float(mu)
