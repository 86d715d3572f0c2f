"""Start the pretrain program on every rank: on this machine, on the hosts of a hostfile, as a Slurm job or
as a Kubernetes job (lejepa.train.kubernetes).

`launch(cfg, program_args)` builds one launcher command from `cfg.launch`, runs it and streams the output of
every rank to stdout. When a rank dies the launch raises LaunchFailed, whose one line names the rank (and
its node, where known) and its error; the launcher's own traceback is not shown. SIGTERM or SIGINT stops
what the launch started, a scheduler's job included, before it returns. Each mode runs what a person would
type:

- local, torchrun:   python -m torch.distributed.run --nproc_per_node N ... -m lejepa.train.rank ARGS
- local, deepspeed:  python -m deepspeed.launcher.runner --num_gpus N ... --module lejepa.train.rank ARGS
- hostfile:          python -m deepspeed.launcher.runner --hostfile H --launcher pdsh ... --module
                     lejepa.train.launch ENV_FILE lejepa.train.rank ARGS (one launch for all nodes over ssh),
                     or with --no_ssh --node_rank R and --module lejepa.train.rank ARGS on every node (one
                     agent per node)
- slurm:             sbatch --parsable SCRIPT, whose `srun python -u -m lejepa.train.rank ARGS` runs once per
  rank;
                     the job is followed with `scontrol show job` through requeues (SlurmJob) and its id is
                     handed to the run's lease, so that no second launch trains beside it

ARGS (`--config FILE --set key=value ...`) reach every rank unchanged, so FILE, this Python and this working
directory must exist at the same paths on every node (a shared file system). ARGS are on command lines that
every user of a node can read (`ps`), so secrets never are: they stay environment variables. Local ranks,
Slurm jobs and no_ssh agents inherit them. Ranks started over ssh get the forwarded variables (AWS_*,
DS_ACCELERATOR, SECRETS_ENV and `launch.env`) in two parts, because DeepSpeed writes every variable of
.deepspeed_env into the ssh command line: the plain ones through .deepspeed_env, the secret ones (SECRET_NAME)
through ENV_FILE, a file only this user can read in the shared working directory. Each rank starts as `python
-m lejepa.train.launch ENV_FILE PROGRAM ARGS`, adds ENV_FILE's variables to its environment and becomes
PROGRAM (`exec_with_env_file`); the file is removed when the launch ends. Secret values are masked in
everything we print.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from lejepa.config import SECRET_NAME, SECRETS_ENV, LaunchConfig, PipelineConfig
from lejepa.with_parent import PARENT_ENV

PROGRAM = "lejepa.train.rank"
RANK_ENTRY = "lejepa.train.launch"
"""What ranks started over ssh run: `python -m lejepa.train.launch ENV_FILE PROGRAM ARGS`
(exec_with_env_file)."""
FORWARDED_ENV = ("AWS_*", "DS_ACCELERATOR", SECRETS_ENV)
# DeepSpeed's runner also puts these variables of its own environment on the ssh command line.
DEEPSPEED_EXPORTS = ("MLFLOW*", "PYTHON*", "MV2*", "UCX*", "NCCL*")
# DeepSpeed puts .deepspeed_env values in double quotes in a remote shell command: these would be expanded.
_UNSAFE_ENV_VALUE = re.compile(r'["$`\\\n]')
_TRACEBACK = "Traceback (most recent call last):"
_FIRST_SLURM_NODE = '"$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'
# sbatch splits a directive at blanks and reads double quotes, backslashes and '#' its own way (single quotes
# are literal): shell quoting does not apply, so a directive's option must be one plain word.
_SBATCH_WORD = re.compile(r"[^\s\"'\\#]+")
# Slurm job states that end a job (a requeued job passes through none of them).
_SLURM_DONE = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)
# What slurmstepd writes into the log when it stops a job: "DUE TO JOB REQUEUE", "DUE TO PREEMPTION", ...
_JOB_CANCELLED = re.compile(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT \S+(?: DUE TO (.+?))? \*\*\*")
_TIME_LIMIT_NEAR = "nears its time limit: requeueing it"  # the sbatch script's USR1 trap
_RUN_STARTS = re.compile(r"\[pretrain\] run \S+: (?:starting|resuming at step (\d+))")  # lejepa.train.rank
_RANKS_STOPPED = re.compile(r"\[pretrain\] stopped at step (\d+)")  # lejepa.train.rank, on SIGTERM
# srun's word on a task that failed: "srun: error: node2: task 1: Exited with exit code 2", or the name
# of the signal that killed it ("... task 1: Aborted").
_SRUN_TASK_FAILED = re.compile(r"srun: error: (\S+): tasks? (\d+)\S*: (?:Exited with exit code (\d+)|(.+))")
_SIGNAL_STATUS = {signal.strsignal(s): 128 + s for s in signal.valid_signals() if signal.strsignal(s)}
_LAUNCHER_EXCEPTIONS = ("ChildFailedError", "CalledProcessError")
# torchrun's line prefix, read from the environment by every torch since 2.2 (its --log_line_prefix_template
# option exists in some versions and not in others). Without either, torchrun writes [default<local rank>]:.
RANK_PREFIX_ENV = {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]: "}
# What a surviving rank's collective raises when a peer died first: a symptom, not the cause.
_PEER_DIED = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing")


class LaunchError(RuntimeError):
    """A launch a user asked for cannot start (missing hostfile, sbatch or pdsh; unreachable host)."""


class LaunchFailed(RuntimeError):
    """The launch ran and failed: a rank died, or the job ended badly. The message is one line naming the
    rank (and its node, where known) and its error; `status` is the launcher's or the job's exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


