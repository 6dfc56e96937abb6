"""The bad-input suite: every entry script, run as a user runs it, on input that is wrong.

Each row of ROWS builds its input under the test's tmp folder, runs the real script in a
subprocess (`sys.executable`, repository root as working folder) and checks:

- one clear line that names the file, key or flag (the row's `expect` regexes; for a stopping row
  exactly one `error: ...` line on stderr, and it matches the first regex);
- no "Traceback" in stdout or stderr;
- a non-zero exit status where the run must stop, status 0 where the script warns and goes on;
- nothing that existed before the run is deleted or changed (every file under the tmp folder and
  the shared fixtures, compared by content), plus the row's own `check`, if any.

To cover a new script add rows: `Row(id, script, build, expect, ...)` where `build(tmp, env)`
writes what the row needs under `tmp` and returns the script's arguments. `env` holds a tiny
model, a good dataset and LoRA / state files made once per session (see `Env`). Rows may set
environment variables read by `tests/fault_hooks/sitecustomize.py` (disk full, unwritable
folder, NaN loss) with `faults`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
import torch
from safetensors.torch import save_file

import dataset_fixtures as df

REPO = Path(__file__).resolve().parents[1]
FAULT_HOOKS = Path(__file__).resolve().parent / "fault_hooks"
TIMEOUT = 600


# --- shared inputs --------------------------------------------------------------------
@dataclass
class Env:
    root: Path
    model: Path  # tiny SD v1 .safetensors
    dataset: Path  # train_data_dir with one "1_dog" folder of two 64 px images and .txt captions
    lora_rank8: Path  # a LoRA of the tiny model with rank 8
    lora_sdxl_keys: Path  # tensors under SDXL LoRA names (another architecture)
    state_rank8: Path  # a --save_state folder of a rank-8 run of the tiny model

    def train(self, tmp: Path, *extra: str, data: Optional[Path] = None, out: Optional[Path] = None) -> list[str]:
        """train_network.py arguments for a one-step 64 px run; `extra` comes last (and wins)."""
        return [
            "--pretrained_model_name_or_path", str(self.model),
            "--train_data_dir", str(data or self.dataset),
            "--caption_extension", ".txt",
            "--resolution", "64",
            "--output_dir", str(out or tmp / "out"),
            "--output_name", "lora",
            "--network_module", "networks.lora",
            "--network_dim", "4",
            "--train_batch_size", "1",
            "--max_train_steps", "1",
            "--seed", "1",
            "--max_data_loader_n_workers", "0",
            *extra,
        ]


def _good_dataset(root: Path, folder: str = "1_dog", count: int = 2) -> Path:
    df.make_dreambooth_folder(root, folder, [(64, 64)] * count, ["a dog"] * count)
    return root


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> Env:
    from library.tiny_sd import build_tiny_models, write_tiny_model
    from networks import lora

    root = tmp_path_factory.mktemp("bad_input_env")
    model = write_tiny_model(root / "model", formats=("safetensors",), seed=0)["safetensors"]
    dataset = _good_dataset(root / "data")
    unet, vae, text_encoder = build_tiny_models(seed=0)
    network = lora.create_network(1.0, 8, 8, vae, text_encoder, unet)
    network.apply_to(text_encoder, unet, True, True)
    lora_rank8 = root / "lora_rank8.safetensors"
    network.save_weights(lora_rank8, None, None)
    lora_sdxl = root / "lora_sdxl.safetensors"
    save_file({
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
    }, str(lora_sdxl))
    state_out = root / "rank8_run"
    _run("train_network.py", Env(root, model, dataset, lora_rank8, lora_sdxl, Path()).train(
        root, "--network_dim", "8", "--save_state_on_train_end", out=state_out))
    return Env(root, model, dataset, lora_rank8, lora_sdxl, state_out / "lora-state")


# --- running and checking -------------------------------------------------------------
def _run(script: str, argv: Sequence[str], faults: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ)
    environment.pop("PYTHONPATH", None)
    if faults:
        environment.update(faults)
        environment["PYTHONPATH"] = str(FAULT_HOOKS)
    environment.setdefault("OMP_NUM_THREADS", "1")  # tiny models on shared CPUs
    return subprocess.run(
        [sys.executable, str(REPO / script), *argv], cwd=REPO, env=environment,
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=TIMEOUT,
    )


def _snapshot(*roots: Path) -> dict[Path, str]:
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                files[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@dataclass
class Row:
    id: str
    script: str
    build: Callable[[Path, Env], list[str]]
    expect: Sequence[str]  # regexes; each must match one output line (the first: the error line)
    stops: bool = True  # non-zero exit expected; False: warn and go on (exit 0)
    faults: dict[str, str] = field(default_factory=dict)  # may use "{tmp}"
    check: Optional[Callable[[Path, Env], None]] = None  # extra assertions after the run


# --- row builders -------------------------------------------------------------------------
def _broken_images(tmp: Path) -> Path:
    """`tmp/data/1_dog`: two good images plus corrupt, truncated, empty, non-image and tiny files."""
    folder = _good_dataset(tmp / "data") / "1_dog"
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not png data" * 4)
    df.write_image(folder / "truncated.png", 64, 64, seed=7)
    (folder / "truncated.png").write_bytes((folder / "truncated.png").read_bytes()[:200])
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is not an image", encoding="utf-8")
    df.write_image(folder / "tiny.png", 16, 16, seed=8)
    return folder


def _broken_files_dataset(tmp: Path, env: Env) -> list[str]:
    return env.train(tmp, "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "64",
                     "--bucket_reso_steps", "32", data=_broken_images(tmp).parent)


def _latin1_caption(tmp: Path) -> Path:
    """`tmp/data/1_dog` whose img0.txt caption is Latin-1, not UTF-8."""
    folder = _good_dataset(tmp / "data") / "1_dog"
    (folder / "img0.txt").write_bytes("caf\xe9 dog".encode("latin-1"))
    return folder


def _bad_caption_encoding(tmp: Path, env: Env) -> list[str]:
    return env.train(tmp, data=_latin1_caption(tmp).parent)


def _empty_dataset(tmp: Path, env: Env) -> list[str]:
    (tmp / "data" / "10_dog").mkdir(parents=True)
    return env.train(tmp, data=tmp / "data")


def _no_repeats_prefix(tmp: Path, env: Env) -> list[str]:
    return env.train(tmp, data=_good_dataset(tmp / "data", folder="dog"))


def _dataset_toml(text: str) -> Callable[[Path, Env], list[str]]:
    def build(tmp: Path, env: Env) -> list[str]:
        path = tmp / "dataset.toml"
        path.write_text(text.replace("{images}", (env.dataset / "1_dog").as_posix()), encoding="utf-8")
        return env.train(tmp, "--dataset_config", str(path))
    return build


def _config_file(text: str, *extra: str) -> Callable[[Path, Env], list[str]]:
    def build(tmp: Path, env: Env) -> list[str]:
        path = tmp / "settings.toml"
        path.write_text(text, encoding="utf-8")
        return env.train(tmp, "--config_file", str(path), *extra)
    return build


def _model(make: Callable[[Path, Env], Path]) -> Callable[[Path, Env], list[str]]:
    def build(tmp: Path, env: Env) -> list[str]:
        return env.train(tmp, "--pretrained_model_name_or_path", str(make(tmp, env)))
    return build


def _not_sd_safetensors(tmp: Path, env: Env) -> Path:
    save_file({"classifier.weight": torch.zeros(3, 3)}, str(tmp / "classifier.safetensors"))
    return tmp / "classifier.safetensors"


def _truncated_safetensors(tmp: Path, env: Env) -> Path:
    data = env.model.read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return tmp / "truncated.safetensors"


class _RunsCode:
    """Unpickling this object would create a marker folder: a `.ckpt` that tries to run code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _code_pickle_ckpt(tmp: Path, env: Env) -> Path:
    torch.save({"state_dict": {"x": _RunsCode(tmp / "code_ran")}}, str(tmp / "evil.ckpt"))
    return tmp / "evil.ckpt"


