"""Launcher test probe: join the process group the way lejepa.train.rank does, all_reduce, report one line.

Prints `probe rank=R world=W sum=S accelerator=A` and, for each --show-env NAME, `NAME=<sha256 prefix>`
(never the value), so a test can check that a variable arrived without it appearing in any log.
--fail-rank R makes rank R raise after joining the group; --exit-rank R exits with --exit-code instead;
--hang-rank R makes rank R create --hang-file and then wait forever (to test stopping a launch).
"""

import argparse
import hashlib
import os
import sys
import threading

import deepspeed
import torch
import torch.distributed as dist


def digest(name: str) -> str:
    value = os.environ.get(name)
    return "unset" if value is None else hashlib.sha256(value.encode()).hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail-rank", type=int)
    parser.add_argument("--exit-rank", type=int)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--hang-rank", type=int)
    parser.add_argument("--hang-file")
    parser.add_argument("--show-env", action="append", default=[])
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if rank == args.fail_rank:
        raise RuntimeError(f"probe failure on rank {rank}")
    if rank == args.exit_rank:
        # The one-line `error: ...` a stage prints on a user error (lejepa.cli.run_stage).
        print(f"error: probe rank {rank} giving up with status {args.exit_code}", file=sys.stderr, flush=True)
        os._exit(args.exit_code)
    if rank == args.hang_rank:
        open(args.hang_file, "w").close()
        threading.Event().wait()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    shown = " ".join(f"{name}={digest(name)}" for name in args.show_env)
    print(
        f"probe rank={rank} world={dist.get_world_size()} sum={total.item():g} "
        f"accelerator={os.environ.get('DS_ACCELERATOR', 'unset')} {shown}".rstrip(),
        flush=True,
    )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