JobRef = dict[str, str]
"""A job a scheduler runs for a launch: {"scheduler": "slurm", "id": "123"}, or {"scheduler": "kubernetes",
"namespace": ..., "name": ...}. The run's lease records it (see `job_alive`)."""


def launch(
    cfg: PipelineConfig,
    program_args: list[str],
    *,
    dry_run: bool = False,
    program: str = PROGRAM,
    env: Mapping[str, str] | None = None,
    on_job: Callable[[JobRef], None] | None = None,
) -> int:
    """Run `program` (a module name, or a path ending in .py) on every rank; return 0 when every rank
    succeeded, else raise LaunchFailed.

    `env` adds variables to the ranks' environment (e.g. SECRETS_ENV, so no file or command line holds the
    storage secrets); secret values are masked in the output. `program_args` must hold no secret: it is on
    every rank's command line. With dry_run the launcher command (slurm: the sbatch script) is printed and
    nothing runs. A scheduler's job is handed to `on_job` once submitted (the run's lease records it).

    SIGTERM or SIGINT stops the launch and everything it started (the scheduler's job included) before
    this returns; SIGTERM then raises SystemExit(143) where nothing else (e.g. Prefect) handles it.
    """
    lc = cfg.launch
    env = {**os.environ, **(env or {})}
    secrets = _secret_values(env)
    with _terminate_raises():
        if lc.mode == "slurm":
            return _launch_slurm(lc, program, program_args, dry_run=dry_run, env=env, on_job=on_job)
        if lc.mode == "kubernetes":
            from lejepa.train.kubernetes import launch_kubernetes  # the client is needed in this mode only

            return launch_kubernetes(lc, program, program_args, dry_run=dry_run, env=env, on_job=on_job)
        return _launch_processes(lc, program, program_args, dry_run=dry_run, env=env, secrets=secrets)


def _launch_processes(
    lc: LaunchConfig,
    program: str,
    program_args: list[str],
    *,
    dry_run: bool,
    env: dict[str, str],
    secrets: list[str],
) -> int:
    """The local and hostfile modes: a launcher process on this machine starts (or reaches) every rank."""
    if rank_accelerator(lc) == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory(prefix="lejepa-launch-") as tmp, contextlib.ExitStack() as cleanup:
        if lc.mode == "local":
            argv = local_command(lc, program, program_args, log_dir=Path(tmp) / "logs")
            env.update(RANK_PREFIX_ENV)
            if rank_accelerator(lc) == "cpu":
                # torchrun would give every rank one thread; share the cores out instead.
                env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _local_nproc(lc))))
        elif lc.no_ssh:
            argv = hostfile_command(lc, program, program_args)
        else:
            rank_env = Path.cwd() / f".lejepa-rank-env-{uuid.uuid4().hex}.json"
            argv = hostfile_command(lc, RANK_ENTRY, [str(rank_env), program, *program_args])
            if not dry_run:
                _check_hostfile_backend(lc)
                env_file = Path(tmp) / ".deepspeed_env"
                secret_env = _write_deepspeed_env(env_file, env, lc.env)
                _write_private(rank_env, json.dumps(secret_env))
                cleanup.callback(rank_env.unlink, missing_ok=True)
                for name in secret_env:  # else DeepSpeed would export those of DEEPSPEED_EXPORTS itself
                    env.pop(name, None)
                # An absolute name makes DeepSpeed read this file instead of ~/.deepspeed_env and
                # ./.deepspeed_env, whose lines it already holds.
                env["DS_ENV_FILE"] = str(env_file)
                if lc.ssh_options:
                    ssh_args = [env.get("PDSH_SSH_ARGS_APPEND", ""), shlex.join(lc.ssh_options)]
                    env["PDSH_SSH_ARGS_APPEND"] = " ".join(ssh_args).strip()
        print(f"launch: {shlex.join(argv)}", flush=True)
        if dry_run:
            return 0
        rc, tail = _stream(argv, env, secrets)
    if rc != 0:
        raise LaunchFailed(rank_error(tail, rc), rc)
    return 0


