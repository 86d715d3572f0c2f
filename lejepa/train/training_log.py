"""The training log: rank 0's per-step records in `{run}/metrics.jsonl`, and the progress shown meanwhile."""

from __future__ import annotations

import json
import sys
from typing import Any

from lejepa.store.layout import TRAINING_LOG
from lejepa.store.storage import Storage


def read_training_log(storage: Storage, run_url: str) -> list[dict[str, Any]]:
    """The run's per-step training records (rank 0's `metrics.jsonl`); [] when it has none."""
    url = f"{run_url}/{TRAINING_LOG}"
    if not storage.exists(url):
        return []
    return [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]


class MetricsLog:
    """Rank 0's per-step JSON lines, kept locally and copied to the run folder at every checkpoint."""

    def __init__(self, storage: Storage, run_url: str) -> None:
        self.storage, self.run_url, self.url = storage, run_url, f"{run_url}/{TRAINING_LOG}"
        self.local = storage.local_dir(run_url) / TRAINING_LOG
        self.local.parent.mkdir(parents=True, exist_ok=True)

    def restart_at(self, step: int) -> None:
        """Keep the lines up to `step` (a resumed run repeats nothing after its checkpoint)."""
        kept = [r for r in read_training_log(self.storage, self.run_url) if r["step"] <= step]
        self.local.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict[str, Any]) -> None:
        with self.local.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        if self.local.exists() and self.storage.protocol != "file":
            self.storage.put_file(self.local, self.url)


class Progress:
    """A progress bar on a terminal; through a launcher's pipes, a plain line every `log_every` steps."""

    def __init__(self, total: int, initial: int, log_every: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.total, self.log_every = total, log_every
        self.enabled = enabled
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="pretrain",
            unit="step",
            file=sys.stderr,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def update(self, record: dict[str, Any]) -> None:
        self.bar.update(1)
        if record["step"] % self.log_every and record["step"] != self.total:
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}")
        if self.enabled and self.bar.disable:
            print("[pretrain] " + "  ".join(_line_parts(record, self.total)), flush=True)

    def set_total(self, total: int) -> None:
        self.total = self.bar.total = total

    def close(self) -> None:
        self.bar.close()


def _line_parts(record: dict[str, Any], total: int) -> list[str]:
    parts = [
        f"step {record['step']}/{total}",
        f"loss {record['loss']:.4f}",
        f"prediction {record['prediction']:.4f}",
        f"sigreg {record['sigreg']:.4f}",
    ]
    if "probe_acc" in record:
        parts.append(f"probe acc {record['probe_acc']:.3f}")
    return parts + [
        f"lr {record['lr']:.2e}",
        f"{record['images_per_s']:.0f} img/s",
        f"data wait {100 * record['data_wait']:.1f}%",
    ]
