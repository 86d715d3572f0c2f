"""launch.mode=kubernetes: the manifests of each job kind, the ranks' start-up, and the launch's API calls.

No Kubernetes cluster runs here, so three things stand in for parts of one:
- the manifests are built with the real client's models and checked field by field;
- the indexed Job's pods are two local processes started with exactly the command and environment the
  manifest gives a pod (what the kubelet fills in, substituted), which train LeJEPA together over gloo;
- the API server is a small HTTP server on 127.0.0.1 serving the handful of endpoints the launch calls,
  behind which a scripted "cluster" runs each job's pods; the real `kubernetes` client talks to it through
  a kubeconfig. What a real cluster adds (scheduling, DNS, the operators) is not exercised.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

pytest.importorskip("kubernetes")

from lejepa.config import SECRETS_ENV, LaunchConfig, PipelineConfig, load_config  # noqa: E402
from lejepa.data.manifest import locate_manifest  # noqa: E402
from lejepa.data.shard import write_shards  # noqa: E402
from lejepa.store import layout  # noqa: E402
from lejepa.store.storage import Storage  # noqa: E402
from lejepa.train.kubernetes import (  # noqa: E402
    COMPLETION_INDEX,
    CONFIG_FILE,
    build_manifests,
    job_alive,
    launch_kubernetes,
)
from lejepa.train.launch import LaunchError, LaunchFailed, free_port, launch  # noqa: E402
from lejepa.train.pretrain import cli, launch_inputs  # noqa: E402

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
STORAGE_SECRET = "storage-secret-9f8e7d6c5b4a"
IMAGE = "registry.example.com/lejepa:0.1.0"
NAME = "lejepa-pretrain-abc123"
ENVIRON = {
    "AWS_ENDPOINT_URL": "http://minio.storage:9000",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001",
    "AWS_SECRET_ACCESS_KEY": SECRET,
    SECRETS_ENV: json.dumps({"secret_access_key": STORAGE_SECRET}),
    "WANDB_MODE": "offline",
    "HOME": "/root",
}
"""The launcher's environment: plain variables to forward, and secrets that must stay out of manifests."""


def gpu_launch(**fields: Any) -> LaunchConfig:
    return LaunchConfig(
        mode="kubernetes",
        image=IMAGE,
        namespace="ml",
        nnodes=2,
        gpus_per_node=4,
        cpus_per_task=8,
        memory="64Gi",
        env=["WANDB_*"],
        secret_env=["s3-credentials"],
        image_pull_secrets=["registry"],
        service_account="lejepa-ranks",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        **fields,
    )


def manifests_of(lc: LaunchConfig, kind: str) -> list[dict[str, Any]]:
    args = ["--config", "/work/.lejepa-launch-x/config.yaml", "--set", "loss.lamb=0.1"]
    return build_manifests(
        lc,
        "lejepa.train.rank",
        args,
        kind=kind,
        name=NAME,
        environ=ENVIRON,
        config_text="loss:\n  lamb: 0.05\n",
    )


def torchrun(*rendezvous: str, nproc: int = 4) -> list[str]:
    return [
        *("python3", "-u", "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc}"),
        *rendezvous,
        *("--tee=3", "-m", "lejepa.train.rank", "--config", CONFIG_FILE, "--set", "loss.lamb=0.1"),
    ]