def local_command(lc: LaunchConfig, program: str, program_args: list[str], *, log_dir: Path) -> list[str]:
    """The torchrun or DeepSpeed command that starts `nproc_per_node` ranks on this machine."""
    nproc = _local_nproc(lc)
    addr = lc.master_addr or "127.0.0.1"
    port = lc.master_port or free_port()
    if lc.launcher == "torchrun":
        argv = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--node_rank=0",
            f"--nproc_per_node={nproc}",
            f"--master_addr={addr}",
            f"--master_port={port}",
            # Tee both streams of every rank to the console, each line prefixed with its rank (the prefix
            # comes from RANK_PREFIX_ENV: torchrun's option for it exists in some versions only).
            "--tee=3",
            f"--log_dir={log_dir}",
        ]
        return argv + (["-m", program] if _is_module(program) else [program]) + program_args
    argv = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        f"--num_gpus={nproc}",
        f"--master_addr={addr}",
        f"--master_port={port}",
    ]
    return argv + _deepspeed_program(program, program_args)


def hostfile_command(lc: LaunchConfig, program: str, program_args: list[str]) -> list[str]:
    """DeepSpeed's multi-node launcher over the hostfile: all nodes over ssh, or this node with no_ssh."""
    hosts = _read_hostfile(lc.hostfile)
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={lc.hostfile}"]
    if lc.no_ssh:
        missing = [name for name in ("node_rank", "master_addr", "master_port") if getattr(lc, name) is None]
        if missing:
            raise LaunchError(
                f"launch.no_ssh needs {', '.join('launch.' + m for m in missing)}: every node's launcher "
                "must name its own node_rank and the same master_addr and master_port"
            )
        if lc.node_rank >= len(hosts):
            raise LaunchError(f"launch.node_rank={lc.node_rank} but {lc.hostfile} names {len(hosts)} hosts")
        argv += ["--no_ssh", f"--node_rank={lc.node_rank}"]
    else:
        argv += [f"--launcher={lc.multinode_launcher}", "--no_ssh_check"]  # we check ssh with ssh_options
        if lc.ssh_port is not None:
            argv.append(f"--ssh_port={lc.ssh_port}")
    master_addr = lc.master_addr or hosts[0]
    if shlex.quote(master_addr) != master_addr:  # DeepSpeed writes it into the nodes' shell command line
        raise LaunchError(
            f"master address {master_addr!r} is not a plain host name: set launch.master_addr, or correct "
            f"the first host of {lc.hostfile}"
        )
    argv += [f"--master_addr={master_addr}", f"--master_port={lc.master_port or free_port()}"]
    if lc.nnodes is not None:
        argv.append(f"--num_nodes={lc.nnodes}")
    if lc.nproc_per_node is not None:
        argv.append(f"--num_gpus={lc.nproc_per_node}")
    return argv + _deepspeed_program(program, program_args)


