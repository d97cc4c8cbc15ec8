"""Targeted filters for third-party log lines and warnings that this project triggers by design and that give the
user nothing to act on. `import diffenv` installs them, so the Python API is as quiet as the CLI; every other
message of those libraries still shows."""

from __future__ import annotations

import logging
import re
import warnings

#: third-party log lines `import diffenv` drops: (logger, message pattern). Each is expected in this repo and
#: gives the user nothing to act on; everything else those libraries log still shows.
QUIET_LOGS = (
    # image processors of pipelines we load but never use (safety checker, IP adapters)
    ("transformers.utils.import_utils", r"requires torchvision \(not installed\); falling back"),
    # our LoRAs adapt the denoiser only, so loading one finds no text-encoder keys
    ("diffusers.loaders.lora_base", r"No LoRA keys associated to \w+ found"),
    ("diffusers.loaders.peft", r"No LoRA keys associated to \w+ found"),
    ("diffusers.loaders.lora_pipeline", r"No LoRA keys associated to \w+ found"),
)
#: third-party warnings `import diffenv` drops: (category, message pattern, module)
QUIET_WARNINGS = (
    # `compare`'s SB3 PPO: a last, smaller mini-batch per epoch is intended (K steps x 32 envs)
    (UserWarning, r"You have specified a mini-batch size of", r"stable_baselines3\."),
)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_third_party() -> None:
    """Install the targeted filters above (idempotent)."""
    for name, pattern in QUIET_LOGS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    for category, message, module in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