PLAIN_ENV = [
    {"name": "AWS_ENDPOINT_URL", "value": "http://minio.storage:9000"},
    {"name": "OMP_NUM_THREADS", "value": "8"},
    {"name": "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "value": "[rank${rank}]: "},
    {"name": "WANDB_MODE", "value": "offline"},
]
RESOURCES = {
    "limits": {"nvidia.com/gpu": "4", "memory": "64Gi"},
    "requests": {"nvidia.com/gpu": "4", "cpu": "32", "memory": "64Gi"},
}
LABELS = {"app.kubernetes.io/name": "lejepa", "lejepa/launch": NAME}
CONFIG_MOUNT = {"name": "config", "mountPath": "/etc/lejepa", "readOnly": True}


def assert_no_secret(manifests: list[dict[str, Any]]) -> None:
    text = json.dumps(manifests) + yaml.safe_dump_all(manifests)
    assert SECRET not in text and STORAGE_SECRET not in text and "AWS_ACCESS_KEY_ID" not in text


def assert_pod_spec(spec: dict[str, Any]) -> None:
    """What every kind's pods share: scheduling, pull secrets, the ConfigMap and /dev/shm."""
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "lejepa-ranks"
    assert spec["imagePullSecrets"] == [{"name": "registry"}]
    assert {"name": "config", "configMap": {"name": f"{NAME}-config"}} in spec["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]


# --- manifests ------------------------------------------------------------------------------------------


def test_indexed_job_manifests() -> None:
    manifests = manifests_of(gpu_launch(), "Job")
    job, config_map, service = manifests
    assert (job["apiVersion"], job["kind"], job["metadata"]) == (
        "batch/v1",
        "Job",
        {"name": NAME, "namespace": "ml", "labels": LABELS},
    )
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (
        "Indexed",
        2,
        2,
        0,
    )
    pod = spec["template"]
    assert pod["metadata"]["labels"] == LABELS and pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["subdomain"] == NAME  # the pods' hosts: <job>-<index>.<service>
    assert_pod_spec(pod["spec"])
    [container] = pod["spec"]["containers"]
    assert container["image"] == IMAGE and container["name"] == "node"
    assert container["command"] == torchrun(f"--master_addr={NAME}-0.{NAME}", "--master_port=29500")
    node_rank = {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}
    assert container["env"] == [*PLAIN_ENV, node_rank]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert container["resources"] == RESOURCES
    assert CONFIG_MOUNT in container["volumeMounts"]
    assert config_map == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{NAME}-config", "namespace": "ml", "labels": LABELS},
        "data": {"config.yaml": "loss:\n  lamb: 0.05\n"},
    }
    assert service["kind"] == "Service" and service["metadata"]["name"] == NAME
    assert service["spec"] == {
        "clusterIP": "None",
        "selector": {"lejepa/launch": NAME},
        "publishNotReadyAddresses": True,
        "ports": [{"name": "rendezvous", "port": 29500, "targetPort": 29500}],
    }
    assert_no_secret(manifests)


def test_pytorchjob_manifests() -> None:
    manifests = manifests_of(gpu_launch(master_port=23456), "PyTorchJob")
    job, config_map = manifests
    assert (job["apiVersion"], job["kind"], job["metadata"]["labels"]) == (
        "kubeflow.org/v1",
        "PyTorchJob",
        LABELS,
    )
    spec = job["spec"]
    assert spec["nprocPerNode"] == "4" and spec["runPolicy"] == {"backoffLimit": 0}
    replicas = spec["pytorchReplicaSpecs"]
    assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 1}
    assert replicas["Master"] == replicas["Worker"] | {"replicas": 1}
    pod = replicas["Master"]["template"]
    assert pod["metadata"]["labels"] == LABELS and "subdomain" not in pod["spec"]
    assert_pod_spec(pod["spec"])
    [container] = pod["spec"]["containers"]
    assert container["name"] == "pytorch"  # the operator's container name
    assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456}]
    # The operator sets MASTER_ADDR, MASTER_PORT and PET_NODE_RANK on every pod.
    assert container["command"] == torchrun("--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)")
    assert container["env"] == PLAIN_ENV
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert container["resources"] == RESOURCES and CONFIG_MOUNT in container["volumeMounts"]
    assert config_map["kind"] == "ConfigMap"
    assert_no_secret(manifests)