def slurm_script(lc: LaunchConfig, program: str, program_args: list[str], *, log_path: Path) -> str:
    """The sbatch script: one srun task per rank, each given RANK/LOCAL_RANK/WORLD_SIZE from Slurm's ids.

    The job may be requeued (preemption, `scontrol requeue`, or its own time limit with
    launch.requeue_on_timeout): its log is appended to, never started over, and its ranks resume from the
    run's last checkpoint, which they commit when Slurm's SIGTERM reaches them (lejepa.train.rank).
    """
    cpu = rank_accelerator(lc) == "cpu"
    directives = [
        f"--job-name={lc.job_name}",
        f"--nodes={lc.nnodes or 1}",
        f"--ntasks-per-node={lc.nproc_per_node or (1 if cpu else lc.gpus_per_node or 1)}",
        f"--output={log_path}",
        "--open-mode=append",
        "--requeue",
        f"--chdir={Path.cwd()}",
    ]
    if lc.requeue_on_timeout:
        # Slurm signals the batch shell (B:) this long before the time limit; the trap below requeues the
        # job, so its ranks get SIGTERM, commit, and the job comes back with a fresh time limit.
        directives.append(f"--signal=B:USR1@{lc.timeout_signal_s}")
    if lc.gpus_per_node:
        directives.append(f"--gpus-per-node={lc.gpus_per_node}")
    if lc.cpus_per_task:
        directives.append(f"--cpus-per-task={lc.cpus_per_task}")
    directives += [
        f"--{name}={value}"
        for name in ("partition", "account", "time")
        if (value := getattr(lc, name)) is not None
    ]
    directives += lc.extra_sbatch
    port = str(lc.master_port) if lc.master_port else "$((20000 + SLURM_JOB_ID % 20000))"
    srun = ["srun", "--label", "--kill-on-bad-exit=1"]
    if lc.cpus_per_task:
        srun.append(f"--cpus-per-task={lc.cpus_per_task}")  # srun no longer inherits it from sbatch
    command = [sys.executable, "-u"] + (["-m", program] if _is_module(program) else [program]) + program_args
    lines = [
        "#!/bin/bash",
        *(_sbatch_directive(d) for d in directives),
        "# Generated by lejepa.train.launch. sbatch and srun pass the submitting shell's environment",
        "# (credentials included) on to every rank: nothing secret is written here.",
        "set -euo pipefail",
        "export MASTER_ADDR=" + (shlex.quote(lc.master_addr) if lc.master_addr else _FIRST_SLURM_NODE),
        f"export MASTER_PORT={port}",
    ]
    if cpu:
        lines.append("export DS_ACCELERATOR=cpu")
    if lc.cpus_per_task:
        lines.append(f"export OMP_NUM_THREADS={lc.cpus_per_task}")
    rank_env = 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS; exec "$@"'
    step = f"{shlex.join(srun)} bash -c {shlex.quote(rank_env)} rank {shlex.join(command)}"
    if not lc.requeue_on_timeout:
        return "\n".join([*lines, step]) + "\n"
    # bash runs a trap only between commands: srun runs in the background and the script waits for it.
    requeue = (
        'echo "lejepa: job $SLURM_JOB_ID nears its time limit: requeueing it"; scontrol requeue $SLURM_JOB_ID'
    )
    lines += [
        f"trap {shlex.quote(requeue)} USR1",
        f"{step} &",
        "step=$!",
        # wait returns early when the trap runs; the step's own status once it has ended.
        'while true; do wait "$step" && break; status=$?; kill -0 "$step" 2>/dev/null || exit $status; done',
    ]
    return "\n".join(lines) + "\n"


def rank_error(lines: Iterable[str], returncode: int) -> str:
    """One line naming the rank that failed first (and its node, where the launcher says) and its error,
    from the launch's output."""
    lines = list(lines)
    tracebacks = list(_tracebacks(lines))
    # torchrun names the first rank that died, and srun the node and task: trust them over the order in
    # which output arrived.
    root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", "\n".join(lines), re.DOTALL)
    srun = next((m for line in lines if (m := _SRUN_TASK_FAILED.search(line)) and m.group(3) != "0"), None)
    if root or srun:
        rank, returncode = (
            (root.group(1), int(root.group(2))) if root else (srun.group(2), _srun_status(srun))
        )
        who = f"rank {rank} on {srun.group(1)}" if srun else f"rank {rank}"
        for prefix, error in tracebacks:
            if _rank_of(prefix) == rank:
                return f"{who if srun else _who(prefix)}: {error} (exit status {returncode})"
        said = [text for line in lines if (text := _said_by(rank, line))]
        # torchrun tails a rank's stdout and stderr separately, so an old stdout line can arrive after the
        # rank's dying words; a stage's `error: ...` line (lejepa.cli) is the reliable one when present.
        # Without one (a rank that died before our program started, e.g. in the interpreter), its last few
        # lines: a usage message ends with a hint, the cause is above it.
        errors = [text for text in said if text.startswith("error: ")]
        last = errors[-1].removeprefix("error: ") if errors else " / ".join(said[-3:]) or "printed nothing"
        return f"{who}: {last} (exit status {returncode})"
    # Otherwise a stage's `error: ...` line (a user error: the rank printed the cause and its fix), then the
    # first traceback that is a cause, not a peer noticing that another rank died.
    said = next((line.strip() for line in lines if line.strip().startswith("error: ")), None)
    if said:
        return f"a rank: {said.removeprefix('error: ')} (exit status {returncode})"
    causes = [(p, e) for p, e in tracebacks if not any(s in e for s in _PEER_DIED)]
    if causes:
        prefix, error = causes[0]
        return f"{_who(prefix)}: {error} (exit status {returncode})"
    if tracebacks:
        prefix, error = tracebacks[0]
        return f"a rank died without a traceback (exit status {returncode}); then {_who(prefix)}: {error}"
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    return f"a rank exited with status {returncode}; last output: {last}"


def _srun_status(failed: re.Match[str]) -> int:
    """The exit status of the task in srun's line: its exit code, or 128 + the signal that killed it."""
    code, killed_by = failed.group(3), failed.group(4)
    return int(code) if code else _SIGNAL_STATUS.get(killed_by.strip(), 1)


