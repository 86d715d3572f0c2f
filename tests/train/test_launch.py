"""The pretrain launcher: commands per mode, real runs of a distributed probe, failures, and Slurm scripts.

Most distributed runs start tests/programs/allreduce_probe.py (DeepSpeed's init_distributed, gloo, one
all_reduce) instead of lejepa.train.rank, so they prove the launcher alone; the two-host pdsh launch trains
LeJEPA itself. Each is bounded by an alarm. The Slurm launch runs on a real cluster: see test_slurm.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from launching import PROBE, cpu_config, probe_lines, two_host_file

from lejepa.config import ConfigError, LaunchConfig, load_config
from lejepa.data.shard import write_shards
from lejepa.train.launch import (
    LaunchError,
    LaunchFailed,
    _write_deepspeed_env,
    forwarded_env,
    free_port,
    hostfile_command,
    launch,
    local_command,
    rank_error,
    slurm_script,
)
from lejepa.train.pretrain import cli, run_pretrain

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SECRET_DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()[:12]


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail a distributed test that hangs, instead of hanging the suite; launch() then stops its ranks."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("launch did not finish within 240 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(240)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)


# --- commands -------------------------------------------------------------------------------------------


def test_local_commands(tmp_path: Path) -> None:
    lc = cpu_config(master_port=29600).launch
    assert local_command(lc, "lejepa.train.rank", ["--config", "c.yaml"], log_dir=tmp_path) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--node_rank=0",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        "--master_port=29600",
        "--tee=3",
        f"--log_dir={tmp_path}",
        "-m",
        "lejepa.train.rank",
        "--config",
        "c.yaml",
    ]
    lc = cpu_config(launcher="deepspeed", nproc_per_node=3, master_port=29600).launch
    assert local_command(lc, "probe.py", ["--set", "a=1"], log_dir=tmp_path) == [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus=3",
        "--master_addr=127.0.0.1",
        "--master_port=29600",
        "--no_local_rank",
        "probe.py",
        "--set",
        "a=1",
    ]


def test_launcher_commands_use_only_options_the_installed_launchers_have(tmp_path: Path) -> None:
    # torch 2.11's torchrun has no --log_line_prefix_template: python took it as its own option and every
    # rank died before the program started. Each option we pass must parse with the launcher that runs.
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    from torch.distributed.run import get_args_parser

    torchrun = local_command(
        cpu_config().launch, "lejepa.train.rank", ["--config", "c.yaml"], log_dir=tmp_path
    )
    parsed = get_args_parser().parse_args(torchrun[3:])
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (
        True,
        "lejepa.train.rank",
        ["--config", "c.yaml"],
    )
    hostfile = two_host_file(tmp_path)
    deepspeed_commands = [
        local_command(
            cpu_config(launcher="deepspeed").launch, "lejepa.train.rank", ["--set", "a=1"], log_dir=tmp_path
        ),
        hostfile_command(
            cpu_config(
                mode="hostfile", hostfile=str(hostfile), nnodes=2, nproc_per_node=1, ssh_port=2222
            ).launch,
            "probe.py",
            [],
        ),
        hostfile_command(
            cpu_config(
                mode="hostfile",
                hostfile=str(hostfile),
                no_ssh=True,
                node_rank=1,
                master_addr="h",
                master_port=1,
            ).launch,
            "lejepa.train.rank",
            [],
        ),
    ]
    for argv in deepspeed_commands:
        parsed = deepspeed_args(argv[3:])
        assert parsed.user_script in ("lejepa.train.rank", "probe.py") and parsed.no_local_rank


def test_hostfile_commands(tmp_path: Path) -> None:
    hostfile = two_host_file(tmp_path)
    lc = cpu_config(mode="hostfile", hostfile=str(hostfile), ssh_port=2222, master_port=29700).launch
    assert hostfile_command(lc, "lejepa.train.rank", ["--config", "c.yaml"]) == [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--launcher=pdsh",
        "--no_ssh_check",
        "--ssh_port=2222",
        "--master_addr=127.0.0.1",
        "--master_port=29700",
        "--no_local_rank",
        "--module",
        "lejepa.train.rank",
        "--config",
        "c.yaml",
    ]
    lc = cpu_config(
        mode="hostfile",
        hostfile=str(hostfile),
        no_ssh=True,
        node_rank=1,
        master_addr="10.0.0.1",
        master_port=29700,
        nproc_per_node=4,
    ).launch
    assert hostfile_command(lc, "lejepa.train.rank", []) == [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--hostfile={hostfile}",
        "--no_ssh",
        "--node_rank=1",
        "--master_addr=10.0.0.1",
        "--master_port=29700",
        "--num_gpus=4",
        "--no_local_rank",
        "--module",
        "lejepa.train.rank",
    ]


def test_hostfile_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="needs launch.hostfile"):
        hostfile_command(cpu_config(mode="hostfile").launch, "lejepa.train.rank", [])
    with pytest.raises(LaunchError, match="does not exist"):
        hostfile_command(cpu_config(mode="hostfile", hostfile=str(tmp_path / "nope")).launch, "x", [])
    lc = cpu_config(mode="hostfile", hostfile=str(two_host_file(tmp_path)), no_ssh=True, node_rank=0).launch
    with pytest.raises(LaunchError, match="launch.master_addr, launch.master_port"):
        hostfile_command(lc, "lejepa.train.rank", [])
    lc = cpu_config(
        mode="hostfile", hostfile=lc.hostfile, no_ssh=True, node_rank=2, master_addr="a", master_port=1
    ).launch
    with pytest.raises(LaunchError, match="node_rank=2 but .* names 2 hosts"):
        hostfile_command(lc, "lejepa.train.rank", [])


def test_config_rejects_unknown_and_invalid_launch_fields() -> None:
    with pytest.raises(ConfigError, match="launch.nproc: Extra inputs"):
        load_config(overrides=["launch.nproc=2"])
    with pytest.raises(ConfigError, match="launch.mode"):
        load_config(overrides=["launch.mode=mesos"])
    cfg = load_config(overrides=["launch.mode=hostfile", "launch.env=[HF_TOKEN, WANDB_*]"])
    assert cfg.launch.env == ["HF_TOKEN", "WANDB_*"]


@pytest.mark.parametrize(
    "override, field",
    [
        ('launch.partition="gpu\\ntouch MARK"', "launch.partition"),
        ('launch.job_name="x\\ntouch MARK"', "launch.job_name"),
        ('launch.extra_sbatch=["--exclusive", "--qos=high\\ntouch MARK"]', "launch.extra_sbatch"),
        ('launch.extra_sbatch=["--qos=high --export=ALL"]', "launch.extra_sbatch"),
        ('launch.extra_sbatch=["--export=ALL,LD_PRELOAD=/tmp/x.so"]', "launch.extra_sbatch"),
        ('launch.extra_sbatch=["--output=/home/me/.bashrc"]', "launch.extra_sbatch"),
        ("launch.account=proj;id", "launch.account"),
        ('launch.time="04:00:00\\ntouch MARK"', "launch.time"),
        ("launch.time=90", "launch.time"),  # an unquoted YAML number (30:00 would arrive as 1800)
        ('launch.master_addr="$(touch MARK)"', "launch.master_addr"),
        ('launch.slurm_dir="slurm\\ntouch MARK"', "launch.slurm_dir"),
        ('launch.hostfile="hosts; touch MARK"', "launch.hostfile"),
        ("launch.ssh_options=[-o, ProxyCommand=touch MARK]", "launch.ssh_options"),
        ("launch.ssh_options=[-oproxycommand=nc %h %p]", "launch.ssh_options"),
        ('launch.ssh_options=["-o LocalCommand=id", "-o PermitLocalCommand=yes"]', "launch.ssh_options"),
        ("launch.ssh_options=[-J, bastion]", "launch.ssh_options"),
        ("launch.ssh_options=[-o, ProxyJump=bastion]", "launch.ssh_options"),
        ("launch.ssh_options=[-o]", "launch.ssh_options"),
    ],
)
def test_config_refuses_values_that_would_run_commands(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^invalid config: {field}: .* is not ") as refusal:
        load_config(overrides=["launch.mode=slurm", override])
    assert "\n" not in str(refusal.value)


def test_config_accepts_legitimate_launch_values(tmp_path: Path) -> None:
    lc = load_config(
        overrides=[
            "launch.partition=gpu-a100",
            "launch.account=proj_42.a",
            "launch.job_name=vit-s4",
            "launch.time=1-02:00:00",
            "launch.master_addr=node-01.cluster",
            f"launch.slurm_dir={tmp_path}/slurm",
            'launch.extra_sbatch=[--exclusive, --qos=high, "--constraint=a100|h100", "--nodelist=g[01-04]"]',
            'launch.ssh_options=["-o StrictHostKeyChecking=no", -o, UserKnownHostsFile=/dev/null, "-p 2222", '
            "-F, /etc/lejepa/ssh_config, -i, KEY, -oConnectTimeout=10, -q]",
        ]
    ).launch
    # Each ssh argument becomes one item, so "-o StrictHostKeyChecking=no" reaches ssh as its two arguments.
    assert lc.ssh_options == [
        *("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-p", "2222"),
        *("-F", "/etc/lejepa/ssh_config", "-i", "KEY", "-oConnectTimeout=10", "-q"),
    ]
    assert lc.extra_sbatch[-1] == "--nodelist=g[01-04]" and lc.time == "1-02:00:00"
    for limit in ("90", "90:30", "04:00:00", "2-00", "2-00:00:00", "UNLIMITED"):
        assert LaunchConfig(time=limit).time == limit
    assert load_config(overrides=['launch.time="90"']).launch.time == "90"
    for addr in ("10.0.0.1", "fe80::1", "localhost", "n_01"):
        assert LaunchConfig(master_addr=addr).master_addr == addr


def test_deepspeed_env_file_forwards_defaults_and_extras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n\n# comment\n")
    environ = {
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "DS_ACCELERATOR": "cpu",
        "WANDB_MODE": "offline",
        "HF_TOKEN": "hf_x",
        "HOME": "/root",
        "AWS_REGION": "us-east-1",
    }
    assert list(forwarded_env(environ, ["WANDB_*"])) == [
        "AWS_REGION",
        "AWS_SECRET_ACCESS_KEY",
        "DS_ACCELERATOR",
        "WANDB_MODE",
    ]
    env_file = tmp_path / "out" / ".deepspeed_env"
    env_file.parent.mkdir()
    # DeepSpeed writes these lines into the ssh command line: the secret ones are returned instead.
    assert _write_deepspeed_env(env_file, environ, ["WANDB_*"]) == {"AWS_SECRET_ACCESS_KEY": SECRET}
    assert env_file.read_text().splitlines() == [
        "NCCL_DEBUG=INFO",
        "AWS_REGION=us-east-1",
        "DS_ACCELERATOR=cpu",
        "WANDB_MODE=offline",
    ]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    with pytest.raises(LaunchError, match=r"cannot forward \$AWS_REGION") as failure:
        _write_deepspeed_env(env_file, {"AWS_REGION": "a$b-region", "AWS_SESSION_TOKEN": "a$b`"}, [])
    assert "a$b" not in str(failure.value)


def test_rank_error_names_the_failing_rank() -> None:
    def traceback(prefix: str, error: str) -> list[str]:
        return [
            f"{prefix}Traceback (most recent call last):",
            f'{prefix}  File "t.py", line 1, in <module>',
            f"{prefix}    main()",
            f"{prefix}{error}",
        ]

    pdsh = traceback("127.0.0.2: [rank1]: ", "ValueError: bad shard")
    assert rank_error(pdsh, 1) == "rank 1 on 127.0.0.2: ValueError: bad shard (exit status 1)"
    srun = ["0: starting"] + traceback("1: ", "OSError: no space")
    assert rank_error(srun, 1) == "rank 1: OSError: no space (exit status 1)"
    # The rank that noticed its peer died is not the cause; a chained exception reports its last link.
    chained = (
        traceback("[rank0]: ", "RuntimeError: Connection closed by peer [127.0.0.1]:1")
        + traceback("[rank1]: ", "KeyError: 'x'")
        + ["[rank1]: ", "[rank1]: During handling of the above exception, another exception occurred:"]
        + traceback("[rank1]: ", "RuntimeError: no key x")
    )
    assert rank_error(chained, 1) == "rank 1: RuntimeError: no key x (exit status 1)"
    assert rank_error(["just a line", ""], 7) == "a rank exited with status 7; last output: just a line"


def test_rank_error_trusts_srun_on_a_task_killed_by_a_signal() -> None:
    # srun names the first task to fail, here by the signal that killed it; its peer's collective error
    # and exit code arrive later and are symptoms.
    lines = [
        "1: error: train-000004.tar does not match its sha256 in the manifest",
        "srun: error: node2: task 1: Aborted",
        "1: terminate called without an active exception",
        "0: [rank0]: Traceback (most recent call last):",
        '0: [rank0]:   File "t.py", line 1, in <module>',
        "0: [rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:24987",
        "srun: error: node1: task 0: Exited with exit code 1",
    ]
    assert rank_error(lines, 1) == (
        "rank 1 on node2: train-000004.tar does not match its sha256 in the manifest (exit status 134)"
    )


def test_rank_error_quotes_a_rank_that_died_before_the_program_started() -> None:
    # torch 2.11's torchrun without a prefix template: [default<local rank>]:, and python's own words.
    lines = [
        "[default0]:unknown option --log_line_prefix_template=[rank${rank}]: ",
        "[default0]:usage: /usr/bin/python3 [option] ... [-c cmd | -m mod | file | -] [arg] ...",
        "[default0]:Try `python -h' for more information.",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
        "Root Cause (first observed failure):",
        "[0]:",
        "  rank      : 0 (local_rank: 0)",
        "  exitcode  : 2 (pid: 4242)",
    ]
    assert rank_error(lines, 1) == (
        "rank 0: unknown option --log_line_prefix_template=[rank${rank}]: / usage: /usr/bin/python3 [option] "
        "... [-c cmd | -m mod | file | -] [arg] ... / Try `python -h' for more information. (exit status 2)"
    )


# --- real launches on this machine ----------------------------------------------------------------------


def test_local_torchrun_runs_every_rank_and_forwards_env(
    deadline: None, secret_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = launch(cpu_config(), ["--show-env", "AWS_SECRET_ACCESS_KEY"], program=PROBE)
    out, err = capsys.readouterr()
    assert rc == 0, err + out[-3000:]
    assert probe_lines(out) == [
        f"[rank{r}]: probe rank={r} world=2 sum=3 accelerator=cpu AWS_SECRET_ACCESS_KEY={SECRET_DIGEST}"
        for r in (0, 1)
    ]
    assert SECRET not in out + err


def test_local_rank_that_raises_fails_the_launch_with_its_error(deadline: None) -> None:
    with pytest.raises(LaunchFailed) as failed:
        launch(cpu_config(), ["--fail-rank", "1"], program=PROBE)
    status = failed.value.status
    assert status != 0
    assert str(failed.value) == f"rank 1: RuntimeError: probe failure on rank 1 (exit status {status})"


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_local_rank_that_exits_nonzero_fails_the_launch_with_its_last_words(
    deadline: None, capsys: pytest.CaptureFixture[str], launcher: str
) -> None:
    with pytest.raises(LaunchFailed) as failed:
        launch(cpu_config(launcher=launcher), ["--exit-rank", "0", "--exit-code", "3"], program=PROBE)
    assert failed.value.status != 0
    message = str(failed.value)
    assert re.fullmatch(
        r"(rank 0|a rank): probe rank 0 giving up with status 3 \(exit status \d+\)", message
    ), message
    # The rank's own words are shown; the launcher's traceback that only says a rank failed is not.
    out = capsys.readouterr().out
    assert "error: probe rank 0 giving up with status 3" in out
    assert not any(noise in out for noise in ("ChildFailedError", "CalledProcessError", "Root Cause")), out


def test_local_rank_that_dies_before_the_program_starts_is_quoted(
    tmp_path: Path, deadline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.py"
    with pytest.raises(LaunchFailed) as failed:
        launch(cpu_config(), [], program=str(missing))
    assert re.fullmatch(
        rf"rank [01]: \S*python\S*: can't open file '{re.escape(str(missing))}': "
        rf"\[Errno 2\] No such file or directory \(exit status 2\)",
        str(failed.value),
    ), str(failed.value)


def test_two_node_agents_with_no_ssh_finish_a_run_together(
    tmp_path: Path, deadline: None, secret_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # One DeepSpeed launcher per "node", as a scheduler would start them: same hostfile, address and port.
    node = {
        "mode": "hostfile",
        "hostfile": str(two_host_file(tmp_path)),
        "no_ssh": True,
        "master_addr": "127.0.0.1",
        "master_port": free_port(),
    }
    configs = [cpu_config(**node, node_rank=rank) for rank in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        codes = list(
            pool.map(lambda cfg: launch(cfg, ["--show-env", "AWS_SECRET_ACCESS_KEY"], program=PROBE), configs)
        )
    out, err = capsys.readouterr()
    assert codes == [0, 0], err + out[-3000:]
    assert probe_lines(out) == [
        f"probe rank={r} world=2 sum=3 accelerator=cpu AWS_SECRET_ACCESS_KEY={SECRET_DIGEST}" for r in (0, 1)
    ]


# --- the real hostfile launcher: pdsh over ssh to two loopback "hosts" ----------------------------------


@pytest.mark.slow
def test_hostfile_pdsh_launch_over_ssh_trains_on_both_hosts(
    tmp_path: Path,
    loopback_sshd: tuple[int, Path],
    deadline: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # LeJEPA itself, one rank per "host", each started by pdsh over ssh from a shared working directory.
    port, ssh_config = loopback_sshd
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    root = tmp_path / "store"
    tiny = [
        f"storage.root={root}",
        "data.source=digits",
        "model.backbone=resnet10t",
        "model.proj_hidden_dim=64",
        "model.proj_dim=16",
        "views.local_views=2",
        "loss.num_slices=32",
        "pretrain.batch_size=32",
        "pretrain.max_steps=6",
        "pretrain.checkpoint_every=3",
        "pretrain.log_every=3",
        "pretrain.num_workers=0",
    ]
    manifest = write_shards(load_config(None, tiny), progress=False).manifest
    over_ssh = [
        "launch.mode=hostfile",
        "launch.accelerator=cpu",
        "launch.nproc_per_node=1",
        f"launch.hostfile={two_host_file(tmp_path)}",
        f"launch.ssh_port={port}",
        f'launch.ssh_options=["-F", "{ssh_config}"]',
        "launch.master_addr=127.0.0.1",
    ]
    cfg = load_config(None, [*tiny, *over_ssh])
    summary = run_pretrain(cfg)
    out = capsys.readouterr().out
    assert summary["steps"] == 6 and summary["manifest"] == manifest
    run = Path(summary["run_dir"])
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").open()] == list(range(1, 7))
    record = json.loads((run / "config.json").read_text())
    assert record["world_size"] == 2 and record["data"]["manifest"] == manifest  # both ranks read it
    # pdsh prefixes each line with its host: rank 0 logged from the first host, and the second host ran.
    assert re.search(r"^127\.0\.0\.1: .*\[pretrain\] step 6/6", out, re.MULTILINE), out[-3000:]
    assert re.search(r"^127\.0\.0\.2: ", out, re.MULTILINE), out[-3000:]


def test_hostfile_launch_with_unreachable_host_fails_in_one_line(tmp_path: Path) -> None:
    if not shutil.which("pdsh") or not shutil.which("ssh"):
        pytest.skip("needs pdsh and ssh: run infra/install-test-deps.sh as root")
    closed_port = free_port()
    cfg = cpu_config(
        mode="hostfile", hostfile=str(two_host_file(tmp_path)), ssh_port=closed_port, master_addr="127.0.0.1"
    )
    with pytest.raises(LaunchError, match=r"cannot ssh to 127\.0\.0\.1 .*refused.*launch.ssh_port"):
        launch(cfg, [], program=PROBE)


# --- Slurm ----------------------------------------------------------------------------------------------


def test_slurm_script_for_a_gpu_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lc = cpu_config(
        mode="slurm",
        accelerator="auto",
        nnodes=4,
        gpus_per_node=8,
        cpus_per_task=12,
        partition="gpu",
        account="proj42",
        time="2-00:00:00",
        extra_sbatch=["--exclusive"],
    ).launch
    script = slurm_script(
        lc,
        "lejepa.train.rank",
        ["--config", "run config.yaml", "--set", "loss.lamb=0.1"],
        log_path=tmp_path / "job.out",
    )
    python = sys.executable
    assert script.splitlines() == [
        "#!/bin/bash",
        "#SBATCH --job-name=lejepa-pretrain",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        f"#SBATCH --output={tmp_path}/job.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --exclusive",
        "# Generated by lejepa.train.launch. sbatch and srun pass the submitting shell's environment",
        "# (credentials included) on to every rank: nothing secret is written here.",
        "set -euo pipefail",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export OMP_NUM_THREADS=12",
        "srun --label --kill-on-bad-exit=1 --cpus-per-task=12 bash -c 'export RANK=$SLURM_PROCID "
        'LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"\' rank '
        f"{python} -u -m lejepa.train.rank --config 'run config.yaml' --set loss.lamb=0.1",
    ]


def test_slurm_cpu_job_sets_the_cpu_accelerator(tmp_path: Path) -> None:
    lc = cpu_config(mode="slurm", accelerator="auto", master_port=29900).launch
    script = slurm_script(lc, "lejepa.train.rank", [], log_path=tmp_path / "job.out")
    assert "#SBATCH --nodes=1" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "gpus-per-node" not in script and "partition" not in script
    assert "export MASTER_PORT=29900\nexport DS_ACCELERATOR=cpu\n" in script


def test_slurm_dry_run_prints_the_script_and_submits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/submitted\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    rc = cli(["--set", "launch.mode=slurm", "--set", "launch.partition=debug", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("#!/bin/bash\n#SBATCH --job-name=lejepa-pretrain\n")
    assert "#SBATCH --partition=debug" in out
    # The ranks read the config from a private launch folder, so no --set (nor a secret) is on their line.
    assert re.search(rf"-m lejepa.train.rank --config {tmp_path}/\.lejepa-launch-\w+/config\.yaml\n$", out)
    assert not (tmp_path / "submitted").exists() and not (tmp_path / "slurm").exists()


@pytest.mark.parametrize("dry_run", [["--dry-run"], []])
def test_slurm_injection_through_the_cli_is_refused_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], dry_run: list[str]
) -> None:
    # The reproduction: a newline in a directive value became a command of the batch script, which
    # sbatch then ran. Now the config is refused, naming the field, and no script exists.
    monkeypatch.chdir(tmp_path)
    injected = f'launch.partition="gpu\\ntouch {tmp_path}/MARK"'
    assert cli([*dry_run, "--set", "launch.mode=slurm", "--set", injected]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("error: invalid config: launch.partition: 'gpu\\ntouch ") and "not a Slurm" in line
    assert not (tmp_path / "MARK").exists() and not (tmp_path / "slurm").exists()


def test_slurm_script_quotes_and_checks_what_it_interpolates(tmp_path: Path) -> None:
    # Defence in depth: a LaunchConfig built without validation still cannot add a line to the script.
    def script(**fields: object) -> str:
        lc = LaunchConfig.model_construct(mode="slurm", accelerator="cpu", **fields)
        return slurm_script(lc, "lejepa.train.rank", [], log_path=tmp_path / "job.out")

    assert "\nexport MASTER_ADDR='a;touch MARK'\n" in script(master_addr="a;touch MARK")
    for fields in ({"partition": "gpu\ntouch MARK"}, {"extra_sbatch": ["--qos=a b"]}, {"job_name": 'x"y'}):
        with pytest.raises(LaunchError, match="cannot write the sbatch directive"):
            script(**fields)
    legit = script(partition="gpu-a100", time="1-02:00:00", master_addr="10.0.0.1", extra_sbatch=["--mem=8G"])
    assert "#SBATCH --partition=gpu-a100\n#SBATCH --time=1-02:00:00\n#SBATCH --mem=8G\n" in legit
    assert "\nexport MASTER_ADDR=10.0.0.1\n" in legit


def test_hostfile_master_address_must_be_a_plain_host(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("h;touch slots=1\n")
    with pytest.raises(LaunchError, match=r"master address 'h;touch' is not a plain host name"):
        hostfile_command(cpu_config(mode="hostfile", hostfile=str(hostfile)).launch, "lejepa.train.rank", [])


def test_slurm_submit_without_sbatch_fails_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_shards(load_config(None, ["data.source=digits"]), progress=False)  # the dataset is found first
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli(["--set", "launch.mode=slurm", "--set", "data.source=digits"]) == 2
    err = capsys.readouterr().err
    assert err == "error: launch.mode=slurm needs sbatch on PATH: run on a Slurm login node (or --dry-run)\n"
    assert not (tmp_path / "slurm").exists()


# --- stopping -------------------------------------------------------------------------------------------


def _processes_naming(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_interrupted_launch_stops_every_rank(
    tmp_path: Path, deadline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # DeepSpeed's local launcher is the hard case: its runner leaves its ranks behind when killed alone.
    hang_file = tmp_path / "rank-0-hangs"
    main_thread = threading.get_ident()

    def interrupt_once_hanging() -> None:
        while not hang_file.exists():
            time.sleep(0.05)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=interrupt_once_hanging, daemon=True).start()
    # A shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: put it in place so the interrupt is delivered however the suite started.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            launch(
                cpu_config(launcher="deepspeed"),
                ["--hang-rank", "0", "--hang-file", str(hang_file)],
                program=PROBE,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    end = time.monotonic() + 10
    while _processes_naming(str(hang_file)) and time.monotonic() < end:
        time.sleep(0.05)
    assert _processes_naming(str(hang_file)) == []
