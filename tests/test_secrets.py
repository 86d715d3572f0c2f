"""Secrets stay secret: a whole run as a user types it, then a search for its credentials everywhere.

The store is moto's S3 server over HTTP with authentication on, so a rank that did not receive the
credentials fails. They are given only on the command line (`--set storage.access_key_id=...` and the
other two, plus secret entries of `storage.options`), and afterwards no process's command line (sampled
every 50 ms), no output line and no file the pipeline wrote (in the bucket, the scratch folders, the
working directory, Prefect's database, and what the trackers got: the MLflow server's database and
artifact folder, the TensorBoard files and W&B's offline run) may hold any of them. The hostfile (pdsh
over ssh) and Slurm launches are checked the same way with the launcher probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import _start_moto
from launching import PROBE, cpu_config, probe_lines, two_host_file

from lejepa.config import MASK, SECRETS_ENV, PipelineConfig, load_config, redacted
from lejepa.store.storage import Storage
from lejepa.train.launch import free_port, launch
from lejepa.train.pretrain import launch_folder, launch_inputs

PIPELINE = str(Path(sys.executable).parent / "lejepa-pipeline")
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
ASSUME = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
}
# Small enough for two ranks on two cores (tests/train/test_train.py's BASE, fewer steps).
TINY = {
    "data": {"source": "digits"},
    "shard": {"samples_per_shard": 600, "workers": 1},
    "model": {"backbone": "resnet10t", "proj_hidden_dim": 128, "proj_dim": 32},
    "views": {"local_views": 2},
    "loss": {"num_slices": 64},
    "pretrain": {"batch_size": 32, "max_steps": 4, "checkpoint_every": 2, "num_workers": 0},
    "launch": {"nproc_per_node": 2, "accelerator": "cpu"},
    "evaluate": {"probe_epochs": 2, "baselines": False, "num_workers": 0},
    "orchestration": {s: {"retries": 0} for s in ("shard", "pretrain", "evaluate", "publish")},
}


@dataclass
class Credentials:
    """Temporary credentials of an assumed role (key, secret and token: moto checks all three)."""

    endpoint: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    session_token: str
    option_token: str = field(default_factory=lambda: f"opt-{os.urandom(12).hex()}")
    """A secret of storage.options only: s3fs drops an s3_additional_kwargs entry no S3 call takes."""

    @property
    def sentinels(self) -> dict[str, str]:
        return {
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "session_token": self.session_token,
            "options.s3_additional_kwargs.ApiToken": self.option_token,
        }

    def overrides(self) -> list[str]:
        """The `--set` arguments that give them; client_kwargs repeats the secret key (s3fs takes either)."""
        options = {
            "client_kwargs": {"aws_secret_access_key": self.secret_access_key},
            "s3_additional_kwargs": {"ApiToken": self.option_token},
        }
        return [
            f"storage.access_key_id={self.access_key_id}",
            f"storage.secret_access_key={self.secret_access_key}",
            f"storage.session_token={self.session_token}",
            f"storage.options={json.dumps(options)}",
        ]

    def client(self) -> object:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
        )


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> Iterator[Credentials]:
    """An authenticating moto server, a bucket, and a role's temporary credentials; no AWS_* variables."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    # moto lets the first 7 requests through unauthenticated: its start-up probe, then the set-up below.
    for endpoint in _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "7"}):
        anyone = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        anyone |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="runner")
        iam.put_user_policy(UserName="runner", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName="runner")["AccessKey"]
        role = iam.create_role(RoleName="trainer", AssumeRolePolicyDocument=json.dumps(ASSUME))["Role"]
        iam.put_role_policy(RoleName="trainer", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        boto3.client("s3", **anyone).create_bucket(Bucket="secrets")
        sts = boto3.client(
            "sts",
            **{
                **anyone,
                "aws_access_key_id": key["AccessKeyId"],
                "aws_secret_access_key": key["SecretAccessKey"],
            },
        )
        issued = sts.assume_role(RoleArn=role["Arn"], RoleSessionName="lejepa")["Credentials"]
        yield Credentials(
            endpoint, "secrets", issued["AccessKeyId"], issued["SecretAccessKey"], issued["SessionToken"]
        )


class CommandLines:
    """The argv of every descendant of this process (with `everywhere`, of every process on this machine:
    a Slurm job's ranks descend from slurmd), sampled every 50 ms while the `with` block runs."""

    def __init__(self, everywhere: bool = False) -> None:
        self.everywhere = everywhere
        self.seen: set[tuple[str, ...]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            parents: dict[int, int] = {}
            for entry in os.scandir("/proc"):
                try:
                    stat = Path(entry.path, "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (ValueError, OSError):
                    continue  # not a process, or one that just ended
            ours = set(parents) if self.everywhere else {os.getpid()}
            for pid in sorted(parents):
                chain, p = [], pid
                while p in parents and p not in ours and p not in chain:
                    chain.append(p)
                    p = parents[p]
                if p in ours:
                    ours.update(chain)
            for pid in ours - {os.getpid()}:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                self.seen.add(tuple(a.decode(errors="replace") for a in argv if a))
            self._stop.wait(0.05)


def run_command(argv: list[str], cwd: Path, env: dict[str, str], outputs: list[str]) -> str:
    """Run one command as a user would; keep its output for the search and return it."""
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    print("TIMING", argv[1], time.monotonic() - t0, file=sys.stderr)
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, f"{argv[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def objects_in(credentials: Credentials) -> dict[str, bytes]:
    s3 = credentials.client()
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=credentials.bucket)
        for item in page.get("Contents", [])
    ]
    return {k: s3.get_object(Bucket=credentials.bucket, Key=k)["Body"].read() for k in keys}


def leaks(sentinels: dict[str, str], places: dict[str, bytes | str]) -> list[str]:
    """'<secret> in <place>' for every secret found anywhere."""
    found = []
    for name, value in sentinels.items():
        for place, content in places.items():
            data = content if isinstance(content, bytes) else content.encode()
            if value.encode() in data:
                found.append(f"{name} in {place}")
    return found


@pytest.mark.slow
def test_a_whole_run_leaves_no_secret_anywhere(
    s3_credentials: Credentials, tmp_path: Path, mlflow_uri: str, mlflow_home: Path
) -> None:
    creds = s3_credentials
    work, scratch, prefect_home, wandb_dir = (tmp_path / name for name in ("work", "tmp", "prefect", "wandb"))
    for folder in (work, scratch, prefect_home, wandb_dir):
        folder.mkdir()
    config = work / "run.yaml"  # the user's own file: no secret in it
    tree = {**TINY, "storage": {"root": f"s3://{creds.bucket}/lejepa", "endpoint_url": creds.endpoint}}
    tree["tracking"] = {"mlflow_uri": mlflow_uri, "tensorboard": True, "wandb_project": "secrets"}
    tree["tracking"] |= {"wandb_mode": "offline", "experiment": "secrets"}
    tree["publish"] = {"name": "secrets"}
    config.write_text(yaml.safe_dump(tree))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PREFECT_"))},
        "TMPDIR": str(scratch),  # the scratch folders of S3 runs, and every temporary file
        "PREFECT_HOME": str(prefect_home),  # the ephemeral Prefect API's database
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "AWS_DEFAULT_REGION": "us-east-1",
        "WANDB_DIR": str(wandb_dir),
    }
    command = [
        PIPELINE,
        "run",
        "--config",
        str(config),
        *(a for o in creds.overrides() for a in ("--set", o)),
    ]
    with CommandLines() as seen:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    result = json.loads(done.stdout.splitlines()[-1])
    assert result["pretrain"]["steps"] == 4 and result["publish"]["promoted"] is True
    stored = objects_in(creds)
    assert any(k.endswith("/release.json") for k in stored)
    results = [json.loads(v) for k, v in stored.items() if "/prefect-results/" in k]
    assert results and all(r["metadata"]["serializer"] == {"type": "lejepa-json"} for r in results)
    assert any(argv[1:4] == ("-u", "-m", "lejepa.train.rank") for argv in seen.seen), "no rank was sampled"
    database = b"".join(files_under(prefect_home).values())
    assert b"s3_additional_kwargs" in database, "the flow's parameters should be in Prefect's database"
    # The trackers got the run (its config among the MLflow params), so the search below covers them.
    assert any("/tensorboard/events.out.tfevents." in k for k in stored)
    assert list(wandb_dir.glob("wandb/offline-run-*/run-*.wandb"))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("secrets").experiment_id])
    assert len(runs) == 1 and runs[0].data.params["storage.root"] == tree["storage"]["root"]
    assert client.get_model_version_by_alias("secrets", "champion").run_id == runs[0].info.run_id
    places = {
        **{f"s3://{creds.bucket}/{k}": v for k, v in stored.items()},
        **files_under(tmp_path),
        **files_under(mlflow_home),  # the server's sqlite backend store and its artifact folder
        "stdout": done.stdout,
        "stderr": done.stderr,
        # The user's own command holds them, as typed; nothing the pipeline started may.
        **{f"argv {' '.join(argv)[:300]}": " ".join(argv) for argv in seen.seen if PIPELINE not in argv[:2]},
    }
    assert leaks(creds.sentinels, places) == []


