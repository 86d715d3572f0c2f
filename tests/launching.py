"""What the launcher tests share (tests/train/test_launch.py, tests/test_secrets.py): the distributed probe
program, CPU launch configs, a two-host hostfile on loopback addresses."""

from __future__ import annotations

from pathlib import Path

from lejepa.config import LaunchConfig, PipelineConfig

PROBE = str(Path(__file__).parent / "programs" / "allreduce_probe.py")


def cpu_config(**launch_fields: object) -> PipelineConfig:
    return PipelineConfig(launch=LaunchConfig(**{"accelerator": "cpu", **launch_fields}))


def two_host_file(tmp_path: Path) -> Path:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two loopback 'nodes'\n127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    return hostfile


def probe_lines(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if "probe rank=" in line)