def test_trainjob_manifests() -> None:
    manifests = manifests_of(gpu_launch(), "TrainJob")
    job, config_map = manifests
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    spec = job["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed"}
    # The runtime sets PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT; its API has no envFrom, so the
    # Secrets are mounted and exported by `python -m lejepa.train.kubernetes` before torchrun starts.
    assert spec["trainer"] == {
        "image": IMAGE,
        "command": ["python3", "-m", "lejepa.train.kubernetes", "/etc/lejepa-secrets", *torchrun()],
        "env": PLAIN_ENV,
        "numNodes": 2,
        "numProcPerNode": 4,
        "resourcesPerNode": RESOURCES,
    }
    [override] = spec["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}] and override["metadata"] == {"labels": LABELS}
    assert_pod_spec(override["spec"])
    assert {"name": "secret-0", "secret": {"secretName": "s3-credentials"}} in override["spec"]["volumes"]
    [container] = override["spec"]["containers"]
    assert container["name"] == "node"
    assert CONFIG_MOUNT in container["volumeMounts"]
    secret_mount = {"name": "secret-0", "mountPath": "/etc/lejepa-secrets/s3-credentials", "readOnly": True}
    assert secret_mount in container["volumeMounts"]
    assert config_map["metadata"]["name"] == f"{NAME}-config"
    assert_no_secret(manifests)


def test_cpu_job_runs_one_rank_per_pod_on_gloo() -> None:
    lc = LaunchConfig(mode="kubernetes", image=IMAGE, nnodes=3)
    [job, service] = build_manifests(lc, "probe.py", ["-x"], kind="Job", name=NAME, environ={})
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["command"][4:7] == ["--nnodes=3", "--nproc_per_node=1", f"--master_addr={NAME}-0.{NAME}"]
    assert container["command"][-3:] == ["--tee=3", "probe.py", "-x"]  # no config file: no ConfigMap
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container["env"]
    assert "resources" not in container and "envFrom" not in container
    assert service["kind"] == "Service"


def test_secret_named_variables_of_launch_env_stay_out() -> None:
    lc = LaunchConfig(mode="kubernetes", image=IMAGE, env=["HF_*", "PET_NNODES"])
    environ = {"HF_TOKEN": SECRET, "HF_HOME": "/cache/hf", "PET_NNODES": "9"}
    [job, _] = build_manifests(lc, "lejepa.train.rank", [], kind="Job", name=NAME, environ=environ)
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "HF_HOME", "value": "/cache/hf"} in env
    assert SECRET not in json.dumps(job) and "HF_TOKEN" not in json.dumps(job)
    assert [e for e in env if e["name"].startswith("PET_")] == [
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}
    ]


@pytest.mark.parametrize(
    "override, field",
    [
        ('launch.image="lejepa:1\\nkind: Secret"', "launch.image"),
        ("launch.namespace=ML_Team", "launch.namespace"),
        ("launch.secret_env=[S3_Creds]", "launch.secret_env"),
        ('launch.service_account="a b"', "launch.service_account"),
        ("launch.image_pull_secrets=[reg/istry]", "launch.image_pull_secrets"),
        ('launch.node_selector={"gpu": "a b"}', "launch.node_selector"),
        ("launch.tolerations=[{key: gpu, operator: Exists, command: [sh]}]", "launch.tolerations"),
        ("launch.tolerations=[{key: gpu, effect: Sometimes}]", "launch.tolerations"),
        ("launch.memory=lots", "launch.memory"),
        ("launch.job_kind=MPIJob", "launch.job_kind"),
    ],
)
def test_config_refuses_values_kubernetes_would_not_take(override: str, field: str) -> None:
    from lejepa.config import ConfigError

    with pytest.raises(ConfigError, match=rf"^invalid config: {field}: ") as refusal:
        load_config(overrides=["launch.mode=kubernetes", override])
    assert "\n" not in str(refusal.value)


def test_config_accepts_kubernetes_values() -> None:
    lc = load_config(
        overrides=[
            "launch.mode=kubernetes",
            f"launch.image={IMAGE}@sha256:0123abcd",
            "launch.namespace=ml-team",
            "launch.secret_env=[s3-credentials, wandb.key]",
            'launch.node_selector={"node.kubernetes.io/instance-type": p5.48xlarge, pool: ""}',
            "launch.tolerations=[{key: nvidia.com/gpu, operator: Exists}, {operator: Exists}, "
            "{key: spot, value: 'true', effect: NoExecute, tolerationSeconds: 60}]",
            "launch.memory=1.5Ti",
        ]
    ).launch
    assert lc.mode == "kubernetes" and lc.job_kind == "auto" and lc.runtime_ref == "torch-distributed"
    assert lc.node_selector == {"node.kubernetes.io/instance-type": "p5.48xlarge", "pool": ""}
    assert lc.tolerations[2] == {
        "key": "spot",
        "value": "true",
        "effect": "NoExecute",
        "tolerationSeconds": 60,
    }