# --- what the launchers put on command lines and into files ---------------------------------------------

SENTINELS = {
    "access_key_id": "AKIA-SENTINEL-ACCESS-KEY-ID",
    "secret_access_key": "sentinel-secret-access-key/+x",
    "session_token": "sentinel-session-token-0123456789",
    "options": "sentinel-option-client-secret",
    "user env": "sentinel-user-aws-secret-in-env",
    "DeepSpeed export": "sentinel-mlflow-token-in-env",
    "launch.env": "sentinel-wandb-api-key-in-env",
}
SECRET_SETS = [
    f"storage.access_key_id={SENTINELS['access_key_id']}",
    f"storage.secret_access_key={SENTINELS['secret_access_key']}",
    f"storage.session_token={SENTINELS['session_token']}",
    "storage.options="
    + json.dumps(
        {"client_kwargs": {"aws_secret_access_key": SENTINELS["options"], "region_name": "eu-west-1"}}
    ),
]


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


@pytest.fixture
def user_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets in the user's environment that remote ranks must get: AWS_*, one that DeepSpeed exports on
    its own (MLFLOW_*), and one that launch.env forwards."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SENTINELS["user env"])
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SENTINELS["DeepSpeed export"])
    monkeypatch.setenv("WANDB_API_KEY", SENTINELS["launch.env"])
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