def _diffusers_missing_unet(tmp: Path, env: Env) -> Path:
    from library.tiny_sd import write_tiny_model

    folder = write_tiny_model(tmp / "dm", formats=("diffusers",), seed=0)["diffusers"]
    shutil.rmtree(folder / "unet")
    return folder


def _code_did_not_run(tmp: Path, env: Env) -> None:
    assert not (tmp / "code_ran").exists()


def _resolution_65(tmp: Path, env: Env) -> list[str]:
    return env.train(tmp, "--resolution", "65")


def _lora_saved(tmp: Path, env: Env) -> None:
    assert (tmp / "out" / "lora.safetensors").is_file()


def _first_step_saved_only(tmp: Path, env: Env) -> None:
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["lora-step00000001.safetensors"]


def _existing_output(tmp: Path) -> Path:
    """An output folder holding a previous run's LoRA and state (must survive the failed run)."""
    out = tmp / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"previous run's LoRA")
    return out


def _disk_full_at_model_save(tmp: Path, env: Env) -> list[str]:
    _existing_output(tmp)
    return env.train(tmp)


def _disk_full_at_state_save(tmp: Path, env: Env) -> list[str]:
    out = tmp / "out"  # the final LoRA save succeeds (and may replace a LoRA); the state save fails
    shutil.copytree(env.state_rank8, out / "lora-state")
    return env.train(tmp, "--network_dim", "8", "--save_state")


