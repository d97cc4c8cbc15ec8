"""The `diffenv` command line: sample, train, sample --lora, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from agents.cli import main


def test_sample_writes_npz_grid_and_prints_figures(tmp_path, capsys):
    out, grid = tmp_path / "s.npz", tmp_path / "g.png"
    rc = main(["sample", "--model", "digits-eps", "--guidance-scale", "3", "--num-steps", "3", "--n", "30",
               "--seed", "0", "--out", str(out), "--grid", str(grid), "--batch-size", "16", "--judge", "digit_judge"])
    assert rc == 0
    data = np.load(out)
    assert data["images"].shape == (30, 1, 8, 8) and data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["conditions"].shape == (30,) and data["conditions"].dtype == np.int64
    assert grid.is_file() and grid.stat().st_size > 100
    text = capsys.readouterr().out
    assert "mean reward (digit_classifier):" in text and "NFE per image: 6" in text and "wall time:" in text
    assert "judge accuracy (digit_judge):" in text


def test_sample_is_reproducible(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    for path in (a, b):
        assert main(["sample", "--num-steps", "2", "--n", "8", "--seed", "5", "--out", str(path)]) == 0
    assert np.array_equal(np.load(a)["images"], np.load(b)["images"])


def test_train_then_sample_with_lora(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--algo", "grpo", "--model", "digits-flow", "--num-steps", "2", "--images", "16",
               "--out", str(run), "--set", "images_per_epoch=16", "--set", "group_size=4", "--no-progress"])
    assert rc == 0 and (run / "lora.safetensors").is_file() and (run / "log.csv").is_file()
    assert "grpo: 1 epoch(s), 16 images" in capsys.readouterr().out
    out = tmp_path / "tuned.npz"
    assert main(["sample", "--model", "digits-flow", "--num-steps", "2", "--n", "8", "--lora",
                 str(run / "lora.safetensors"), "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (8, 1, 8, 8)
    assert main(["sample", "--model", "digits-eps", "--num-steps", "2", "--n", "8", "--lora",
                 str(run / "lora.safetensors")]) == 2
    assert "trained on model 'digits-flow'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "--model", "digits-epz"], "unknown model 'digits-epz'"),
        (["sample", "--reward", "nope"], "unknown reward 'nope'"),
        (["sample", "--sampler", "euler"], "unknown sampler 'euler'"),
        (["train", "--algo", "grpo", "--images", "10", "--out", "{tmp}/r"],
         "images=10: expected a multiple of images_per_epoch=64"),
        (["train", "--algo", "grpo", "--images", "64", "--out", "{tmp}/r", "--reward", "nope"], "unknown reward"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


LONG = "a" * 300
GOOD_TASK = 'eval_images = 10\ncfg_scales = [1.0]\nbest_of_n = [2]\nalgos = []\n[[task]]\nmodel = "digits-flow"\n'


@pytest.mark.parametrize("argv, files, message", [
    (["train", "--algo", "grpo", "--images", "64", "--out", f"{{tmp}}/{LONG}"], {},
     "diffenv train: error: out='/"),
    (["train", "--algo", "grpo", "--images", "64", "--out", f"{{tmp}}/{LONG}"], {},
     "(300 characters) has 300 bytes; expected at most 255 bytes per file or folder name"),
    (["train", "--algo", "grpo", "--images", "64", "--out", "{tmp}/r", "--set", "lr=1e38"], {},
     "--set lr=1e38: expected a float in (0, 1e+30]"),
    (["compare", "--config", "{tmp}/c.toml", "--out", "{tmp}/o"], {"c.toml": "x = [\n"},
     "comparison config {tmp}/c.toml is not valid TOML (Invalid value (at end of document))"),
    (["compare", "--config", "{tmp}/c.toml", "--out", "{tmp}/o"], {"c.toml": "\xff\xfe[[task]]\n"},
     "comparison config {tmp}/c.toml is not valid TOML"),
    (["compare", "--config", "{tmp}/c.toml", "--out", "{tmp}/o"], {"c.toml": GOOD_TASK + f'name = "{LONG}"\n'},
     "(300 characters): expected a non-empty name without '/', '\\' or NUL, other than '.' and '..', of at most 100"),
    (["compare", "--config", "{tmp}/c.toml", "--out", "{tmp}/o"],
     {"c.toml": GOOD_TASK + 'name = "t"\n[task.algo_overrides.grpoo]\nlr = 1e-3\n'},
     "task 't': algo_overrides names unknown algorithms ['grpoo']; expected some of ['awm', 'ddpo', 'dgpo', 'fdfo', 'fpo', "
     "'grpo', 'nft', 'sb3_ppo']"),
    (["compare", "--config", "{tmp}/c.toml", "--out", "{tmp}/o"],
     {"c.toml": GOOD_TASK + 'name = "t"\n[task.algo_overrides.sb3_ppo]\nlearning_rate = 1e-3\n'},
     "unknown sb3_ppo option(s) ['learning_rate']; expected some of"),
    (["compare", "--config", "{tmp}/c.toml", "--out", f"{{tmp}}/{LONG}"], {"c.toml": GOOD_TASK + 'name = "t"\n'},
     "expected at most 255 bytes per file or folder name"),
    (["sample", "--num-steps", "1", "--n", "2", "--grid", "{tmp}"], {},
     "--grid='{tmp}' is a folder; expected a file name, e.g. {tmp}/out.png"),
    (["sample", "--num-steps", "1", "--n", "2", "--grid", "{tmp}/grid"], {},
     "--grid='{tmp}/grid': expected a file name ending in .png"),
    (["sample", "--num-steps", "1", "--n", "2", "--out", "{tmp}"], {}, "--out='{tmp}' is a folder"),
])
def test_bad_paths_names_and_configs_exit_2_with_one_line(argv, files, message, capsys, tmp_path):
    """Each names the argument, its value and what is expected, on one line, before any work (no traceback)."""
    for name, text in files.items():
        (tmp_path / name).write_bytes(text.encode("latin-1") if "\xff" in text else text.encode())
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_meta_device_is_refused_by_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--algo", "grpo", "--images", "64", "--out", "x", "--device", "meta"])
    assert e.value.code == 2
    assert "argument --device: 'meta': unsupported device type 'meta'; expected 'cpu'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["sample", "--n", "0"], ["sample", "--guidance-scale", "-1"],
                                  ["train", "--algo", "ppo9", "--images", "8", "--out", "x"],
                                  ["train", "--algo", "grpo", "--images", "0", "--out", "x"]])
def test_argparse_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


# --------------------------------------------------------------------------- condition sets and budgets
def test_conditions_are_a_set_sampled_balanced(tmp_path):
    out = tmp_path / "c.npz"
    assert main(["sample", "--num-steps", "2", "--conditions", "3", "7", "--n", "20", "--batch-size", "8",
                 "--out", str(out), "--no-progress"]) == 0
    ids, counts = np.unique(np.load(out)["conditions"], return_counts=True)
    assert ids.tolist() == [3, 7] and counts.tolist() == [10, 10]


def test_split_names_come_from_the_backend(tmp_path, capsys):
    from types import SimpleNamespace

    from diffenv.config import EnvConfig
    from diffenv.models.prompts import load_prompts, prompt_splits

    prompts = tmp_path / "p.txt"
    prompts.write_text("# split: train\na red cat\na blue dog\n# split: heldout\na green bird\n")
    assert load_prompts(prompts) == ["a red cat", "a blue dog", "a green bird"]
    splits = prompt_splits(prompts)
    assert splits == {"train": [0, 1], "heldout": [2]}
    backend = SimpleNamespace(n_conditions=3, condition_splits=splits, name="sd:x")
    assert EnvConfig(conditions="heldout").condition_ids(backend) == [2]
    assert EnvConfig(conditions=["train", 2]).condition_ids(backend) == [0, 1, 2]
    assert main(["sample", "--conditions", "heldout"]) == 2  # digits declare no split names
    assert "unknown split name(s) ['heldout']; expected ids in 0..9 (model 'digits-eps' declares no split names)" \
        in capsys.readouterr().err


def test_train_conditions_restrict_rollouts_and_evaluation(tmp_path):
    from agents.trainer import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(algo="grpo", model="digits-flow", num_steps=2, images=16, out=str(tmp_path),
                                  progress=False, grid_every=0, conditions=[3, 7],
                                  algo_overrides={"images_per_epoch": 16, "group_size": 4, "minibatch_size": 16}))
    assert trainer.env.condition_set.tolist() == [3, 7]
    assert trainer.evaluate(8)["result"].conditions.tolist() == [3, 7] * 4


# --------------------------------------------------------------------------- merged LoRA, help, threads, quiet
def test_sample_lora_is_merged_before_sampling(tmp_path):
    import argparse

    import torch

    from diffenv.cli import load_model
    from diffenv.models import load_backend
    from diffenv.models.lora import lora_layers, add_lora, lora_parameters, save_lora

    base = load_backend("digits-flow")
    config = add_lora(base.denoiser, rank=2)
    for p in lora_parameters(base.denoiser):
        torch.nn.init.normal_(p, std=0.05)
    path = save_lora(base.denoiser, tmp_path / "lora.safetensors", config, extra={"model": "digits-flow"})
    tuned = load_model(argparse.Namespace(model="digits-flow", lora=str(path), device="cpu", prompts=None))
    layers = lora_layers(tuned.denoiser)
    assert layers and all(layer.merged for layer in layers)  # no adapter matmuls left at sampling time
    x, t, c = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0), torch.arange(4)
    with torch.no_grad():
        torch.testing.assert_close(tuned.forward_model(x, t, c), base.forward_model(x, t, c), atol=1e-5, rtol=1e-4)


def test_help_shows_every_option_with_its_default():
    import argparse

    from agents.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"sample", "ab", "train", "compare"}
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
        text = " ".join(p.format_help().split())
        assert "--threads" in text
        for action in p._actions:
            if action.default not in (None, False, [], argparse.SUPPRESS) and not action.required:
                assert f"(default: {action.default})" in text or "default:" in action.help, (name, action.dest)
    train = " ".join(sub.choices["train"].format_help().split())
    assert "(default: 10)" in train and "digit_classifier" in train and "digits-flow" in train
    assert "clip_range=0.2" in train  # --set lists every algorithm option with its default


def test_threads_option_sets_torch_threads(tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["sample", "--threads", "1", "--num-steps", "1", "--n", "2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        main(["sample", "--threads", "0"])


def test_known_third_party_noise_is_filtered_and_nothing_else(caplog):
    import logging
    import warnings

    from diffenv.quiet import quiet_third_party

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        from gymnasium.envs.classic_control import CartPoleEnv
        from stable_baselines3 import PPO

        PPO("MlpPolicy", CartPoleEnv(), n_steps=10, batch_size=3, device="cpu")  # 10 % 3: SB3's mini-batch warning
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        logging.getLogger("diffusers.loaders.lora_base").warning(
            "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
        logging.getLogger("diffusers.loaders.lora_base").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_compare_shows_progress_of_its_entries(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('eval_images = 10\ncfg_scales = [1.0]\nbest_of_n = [2]\nalgos = []\n'
                      '[[task]]\nname = "t"\nmodel = "digits-flow"\nnum_steps = 1\n')
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "t: 100%" in err and "2/2" in err and "bon_2" in err  # the entry being computed


def test_every_flag_is_a_dataclass_field_defined_once():
    """The parser is built from config dataclasses: each flag's dest is a field, its help starts with the field's
    docstring, and `train` has a flag for every `TrainConfig` field but the two that other flags fill."""
    import argparse
    import dataclasses

    from agents.cli import TRAIN_FIELDS, build_parser, subcommands
    from agents.trainer import TrainConfig
    from diffenv.validation import field_docs

    assert set(TRAIN_FIELDS) == {f.name for f in dataclasses.fields(TrainConfig)} - {"algo_overrides", "model_kwargs"}
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, (_, flags, _) in subcommands().items():
        dests = [a.dest for a in sub.choices[name]._actions if a.dest != "help"]
        assert len(dests) == len(set(dests)), name  # no flag twice
        owners = {field: cls for cls, field, *_ in flags}
        assert set(dests) == set(owners) | {"threads"}, name
        for action in sub.choices[name]._actions:
            if action.dest in owners:
                doc = field_docs(owners[action.dest]).get(action.dest)
                assert doc and action.help.startswith(doc[:20]) or action.dest in ("model", "reward"), (name, action.dest)