def test_json_forms_and_written_configs_mask_every_secret() -> None:
    from flows.deploy import default_parameters
    from flows.pipeline import pipeline

    cfg = load_config(None, SECRET_SETS)
    forms = {
        "repr": repr(cfg),
        "str": str(cfg.storage),
        "model_dump(mode='json')": json.dumps(cfg.model_dump(mode="json")),
        "Prefect flow parameters": json.dumps(pipeline.serialize_parameters({"config": cfg})),
        "config.json, metrics.json, model card": json.dumps(redacted(cfg)),
        "deployment parameters": json.dumps(default_parameters(cfg)),
    }
    assert leaks(SENTINELS, forms) == []
    shown = pipeline.serialize_parameters({"config": cfg})["config"]["storage"]
    assert shown["secret_access_key"] == MASK
    assert shown["options"] == {"client_kwargs": {"aws_secret_access_key": MASK, "region_name": "eu-west-1"}}
    deployed = default_parameters(cfg)["config"]["storage"]
    assert deployed["access_key_id"] is None and deployed["options"]["client_kwargs"] == {
        "region_name": "eu-west-1"
    }
    # Parameters read back (a deployment run, "run again" in the UI) give no secret: the worker's own apply.
    again = load_config(None, [f"storage.options={json.dumps(shown['options'])}"]).storage
    assert again.options == deployed["options"]
    assert PipelineConfig.model_validate({"storage": shown}).storage.secret_access_key is None
    # The stages in this process still have the real values.
    assert cfg.storage.secret_access_key.get_secret_value() == SENTINELS["secret_access_key"]


def test_the_ranks_config_file_holds_no_secret_and_their_environment_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None, ["storage.root=s3://bucket/run", "storage.endpoint_url=http://127.0.0.1:9", *SECRET_SETS]
    )
    with launch_folder(cfg) as folder:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.parent == tmp_path
        args, env = launch_inputs(cfg, folder)
        written = Path(args[1]).read_text()
        assert args == ["--config", str(folder / "config.yaml")] and list(env) == [SECRETS_ENV]
        assert leaks(SENTINELS, {"config.yaml": written}) == []
        # A rank: its config from the file, its secrets from the environment the launcher gave it.
        rank_cfg = load_config(args[1])
    assert not folder.exists()
    monkeypatch.setenv(SECRETS_ENV, env[SECRETS_ENV])
    fs = Storage.from_config(rank_cfg.storage).fs
    assert (fs.key, fs.secret, fs.token) == (
        SENTINELS["access_key_id"],
        SENTINELS["secret_access_key"],
        SENTINELS["session_token"],
    )
    assert fs.client_kwargs == {"aws_secret_access_key": SENTINELS["options"], "region_name": "eu-west-1"}
    monkeypatch.delenv(SECRETS_ENV)
    fs = Storage.from_config(rank_cfg.storage).fs
    assert (fs.key, fs.secret, fs.client_kwargs) == (None, None, {"region_name": "eu-west-1"})