def test_trainjob_pod_exports_its_mounted_secrets(tmp_path: Path) -> None:
    # A Secret volume as the kubelet writes it: each key a file (a link into ..data), beside its own entries.
    secret = tmp_path / "secrets" / "s3-credentials"
    (secret / "..data").mkdir(parents=True)
    (secret / "..data" / "AWS_SECRET_ACCESS_KEY").write_text(SECRET)
    (secret / "AWS_SECRET_ACCESS_KEY").symlink_to("..data/AWS_SECRET_ACCESS_KEY")
    (secret / "not-a-variable.json").write_text("{}")
    show = (
        "import os; e = os.environ; print(sorted(k for k in e if k[:3] == 'AWS'), e['AWS_SECRET_ACCESS_KEY'])"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lejepa.train.kubernetes",
            str(tmp_path / "secrets"),
            sys.executable,
            "-c",
            show,
        ],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
        check=True,
    )
    assert done.stdout == f"['AWS_SECRET_ACCESS_KEY'] {SECRET}\n"


def test_launch_needs_an_image_and_a_kubernetes_job_name(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match=r"^launch.mode=kubernetes needs launch.image: "):
        launch_kubernetes(LaunchConfig(mode="kubernetes"), "lejepa.train.rank", [])
    lc = LaunchConfig(mode="kubernetes", image=IMAGE, job_name="LeJEPA_run")
    with pytest.raises(LaunchError, match=r"launch.job_name='LeJEPA_run' cannot name a Kubernetes job"):
        launch_kubernetes(lc, "lejepa.train.rank", [], dry_run=True)


# --- the ranks' start-up, from the indexed Job's manifest -----------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    write_shards(load_config(None, [f"storage.root={root}", "data.source=digits"]), progress=False)
    return root


def test_indexed_job_pods_train_together(tmp_path: Path, store: Path) -> None:
    cfg = load_config(
        None,
        [
            f"storage.root={store}",
            "data.source=digits",
            "model.backbone=resnet10t",
            "model.proj_hidden_dim=128",
            "model.proj_dim=32",
            "views.local_views=2",
            "loss.num_slices=64",
            "pretrain.run_name=on-kubernetes",
            "pretrain.batch_size=16",
            "pretrain.max_steps=3",
            "pretrain.checkpoint_every=3",
            "pretrain.log_every=1",
            "pretrain.num_workers=0",
            "launch.mode=kubernetes",
            f"launch.image={IMAGE}",
            "launch.nnodes=2",
            "launch.nproc_per_node=1",
            "launch.cpus_per_task=1",
            f"launch.master_port={free_port()}",
        ],
    )
    # What the pretrain stage hands a launch: the ranks' config file, and the dataset resolved once.
    folder = tmp_path / "launch"
    folder.mkdir()
    program_args, _ = launch_inputs(cfg, folder)
    manifest_url = locate_manifest(cfg, Storage.from_config(cfg.storage))
    program_args += ["--set", f"data.manifest={json.dumps(manifest_url)}"]
    config_text = (folder / "config.yaml").read_text()
    job, config_map, service = build_manifests(
        cfg.launch,
        "lejepa.train.rank",
        program_args,
        kind="Job",
        name=NAME,
        environ=dict(os.environ),
        config_text=config_text,
    )
    [container] = job["spec"]["template"]["spec"]["containers"]

    # What the kubelet gives each pod, substituted here: the ConfigMap's file at its mount point (a copy at
    # another path, since /etc is not ours to write), the image's python3 (this one), PET_NODE_RANK from the
    # completion-index annotation, and the headless Service's name for node 0 resolving to this machine (the
    # rendezvous host passed as 127.0.0.1 instead of an /etc/hosts entry, which would need root).
    mounted = tmp_path / "etc-lejepa" / "config.yaml"
    mounted.parent.mkdir()
    mounted.write_text(config_map["data"]["config.yaml"])
    substitute = {
        "python3": sys.executable,
        CONFIG_FILE: str(mounted),
        f"--master_addr={NAME}-0.{service['metadata']['name']}": "--master_addr=127.0.0.1",
    }
    command = [substitute.get(word, word) for word in container["command"]]
    assert command != container["command"] and f"--master_addr={NAME}-0.{NAME}" in container["command"]
    image_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    pods = []
    for index in range(job["spec"]["completions"]):
        env = dict(image_env)
        for var in container["env"]:
            if "valueFrom" in var:
                assert var["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
                env[var["name"]] = str(index)
            else:
                env[var["name"]] = var["value"]
        log = tmp_path / f"pod-{index}.log"
        with log.open("w") as out:
            pods.append(
                (subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path), log)
            )
    try:
        codes = [proc.wait(timeout=240) for proc, _ in pods]
    finally:
        for proc, _ in pods:
            if proc.poll() is None:
                proc.kill()
    logs = [log.read_text() for _, log in pods]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs)
    # Node 0 ran rank 0, which logs (torchrun's prefix names it); node 1 ran the other rank of the two.
    assert "[rank0]:" in logs[0] and "[rank1]:" not in logs[0] and "[rank0]:" not in logs[1]
    storage = Storage.from_config(cfg.storage)
    run = layout.run_url(storage, "on-kubernetes")
    summary = storage.read_json(f"{run}/{layout.SUMMARY}")
    assert summary["steps"] == 3 and summary["manifest"] == manifest_url
    assert storage.read_json(f"{run}/{layout.CONFIG}")["world_size"] == 2


