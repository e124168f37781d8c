"""Config loading: defaults, TOML files, overrides, tuning files, and errors that name the key."""
from __future__ import annotations

import dataclasses

import pytest
import tomllib

from fastpipe.config import CONFIG_DIR, Config, ConfigError, from_dict, load_config, parse_overrides, to_toml
from fastpipe.train import main


def test_overrides_are_parsed_as_toml_values_or_plain_strings():
    layer = parse_overrides(["--optim.lr=0.4", "--data.backend", "dali", "--model.compile=false",
                             "--resolution.stages=[{epochs = 2, resolution = 128}]", "--data.ffcv.order=random"])
    assert layer == {"optim": {"lr": 0.4}, "data": {"backend": "dali", "ffcv": {"order": "random"}},
                     "model": {"compile": False}, "resolution": {"stages": [{"epochs": 2, "resolution": 128}]}}


def test_command_line_beats_tune_file_beats_config_file(tmp_path):
    tune = tmp_path / "autotune.toml"
    tune.write_text("[data]\nbatch_size = 384\nworkers = 3\n")
    config = load_config("r18.toml", ["--data.workers=5"], tune=tune)
    assert config.model.arch == "resnet18"            # from the file
    assert config.data.batch_size == 384              # from the tune file
    assert config.data.workers == 5                   # from the command line
    assert config.run.name == "r18"


def test_config_name_is_found_in_configs_folder_with_or_without_suffix():
    assert load_config("r50.toml").model.arch == "resnet50"
    assert load_config("r50").model.arch == "resnet50"
    with pytest.raises(ConfigError, match="r18.toml"):
        load_config("r81.toml")


