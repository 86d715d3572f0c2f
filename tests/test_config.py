"""The typed pipeline config: YAML in, `--set` overrides, errors that name the field."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from lejepa import __version__
from lejepa.config import ConfigError, load_config, redacted
from lejepa.objective.model import Encoder

INFRA = Path(__file__).resolve().parents[1] / "infra"


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(None, ["loss.lamb=0.1", "views.global_scale=[0.4, 1.0]", "pretrain.max_steps=7"])
    assert cfg.loss.lamb == 0.1 and cfg.views.global_scale == (0.4, 1.0) and cfg.pretrain.max_steps == 7


@pytest.mark.parametrize(
    "override, field",
    [
        ("loss.lamb=2", "loss.lamb"),
        ("views.local_views=-1", "views.local_views"),
        ("pretrain.zero_stage=4", "pretrain.zero_stage"),
    ],
)
def test_an_invalid_value_names_its_field(override, field):
    with pytest.raises(ConfigError, match=rf"^invalid config: {field}: "):
        load_config(None, [override])


def test_unknown_keys_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model.backbon"):
        load_config(None, ["model.backbon=resnet50"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must map sections"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["loss.lamb"])


def test_shipped_profiles_are_valid():
    gpu = load_config(INFRA / "gpu.yaml")
    assert (
        gpu.pretrain.precision == "bf16" and "vit" in gpu.model.backbone and gpu.launch.accelerator == "cuda"
    )
    # The CPU profile's CIFAR-style ResNet-10 keeps a 3x3 map of a 20 px view (stock: 1x1).
    cpu = load_config(INFRA / "cpu.yaml")
    encoder = Encoder.from_config(cpu.model, in_chans=1, img_size=cpu.views.global_size)
    size = cpu.views.global_size
    assert encoder.backbone.forward_features(torch.zeros(2, 1, size, size)).shape == (2, 512, 3, 3)
    assert [len(stage) for stage in (encoder.backbone.layer1, encoder.backbone.layer4)] == [1, 1]
    assert encoder.embed_dim == 512 and cpu.pretrain.precision == cpu.evaluate.precision == "native"


def test_redacted_blanks_credentials():
    cfg = load_config(None, ["storage.access_key_id=AKIAEXAMPLE", "storage.secret_access_key=s3cr3t"])
    tree = redacted(cfg)
    assert "AKIAEXAMPLE" not in str(tree) and "s3cr3t" not in str(tree)


def test_console_script_prints_version_and_help():
    run = [sys.executable, "-m", "flows.cli"]
    assert (
        subprocess.run([*run, "version"], capture_output=True, text=True, check=True).stdout.strip()
        == __version__
    )
    usage = subprocess.run([*run, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in usage for name in ("shard", "pretrain", "evaluate", "publish", "run", "demo"))
    bad = subprocess.run([*run, "shard", "--set", "loss.lamb=5"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: invalid config: loss.lamb"
    )


@pytest.mark.parametrize(
    "override, field",
    [
        ("pretrain.run_name=../models/x", "pretrain.run_name"),
        ("pretrain.run_name=..", "pretrain.run_name"),
        ("data.name=a/b", "data.name"),
        ("data.name=.", "data.name"),
        ("publish.name=/abs", "publish.name"),
        ('publish.name="x\\ny"', "publish.name"),
    ],
)
def test_names_joined_into_store_paths_must_be_one_folder(override, field):
    with pytest.raises(ConfigError, match=rf"^invalid config: {field}: .* is not a folder name: "):
        load_config(None, [override])


def test_plain_folder_names_are_accepted_and_assignments_checked():
    cfg = load_config(None, ["pretrain.run_name=vit-s4_gpu.2", "data.name=fashion-mnist", "publish.name=m"])
    assert (cfg.pretrain.run_name, cfg.data.name, cfg.publish.name) == ("vit-s4_gpu.2", "fashion-mnist", "m")
    # The continual flow renames runs by assignment: the same check applies.
    cfg.pretrain.run_name = "fmnist-v-0123456789ab"
    with pytest.raises(ValidationError, match="is not a folder name"):
        cfg.pretrain.run_name = "../models/fmnist"


def test_the_configuration_reference_is_current() -> None:
    from lejepa.config_reference import reference

    page = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert page.read_text() == reference(), "docs/configuration.md is stale: run `make docs`"
    assert "| `launch.requeue_on_timeout` | bool | `false` | Slurm: a job about" in page.read_text()