# --- the launch against a stand-in API server -----------------------------------------------------------

API_GROUPS = {
    "Job": ("batch", "v1", "jobs"),
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}
JOBS = ("jobs", "pytorchjobs", "trainjobs")
OBJECT_PATH = re.compile(
    r"/apis?/(?:batch/v1|v1|kubeflow\.org/v1|trainer\.kubeflow\.org/v1alpha1)/namespaces/[^/]+/"
    r"(?P<plural>\w+)(?:/(?P<name>[^/]+))?(?P<log>/log)?"
)


class Pod:
    """A pod of the stand-in cluster: running (its log half written) until the job's second read, then ended
    with `exit_code`; or stuck `waiting` for a reason."""

    def __init__(self, index: int, lines: list[str], exit_code: int = 0, waiting: str | None = None) -> None:
        self.index, self.lines, self.exit_code, self.waiting = index, lines, exit_code, waiting
        self.log_reads = 0

    def name(self, job: dict[str, Any]) -> str:
        """Named as each kind's controller names its pods."""
        name = job["metadata"]["name"]
        if job["kind"] == "PyTorchJob":
            return f"{name}-master-0" if self.index == 0 else f"{name}-worker-{self.index - 1}"
        return f"{name}-{'node-0-' if job['kind'] == 'TrainJob' else ''}{self.index}-x7k2p"

    def as_json(self, job: dict[str, Any], ended: bool) -> dict[str, Any]:
        labels = {"lejepa/launch": job["metadata"]["name"]}
        annotations = {}
        if job["kind"] == "PyTorchJob":
            labels["training.kubeflow.org/replica-type"] = "master" if self.index == 0 else "worker"
            labels["training.kubeflow.org/replica-index"] = str(max(0, self.index - 1))
        else:
            annotations["batch.kubernetes.io/job-completion-index"] = str(self.index)
        if self.waiting:
            phase, state = (
                "Pending",
                {"waiting": {"reason": self.waiting, "message": f'Back-off pulling "{IMAGE}"'}},
            )
        elif not ended:
            phase, state = "Running", {"running": {}}
        else:
            phase = "Failed" if self.exit_code else "Succeeded"
            finished = f"2026-01-01T00:01:0{5 - self.index}Z"  # the last pod ends first
            state = {"terminated": {"exitCode": self.exit_code, "finishedAt": finished}}
        container = "pytorch" if job["kind"] == "PyTorchJob" else "node"
        return {
            "metadata": {"name": self.name(job), "labels": labels, "annotations": annotations},
            "status": {"phase": phase, "containerStatuses": [{"name": container, "state": state}]},
        }


