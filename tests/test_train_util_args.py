"""sd-scripts flag groups, --config_file TOML, unsupported flags, consistency checks, output names."""
from __future__ import annotations

import argparse
import logging
import tomllib
from pathlib import Path

import pytest

from library import train_util
from library.errors import UserError


def make_parser(dreambooth: bool = True, caption: bool = True) -> argparse.ArgumentParser:
    """Flag groups as train_network.py registers them."""
    parser = argparse.ArgumentParser()
    train_util.add_sd_models_arguments(parser)
    train_util.add_dataset_arguments(parser, dreambooth, caption, True)
    train_util.add_training_arguments(parser, dreambooth)
    train_util.add_optimizer_arguments(parser)
    train_util.add_custom_train_arguments(parser)
    train_util.add_dataset_config_argument(parser)
    parser.add_argument("--network_dim", type=int, default=None)  # a script-specific flag
    return parser


@pytest.fixture()
def parser() -> argparse.ArgumentParser:
    return make_parser()


DEFAULTS = [
    ("v2", False), ("v_parameterization", False), ("pretrained_model_name_or_path", None),
    ("tokenizer_cache_dir", None), ("train_data_dir", None), ("shuffle_caption", False),
    ("caption_extension", ".caption"), ("caption_extention", None), ("keep_tokens", 0), ("color_aug", False),
    ("flip_aug", False), ("face_crop_aug_range", None), ("random_crop", False), ("resolution", None),
    ("cache_latents", False), ("cache_latents_to_disk", False), ("vae_batch_size", 1), ("enable_bucket", False),
    ("min_bucket_reso", 256), ("max_bucket_reso", 1024), ("bucket_reso_steps", 64), ("bucket_no_upscale", False),
    ("token_warmup_min", 1), ("token_warmup_step", 0), ("caption_dropout_rate", 0.0),
    ("caption_dropout_every_n_epochs", 0), ("caption_tag_dropout_rate", 0.0), ("reg_data_dir", None),
    ("in_json", None), ("dataset_repeats", 1), ("output_dir", None), ("output_name", None),
    ("save_precision", None), ("save_every_n_epochs", None), ("save_every_n_steps", None),
    ("save_n_epoch_ratio", None), ("save_last_n_epochs", None), ("save_state", False), ("resume", None),
    ("train_batch_size", 1), ("max_token_length", None), ("mem_eff_attn", False), ("xformers", False),
    ("sdpa", False), ("vae", None), ("max_train_steps", 1600), ("max_train_epochs", None),
    ("max_data_loader_n_workers", 8), ("persistent_data_loader_workers", False), ("seed", None),
    ("gradient_checkpointing", False), ("gradient_accumulation_steps", 1), ("mixed_precision", "no"),
    ("full_fp16", False), ("full_bf16", False), ("clip_skip", None), ("logging_dir", None), ("log_with", None),
    ("log_prefix", None), ("noise_offset", None), ("adaptive_noise_scale", None),
    ("multires_noise_iterations", None), ("multires_noise_discount", 0.3), ("ip_noise_gamma", None),
    ("zero_terminal_snr", False), ("min_timestep", None), ("max_timestep", None), ("lowram", False),
    ("sample_every_n_steps", None), ("sample_every_n_epochs", None), ("sample_at_first", False),
    ("sample_prompts", None), ("sample_sampler", "ddim"), ("config_file", None), ("output_config", False),
    ("prior_loss_weight", 1.0), ("optimizer_type", ""), ("use_8bit_adam", False), ("use_lion_optimizer", False),
    ("learning_rate", 2e-6), ("max_grad_norm", 1.0), ("optimizer_args", None), ("lr_scheduler_type", ""),
    ("lr_scheduler_args", None), ("lr_scheduler", "constant"), ("lr_warmup_steps", 0),
    ("lr_scheduler_num_cycles", 1), ("lr_scheduler_power", 1), ("min_snr_gamma", None),
    ("weighted_captions", False), ("dataset_config", None), ("huggingface_repo_id", None),
]