def test_unknown_key_names_the_closest_valid_keys():
    with pytest.raises(ConfigError, match=r"Unknown config key 'optim.lrr'.*optim\.lr"):
        load_config(None, ["--optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'optimm'.*Did you mean optim\b"):
        load_config(None, ["--optimm.lr=0.1"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.epochs"):
        load_config(None, ["--resolution.stages=[{epoch = 1, resolution = 64}]"])


@pytest.mark.parametrize("override, expected", [
    ("--optim.lr=fast", "'optim.lr' expects float or 'auto'"),
    ("--data.workers=1.5", "'data.workers' expects int"),
    ("--model.compile=1", "'model.compile' expects bool or 'auto'"),
    ("--model.arch=resnet101", "'model.arch' expects 'resnet18' or 'resnet34' or 'resnet50'"),
    ("--augment.flip=yes", "'augment.flip' expects bool"),
])
def test_wrong_type_names_the_key_and_the_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        load_config(None, [override])


def test_ints_are_accepted_for_float_keys_and_auto_for_lr():
    assert load_config(None, ["--optim.lr=1"]).optim.lr == 1.0
    assert load_config(None, ["--optim.lr=auto"]).optim.lr == "auto"


def test_out_of_range_values_are_rejected():
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(None, ["--data.batch_size=0"])
    with pytest.raises(ConfigError, match="ramp_end"):
        load_config(None, ["--resolution.ramp_start=5", "--resolution.ramp_end=2"])


def test_to_toml_round_trips_to_an_equal_config():
    config = load_config("cpu-smoke.toml", ["--resolution.stages=[{epochs = 1, resolution = 64, batch_size = 8}]",
                                            "--data.ffcv={os_cache = false}", "--optim.lr=auto"])
    assert from_dict(tomllib.loads(to_toml(config))) == config
    assert config.schedule_for_resolution().batch_size_at(0) == 8


@pytest.mark.parametrize("name", ["r50.toml", "r18.toml", "cpu-smoke.toml", "small.toml"])
def test_shipped_configs_list_only_what_differs_from_the_defaults(name):
    defaults = Config().to_dict()
    listed = tomllib.loads((CONFIG_DIR / name).read_text())
    for section, values in listed.items():
        for key, value in values.items():
            assert defaults[section][key] != value, f"{name}: {section}.{key} repeats the default"
    load_config(name)   # and they validate


def test_gpu_recipes_follow_the_fast_imagenet_practice():
    for name in ("r50.toml", "r18.toml"):
        config = load_config(name)
        assert (config.resolution.start, config.resolution.end) == (160, 192)
        assert config.resolution.val > config.resolution.end
        assert config.optim.label_smoothing == 0.1 and config.optim.name == "sgd"
        assert 16 <= config.schedule.epochs <= 40


def test_print_config_prints_the_resolved_toml(capsys):
    assert main(["--config", "r18.toml", "--optim.lr=0.3", "--print-config"]) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.3 and printed["model"]["arch"] == "resnet18"


def test_cli_config_error_exits_2_with_the_suggestion(capsys):
    assert main(["--config", "r18.toml", "--schedule.epoch=3"]) == 2
    assert "schedule.epochs" in capsys.readouterr().err


def test_missing_tune_file_points_to_autotune(tmp_path):
    with pytest.raises(ConfigError, match="benchmarks autotune"):
        load_config("r18.toml", tune=tmp_path / "nope.toml")


def test_config_sections_are_frozen():
    config = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0


def test_help_lists_every_config_key_with_its_type_default_and_meaning(capsys):
    from fastpipe.config import valid_keys
    from fastpipe.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for key in valid_keys():
        assert f"  {key} " in text, key
    assert "'ffcv' or 'dali' or 'torch'" in text and "default 256" in text
    assert "peak LR for data.batch_size" in text and "random horizontal flips" in text


def test_to_toml_escapes_control_characters():
    config = load_config(None, {"run": {"name": 'tab\there "quoted" \x01 bell', "dir": "line\nbreak"}})
    assert from_dict(tomllib.loads(to_toml(config))) == config


def test_every_augment_key_reaches_the_loaders_or_the_step():
    import torch

    from fastpipe.train.assemble import build_mix, loader_args
    from fastpipe.train.distributed import DistInfo
    from fastpipe.train.runtime import Runtime, resolve_precision

    config = load_config(None, {"augment": {"min_scale": 0.3, "max_scale": 0.6, "ratio": [0.5, 2.0],
                                            "flip": False, "mixup": 0.2, "cutmix": 0.0}})
    runtime = Runtime(torch.device("cpu"), resolve_precision("off", "cpu"), DistInfo())
    train = loader_args(config, "train", runtime)
    assert (train["min_scale"], train["max_scale"], train["ratio"], train["flip"]) == (0.3, 0.6, (0.5, 2.0), False)
    assert build_mix(config, 10) is not None            # mixup / cutmix act in the step, for every backend
    loader_keys = {"min_scale", "max_scale", "ratio", "flip"}
    assert {f.name for f in dataclasses.fields(config.augment)} == loader_keys | {"mixup", "cutmix"}
    val = loader_args(config, "val", runtime)
    assert not loader_keys & set(val) and val["shuffle"] is False and val["resolution"] == config.resolution.val


def test_a_run_written_with_a_removed_key_still_loads_with_a_note(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text("[train]\nmax_nonfinite_steps = 5\nseed = 3\n")
    assert load_config(path).train.seed == 3
    assert "max_nonfinite_steps" in capsys.readouterr().err


def test_stages_and_backend_options_are_typed_records_checked_key_by_key(tmp_path):
    from fastpipe.config import FFCVOptions
    from fastpipe.train.resolution import Stage

    file = tmp_path / "run.toml"
    file.write_text('[data.ffcv]\norder = "quasi_random"\nos_cache = false\n[data.dali]\nprefetch = 3\n')
    config = load_config(file, ["--data.ffcv.batches_ahead=5", "--resolution.stages=[{epochs = 2, resolution = 64}]"])
    # a table updates the keys it names: the file's FFCV options stay beside the command line's
    assert config.data.ffcv == FFCVOptions(order="quasi_random", os_cache=False, batches_ahead=5)
    assert config.data.options_for("ffcv") == {"order": "quasi_random", "os_cache": False, "batches_ahead": 5}
    assert config.data.options_for("dali") == {"prefetch": 3} and config.data.options_for("torch") == {}
    assert config.resolution.stages == (Stage(epochs=2, resolution=64),)
    with pytest.raises(ConfigError, match=r"'data.ffcv.order' expects 'random' or 'quasi_random'"):
        load_config(None, ["--data.ffcv.order=shuffled"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'data.dali.prefech'.*data\.dali\.prefetch"):
        load_config(None, ["--data.dali.prefech=2"])
    with pytest.raises(ConfigError, match=r"'resolution.stages\[0\]' needs 'resolution'"):
        load_config(None, ["--resolution.stages=[{epochs = 2}]"])
    with pytest.raises(ConfigError, match=r"'resolution.stages\[0\]' expects a table \{epochs, resolution, batch_size\}"):
        load_config(None, ["--resolution.stages=[64]"])


def test_backend_options_reach_the_backend_that_runs():
    import torch

    from fastpipe.train.assemble import loader_args
    from fastpipe.train.distributed import DistInfo
    from fastpipe.train.runtime import Runtime, resolve_precision

    config = load_config(None, ["--data.ffcv.os_cache=false", "--data.torch.prefetch_factor=4"])
    runtime = Runtime(torch.device("cpu"), resolve_precision("off", "cpu"), DistInfo())
    assert loader_args(config, "train", runtime)["os_cache"] is False
    torch_args = loader_args(config, "train", runtime, backend="torch")
    assert torch_args["prefetch_factor"] == 4 and "os_cache" not in torch_args


def test_a_run_written_with_data_options_loads_them_as_its_backend_record(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text('[data]\nbackend = "ffcv"\n[data.options]\norder = "quasi_random"\nos_cache = false\n')
    assert load_config(path).data.options_for("ffcv") == {"order": "quasi_random", "os_cache": False}
    assert "data.options" in capsys.readouterr().err
    path.write_text("[data]\noptions = {}\n")   # what runs without options wrote: silently nothing
    assert load_config(path).data.options_for("ffcv") == {} and not capsys.readouterr().err