class StandInApi(ThreadingHTTPServer):
    """The Kubernetes API endpoints the launch calls, on 127.0.0.1: discovery of the kinds it `serves`;
    create, read and delete of jobs, ConfigMaps and Services; the pod list and the pods' logs. Behind them,
    a job runs `pods` and ends on its second read. Every request is kept: (method, path, query, body)."""

    def __init__(self, serves: set[str], pods: list[Pod]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.serves, self.pods = serves, pods
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], Any]] = []
        self.job_reads = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def job(self) -> dict[str, Any]:
        [job] = [obj for (plural, _), obj in self.objects.items() if plural in JOBS]
        return job

    def answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        for kind, (group, version, plural) in API_GROUPS.items():
            if path == f"/apis/{group}/{version}":
                if kind not in self.serves:
                    return _not_found(path)
                return 200, {"kind": "APIResourceList", "resources": [{"name": plural, "kind": kind}]}
        route = OBJECT_PATH.fullmatch(path)
        if route is None:
            return _not_found(path)
        plural, name = route["plural"], route["name"]
        if method == "POST":
            self.objects[(plural, body["metadata"]["name"])] = {
                **body,
                "metadata": {**body["metadata"], "uid": "u1"},
            }
            return 201, self.objects[(plural, body["metadata"]["name"])]
        if plural == "pods":
            job = self.job()
            ended = self.job_reads >= 2
            if name is None:
                assert query["labelSelector"] == [f"lejepa/launch={job['metadata']['name']}"]
                return 200, {"kind": "PodList", "items": [pod.as_json(job, ended) for pod in self.pods]}
            [pod] = [pod for pod in self.pods if pod.name(job) == name]
            pod.log_reads += 1
            # A running pod's first stream drops after half its lines; the next one starts from the top.
            lines = pod.lines[: len(pod.lines) // 2] if pod.log_reads == 1 and not ended else pod.lines
            return 200, "".join(f"2026-01-01T00:00:{i:02d}.{i + 1}Z {line}\n" for i, line in enumerate(lines))
        if (plural, name) not in self.objects:
            return _not_found(f'{plural} "{name}"')
        if method == "DELETE":
            del self.objects[(plural, name)]
            return 200, {"kind": "Status", "status": "Success"}
        found = self.objects[(plural, name)]
        if plural in JOBS:
            self.job_reads += 1
            if self.job_reads >= 2:
                failed = any(pod.exit_code for pod in self.pods)
                done = "Failed" if failed else "Succeeded" if plural == "pytorchjobs" else "Complete"
                condition = {
                    "type": done,
                    "status": "True",
                    "reason": "BackoffLimitExceeded" if failed else "",
                }
                found = {
                    **found,
                    "status": {"conditions": [{"type": "Created", "status": "True"}, condition]},
                }
        return 200, found


def _not_found(what: str) -> tuple[int, dict[str, Any]]:
    return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "message": f"{what} not found"}