@pytest.mark.parametrize("mode", ["local", "hostfile", "slurm"])
def test_a_dry_run_shows_no_secret(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lejepa.train.pretrain import cli

    monkeypatch.chdir(tmp_path)
    sets = [*SECRET_SETS, f"launch.mode={mode}", f"launch.hostfile={two_host_file(tmp_path)}"]
    assert (
        cli(["--dry-run", "--set", "launch.accelerator=cpu", *(a for s in sets for a in ("--set", s))]) == 0
    )
    out, err = capsys.readouterr()
    assert "lejepa.train.rank --config " in out
    assert leaks(SENTINELS, {"output": out + err}) == []


SHOWN = (SECRETS_ENV, "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY")


def launch_probe(cfg: PipelineConfig) -> tuple[int, set[tuple[str, ...]], str]:
    """Launch the probe as the pretrain stage launches lejepa.train.rank (launch_inputs in a launch_folder),
    with the storage secrets of SECRET_SETS; returns its status, the command lines seen, and what each rank
    should print about SHOWN when every secret arrived."""
    cfg.storage = load_config(None, SECRET_SETS).storage
    with launch_folder(cfg) as folder, CommandLines(everywhere=cfg.launch.mode == "slurm") as seen:
        _, env = launch_inputs(cfg, folder)
        rc = launch(cfg, [a for name in SHOWN for a in ("--show-env", name)], program=PROBE, env=env)
    values = [env[SECRETS_ENV], SENTINELS["user env"], SENTINELS["DeepSpeed export"], SENTINELS["launch.env"]]
    shown = " ".join(f"{name}={digest(value)}" for name, value in zip(SHOWN, values, strict=True))
    return rc, seen.seen, shown


@pytest.mark.slow
def test_ranks_started_over_ssh_get_their_secrets_from_a_private_file(
    tmp_path: Path,
    loopback_sshd: tuple[int, Path],
    user_secrets: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, ssh_config = loopback_sshd
    monkeypatch.chdir(tmp_path)  # the working directory the nodes share
    cfg = cpu_config(
        mode="hostfile",
        hostfile=str(two_host_file(tmp_path)),
        ssh_port=port,
        ssh_options=["-F", str(ssh_config)],
        master_addr="127.0.0.1",
        env=["WANDB_*"],
    )
    rc, seen, shown = launch_probe(cfg)
    out, err = capsys.readouterr()
    assert rc == 0, err + out[-3000:]
    assert probe_lines(out) == [
        f"127.0.0.{r + 1}: probe rank={r} world=2 sum=3 accelerator=cpu {shown}" for r in (0, 1)
    ]
    commands = {" ".join(argv) for argv in seen}
    # pdsh, ssh and the remote shell were seen; plain variables still cross in the command (.deepspeed_env).
    assert any(c.startswith("pdsh ") and "export DS_ACCELERATOR=cpu;" in c for c in commands), commands
    assert any(f"-u {PROBE} --show-env" in c for c in commands)  # a rank, after lejepa.train.launch exec'd it
    assert leaks(SENTINELS, {"output": out + err, **{f"argv {c[:300]}": c for c in commands}}) == []
    assert not list(tmp_path.glob(".lejepa-*")), "the rank env file and the launch folder should be gone"


@pytest.mark.slow
def test_slurm_ranks_inherit_their_secrets_and_no_file_holds_them(
    tmp_path: Path,
    slurm: dict[str, str],
    user_secrets: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A one-node job of two ranks on the suite's real Slurm cluster.
    monkeypatch.chdir(tmp_path)
    cfg = cpu_config(mode="slurm", nproc_per_node=2, master_port=free_port(), env=["WANDB_*"])
    rc, seen, shown = launch_probe(cfg)
    out, err = capsys.readouterr()
    assert rc == 0, err + out[-3000:]
    assert probe_lines(out) == [f"{r}: probe rank={r} world=2 sum=3 accelerator=cpu {shown}" for r in (0, 1)]
    files = files_under(tmp_path)
    assert {Path(f).suffix for f in files} >= {".sbatch", ".out"}
    commands = {" ".join(argv) for argv in seen}
    assert any(c.startswith("srun --label") for c in commands), commands
    assert leaks(SENTINELS, {"output": out + err, **files, **{f"argv {c[:300]}": c for c in commands}}) == []