def free_port() -> int:
    """A TCP port free on this machine right now (the rendezvous binds it moments later)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def forwarded_env(environ: Mapping[str, str], extra: list[str]) -> dict[str, str]:
    """The variables remote ranks receive: AWS_*, DS_ACCELERATOR, SECRETS_ENV and the names or NAME_* patterns
    in extra."""
    patterns = [*FORWARDED_ENV, *extra]
    return {k: v for k, v in sorted(environ.items()) if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


def _launch_slurm(
    lc: LaunchConfig,
    program: str,
    program_args: list[str],
    *,
    dry_run: bool,
    env: dict[str, str],
    on_job: Callable[[JobRef], None] | None,
) -> int:
    stem = f"{lc.job_name}-{datetime.now():%Y%m%d-%H%M%S}"
    slurm_dir = Path(lc.slurm_dir).absolute()
    log_path = slurm_dir / f"{stem}.out"
    script = slurm_script(lc, program, program_args, log_path=log_path)
    if dry_run:
        print(script, end="", flush=True)
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError("launch.mode=slurm needs sbatch on PATH: run on a Slurm login node (or --dry-run)")
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script_path = slurm_dir / f"{stem}.sbatch"
    script_path.write_text(script)
    argv = [sbatch, "--parsable", str(script_path)]
    print(f"launch: {shlex.join(argv)}  (log: {log_path})", flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise LaunchFailed(f"sbatch refused the job: {said}", done.returncode)
    job_id = done.stdout.strip().split(";")[0]
    print(f"launch: submitted Slurm job {job_id}", flush=True)
    if not lc.wait:
        return 0
    job = SlurmJob(job_id, log_path, _secret_values(env), env)
    try:
        if on_job is not None:
            on_job({"scheduler": "slurm", "id": job_id})
        job.follow()
    except BaseException:
        with _signals_ignored():  # a second SIGTERM must not cut the cancellation short
            job.cancel()
        raise
    return 0


class SlurmJob:
    """A submitted job, followed to its end: its log streamed line by line (once each: the job appends to
    it, across requeues too), its requeues reported as `job N requeued (reason): resuming at step S`, and
    its end turned into success or one LaunchFailed line. `cancel` scancels it and waits until squeue no
    longer lists it."""

    def __init__(self, job_id: str, log_path: Path, secrets: list[str], env: dict[str, str]) -> None:
        self.id, self.log_path, self.secrets, self.env = job_id, log_path, secrets, env
        self.tail: deque[str] = deque(maxlen=2000)
        self._offset, self._partial = 0, ""
        self._starts = 0  # times rank 0 announced the run: more than one means the job came back
        self._reason: str | None = None  # why the job last stopped, from its log
        self._stopped_at: str | None = None  # the step the ranks last committed on a SIGTERM

    def follow(self) -> None:
        """Stream the log until the job ends; raise LaunchFailed unless it completed."""
        info: dict[str, str] = {}
        while True:
            self._read_log()
            latest = slurm_job_info(self.id, self.env)
            if latest is None:  # purged from the controller's memory (MinJobAge) since the last look
                break
            info = latest
            if info.get("JobState") in _SLURM_DONE:
                break
            time.sleep(1.0)
        self._read_log(final=True)
        state = info.get("JobState", "UNKNOWN")
        code, sig = (int(x) for x in (info.get("ExitCode") or "1:0").split(":"))
        status = code or (128 + sig if sig else 0)
        if state == "COMPLETED" and status == 0:
            return
        resume = "run the stage again to resume from the run's last checkpoint"
        at = f" at step {self._stopped_at}" if self._stopped_at else ""
        if state == "TIMEOUT":
            raise LaunchFailed(
                f"Slurm job {self.id} reached its time limit{at}: {resume}, or set launch.time higher or "
                "launch.requeue_on_timeout=true",
                status or 1,
            )
        if state in ("CANCELLED", "PREEMPTED", "DEADLINE"):
            why = {"CANCELLED": "was cancelled (scancel)", "PREEMPTED": "was preempted"}
            raise LaunchFailed(
                f"Slurm job {self.id} {why.get(state, 'passed its deadline')}{at}: {resume}", status or 1
            )
        raise LaunchFailed(rank_error(self.tail, status or 1), status or 1)

    def cancel(self, timeout: float = 600.0) -> None:
        """scancel the job (its ranks commit a checkpoint on Slurm's SIGTERM) and wait until squeue no
        longer lists it, streaming what the ranks still say."""
        print(f"launch: cancelling Slurm job {self.id}", flush=True)
        subprocess.run(["scancel", self.id], capture_output=True, env=self.env)
        deadline = time.monotonic() + timeout
        while slurm_job_listed(self.id, self.env):
            self._read_log()
            if time.monotonic() > deadline:
                print(f"warning: Slurm job {self.id} is still listed {timeout:g} s after scancel", flush=True)
                return
            time.sleep(0.5)
        self._read_log(final=True)
        print(f"launch: Slurm job {self.id} cancelled", flush=True)

    def _read_log(self, final: bool = False) -> None:
        if not self.log_path.exists():
            return
        with self.log_path.open("r", errors="replace") as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        *complete, self._partial = (self._partial + chunk).split("\n")
        if final and self._partial:
            complete, self._partial = [*complete, self._partial], ""
        for line in complete:
            _emit(line, self.secrets, self.tail)
            self._note(line)

    def _note(self, line: str) -> None:
        """Follow the job's life in its own log: why it stopped, and where a requeued job resumes."""
        if _TIME_LIMIT_NEAR in line:
            self._reason = "time limit"
        elif (cancelled := _JOB_CANCELLED.search(line)) and self._reason != "time limit":
            self._reason = (cancelled.group(1) or "cancelled").lower()
        elif stopped := _RANKS_STOPPED.search(line):
            self._stopped_at = stopped.group(1)
        elif start := _RUN_STARTS.search(line):
            self._starts += 1
            if self._starts > 1:
                reason, step = self._reason or "by Slurm", start.group(1) or 0
                print(f"job {self.id} requeued ({reason}): resuming at step {step}", flush=True)
                self._reason = None


def slurm_job_info(job_id: str, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """`scontrol show job`'s fields for the job (JobState, ExitCode, Restarts, ...); None once Slurm has
    forgotten it. A controller that does not answer is retried: the job is still somewhere."""
    for attempt in range(30):
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env
        )
        if done.returncode == 0:
            return dict(word.split("=", 1) for word in done.stdout.split() if "=" in word)
        if "Invalid job id" in done.stderr:
            return None
        time.sleep(min(2.0**attempt, 10.0))
    raise LaunchFailed(f"scontrol show job {job_id} kept failing: {done.stderr.strip()}", 1)


def slurm_job_listed(job_id: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether squeue still lists the job as pending, running or completing; True when squeue cannot
    tell (no squeue here, or no controller): only squeue's word that the job is gone counts."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, env=env, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return True
    if done.returncode != 0:
        return "Invalid job id" not in done.stderr
    return any(state not in _SLURM_DONE for state in done.stdout.split())


def job_alive(job: JobRef) -> bool:
    """Whether a job a launch submitted may still be running (the lease of its run stays held)."""
    if job.get("scheduler") == "slurm":
        return slurm_job_listed(job["id"])
    if job.get("scheduler") == "kubernetes":
        from lejepa.train import kubernetes

        return kubernetes.job_alive(job)
    return True  # a scheduler this code cannot ask: it may be running


def describe_job(job: JobRef) -> str:
    """The job in words, with how to stop it."""
    if job.get("scheduler") == "slurm":
        return f"Slurm job {job['id']} (scancel {job['id']})"
    if job.get("scheduler") == "kubernetes":
        kind, where = job.get("kind", "Job"), f"-n {job['namespace']} {job['name']}"
        return f"Kubernetes {kind} {job['namespace']}/{job['name']} (kubectl delete {kind.lower()} {where})"
    return f"{job.get('scheduler', 'a scheduler')} job {job.get('id') or job.get('name')}"


def _sbatch_directive(option: str) -> str:
    """`#SBATCH OPTION`, refused unless OPTION stays one word on its line (the config's validators make its
    fields so; this also guards the working directory, and a LaunchConfig built without validation)."""
    if not _SBATCH_WORD.fullmatch(option):
        raise LaunchError(
            f"cannot write the sbatch directive {option!r}: it must be one word without quotes, backslashes "
            "or '#': check launch.slurm_dir and launch.extra_sbatch, and run from a directory without them"
        )
    return f"#SBATCH {option}"


def _stream(argv: list[str], env: dict[str, str], secrets: list[str]) -> tuple[int, deque[str]]:
    """Run the launcher in its own process group, echo its merged output line by line, keep the tail.

    A `python -m MODULE` launcher runs under `lejepa.with_parent`, so it dies with this process however
    this process ends, and stops its ranks.
    """
    tail: deque[str] = deque(maxlen=2000)
    if argv[0] == sys.executable and argv[1] == "-m":
        argv = [argv[0], "-m", "lejepa.with_parent", *argv[2:]]
        env = {**env, PARENT_ENV: str(os.getpid())}
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    held: list[str] = []  # from an unprefixed traceback on: maybe the launcher's own failure report
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _masked(raw.rstrip("\n"), secrets)
            tail.append(line)
            if held and _rank_of(line) is not None:  # the ranks go on: no final report after all
                print("\n".join(held), flush=True)
                held = []
            if held or line.startswith(_TRACEBACK):
                held.append(line)
            else:
                print(line, flush=True)
        if kept := _without_launcher_tracebacks(held):
            print("\n".join(kept), flush=True)
        return proc.wait(), tail
    except BaseException:
        _stop(proc)
        raise


def _without_launcher_tracebacks(lines: list[str]) -> list[str]:
    """`lines` less the launcher's own tracebacks (torchrun's ChildFailedError and the failure report after
    it, DeepSpeed's CalledProcessError): they only say that a rank failed, which the launch's error line
    says better."""
    kept: list[str] = []
    for start, line in enumerate(lines):
        if line.startswith(_TRACEBACK):
            error = _exception_line(lines[start + 1 :], "") or ""
            if error.split(":")[0].endswith(_LAUNCHER_EXCEPTIONS):
                return kept
        kept.append(line)
    return kept


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """In the block, SIGTERM raises SystemExit(143) where nothing else handles it (a launch from the command
    line), so a cancelled launch stops its ranks or its job on the way out. Prefect's own handler, where it
    is installed, raises already; off the main thread no handler can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def exit_on(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """SIGTERM and SIGINT ignored in the block (main thread only): for a clean-up that must finish."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launcher and all it started: SIGTERM to its process group (torchrun and DeepSpeed stop their
    ranks, and pdsh's remote ones, on it), then SIGKILL to whatever is left."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def _emit(line: str, secrets: list[str], tail: deque[str]) -> None:
    line = _masked(line, secrets)
    print(line, flush=True)
    tail.append(line)


def _masked(line: str, secrets: list[str]) -> str:
    for value in secrets:
        line = line.replace(value, "***")
    return line


def _secret_values(environ: Mapping[str, str]) -> list[str]:
    """What to mask in printed output: the values of secret-named variables and the secrets inside
    SECRETS_ENV, longest first. Short values would mask ordinary words; real keys and tokens are long."""
    handed = json.loads(environ.get(SECRETS_ENV) or "{}")
    values = {v for v in [*_secret_strings(environ), *_secret_strings(handed)] if len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def _secret_strings(tree: object, secret: bool = False) -> Iterator[str]:
    """The strings of a JSON-like tree that lie under a name matching SECRET_NAME (all of them if secret)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _secret_strings(value, secret or bool(SECRET_NAME.search(str(key))))
    elif isinstance(tree, str) and secret:
        yield tree


def _write_deepspeed_env(path: Path, environ: dict[str, str], extra: list[str]) -> dict[str, str]:
    """Write DeepSpeed's KEY=VALUE env file (mode 0600): the user's own .deepspeed_env lines, then ours.

    DeepSpeed writes each of its lines, and each variable of DEEPSPEED_EXPORTS, into the ssh command line,
    which any user of a node can read: those with a secret name (SECRET_NAME) are left out of the file and
    returned, for the ranks' private ENV_FILE.
    """
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    lines: dict[str, str] = {}
    for base in (Path.home(), Path.cwd()):
        user_file = base / name
        if user_file.is_file():
            for raw in user_file.read_text().splitlines():
                key, sep, value = raw.partition("=")
                if sep and key.strip() and not key.lstrip().startswith("#"):
                    lines[key.strip()] = value
    lines.update(forwarded := forwarded_env(environ, extra))
    exported = forwarded_env(environ, list(DEEPSPEED_EXPORTS))
    secret = {k: v for k, v in {**exported, **lines}.items() if SECRET_NAME.search(k)}
    for key, value in forwarded.items():
        if key not in secret and _UNSAFE_ENV_VALUE.search(value):
            raise LaunchError(
                f"cannot forward ${key} to remote ranks: DeepSpeed's ssh launch would expand its "
                'characters ("$`\\ or a newline); remove them or set it on the hosts themselves'
            )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in lines.items() if k not in secret)
    return secret


def _write_private(path: Path, text: str) -> None:
    """Create `path` readable by this user only (mode 0600), holding `text`; refuse to reuse a file."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)


def exec_with_env_file(argv: list[str]) -> NoReturn:
    """`python -m lejepa.train.launch ENV_FILE PROGRAM [ARGS...]`, a rank started over ssh: add the variables
    of the private ENV_FILE (JSON, written by `launch`) to the environment, then become PROGRAM (a module name
    or a path ending in .py) with ARGS. The secrets so reach the rank with no command line holding them."""
    env_file, program, *args = argv
    try:
        info = os.stat(env_file)
    except OSError as exc:
        sys.exit(f"error: cannot read {env_file} ({exc.strerror}): every node needs this working directory")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        sys.exit(f"error: {env_file} must belong to uid {os.getuid()} and have mode 0600: it holds secrets")
    with open(env_file) as f:
        env = {**os.environ, **json.load(f)}
    command = [sys.executable, "-u", *(["-m", program] if _is_module(program) else [program]), *args]
    os.execve(sys.executable, command, env)


def _check_hostfile_backend(lc: LaunchConfig) -> None:
    """Fail with one line before DeepSpeed starts when pdsh is missing or a host refuses ssh."""
    if lc.multinode_launcher != "pdsh":
        return
    if shutil.which("pdsh") is None:
        raise LaunchError("launch.multinode_launcher=pdsh needs pdsh on PATH: apt-get install pdsh")
    hosts = _read_hostfile(lc.hostfile)[: lc.nnodes]
    port = ["-p", str(lc.ssh_port)] if lc.ssh_port is not None else []
    for host in hosts:
        check = subprocess.run(
            ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", *port, *lc.ssh_options, host, "true"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if check.returncode != 0:
            reason = (check.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise LaunchError(
                f"cannot ssh to {host} from {lc.hostfile} ({reason}): set up passwordless ssh to every host, "
                "or point launch.ssh_port / launch.ssh_options at it"
            )


def _read_hostfile(hostfile: str | None) -> list[str]:
    if hostfile is None:
        raise LaunchError("launch.mode=hostfile needs launch.hostfile: a file of `host slots=N` lines")
    path = Path(hostfile)
    if not path.is_file():
        raise LaunchError(f"hostfile {hostfile} does not exist: set launch.hostfile to an existing file")
    lines = [line.strip() for line in path.read_text().splitlines()]
    hosts = [line.split()[0] for line in lines if line and not line.startswith("#")]
    if not hosts:
        raise LaunchError(f"hostfile {hostfile} names no hosts: write one `host slots=N` line per node")
    return hosts


def _deepspeed_program(program: str, program_args: list[str]) -> list[str]:
    # lejepa.train.rank reads LOCAL_RANK from the environment, so DeepSpeed must not add --local_rank.
    return ["--no_local_rank"] + (["--module"] if _is_module(program) else []) + [program] + program_args


def _local_nproc(lc: LaunchConfig) -> int:
    if lc.nproc_per_node is not None:
        return lc.nproc_per_node
    if rank_accelerator(lc) == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return 2


def rank_accelerator(lc: LaunchConfig) -> str:
    """What the ranks run on: launch.accelerator, or for "auto" cuda when this machine sees a GPU (on a
    scheduler: when the job requests GPUs)."""
    if lc.accelerator != "auto":
        return lc.accelerator
    if lc.mode in ("slurm", "kubernetes"):
        return "cuda" if lc.gpus_per_node else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_module(program: str) -> bool:
    return not program.endswith(".py")


def _tracebacks(lines: list[str]) -> Iterable[tuple[str, str]]:
    """(prefix, exception line) of every Python traceback of a rank in the output, launchers' own left out."""
    for start, line in enumerate(lines):
        if _TRACEBACK in line:
            prefix = line[: line.index(_TRACEBACK)]
            error = _exception_line(lines[start + 1 :], prefix)
            if error and not error.split(":")[0].endswith(_LAUNCHER_EXCEPTIONS):
                yield prefix, error


def _exception_line(lines: list[str], prefix: str) -> str | None:
    """The exception that ends the traceback starting at lines[0] (the last one of a chain)."""
    error = None
    for line in lines:
        if not line.startswith(prefix):
            continue
        body = line[len(prefix) :]
        if not body.strip() or body[0].isspace() or body.startswith(_TRACEBACK):
            continue
        if body.startswith(("During handling of the above", "The above exception")):
            error = None
            continue
        if error is not None:
            break
        error = body.strip()
    return error


def _rank_of(prefix: str) -> str | None:
    """The rank in a line prefix: torch's and torchrun's [rankN]:, an older torchrun's [defaultN]: (the local
    rank, which is the rank in local mode), or srun --label's N:."""
    match = re.search(r"\[(?:rank|default)(\d+)\]", prefix) or re.match(r"\s*(\d+): ", prefix)
    return match.group(1) if match else None


def _said_by(rank: str, line: str) -> str:
    """What `line` says if rank `rank` printed it under torchrun's prefix (however many times) or srun
    --label's, else ''."""
    match = re.match(r"\s*(?:\[(?:rank|default)(\d+)\]:\s?)+(.*)", line) or re.match(r"\s*(\d+): (.*)", line)
    return match.group(2).strip() if match and match.group(1) == rank else ""


def _who(prefix: str) -> str:
    rank = _rank_of(prefix)
    host = re.match(r"\s*([^\s\[\]:]+): ", prefix)  # pdsh's "host: "
    host_name = host.group(1) if host and not host.group(1).isdigit() else None
    who = f"rank {rank}" if rank is not None else "a rank"
    return f"{who} on {host_name}" if host_name else who


if __name__ == "__main__":
    exec_with_env_file(sys.argv[1:])