def _old_state(tmp: Path, env: Env) -> Path:
    """The rank-8 state as an older version wrote it: train_state.json without the run fingerprint."""
    state = tmp / "old-state"
    shutil.copytree(env.state_rank8, state)
    saved = json.loads((state / "train_state.json").read_text(encoding="utf-8"))
    del saved["run"]
    (state / "train_state.json").write_text(json.dumps(saved), encoding="utf-8")
    return state


def _no_temp_files_left(tmp: Path, env: Env) -> None:
    leftovers = [p.name for p in (tmp / "out").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def _empty_folder(tmp: Path) -> Path:
    (tmp / "empty").mkdir()
    return tmp / "empty"


def _file(tmp: Path, name: str = "a_file") -> Path:
    (tmp / name).write_text("I am a file", encoding="utf-8")
    return tmp / name


def _sample_folder_is_file(tmp: Path, env: Env) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    _file(out, "sample")
    prompts = tmp / "prompts.txt"
    prompts.write_text("a dog --w 64 --h 64 --s 2\n", encoding="utf-8")
    return env.train(tmp, "--sample_prompts", str(prompts), "--sample_every_n_steps", "1")


def _cache_folder_denied(tmp: Path, env: Env) -> list[str]:
    return env.train(tmp, "--cache_latents_to_disk", data=_good_dataset(tmp / "data"))


def _prepare_buckets(tmp: Path, env: Env, model: Path) -> list[str]:
    meta = tmp / "meta.json"
    meta.write_text(json.dumps({str(env.dataset / "1_dog" / "img0.png"): {"caption": "a dog"}}), encoding="utf-8")
    return [str(env.dataset / "1_dog"), str(meta), str(tmp / "meta_lat.json"), str(model), "--full_path",
            "--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "64"]


def _bad_json(tmp: Path) -> Path:
    (tmp / "bad.json").write_text('{"img0": {"caption": "a dog",}', encoding="utf-8")
    return tmp / "bad.json"


TRAIN = "train_network.py"
CONVERT = "tools/convert_diffusers20_original_sd.py"
MERGE_CAPTIONS = "finetune/merge_captions_to_metadata.py"
CLEAN = "finetune/clean_captions_and_tags.py"
DD_TAGS = "finetune/merge_dd_tags_to_metadata.py"
PREPARE = "finetune/prepare_buckets_latents.py"
RESIZE = "tools/resize_images_to_resolution.py"
TINY = "tools/make_tiny_model.py"
ENOSPC_ROWS_SAVE = {"REL_ENOSPC_MATCH": ".lora."}  # the temp file of the final LoRA save

DB = "train_db.py"
FINE_TUNE = "fine_tune.py"
TI = "train_textual_inversion.py"
GEN = "gen_img_diffusers.py"
MERGE_LORA = "networks/merge_lora.py"
RESIZE_LORA = "networks/resize_lora.py"
EXTRACT_LORA = "networks/extract_lora_from_models.py"
CHECK_LORA = "networks/check_lora_weights.py"
MERGE_MODELS = "tools/merge_models.py"
CAPTIONS = "finetune/make_captions.py"


def _trainer(env: Env, tmp: Path, *extra: str) -> list[str]:
    """train_db.py / train_textual_inversion.py arguments for a short run (no LoRA flags)."""
    return [
        "--pretrained_model_name_or_path", str(env.model), "--train_data_dir", str(env.dataset),
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(tmp / "out"),
        "--train_batch_size", "1", "--max_train_steps", "2", "--max_data_loader_n_workers", "0", *extra,
    ]


def _gen(env: Env, tmp: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(env.model), "--prompt", "a dog", "--outdir", str(tmp / "images"), "--W", "64", "--H", "64", *extra]

ROWS: list[Row] = [
    # --- dataset ---
    Row("dataset_broken_files_warn_and_train", TRAIN, _broken_files_dataset, [
        r"WARNING .*skipping image: .*corrupt\.png", r"WARNING .*skipping image: .*truncated\.png",
        r"WARNING .*skipping image: .*zero\.png", r"WARNING .*skipping image: .*notes\.jpg",
        r"WARNING .*smaller than their bucket.*tiny\.png",
    ], stops=False, check=_lora_saved),
    Row("dataset_caption_not_utf8", TRAIN, _bad_caption_encoding, [r"^error: caption file .*img0\.txt is not valid UTF-8"]),
    Row("dataset_empty", TRAIN, _empty_dataset, [r"^error: no training images found in .*10_dog: the layout must be <train_data_dir>/<repeats>_"]),
    Row("dataset_folder_without_repeats", TRAIN, _no_repeats_prefix,
        [r"^error: --train_data_dir .* has no '<repeats>_<class tokens>' folders.*the layout must be", r"WARNING .*ignoring folder .*dog"]),
    # --- dataset TOML ---
    Row("toml_unknown_key", TRAIN, _dataset_toml('[general]\nfoo = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{images}"\n'),
        [r"^error: invalid dataset config .*dataset\.toml: general\.foo: unknown key"]),
    Row("toml_wrong_type", TRAIN, _dataset_toml('[[datasets]]\nbatch_size = "two"\n[[datasets.subsets]]\nimage_dir = "{images}"\n'),
        [r"^error: invalid dataset config .*dataset\.toml: datasets\[0\]\.batch_size: wrong type"]),
    Row("toml_missing_section", TRAIN, _dataset_toml('[general]\nshuffle_caption = true\n'),
        [r"^error: no datasets defined \(in .*dataset\.toml\): add \[\[datasets\]\]"]),
    Row("toml_syntax_error", TRAIN, _dataset_toml('[general]\nshuffle_caption = true\n[[datasets]\n'),
        [r"^error: cannot parse dataset config .*dataset\.toml: .*line 3"]),
    Row("config_file_wrong_type", TRAIN, _config_file('[training]\nlearning_rate = "fast"\n'),
        [r"^error: --config_file .*settings\.toml: key 'learning_rate' = 'fast': wrong type"]),
    Row("config_file_syntax_error", TRAIN, _config_file('[training]\nlearning_rate = 1e-4\nmax_train_steps = = 3\n'),
        [r"^error: --config_file: TOML syntax error in .*settings\.toml: .*line 3"]),
    Row("config_file_unknown_key_warns", TRAIN, _config_file('[training]\nlearning_rat = 1e-4\n', "--debug_dataset"),
        [r"WARNING .*settings\.toml: key 'learning_rat' is not a flag of this script"], stops=False),
    # --- model ---
    Row("model_missing", TRAIN, _model(lambda tmp, env: tmp / "nothere.safetensors"),
        [r"^error: .*nothere\.safetensors: model not found"]),
    Row("model_not_stable_diffusion", TRAIN, _model(_not_sd_safetensors),
        [r"^error: .*classifier\.safetensors: not a Stable Diffusion"]),
    Row("model_truncated_safetensors", TRAIN, _model(_truncated_safetensors), [r"^error: .*truncated\.safetensors: the file is truncated"]),
    Row("model_ckpt_pickle_runs_code", TRAIN, _model(_code_pickle_ckpt),
        [r"^error: .*evil\.ckpt: refusing to load: the pickle references '[\w.]*mkdir'"], check=_code_did_not_run),
    Row("model_diffusers_folder_missing_unet", TRAIN, _model(_diffusers_missing_unet),
        [r"^error: .*dm[/\\]diffusers: not a Diffusers model folder \('unet/config\.json' is missing\)"]),
    # --- networks ---
    Row("network_weights_wrong_rank", TRAIN, lambda tmp, env: env.train(tmp, "--network_weights", str(env.lora_rank8)),
        [r"^error: LoRA weights .*lora_rank8\.safetensors: module \w+ has lora_down\.weight of shape \(8, \d+\) but this model needs \(4, \d+\)"]),
    Row("network_weights_wrong_architecture", TRAIN, lambda tmp, env: env.train(tmp, "--network_weights", str(env.lora_sdxl_keys)),
        [r"^error: LoRA weights .*lora_sdxl\.safetensors: none of its 3 weights fit this model's network"]),
    Row("network_weights_missing", TRAIN, lambda tmp, env: env.train(tmp, "--network_weights", str(tmp / "no.safetensors")),
        [r"^error: --network_weights: file not found: .*no\.safetensors"]),
    # --- flags ---
    Row("resolution_65_rounded", TRAIN, _resolution_65, [r"WARNING .*resolution 65x65 is not a multiple of 8: using 64x64"],
        stops=False, check=_lora_saved),
    Row("cache_latents_with_color_aug", TRAIN, lambda tmp, env: env.train(tmp, "--cache_latents", "--color_aug"),
        [r"^error: --cache_latents cannot be used with --color_aug"]),
    Row("cache_latents_with_random_crop", TRAIN, lambda tmp, env: env.train(tmp, "--cache_latents", "--random_crop"),
        [r"^error: --cache_latents cannot be used with --random_crop"]),
    Row("resume_missing_folder", TRAIN, lambda tmp, env: env.train(tmp, "--resume", str(tmp / "gone-state")),
        [r"^error: --resume: state folder not found: .*gone-state"]),
    Row("resume_another_runs_state", TRAIN, lambda tmp, env: env.train(tmp, "--resume", str(env.state_rank8)),
        [r"^error: --resume: the state in .*lora-state is from another run: network_dim 8 in the state, 4 in this run"]),
    Row("resume_old_state_of_this_run_warns", TRAIN,
        lambda tmp, env: env.train(tmp, "--network_dim", "8", "--max_train_steps", "2", "--resume", str(_old_state(tmp, env))),
        [r"WARNING .*--resume: .*old-state records no run settings \(written by an older version or by sd-scripts\)"],
        stops=False, check=_lora_saved),
    Row("resume_folder_without_states", TRAIN, lambda tmp, env: env.train(tmp, "--resume", str(_existing_output(tmp))),
        [r"^error: --resume .*out: no training state in this folder"]),
    # --- disk ---
    Row("output_dir_is_a_file", TRAIN, lambda tmp, env: env.train(tmp, out=_file(tmp)),
        [r"^error: --output_dir .*a_file is an existing file, not a folder"]),
    Row("output_dir_not_writable", TRAIN, lambda tmp, env: env.train(tmp, out=_existing_output(tmp)),
        [r"^error: --output_dir .*out is not writable: Permission denied"], faults={"REL_DENY_WRITE_DIR": "{tmp}/out"}),
    Row("logging_dir_through_a_file", TRAIN, lambda tmp, env: env.train(tmp, "--logging_dir", str(_file(tmp) / "logs")),
        [r"^error: --logging_dir: cannot create the folder .*logs: .*a_file is a file, not a folder"]),
    Row("sample_folder_is_a_file", TRAIN, _sample_folder_is_file,
        [r"^error: --sample_prompts: sample folder .*sample is an existing file"]),
    Row("cache_latents_to_disk_folder_not_writable", TRAIN, _cache_folder_denied,
        [r"^error: --cache_latents_to_disk: latent cache folder .*1_dog is not writable"],
        faults={"REL_DENY_WRITE_DIR": "{tmp}/data/1_dog"}),
    Row("disk_full_during_model_save", TRAIN, _disk_full_at_model_save,
        [r"^error: cannot write .*out[/\\]lora\.safetensors: the disk is full"], faults=ENOSPC_ROWS_SAVE,
        check=_no_temp_files_left),
    Row("disk_full_during_state_save", TRAIN, _disk_full_at_state_save,
        [r"^error: cannot write .*out[/\\]lora-state: the disk is full"], faults={"REL_ENOSPC_MATCH": "lora-state.partial"},
        check=_no_temp_files_left),
    # --- training ---
    Row("nan_loss_stops_keeps_last_save", TRAIN,
        lambda tmp, env: env.train(tmp, "--max_train_steps", "3", "--save_every_n_steps", "1"),
        [r"^error: loss became nan at step 2: training diverged \(learning rate 2e-06, 2e-06; --mixed_precision no\)"],
        faults={"REL_NAN_AFTER_CALLS": "2"}, check=_first_step_saved_only),
    # --- tools/convert_diffusers20_original_sd.py ---
    Row("convert_ckpt_pickle_runs_code", CONVERT, lambda tmp, env: [str(_code_pickle_ckpt(tmp, env)), str(tmp / "o.safetensors")],
        [r"^error: .*evil\.ckpt: refusing to load"], check=_code_did_not_run),
    Row("convert_not_stable_diffusion", CONVERT, lambda tmp, env: [str(_not_sd_safetensors(tmp, env)), str(tmp / "o.safetensors")],
        [r"^error: .*classifier\.safetensors: not a Stable Diffusion"]),
    Row("convert_output_through_a_file", CONVERT, lambda tmp, env: [str(env.model), str(_file(tmp) / "o.safetensors")],
        [r"^error: cannot write .*o\.safetensors: cannot create the folder .*a_file is a file, not a folder"]),
    # --- finetune/ metadata pipeline ---
    Row("merge_captions_missing_folder", MERGE_CAPTIONS, lambda tmp, env: [str(tmp / "nothere"), str(tmp / "m.json")],
        [r"^error: train_data_dir .*nothere not found"]),
    Row("merge_captions_caption_not_utf8", MERGE_CAPTIONS,
        lambda tmp, env: [str(_latin1_caption(tmp)), str(tmp / "m.json"), "--caption_extension", ".txt"],
        [r"^error: .*img0\.txt is not valid UTF-8"]),
    Row("clean_captions_bad_json", CLEAN, lambda tmp, env: [str(_bad_json(tmp)), str(tmp / "o.json")],
        [r"^error: metadata file .*bad\.json is not valid JSON: .*line 1"]),
    Row("dd_tags_in_json_missing", DD_TAGS, lambda tmp, env: [str(env.dataset / "1_dog"), str(tmp / "o.json"), "--in_json", str(tmp / "no.json")],
        [r"^error: metadata file .*no\.json not found"]),
    Row("prepare_buckets_ckpt_pickle_runs_code", PREPARE, lambda tmp, env: _prepare_buckets(tmp, env, _code_pickle_ckpt(tmp, env)),
        [r"^error: .*evil\.ckpt: refusing to load"], check=_code_did_not_run),
    # --- tools/resize_images_to_resolution.py, tools/make_tiny_model.py ---
    Row("resize_corrupt_image_warns", RESIZE, lambda tmp, env: [str(_broken_images(tmp)), str(tmp / "small")],
        [r"WARNING .*skipping image: .*corrupt\.png"], stops=False),
    Row("resize_destination_through_a_file", RESIZE, lambda tmp, env: [str(env.dataset / "1_dog"), str(_file(tmp) / "small")],
        [r"^error: destination folder: cannot create the folder .*small: .*a_file is a file"]),
    Row("make_tiny_model_output_through_a_file", TINY, lambda tmp, env: [str(_file(tmp) / "model")],
        [r"^error: cannot write .*model.*a_file is a file, not a folder"]),
    # --- train_db.py, fine_tune.py, train_textual_inversion.py ---
    Row("db_stop_text_encoder_beyond_steps", DB, lambda tmp, env: _trainer(env, tmp, "--stop_text_encoder_training", "5"),
        [r"^error: --stop_text_encoder_training 5 is greater than the number of training steps \(2\)"]),
    Row("db_diffusers_onto_existing_file", DB,
        lambda tmp, env: _trainer(env, tmp, "--save_model_as", "diffusers", "--output_dir", str(tmp), "--output_name", _file(tmp).name),
        [r"^error: --save_model_as diffusers: .*a_file is an existing file"]),
    Row("db_resume_of_a_lora_state", DB, lambda tmp, env: _trainer(env, tmp, "--resume", str(env.state_rank8)),
        [r'^error: --resume: the state in .*lora-state is from another run: trainer "train_network\.py" in the state, '
         r'"train_db\.py" in this run']),
    Row("fine_tune_in_json_missing", FINE_TUNE, lambda tmp, env: _trainer(env, tmp, "--in_json", str(tmp / "no.json")),
        [r"^error: metadata file .*no\.json not found"]),
    Row("ti_token_already_known", TI, lambda tmp, env: _trainer(env, tmp, "--token_string", "dog", "--init_word", "cat"),
        [r"^error: --token_string: the tokenizer already knows the token 'dog'"]),
    Row("ti_init_word_too_long", TI,
        lambda tmp, env: _trainer(env, tmp, "--token_string", "mytok", "--init_word", "a big red dog", "--num_vectors_per_token", "2"),
        [r"^error: --init_word 'a big red dog' has 4 tokens, more than --num_vectors_per_token 2"]),
    # --- gen_img_diffusers.py ---
    Row("gen_missing_ckpt", GEN, lambda tmp, env: _gen(env, tmp, "--ckpt", str(tmp / "none.safetensors")),
        [r"^error: .*none\.safetensors: model not found"]),
    Row("gen_unknown_sampler", GEN, lambda tmp, env: _gen(env, tmp, "--sampler", "nosuch"), [r"^error: unknown sampler 'nosuch' \(--sampler\)"]),
    Row("gen_mask_without_image", GEN, lambda tmp, env: _gen(env, tmp, "--mask_path", str(_file(tmp))),
        [r"^error: --mask_path needs --image_path"]),
    Row("gen_lora_of_another_architecture", GEN,
        lambda tmp, env: _gen(env, tmp, "--network_module", "networks.lora", "--network_weights", str(env.lora_sdxl_keys)),
        [r"^error: .*lora_sdxl\.safetensors"]),
    # --- LoRA and model tools, captioning ---
    Row("merge_lora_ratio_count", MERGE_LORA,
        lambda tmp, env: ["--models", str(env.lora_rank8), str(env.lora_rank8), "--ratios", "1.0", "--save_to", str(tmp / "m.safetensors")],
        [r"^error: --ratios has 1 values but --models has 2 files"]),
    Row("merge_lora_save_to_is_input", MERGE_LORA, lambda tmp, env: ["--models", str(env.lora_rank8), "--save_to", str(env.lora_rank8)],
        [r"^error: --save_to .*lora_rank8\.safetensors is also an input file"]),
    Row("merge_lora_wrong_architecture", MERGE_LORA,
        lambda tmp, env: ["--sd_model", str(env.model), "--models", str(env.lora_sdxl_keys), "--save_to", str(tmp / "m.safetensors")],
        [r"^error: .*lora_sdxl\.safetensors"]),
    Row("resize_lora_not_a_lora", RESIZE_LORA,
        lambda tmp, env: ["--model", str(_not_sd_safetensors(tmp, env)), "--save_to", str(tmp / "r.safetensors"), "--new_rank", "2"],
        [r"^error: .*classifier\.safetensors: not a LoRA file"]),
    Row("extract_lora_missing_model", EXTRACT_LORA,
        lambda tmp, env: ["--model_org", str(env.model), "--model_tuned", str(tmp / "none.safetensors"),
                          "--save_to", str(tmp / "e.safetensors"), "--dim", "4"],
        [r"^error: .*none\.safetensors: model not found"]),
    Row("check_lora_not_a_lora", CHECK_LORA, lambda tmp, env: [str(_not_sd_safetensors(tmp, env))],
        [r"^error: .*classifier\.safetensors: not a LoRA file"]),
    Row("merge_models_ratio_count", MERGE_MODELS,
        lambda tmp, env: ["--models", str(env.model), str(env.model), "--ratios", "0.5", "--output", str(tmp / "mm.safetensors")],
        [r"^error: --ratios has 1 values but --models has 2"]),
    Row("make_captions_no_images", CAPTIONS, lambda tmp, env: [str(_empty_folder(tmp)), "--caption_weights", str(tmp / "no_model")],
        [r"^error: train_data_dir: no images .* in .*empty"]),
]


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input(row: Row, tmp_path: Path, env: Env) -> None:
    argv = row.build(tmp_path, env)
    before = _snapshot(tmp_path, env.root)
    faults = {key: value.replace("{tmp}", str(tmp_path)) for key, value in row.faults.items()}
    result = _run(row.script, argv, faults)
    output = result.stdout + result.stderr
    lines = output.splitlines()
    assert "Traceback" not in output, output[-3000:]
    if row.stops:
        assert result.returncode != 0, output[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, output[-3000:]
        assert re.search(row.expect[0], errors[0]), errors[0]
        patterns = row.expect[1:]
    else:
        assert result.returncode == 0, output[-3000:]
        patterns = row.expect
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in lines), f"{pattern!r} not in:\n{output[-3000:]}"
    after = _snapshot(tmp_path, env.root)
    changed = [str(path) for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"existing files deleted or changed: {changed}"
    if row.check is not None:
        row.check(tmp_path, env)