class _Handler(BaseHTTPRequestHandler):
    server: StandInApi

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with self.server.lock:
            self.server.requests.append((method, url.path, query, body))
            code, answer = self.server.answer(method, url.path, query, body)
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(answer, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def use_kubeconfig(monkeypatch: pytest.MonkeyPatch, path: Path, server: str) -> None:
    """Point the client at `server` through a kubeconfig, as a user's laptop would be."""
    path.write_text(
        yaml.safe_dump(
            {
                "clusters": [{"name": "here", "cluster": {"server": server}}],
                "users": [{"name": "launcher", "user": {"token": "launcher-token"}}],
                "contexts": [{"name": "here", "context": {"cluster": "here", "user": "launcher"}}],
                "current-context": "here",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[StandInApi]:
    """A stand-in API server (indirect parameter: the kinds it serves and the job's pods) the client uses."""
    serves, pods = getattr(request, "param", (set(), []))
    server = StandInApi(serves, pods)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    use_kubeconfig(monkeypatch, tmp_path / "kubeconfig", server.url)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def ranks_config(tmp_path: Path) -> tuple[LaunchConfig, list[str]]:
    """A two-node launch, and the arguments that name its config file (which the pods get in a ConfigMap)."""
    config = tmp_path / "ranks.yaml"
    config.write_text("pretrain:\n  max_steps: 3\n")
    lc = LaunchConfig(mode="kubernetes", image=IMAGE, nnodes=2, secret_env=["s3-credentials"])
    return lc, ["--config", str(config), "--set", "loss.lamb=0.1"]


def rank_lines(rank: int) -> list[str]:
    return [f"[rank{rank}]: run starting", f"[rank{rank}]: step 1 {SECRET}", f"[rank{rank}]: step 2", "done"]


TWO_PODS = [Pod(0, rank_lines(0)), Pod(1, rank_lines(1))]


@pytest.mark.parametrize(
    "cluster, kind",
    [
        ((set(), TWO_PODS), "Job"),
        (({"PyTorchJob"}, TWO_PODS), "PyTorchJob"),
        ((set(API_GROUPS), TWO_PODS), "TrainJob"),
    ],
    indirect=["cluster"],
)
def test_launch_creates_follows_and_deletes_the_job(
    cluster: StandInApi, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lc, args = ranks_config(tmp_path)
    jobs: list[dict[str, str]] = []
    assert launch_kubernetes(lc, "lejepa.train.rank", args, env=ENVIRON, on_job=jobs.append) == 0
    out = capsys.readouterr().out
    group, version, plural = API_GROUPS[kind]
    created = [(path, body) for method, path, _, body in cluster.requests if method == "POST"]
    assert [path for path, _ in created] == [  # the kind the cluster serves first, then what it owns
        f"/apis/{group}/{version}/namespaces/default/{plural}",
        "/api/v1/namespaces/default/configmaps",
        *(["/api/v1/namespaces/default/services"] if kind == "Job" else []),
    ]
    job = created[0][1]
    name = job["metadata"]["name"]
    assert job["kind"] == kind and re.fullmatch(r"lejepa-pretrain-[0-9a-f]{6}", name)
    assert jobs == [{"scheduler": "kubernetes", "namespace": "default", "name": name, "kind": kind}]
    owner = {"apiVersion": f"{group}/{version}", "kind": kind, "name": name, "uid": "u1"}
    for _, owned in created[1:]:  # so Kubernetes deletes the ConfigMap and the Service with the job
        assert owned["metadata"]["ownerReferences"] == [owner]
        assert owned["metadata"]["labels"]["lejepa/launch"] == name
    assert created[1][1]["data"] == {"config.yaml": "pretrain:\n  max_steps: 3\n"}
    assert SECRET not in json.dumps(cluster.requests) and STORAGE_SECRET not in json.dumps(cluster.requests)
    # Every line of every pod once, after the pod's name, the secret masked: the stream that dropped
    # halfway was read again from the top without repeating a line.
    for pod in TWO_PODS:
        prefix = f"{pod.name(job)}: "
        said = [line.removeprefix(prefix) for line in out.splitlines() if line.startswith(prefix)]
        assert said == [line.replace(SECRET, "***") for line in pod.lines]
        assert pod.log_reads >= 2
    assert SECRET not in out
    # Then the job was deleted, its pods first, and the launch waited until it was gone.
    job_path = f"/apis/{group}/{version}/namespaces/default/{plural}/{name}"
    assert ("DELETE", job_path, {"propagationPolicy": ["Foreground"]}) in [r[:3] for r in cluster.requests]
    assert cluster.requests[-1][:2] == ("GET", job_path) and cluster.objects == {}
    assert out.splitlines()[-1] == f"launch: deleted {kind} default/{name}"


FAILING_PODS = [
    Pod(
        0,
        ["[rank0]: step 1", "[rank0]: RuntimeError: Connection closed by peer [10.0.0.7]:29500"],
        exit_code=1,
    ),
    Pod(
        1,
        [
            "[rank1]: step 1",
            "[rank1]: Traceback (most recent call last):",
            '[rank1]:   File "lejepa/train/rank.py", line 1, in <module>',
            "[rank1]: ValueError: shard 7 is corrupt",
        ],
        exit_code=1,
    ),
]


@pytest.mark.parametrize("cluster", [(set(), FAILING_PODS)], indirect=True)
def test_failed_rank_fails_the_launch_in_one_line(cluster: StandInApi, tmp_path: Path) -> None:
    lc, args = ranks_config(tmp_path)
    jobs: list[dict[str, str]] = []
    with pytest.raises(LaunchFailed) as failure:
        launch_kubernetes(lc, "lejepa.train.rank", args, env=ENVIRON, on_job=jobs.append)
    # Pod 1 ended first, with the error; pod 0 only noticed that its peer was gone.
    assert (
        str(failure.value)
        == f"pod {jobs[0]['name']}-1-x7k2p (node 1): rank 1: ValueError: shard 7 is corrupt (exit status 1)"
    )
    assert failure.value.status == 1 and cluster.objects == {}


@pytest.mark.parametrize(
    "cluster", [(set(), [Pod(0, [], waiting="ImagePullBackOff"), Pod(1, [])])], indirect=True
)
def test_pod_that_cannot_start_fails_the_launch_in_one_line(cluster: StandInApi, tmp_path: Path) -> None:
    lc, args = ranks_config(tmp_path)
    with pytest.raises(LaunchFailed) as failure:
        launch_kubernetes(lc, "lejepa.train.rank", args, env=ENVIRON)
    assert re.fullmatch(
        r"pod lejepa-pretrain-\w{6}-0-x7k2p \(node 0\) cannot start: ImagePullBackOff: Back-off pulling "
        r'"registry.example.com/lejepa:0.1.0": check launch.image and launch.image_pull_secrets',
        str(failure.value),
    ), failure.value
    assert cluster.objects == {}


@pytest.mark.parametrize("cluster", [(set(), TWO_PODS)], indirect=True)
def test_terminated_launch_deletes_the_job(cluster: StandInApi, tmp_path: Path) -> None:
    # SIGTERM (a cancelled flow run) arrives once the job exists: launch() raises SystemExit(143) for it, and
    # the job, its ConfigMap and its Service are deleted before the exception leaves.
    lc, args = ranks_config(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        launch(PipelineConfig(launch=lc), args, on_job=lambda job: os.kill(os.getpid(), signal.SIGTERM))
    assert stopped.value.code == 143
    deleted = sorted(path.split("/")[-2] for method, path, _, _ in cluster.requests if method == "DELETE")
    assert deleted == ["configmaps", "jobs", "services"] and cluster.objects == {}
    assert not any(method == "GET" and "/log" in path for method, path, _, _ in cluster.requests)


@pytest.mark.parametrize("cluster", [(set(), [])], indirect=True)
def test_job_alive_asks_the_cluster(
    cluster: StandInApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = {"scheduler": "kubernetes", "namespace": "default", "name": NAME, "kind": "Job"}
    assert not job_alive(ref)  # no such job
    cluster.objects[("jobs", NAME)] = {"kind": "Job", "metadata": {"name": NAME}}
    assert job_alive(ref)  # its first read finds it running
    assert not job_alive(ref)  # then complete
    use_kubeconfig(monkeypatch, tmp_path / "elsewhere", f"http://127.0.0.1:{free_port()}")
    assert job_alive(ref)  # an API server that does not answer cannot say the job ended


def test_missing_config_or_unreachable_api_fail_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lc, args = ranks_config(tmp_path)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError) as failure:
        launch_kubernetes(lc, "lejepa.train.rank", args)
    assert re.fullmatch(
        r"launch.mode=kubernetes found no Kubernetes config \(.+\): run in a pod of the cluster, or point "
        r"KUBECONFIG at a kubeconfig",
        str(failure.value),
    ), failure.value
    closed = f"http://127.0.0.1:{free_port()}"
    use_kubeconfig(monkeypatch, tmp_path / "kubeconfig", closed)
    with pytest.raises(LaunchError) as failure:
        launch_kubernetes(lc, "lejepa.train.rank", args)
    assert re.fullmatch(
        rf"cannot reach the Kubernetes API at {closed} to ask whether the cluster serves "
        r"trainer.kubeflow.org/v1alpha1 \(.+\): check the kubeconfig's server and the network",
        str(failure.value),
    ), failure.value


def test_dry_run_prints_the_manifests_and_submits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-cluster-here"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    overrides = [
        "launch.mode=kubernetes",
        f"launch.image={IMAGE}",
        "launch.nnodes=2",
        f"storage.secret_access_key={STORAGE_SECRET}",
    ]
    assert cli([*(arg for o in overrides for arg in ("--set", o)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# launch.job_kind=auto, but launch.mode=kubernetes found no Kubernetes config")
    assert "\n# AWS_SECRET_ACCESS_KEY, LEJEPA_STORAGE_SECRETS stay out of the manifests (secrets)" in out
    job, config_map, service = yaml.safe_load_all(out)  # the notes are comments: the output is YAML
    assert (job["kind"], config_map["kind"], service["kind"]) == ("Job", "ConfigMap", "Service")
    written = yaml.safe_load(config_map["data"]["config.yaml"])  # the file the pretrain stage wrote
    assert written["launch"]["image"] == IMAGE and written["storage"]["secret_access_key"] is None
    assert SECRET not in out and STORAGE_SECRET not in out