@pytest.mark.parametrize("name,default", DEFAULTS)
def test_flag_defaults_match_sd_scripts(parser, name, default):
    args = parser.parse_args([])
    assert hasattr(args, name), name
    value = getattr(args, name)
    assert value == default and type(value) is type(default), (name, value)


def test_flag_types_and_choices(parser):
    args = parser.parse_args([
        "--resolution", "640,448", "--learning_rate", "1e-4", "--max_token_length", "225", "--optimizer_args",
        "weight_decay=0.1", "betas=0.9,0.99", "--dataset_config", "d.toml", "--lr_warmup_steps", "0.1",
    ])
    assert args.resolution == "640,448" and args.learning_rate == pytest.approx(1e-4)
    assert args.max_token_length == 225
    assert args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.99"]
    assert args.dataset_config == Path("d.toml")
    assert args.lr_warmup_steps == 0.1 and isinstance(args.lr_warmup_steps, float)
    assert parser.parse_args(["--lr_warmup_steps", "30"]).lr_warmup_steps == 30
    with pytest.raises(SystemExit):
        parser.parse_args(["--max_token_length", "100"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--mixed_precision", "fp8"])


def test_save_arguments_and_group_switches():
    parser = argparse.ArgumentParser()
    train_util.add_sd_saving_arguments(parser)
    args = parser.parse_args(["--save_model_as", "diffusers_safetensors"])
    assert args.save_model_as == "diffusers_safetensors" and args.use_safetensors is False
    assert parser.parse_args([]).save_model_as is None
    without = make_parser(dreambooth=False, caption=False).parse_args([])
    assert not hasattr(without, "reg_data_dir") and not hasattr(without, "prior_loss_weight")
    assert not hasattr(without, "in_json")


# ---- --config_file ----


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_config_file_cli_over_toml_over_defaults(parser, tmp_path):
    write(tmp_path / "run.toml", """
top_level = "kept"
[model_arguments]
pretrained_model_name_or_path = "model.safetensors"
v2 = true
[optimizer_arguments]
learning_rate = 1e-4
optimizer_args = ["weight_decay=0.05"]
[training_arguments]
max_train_steps = 30
resolution = 512
unknown_key = 7
""")
    argv = ["--config_file", str(tmp_path / "run"), "--learning_rate", "3e-4"]  # .toml appended
    args = train_util.parse_args_with_config(parser, argv)
    assert args.learning_rate == pytest.approx(3e-4)  # CLI wins
    assert args.max_train_steps == 30 and args.v2 is True  # TOML over defaults
    assert args.pretrained_model_name_or_path == "model.safetensors"
    assert args.optimizer_args == ["weight_decay=0.05"]
    assert args.resolution == 512  # TOML values are used as-is
    assert args.unknown_key == 7 and args.top_level == "kept"
    assert args.train_batch_size == 1 and args.mixed_precision == "no"  # defaults
    assert args.config_file == str(tmp_path / "run")  # extension removed


def test_output_config_round_trip_and_refuses_overwrite(parser, tmp_path):
    target = tmp_path / "saved.toml"
    argv = [
        "--config_file", str(target), "--output_config", "--learning_rate", "5e-5", "--v2", "--resolution", "768",
        "--dataset_config", "data.toml", "--optimizer_args", "weight_decay=0.1", "--wandb_api_key", "secret",
        "--lr_warmup_steps", "0.05", "--network_dim", "8",
    ]
    with pytest.raises(train_util.OutputConfigWritten) as info:
        train_util.parse_args_with_config(parser, argv)
    assert info.value.code == 0 and info.value.path == target  # a SystemExit(0): the script stops cleanly
    written = tomllib.loads(target.read_text(encoding="utf-8"))
    assert written == {
        "learning_rate": 5e-5, "v2": True, "resolution": "768", "dataset_config": "data.toml",
        "optimizer_args": ["weight_decay=0.1"], "lr_warmup_steps": 0.05, "network_dim": 8,
    }
    # the TOML reproduces the args
    original = parser.parse_args([a for a in argv if a not in ("--output_config",)][2:])
    reloaded = train_util.parse_args_with_config(make_parser(), ["--config_file", str(target)])
    for key, value in vars(original).items():
        if key in ("config_file", "wandb_api_key"):
            continue
        expected = str(value) if isinstance(value, Path) else value
        assert getattr(reloaded, key) == expected, key
    # an existing file is never overwritten
    before = target.read_bytes()
    with pytest.raises(UserError, match="saved.toml"):
        train_util.parse_args_with_config(make_parser(), argv)
    assert target.read_bytes() == before


def test_config_file_errors_name_file_and_line(parser, tmp_path):
    with pytest.raises(UserError, match="nothere.toml"):
        train_util.parse_args_with_config(parser, ["--config_file", str(tmp_path / "nothere")])
    bad = write(tmp_path / "bad.toml", "learning_rate = 1e-4\nmax_train_steps = = 3\n")
    with pytest.raises(UserError) as info:
        train_util.parse_args_with_config(parser, ["--config_file", str(bad)])
    message = str(info.value)
    assert "bad.toml" in message and "line 2" in message and "\n" not in message


def test_read_config_without_config_file_returns_args(parser):
    args = parser.parse_args(["--seed", "3"])
    assert train_util.read_config_from_file(args, parser, ["--seed", "3"]) is args
    with pytest.raises(UserError, match="--output_config needs --config_file"):
        train_util.parse_args_with_config(parser, ["--output_config"])


# ---- unsupported flags ----


@pytest.mark.parametrize("argv,flag", [
    (["--fp8_base"], "--fp8_base"),
    (["--masked_loss", "--seed", "1"], "--masked_loss"),
    (["--alpha_mask"], "--alpha_mask"),
    (["--loss_type", "huber"], "--loss_type"),
    (["--loss_type=smooth_l1"], "--loss_type"),
    (["--huber_c", "0.2"], "--huber_c"),
    (["--validation_split", "0.1"], "--validation_split"),
    (["--debiased_estimation_loss"], "--debiased_estimation_loss"),
    (["--scale_weight_norms", "1.0"], "--scale_weight_norms"),
    (["--base_weights", "a.safetensors"], "--base_weights"),
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs"),
])
def test_unsupported_flag_refused_with_one_line(parser, argv, flag):
    with pytest.raises(UserError) as info:
        train_util.parse_args_with_config(parser, argv)
    message = str(info.value)
    assert message.startswith(flag) and "not supported" in message and "\n" not in message


def test_unsupported_flag_default_values_accepted(parser):
    args = train_util.parse_args_with_config(parser, ["--loss_type", "l2"])
    assert args.loss_type == "l2"
    train_util.check_unsupported_flags(["--resolution", "512", "--noise_offset", "0.1"])


def test_unsupported_flag_in_toml_refused(parser, tmp_path):
    config = write(tmp_path / "c.toml", "[training]\nmasked_loss = true\n")
    with pytest.raises(UserError, match=r"--masked_loss \(in .*c\.toml\)"):
        train_util.parse_args_with_config(parser, ["--config_file", str(config)])
    harmless = write(tmp_path / "h.toml", "[training]\nmasked_loss = false\nloss_type = \"l2\"\n")
    assert train_util.parse_args_with_config(parser, ["--config_file", str(harmless)]).masked_loss is False


# ---- consistency checks ----


def verified(parser, *argv: str) -> argparse.Namespace:
    args = parser.parse_args(list(argv))
    train_util.verify_training_args(args)
    return args


@pytest.mark.parametrize("argv,flags", [
    (["--cache_latents", "--color_aug"], ["--cache_latents", "--color_aug"]),
    (["--cache_latents_to_disk", "--random_crop"], ["--cache_latents", "--random_crop"]),
    (["--full_fp16"], ["--full_fp16", "--mixed_precision fp16"]),
    (["--full_bf16", "--mixed_precision", "fp16"], ["--full_bf16", "--mixed_precision bf16"]),
    (["--noise_offset", "0.1", "--multires_noise_iterations", "6"], ["--noise_offset", "--multires_noise_iterations"]),
    (["--adaptive_noise_scale", "0.1"], ["--adaptive_noise_scale", "--noise_offset"]),
    (["--min_timestep", "500", "--max_timestep", "100"], ["--min_timestep", "--max_timestep"]),
    (["--max_timestep", "1001"], ["--max_timestep"]),
    (["--lr_warmup_steps", "1.5"], ["--lr_warmup_steps"]),
    (["--train_batch_size", "0"], ["--train_batch_size"]),
])
def test_inconsistent_flags_raise_user_error(parser, argv, flags):
    with pytest.raises(UserError) as info:
        verified(parser, *argv)
    for flag in flags:
        assert flag in str(info.value)


def test_values_from_toml_are_checked(parser):
    args = parser.parse_args([])
    args.max_token_length = 100  # TOML values skip argparse choices
    with pytest.raises(UserError, match="--max_token_length"):
        train_util.verify_training_args(args)
    args = parser.parse_args([])
    args.loss_type = "huber"
    with pytest.raises(UserError, match="--loss_type"):
        train_util.verify_training_args(args)


def test_xformers_missing_is_a_clear_error(parser, monkeypatch):
    monkeypatch.setattr(train_util, "_xformers_available", lambda: False)
    with pytest.raises(UserError, match="--xformers.*--sdpa"):
        verified(parser, "--xformers")
    monkeypatch.setattr(train_util, "_xformers_available", lambda: True)
    assert verified(parser, "--xformers").xformers is True


def test_valid_combinations_and_adjustments(parser, caplog):
    with caplog.at_level(logging.WARNING, logger="library.train_util"):
        args = verified(parser, "--v_parameterization", "--cache_latents_to_disk", "--sample_every_n_steps", "0",
                        "--full_bf16", "--mixed_precision", "bf16", "--noise_offset", "0.1",
                        "--adaptive_noise_scale", "0.01", "--min_timestep", "100", "--max_timestep", "900")
    assert "--v_parameterization without --v2" in caplog.text
    assert args.cache_latents is True  # implied by cache_latents_to_disk
    assert args.sample_every_n_steps is None
    assert verified(parser, "--full_fp16", "--mixed_precision", "fp16").full_fp16


# ---- dataset args ----


def test_prepare_dataset_args(parser):
    args = parser.parse_args(["--resolution", "512", "--caption_extention", ".txt", "--face_crop_aug_range", "2.0,4.0"])
    train_util.prepare_dataset_args(args, True)
    assert args.resolution == (512, 512) and args.caption_extension == ".txt" and args.caption_extention is None
    assert args.face_crop_aug_range == (2.0, 4.0)
    args = parser.parse_args(["--resolution", "640,448"])
    train_util.prepare_dataset_args(args, False)
    assert args.resolution == (640, 448) and args.face_crop_aug_range is None
    args = parser.parse_args([])
    args.resolution = 768  # from TOML
    train_util.prepare_dataset_args(args, False)
    assert args.resolution == (768, 768)
    for bad in (["--resolution", "512,x"], ["--resolution", "1,2,3"], ["--face_crop_aug_range", "4.0,2.0"]):
        args = parser.parse_args(bad)
        with pytest.raises(UserError, match=bad[0]):
            train_util.prepare_dataset_args(args, False)


# ---- names, git hash, seeds ----


def test_checkpoint_names():
    named = argparse.Namespace(output_name="dog")
    unnamed = argparse.Namespace(output_name=None)
    assert train_util.get_epoch_ckpt_name(named, ".safetensors", 3) == "dog-000003.safetensors"
    assert train_util.get_epoch_ckpt_name(unnamed, "ckpt", 12) == "epoch-000012.ckpt"
    assert train_util.get_step_ckpt_name(named, ".pt", 500) == "dog-step00000500.pt"
    assert train_util.get_step_ckpt_name(unnamed, ".pt", 7) == "at-step00000007.pt"
    assert train_util.get_last_ckpt_name(named, ".safetensors") == "dog.safetensors"
    assert train_util.get_last_ckpt_name(unnamed, "") == "last"  # diffusers folder
    assert train_util.get_epoch_state_name(named, 2) == "dog-000002-state"
    assert train_util.get_step_state_name(unnamed, 40) == "at-step00000040-state"
    assert train_util.get_last_state_name(named) == "dog-state"
    assert train_util.default_if_none(None, 5) == 5 and train_util.default_if_none(0, 5) == 0


def test_git_revision_hash_reads_files(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    (repo / ".git" / "refs" / "heads" / "main").write_text(commit + "\n", encoding="utf-8")
    (repo / "library").mkdir()
    assert train_util.get_git_revision_hash(repo / "library") == commit
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    other = "f" * 40
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs\n{other} refs/heads/main\n", encoding="utf-8")
    assert train_util.get_git_revision_hash(repo) == other
    (repo / ".git" / "HEAD").write_text(commit + "\n", encoding="utf-8")  # detached
    assert train_util.get_git_revision_hash(repo) == commit
    worktree = tmp_path / "wt"
    worktree.mkdir()
    (worktree / ".git").write_text(f"gitdir: {repo / '.git'}\n", encoding="utf-8")
    assert train_util.get_git_revision_hash(worktree) == commit
    (repo / ".git" / "HEAD").write_text("garbage", encoding="utf-8")
    assert train_util.get_git_revision_hash(repo) == "(unknown)"
    nogit = tmp_path / "nogit"
    nogit.mkdir()
    if not any((p / ".git").exists() for p in (nogit, *nogit.parents)):
        assert train_util.get_git_revision_hash(nogit) == "(unknown)"
    assert "subprocess" not in Path(train_util.__file__).read_text(encoding="utf-8")


def test_seed_helpers():
    args = argparse.Namespace(seed=None)
    seed = train_util.resolve_seed(args)
    assert args.seed == seed and 0 <= seed < 2**32
    assert train_util.resolve_seed(argparse.Namespace(seed=42)) == 42
    import torch

    a = torch.randn(4, generator=train_util.make_generator(42, 3))
    b = torch.randn(4, generator=train_util.make_generator(42, 3))
    c = torch.randn(4, generator=train_util.make_generator(42, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert train_util.resolve_lr_warmup_steps(0.1, 200) == 20 and train_util.resolve_lr_warmup_steps(7, 200) == 7


def test_script_registered_flag_wins_and_unknown_flags_get_argparse_error(tmp_path):
    parser = make_parser()
    parser.add_argument("--scale_weight_norms", type=float, default=None)  # a script implementing it
    args = train_util.parse_args_with_config(parser, ["--scale_weight_norms", "1.0"])
    assert args.scale_weight_norms == 1.0
    config = write(tmp_path / "s.toml", "scale_weight_norms = 2.0\n")
    assert train_util.parse_args_with_config(parser, ["--config_file", str(config)]).scale_weight_norms == 2.0
    with pytest.raises(UserError, match="--loss_type"):  # registered only for its default value
        train_util.parse_args_with_config(parser, ["--loss_type", "huber"])
    with pytest.raises(SystemExit) as info:
        train_util.parse_args_with_config(parser, ["--no_such_flag_at_all"])
    assert info.value.code == 2
