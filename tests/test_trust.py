"""Nothing from the store runs as code, and no other user can put files where checkpoints are loaded from.

Resuming reads DeepSpeed's checkpoint files with `torch.load(weights_only=True)`: a file holding anything
but tensors, plain data and the few DeepSpeed types allowed is refused with one `error:` line (exit 2)
before any of it runs. Neither a config nor a stored encoder.json can make timm load a weights file. The
local scratch folder of remote stores is private to the user. (The flows' cached task results, plain JSON
only, are checked in test_flows.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

import lejepa
from lejepa.config import ConfigError, load_config
from lejepa.data.shard import write_shards
from lejepa.objective.model import Encoder
from lejepa.store.storage import Storage, StorageError
from lejepa.train.export import encoder_description, export_encoder

# One rank started by hand (`python -m lejepa.train.rank`, its own CLI), two steps: seconds on two cores.
BASE = {
    "data": {"source": "digits"},
    "model": {"backbone": "resnet10t", "proj_hidden_dim": 256, "proj_dim": 64},
    "views": {"local_views": 2},
    "loss": {"num_slices": 128},
    "pretrain": {"batch_size": 32, "max_steps": 2, "checkpoint_every": 2, "num_workers": 1, "lr": 2e-3},
}
TAG = "step00000002"


class OpensAFile:
    """Unpickling this calls open(path, "w"): the marker stands for any code a crafted file could run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_shards(load_config(None, [f"storage.root={root}", "data.source=digits"]), progress=False)
    return root


def write_config(path: Path, store: Path, run_name: str, **pretrain: object) -> Path:
    tree = json.loads(json.dumps(BASE))
    tree["storage"] = {"root": str(store)}
    tree["pretrain"].update(run_name=run_name, **pretrain)
    path.write_text(yaml.safe_dump(tree))
    return path


def train(config: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    args = [a for o in overrides for a in ("--set", o)]
    return subprocess.run(
        [sys.executable, "-m", "lejepa.train.rank", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ZeRO-2 run committed at step 2: its run folder, to copy."""
    config = write_config(tmp_path_factory.mktemp("base") / "cfg.yaml", store, "base", zero_stage=2)
    done = train(config)
    assert done.returncode == 0, done.stderr[-3000:]
    return store / "runs" / "base"


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_crafted_checkpoint_file_is_refused_before_it_runs(
    tmp_path: Path, store: Path, trained: Path, name: str
) -> None:
    run = store / "runs" / f"crafted-{name.split('_')[0]}"
    shutil.copytree(trained, run)
    checkpoints = run / "checkpoints"
    marker = tmp_path / "marker"
    torch.save({"module": OpensAFile(marker)}, checkpoints / TAG / name)

    config = write_config(tmp_path / "cfg.yaml", store, run.name, zero_stage=2)
    done = train(config, "pretrain.max_steps=4")

    assert not marker.exists(), "the crafted file ran code while resuming"
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: checkpoint {checkpoints}/{TAG}/{name} holds objects that are not plain tensors and data "
        f"(io.open): it was not written by this version of the pipeline; delete {checkpoints} to "
        "restart the run"
    ]
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 2  # nothing was overwritten


def resumes_to_step_4(config: Path) -> None:
    resumed = train(config, "pretrain.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stdout
    summary = json.loads(resumed.stdout.splitlines()[-1])
    assert summary["steps"] == 4
    log = Path(summary["run_dir"], "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]


def test_a_clean_zero2_checkpoint_resumes_under_weights_only(
    tmp_path: Path, store: Path, trained: Path
) -> None:
    shutil.copytree(trained, store / "runs" / "clean-2")
    resumes_to_step_4(write_config(tmp_path / "cfg.yaml", store, "clean-2", zero_stage=2))


# ZeRO 0 in fp32 resumes in tests/train/test_train.py; bf16 is what GPUs train in.
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_clean_bf16_checkpoint_resumes_under_weights_only(
    tmp_path: Path, store: Path, zero_stage: int
) -> None:
    config = write_config(
        tmp_path / "cfg.yaml", store, f"clean-{zero_stage}", zero_stage=zero_stage, precision="bf16"
    )
    first = train(config)
    assert first.returncode == 0, first.stderr[-3000:]
    resumes_to_step_4(config)


# -- the scratch folder of remote stores -----------------------------------------------------------------


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp folder, for this test: tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def scratch(url: str = "s3://bucket/store/runs/x/checkpoints") -> Path:
    return Storage("s3://bucket/store").local_dir(url)


def test_the_scratch_folder_is_private_to_the_user(temp_dir: Path) -> None:
    folder = scratch()
    assert folder.parent == temp_dir / f"lejepa-scratch-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    assert scratch() == folder  # the same for every process: ranks share what local rank 0 downloads
    assert scratch("s3://bucket/store/runs/y/checkpoints") != folder


@pytest.mark.parametrize("level", ["root", "run"])
def test_a_scratch_folder_others_can_write_is_refused(temp_dir: Path, level: str) -> None:
    folder = scratch()
    target = folder.parent if level == "root" else folder
    target.chmod(0o777)
    with pytest.raises(StorageError, match=f"scratch folder {target} is writable by other users"):
        scratch()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_scratch_folder_of_another_user_is_refused(temp_dir: Path) -> None:
    root = scratch().parent
    os.chown(root, 12345, -1)
    with pytest.raises(StorageError, match=f"scratch folder {root} belongs to uid 12345"):
        scratch()


def test_a_scratch_folder_that_is_a_link_is_refused(temp_dir: Path) -> None:
    elsewhere = temp_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (temp_dir / f"lejepa-scratch-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(StorageError, match="is not a folder"):
        scratch()


@pytest.mark.parametrize("argument", ["checkpoint_path", "pretrained"])
def test_a_config_that_would_make_timm_load_weights_is_refused(argument: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"^invalid config: model.backbone_kwargs: .*{argument} would make timm"
    ):
        load_config(None, [f"model.backbone_kwargs={{{argument}: /tmp/weights.pth}}"])


def test_an_encoder_json_that_names_a_weights_file_is_refused_before_timm_reads_it(tmp_path: Path) -> None:
    encoder = Encoder("resnet10t", in_chans=1, proj_hidden_dim=32)
    description = encoder_description("resnet10t", {}, 1, 16, False, encoder.embed_dim, [0.5], [0.5])
    url = export_encoder(encoder.backbone, description, Storage(str(tmp_path)), str(tmp_path / "run"))
    # The store's encoder.json points timm at a pickle: older timm would unpickle it, running its code.
    marker, crafted = tmp_path / "the-store-ran-code", tmp_path / "weights.pth"
    torch.save({"state_dict": OpensAFile(marker)}, crafted)
    described = json.loads(Path(url).read_text())
    Path(url).write_text(json.dumps({**described, "backbone_kwargs": {"checkpoint_path": str(crafted)}}))

    with pytest.raises(
        ValueError, match="checkpoint_path would make timm load weights from the hub or a file"
    ):
        lejepa.load_encoder(url)
    assert not marker.exists()
