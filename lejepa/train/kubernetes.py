"""Run the pretrain ranks as a Kubernetes job (launch.mode=kubernetes) and follow it to its end.

`launch_kubernetes` submits the job through the Kubernetes API, as whichever kind the cluster serves: a
Kubeflow Trainer TrainJob (trainer.kubeflow.org/v1alpha1, on the `launch.runtime_ref` runtime), else a
training operator PyTorchJob (kubeflow.org/v1), else an indexed batch/v1 Job with a headless Service
(`launch.job_kind` picks one by hand). Every pod is one node and runs torchrun, as local mode does:

    python3 -u -m torch.distributed.run --nnodes=N --nproc_per_node=P ... -m lejepa.train.rank --config
        /etc/lejepa/config.yaml ARGS

The nodes meet in torchrun's static rendezvous at node 0, as both operators set it up: a TrainJob's runtime
and a PyTorchJob's operator give each pod its node rank (PET_NODE_RANK) and node 0's address; the indexed
Job's pods take their rank from their completion index and find node 0 at its stable name `<job>-0.<job>`
(the Job names its pods' hosts `<job>-<index>`; the Service, named like the Job, is their DNS subdomain).
(torchrun's c10d rendezvous would pick its store's host by matching host names, which fails for
`<pod>.<service>` names on Kubernetes: pytorch/elastic#165.)

What the other modes hand over on a shared file system or in the environment travels differently here:
- the config file the pretrain stage writes for the ranks (it holds no secret: `blank_credentials`) goes
  in a ConfigMap, mounted at /etc/lejepa in every pod;
- secrets never enter a manifest. `launch.secret_env` names Kubernetes Secrets whose keys become every
  pod's environment variables (envFrom; a TrainJob, whose API has no envFrom, mounts them instead and
  `python -m lejepa.train.kubernetes` exports their files before torchrun starts). The launcher's own secret
  variables, SECRETS_ENV (the storage credentials of the config) included, are not forwarded;
- plain variables are forwarded: AWS_* and `launch.env`, as to remote hostfile ranks; DS_ACCELERATOR=cpu
  is set where the pods have no GPU.

The ConfigMap and the Service belong to the job (ownerReferences), so Kubernetes deletes them with it. Every
pod's log streams to stdout, each line once, after the pod's name (torchrun adds `[rankN]:`), secret values
masked. When the job ends, fails, or the launch stops on an exception or a signal, the job is deleted
(foreground: its pods first) and the launch waits until it is gone. A failed job raises LaunchFailed: one
line naming the pod, the rank and its error. The service account of the launcher needs create, get and
delete on the job's kind, configmaps and services, list on pods and get on pods/log (docs/kubernetes.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from lejepa.config import SECRET_NAME, LaunchConfig
from lejepa.train.launch import (
    RANK_PREFIX_ENV,
    JobRef,
    LaunchError,
    LaunchFailed,
    _emit,
    _secret_values,
    _signals_ignored,
    forwarded_env,
    rank_accelerator,
    rank_error,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

CONFIG_DIR = "/etc/lejepa"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
SECRETS_DIR = "/etc/lejepa-secrets"
"""Where a TrainJob's pods mount the Secrets of launch.secret_env, one folder each."""
PYTHON = "python3"  # the image's interpreter: PEP 394 promises python3 where `python` may be missing
DEFAULT_PORT = 29500
LAUNCH_LABEL = "lejepa/launch"
"""Label whose value is the job's name, on every object of a launch: job, pods, ConfigMap, Service."""
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
_JOB_NAME = re.compile(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?")  # RFC 1035, room for "-<suffix>-node-0-0"
# A pod stuck in one of these states never starts on its own: fail with the reason and where to look.
_CANNOT_START = {
    "ImagePullBackOff": "check launch.image and launch.image_pull_secrets",
    "ErrImageNeverPull": "check launch.image and launch.image_pull_secrets",
    "InvalidImageName": "check launch.image",
    "CreateContainerConfigError": "check launch.secret_env: every Secret must exist in launch.namespace",
    "CreateContainerError": "check that launch.image has python3 with this package installed",
}


@dataclass(frozen=True)
class JobKind:
    """How to address one kind of job through the API, and what its operator expects."""

    kind: str
    group: str
    version: str
    plural: str
    container: str
    """The rank container's name: the operators find it by this name."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


KINDS = {
    "TrainJob": JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "node"),
    "PyTorchJob": JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "pytorch"),
    "Job": JobKind("Job", "batch", "v1", "jobs", "node"),
}


def launch_kubernetes(
    lc: LaunchConfig,
    program: str,
    program_args: list[str],
    *,
    dry_run: bool = False,
    env: Mapping[str, str] | None = None,
    on_job: Callable[[JobRef], None] | None = None,
) -> int:
    """Run `program` with `program_args` on every rank as one Kubernetes job; return 0 once it completed.

    `env` is the launcher's environment: its plain forwarded variables go into the manifest, its secret
    ones nowhere (they are masked in the output). `on_job` receives {"scheduler": "kubernetes", "namespace",
    "name", "kind"} once the job exists. With dry_run the manifests are printed as YAML and nothing is
    submitted (job_kind auto: the kind the cluster would get, or the indexed Job if it cannot be asked).
    Raises LaunchError when the launch cannot start, LaunchFailed when the job failed.
    """
    environ = dict(os.environ if env is None else env)
    if not lc.image:
        raise LaunchError(
            "launch.mode=kubernetes needs launch.image: the ranks' container image with this package "
            "installed, e.g. launch.image=registry.example.com/lejepa:0.1.0"
        )
    name = job_name(lc)
    config_path, _ = _config_arg(program_args)
    config_text = _read_config(config_path) if config_path else None
    say = "# " if dry_run else "launch: "  # a dry run's notes are YAML comments: its output stays YAML
    api = None
    kind = lc.job_kind
    if kind == "auto":
        try:
            api = connect()
            kind = served_kind(api)
        except LaunchError as unreachable:
            if not dry_run:
                raise
            print(f"{say}launch.job_kind=auto, but {unreachable}; showing the indexed Job", flush=True)
            kind = "Job"
    manifests = build_manifests(
        lc, program, program_args, kind=kind, name=name, environ=environ, config_text=config_text
    )
    withheld = sorted(k for k in forwarded_env(environ, lc.env) if SECRET_NAME.search(k))
    if withheld and not lc.secret_env:
        print(
            f"{say}{', '.join(withheld)} stay out of the manifests (secrets): give the pods a Kubernetes "
            "Secret with launch.secret_env",
            flush=True,
        )
    if dry_run:
        print(yaml.dump_all(manifests, Dumper=_ManifestDumper, sort_keys=False), end="", flush=True)
        return 0
    job = KubernetesJob(api or connect(), lc.namespace, KINDS[kind], name, _secret_values(environ))
    try:
        job.create(manifests)
        if on_job is not None:
            on_job(job.ref)
        job.follow()
    finally:
        with _signals_ignored():  # a second SIGTERM must not cut the deletion short
            job.delete()
    return 0


def build_manifests(
    lc: LaunchConfig,
    program: str,
    program_args: list[str],
    *,
    kind: str,
    name: str,
    environ: Mapping[str, str],
    config_text: str | None = None,
) -> list[dict[str, Any]]:
    """The objects of one launch as JSON-ready dicts, in the order they are created: the job (`kind`), the
    ConfigMap holding `config_text` (the file `--config` names in program_args, which the pods read at
    CONFIG_FILE instead) and, for the indexed Job, its headless Service.

    They are made with the client's models (V1Job, V1PodTemplateSpec, V1Container, ...); a TrainJob or a
    PyTorchJob wraps the same pod template in its operator's fields. `environ` gives the plain variables
    to forward; no value of a secret-named variable is written.
    """
    from kubernetes import client

    job_kind = KINDS[kind]
    labels = {"app.kubernetes.io/name": "lejepa", LAUNCH_LABEL: name}
    nnodes = lc.nnodes or 1
    cpu = rank_accelerator(lc) == "cpu"
    nproc = lc.nproc_per_node or (1 if cpu else lc.gpus_per_node or 1)
    port = lc.master_port or DEFAULT_PORT
    if config_text is not None:
        program_args = _config_arg(program_args, CONFIG_FILE)[1]

    torchrun = [
        PYTHON,
        "-u",
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
    ]
    if kind == "Job":  # the node rank comes from PET_NODE_RANK, below
        torchrun += [f"--master_addr={name}-0.{name}", f"--master_port={port}"]
    elif kind == "PyTorchJob":  # the operator sets both, and PET_NODE_RANK, on every pod
        torchrun += ["--master_addr=$(MASTER_ADDR)", "--master_port=$(MASTER_PORT)"]
    # (a TrainJob's runtime sets PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun reads)
    # --tee=3: every rank's lines reach the pod's log, each after its rank (RANK_PREFIX_ENV).
    torchrun += ["--tee=3", *(["-m", program] if not program.endswith(".py") else [program]), *program_args]
    if kind == "TrainJob" and lc.secret_env:
        torchrun = [PYTHON, "-m", "lejepa.train.kubernetes", SECRETS_DIR, *torchrun]

    plain = {
        k: v
        for k, v in forwarded_env(environ, lc.env).items()
        # PET_* are torchrun's settings, and DS_ACCELERATOR is the pods' (set below), not the launcher's
        if not SECRET_NAME.search(k) and not k.startswith("PET_") and k != "DS_ACCELERATOR"
    }
    plain.update(RANK_PREFIX_ENV)
    if cpu:
        plain["DS_ACCELERATOR"] = "cpu"
    if lc.cpus_per_task:
        plain["OMP_NUM_THREADS"] = str(lc.cpus_per_task)
    env = [client.V1EnvVar(name=k, value=v) for k, v in sorted(plain.items())]
    if kind == "Job":
        index = client.V1ObjectFieldSelector(field_path=COMPLETION_INDEX)
        env.append(client.V1EnvVar(name="PET_NODE_RANK", value_from=client.V1EnvVarSource(field_ref=index)))

    gpus = lc.gpus_per_node or (0 if cpu else nproc)
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    requests = dict(limits)
    if lc.cpus_per_task:
        requests["cpu"] = str(lc.cpus_per_task * nproc)
    if lc.memory:
        requests["memory"] = limits["memory"] = lc.memory

    volumes = [  # torch's data-loader workers and NCCL need more shared memory than a container's 64 MiB
        client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory"))
    ]
    mounts = [client.V1VolumeMount(name="dshm", mount_path="/dev/shm")]
    if config_text is not None:
        volumes.append(
            client.V1Volume(name="config", config_map=client.V1ConfigMapVolumeSource(name=f"{name}-config"))
        )
        mounts.append(client.V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True))
    env_from = None
    if kind == "TrainJob":
        for i, secret in enumerate(lc.secret_env):
            volumes.append(
                client.V1Volume(name=f"secret-{i}", secret=client.V1SecretVolumeSource(secret_name=secret))
            )
            mounts.append(
                client.V1VolumeMount(name=f"secret-{i}", mount_path=f"{SECRETS_DIR}/{secret}", read_only=True)
            )
    else:
        env_from = [
            client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=s)) for s in lc.secret_env
        ]

    container = client.V1Container(
        name=job_kind.container,
        image=lc.image,
        command=torchrun,
        env=env,
        env_from=env_from or None,
        resources=client.V1ResourceRequirements(requests=requests, limits=limits or None)
        if requests
        else None,
        ports=[
            client.V1ContainerPort(
                name="pytorchjob-port" if kind == "PyTorchJob" else "rendezvous", container_port=port
            )
        ],
        volume_mounts=mounts,
    )
    pod = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(labels=labels),
        spec=client.V1PodSpec(
            containers=[container],
            restart_policy="Never",  # a rank that died cannot rejoin: the run resumes from a checkpoint
            subdomain=name if kind == "Job" else None,
            service_account_name=lc.service_account,
            node_selector=lc.node_selector or None,
            tolerations=[_toleration(t) for t in lc.tolerations] or None,
            image_pull_secrets=[client.V1LocalObjectReference(name=s) for s in lc.image_pull_secrets] or None,
            volumes=volumes,
        ),
    )
    serialize = client.ApiClient().sanitize_for_serialization
    metadata = client.V1ObjectMeta(name=name, namespace=lc.namespace, labels=labels)
    if kind == "Job":
        job = serialize(
            client.V1Job(
                api_version="batch/v1",
                kind="Job",
                metadata=metadata,
                spec=client.V1JobSpec(
                    completion_mode="Indexed",
                    completions=nnodes,
                    parallelism=nnodes,
                    backoff_limit=0,
                    template=pod,
                ),
            )
        )
    elif kind == "PyTorchJob":
        replicas = {"Master": 1, "Worker": nnodes - 1}
        job = {
            "apiVersion": job_kind.api_version,
            "kind": kind,
            "metadata": serialize(metadata),
            "spec": {
                "nprocPerNode": str(nproc),
                "runPolicy": {"backoffLimit": 0},
                "pytorchReplicaSpecs": {
                    role: {"replicas": count, "restartPolicy": "Never", "template": serialize(pod)}
                    for role, count in replicas.items()
                    if count
                },
            },
        }
    else:
        job = _train_job(serialize(pod), serialize(metadata), lc.runtime_ref, nnodes, nproc)
    objects = [job]
    if config_text is not None:
        config_map = client.V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=client.V1ObjectMeta(name=f"{name}-config", namespace=lc.namespace, labels=labels),
            data={"config.yaml": config_text},
        )
        objects.append(serialize(config_map))
    if kind == "Job":
        service = client.V1Service(
            api_version="v1",
            kind="Service",
            metadata=metadata,
            spec=client.V1ServiceSpec(
                cluster_ip="None",  # headless: DNS names the pods themselves
                selector={LAUNCH_LABEL: name},
                publish_not_ready_addresses=True,  # node 0's name resolves before its readiness
                ports=[client.V1ServicePort(name="rendezvous", port=port, target_port=port)],
            ),
        )
        objects.append(serialize(service))
    return objects


def _train_job(
    pod: dict[str, Any], metadata: dict[str, Any], runtime: str, nnodes: int, nproc: int
) -> dict[str, Any]:
    """A TrainJob running `pod`'s container: its API takes the image, command, environment and resources
    as `trainer` fields, and the pod's other settings as a podTemplateOverride of the runtime's `node`
    job (one that cannot hold envFrom, hence the Secrets as volumes)."""
    spec = pod["spec"]
    container = spec["containers"][0]
    override = {
        k: spec[k]
        for k in ("serviceAccountName", "nodeSelector", "tolerations", "imagePullSecrets")
        if k in spec
    }
    override["volumes"] = spec["volumes"]
    override["containers"] = [{"name": "node", "volumeMounts": container["volumeMounts"]}]
    trainer = {
        "image": container["image"],
        "command": container["command"],
        "env": container["env"],
        "numNodes": nnodes,
        "numProcPerNode": nproc,
    }
    if container.get("resources"):
        trainer["resourcesPerNode"] = container["resources"]
    return {
        "apiVersion": KINDS["TrainJob"].api_version,
        "kind": "TrainJob",
        "metadata": metadata,
        "spec": {
            "runtimeRef": {"name": runtime},
            "trainer": trainer,
            "podTemplateOverrides": [
                {"targetJobs": [{"name": "node"}], "metadata": pod["metadata"], "spec": override}
            ],
        },
    }


def job_name(lc: LaunchConfig) -> str:
    """A fresh name for this launch's job: launch.job_name and a random suffix."""
    if not _JOB_NAME.fullmatch(lc.job_name):
        raise LaunchError(
            f"launch.job_name={lc.job_name!r} cannot name a Kubernetes job: write at most 40 lower-case "
            "letters, digits and '-', starting with a letter (e.g. lejepa-pretrain)"
        )
    return f"{lc.job_name}-{uuid.uuid4().hex[:6]}"


def connect() -> ApiClient:
    """An API client configured from inside the cluster (in a pod: KUBERNETES_SERVICE_HOST is set), else
    from the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            # KUBECONFIG as it is now: the client reads it once, when first imported.
            kubeconfig = os.environ.get("KUBECONFIG") or "~/.kube/config"
            config.load_kube_config(kubeconfig, client_configuration=configuration, persist_config=False)
    except (config.ConfigException, OSError) as exc:
        raise LaunchError(
            f"launch.mode=kubernetes found no Kubernetes config ({exc}): run in a pod of the cluster, or "
            "point KUBECONFIG at a kubeconfig"
        ) from None
    return client.ApiClient(configuration)


def served_kind(api: ApiClient) -> str:
    """TrainJob where the cluster serves trainer.kubeflow.org's trainjobs, else PyTorchJob where it serves
    kubeflow.org's pytorchjobs, else Job. Asks the discovery API, which every account may read."""
    from kubernetes import client

    for kind in ("TrainJob", "PyTorchJob"):
        k = KINDS[kind]
        try:
            what = f"ask whether the cluster serves {k.api_version}"
            found = _call(api, what, client.CustomObjectsApi(api).get_api_resources, k.group, k.version)
        except _NotFound:
            continue
        if any(r.get("name") == k.plural for r in found.get("resources", [])):
            return kind
    return "Job"


def job_alive(job: Mapping[str, str]) -> bool:
    """Whether a job a launch created (its `on_job` reference) still exists and has not finished; True when
    the cluster cannot be asked (it may be running)."""
    kind = KINDS[job.get("kind", "Job")]
    try:
        found = _get(connect(), kind, job["namespace"], job["name"])
    except _NotFound:
        return False
    except LaunchError:
        return True
    return _finished(found) is None


class KubernetesJob:
    """One launch's job in the cluster: created with its ConfigMap and Service, followed to its end with
    every pod's log streamed, and deleted with all it owns."""

    def __init__(
        self,
        api: ApiClient,
        namespace: str,
        kind: JobKind,
        name: str,
        secrets: list[str],
        poll_s: float = 2.0,
    ) -> None:
        self.api, self.namespace, self.kind, self.name = api, namespace, kind, name
        self.secrets, self.poll_s = secrets, poll_s
        self.ref: JobRef = {
            "scheduler": "kubernetes",
            "namespace": namespace,
            "name": name,
            "kind": kind.kind,
        }
        self.created: list[dict[str, Any]] = []
        self.logs: dict[str, deque[str]] = {}  # each pod's last lines, for the failure's one line
        self._followers: dict[str, threading.Thread] = {}
        self._phases: dict[str, str] = {}
        self._printing = threading.Lock()
        self._stopping = threading.Event()

    def create(self, manifests: list[dict[str, Any]]) -> None:
        """Create the job, then what it owns (so Kubernetes deletes them with it)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api)
        job, *owned = manifests
        k = self.kind
        what = f"create {k.kind} {self.name} in namespace {self.namespace}"
        if k.kind == "Job":
            create = client.BatchV1Api(self.api).create_namespaced_job
            made = _call(self.api, what, create, self.namespace, job)
        else:
            create = client.CustomObjectsApi(self.api).create_namespaced_custom_object
            made = _call(self.api, what, create, k.group, k.version, self.namespace, k.plural, job)
        self.created.append(job)
        owner = {
            "apiVersion": k.api_version,
            "kind": k.kind,
            "name": self.name,
            "uid": made["metadata"]["uid"],
        }
        for manifest in owned:
            manifest = {**manifest, "metadata": {**manifest["metadata"], "ownerReferences": [owner]}}
            is_config = manifest["kind"] == "ConfigMap"
            create = core.create_namespaced_config_map if is_config else core.create_namespaced_service
            what = f"create the {manifest['kind']} {manifest['metadata']['name']}"
            _call(self.api, what, create, self.namespace, manifest)
            self.created.append(manifest)
        print(f"launch: created {self.kind.kind} {self.namespace}/{self.name}", flush=True)

    def follow(self, patience: float = 300.0) -> None:
        """Stream every pod's log until the job ends; raise LaunchFailed unless it completed. An API server
        that does not answer is asked again for `patience` seconds (a control plane restarting) first."""
        noted: set[str] = set()
        trouble: float | None = None
        while True:
            try:
                job = _get(self.api, self.kind, self.namespace, self.name)
                pods = self._pods()
            except _NotFound:
                raise LaunchFailed(f"{self.kind.kind} {self.name} was deleted while it ran", 1) from None
            except LaunchError as error:
                if trouble is None:
                    trouble = time.monotonic()
                    print(f"warning: {error}; asking again for up to {patience:g} s", flush=True)
                elif time.monotonic() - trouble > patience:
                    raise
                time.sleep(self.poll_s)
                continue
            trouble = None
            state = _finished(job)
            for pod in pods:
                self._watch(pod, noted)
            if state is not None:
                break
            time.sleep(self.poll_s)
        for follower in self._followers.values():  # a finished pod's log ends by itself
            follower.join(timeout=30)
        if state == "Failed":
            raise LaunchFailed(*self._failure(job))

    def delete(self, timeout: float = 300.0) -> None:
        """Delete the job (foreground: its pods first) and what it owns; wait until the job is gone."""
        if not self.created:
            return
        from kubernetes import client

        self._stopping.set()
        core, k = client.CoreV1Api(self.api), self.kind
        try:
            for manifest in self.created:  # the job first; what it owns goes with it, and these make sure
                name = manifest["metadata"]["name"]
                what = f"delete the {manifest['kind']} {name}"
                try:
                    if manifest["kind"] == "ConfigMap":
                        _call(self.api, what, core.delete_namespaced_config_map, name, self.namespace)
                    elif manifest["kind"] == "Service":
                        _call(self.api, what, core.delete_namespaced_service, name, self.namespace)
                    elif k.kind == "Job":
                        delete = client.BatchV1Api(self.api).delete_namespaced_job
                        _call(self.api, what, delete, name, self.namespace, propagation_policy="Foreground")
                    else:
                        delete = client.CustomObjectsApi(self.api).delete_namespaced_custom_object
                        args = (k.group, k.version, self.namespace, k.plural, name)
                        _call(self.api, what, delete, *args, propagation_policy="Foreground")
                except _NotFound:
                    pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    _get(self.api, k, self.namespace, self.name)
                except _NotFound:
                    print(f"launch: deleted {k.kind} {self.namespace}/{self.name}", flush=True)
                    return
                time.sleep(1.0)
            print(f"warning: {k.kind} {self.name} still exists {timeout:g} s after its deletion", flush=True)
        except LaunchError as error:
            print(
                f"warning: {error}: delete it with kubectl delete {k.plural}.{k.group} {self.name} "
                f"-n {self.namespace}",
                flush=True,
            )

    def _pods(self) -> list[dict[str, Any]]:
        from kubernetes import client

        found = _call(
            self.api,
            f"list the pods of {self.kind.kind} {self.name}",
            client.CoreV1Api(self.api).list_namespaced_pod,
            self.namespace,
            label_selector=f"{LAUNCH_LABEL}={self.name}",
        )
        return found.get("items", [])

    def _watch(self, pod: dict[str, Any], noted: set[str]) -> None:
        """Start following a pod's log once it has one; fail on a pod that cannot start; say why one waits."""
        name, status = pod["metadata"]["name"], pod.get("status", {})
        phase = self._phases[name] = status.get("phase", "Pending")
        if phase in ("Running", "Succeeded", "Failed") and name not in self._followers:
            self.logs[name] = deque(maxlen=2000)
            follower = threading.Thread(
                target=self._follow_log, args=(name,), name=f"log-{name}", daemon=True
            )
            self._followers[name] = follower
            follower.start()
        for container in status.get("containerStatuses", []):
            waiting = container.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in _CANNOT_START:
                reason = waiting["reason"]
                raise LaunchFailed(
                    f"pod {name} (node {_node_rank(pod)}) cannot start: {reason}: "
                    f"{waiting.get('message', 'no message')}: {_CANNOT_START[reason]}",
                    1,
                )
        for condition in status.get("conditions", []):
            if condition.get("reason") == "Unschedulable" and name not in noted:
                noted.add(name)
                print(f"launch: pod {name} waits for a node: {condition.get('message', '')}", flush=True)

    def _follow_log(self, pod: str) -> None:
        """Print a pod's log as it grows, each line once: a dropped stream is read again from the start and
        the lines up to the last one printed (by their timestamps) are skipped."""
        import urllib3
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        core, last = client.CoreV1Api(self.api), ""
        while not self._stopping.is_set():
            try:
                stream = core.read_namespaced_pod_log(
                    pod,
                    self.namespace,
                    container=self.kind.container,
                    follow=True,
                    timestamps=True,
                    _preload_content=False,
                    _request_timeout=(30, 600),
                )
                try:
                    for raw in stream:
                        stamp, _, text = raw.decode(errors="replace").rstrip("\r\n").partition(" ")
                        key = _stamp_key(stamp)
                        if key is not None and key <= last:
                            continue
                        last = key or last
                        with self._printing:
                            _emit(f"{pod}: {text}", self.secrets, self.logs[pod])
                finally:
                    stream.release_conn()
            except ApiException as error:
                if error.status == 404:  # the pod is gone
                    return
            except (urllib3.exceptions.HTTPError, OSError):
                pass  # a dropped connection: read again
            if self._phases.get(pod) in ("Succeeded", "Failed"):
                return
            time.sleep(1.0)

    def _failure(self, job: dict[str, Any]) -> tuple[str, int]:
        """One line naming the pod that failed first, its rank and its error; and its exit status."""
        failed = []
        for pod in self._pods():
            name = pod["metadata"]["name"]
            for container in pod.get("status", {}).get("containerStatuses", []):
                ended = container.get("state", {}).get("terminated") or {}
                if container.get("name") == self.kind.container and ended.get("exitCode"):
                    failed.append((ended.get("finishedAt") or "", name, ended, pod))
        if not failed:
            why = next(
                (c for c in job.get("status", {}).get("conditions", []) if c.get("type") == "Failed"), {}
            )
            return (
                f"{self.kind.kind} {self.name} failed: {why.get('reason', 'no reason given')}: "
                f"{why.get('message', 'no message')}",
                1,
            )
        _, name, ended, pod = min(failed, key=lambda item: item[0])
        code = int(ended["exitCode"])
        said = [line.removeprefix(f"{name}: ") for line in self.logs.get(name, [])]
        detail = f"pod {name} (node {_node_rank(pod)}): {rank_error(said, code)}"
        if ended.get("reason") == "OOMKilled":
            detail += "; the pod ran out of memory: raise launch.memory"
        return detail, code


class _ManifestDumper(yaml.SafeDumper):
    """YAML as kubectl users write it: a multi-line text (the ConfigMap's config file) as a block."""


_ManifestDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


class _NotFound(Exception):
    """The API answered 404."""


@contextlib.contextmanager
def _api_errors(api: ApiClient, what: str) -> Iterator[None]:
    """Turn the client's errors into one line: LaunchError for an API that cannot be reached or refuses,
    _NotFound for a 404 (which callers expect)."""
    import urllib3
    from kubernetes.client.exceptions import ApiException

    try:
        yield
    except ApiException as error:
        if error.status == 404:
            raise _NotFound(what) from None
        try:
            said = json.loads(error.body or "{}").get("message") or error.reason
        except ValueError:
            said = error.reason
        hint = (
            ": the launcher's service account needs RBAC for it (docs/kubernetes.md)"
            if error.status == 403
            else ""
        )
        raise LaunchError(f"Kubernetes refused to {what}: {error.status} {said}{hint}") from None
    except urllib3.exceptions.HTTPError as error:
        reason = getattr(error, "reason", None) or error
        raise LaunchError(
            f"cannot reach the Kubernetes API at {api.configuration.host} to {what} ({reason}): check the "
            "kubeconfig's server and the network"
        ) from None


def _call(api: ApiClient, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """An API call's answer as plain JSON (every kind alike, custom resources included); its failure as
    one line that says `what` it was for (see _api_errors)."""
    with _api_errors(api, what):
        return json.loads(call(*args, _preload_content=False, **kwargs).data or b"{}")


def _get(api: ApiClient, kind: JobKind, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    what = f"read {kind.kind} {name}"
    if kind.kind == "Job":
        return _call(api, what, client.BatchV1Api(api).read_namespaced_job, name, namespace)
    read = client.CustomObjectsApi(api).get_namespaced_custom_object
    return _call(api, what, read, kind.group, kind.version, namespace, kind.plural, name)


def _finished(job: dict[str, Any]) -> str | None:
    """'Complete' or 'Failed' once the job has ended (a PyTorchJob says Succeeded), else None."""
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Succeeded", "Failed"):
            return "Failed" if condition["type"] == "Failed" else "Complete"
    return None


def _node_rank(pod: dict[str, Any]) -> str:
    """The node a pod is: its completion index (Job, TrainJob), or Master 0 and Worker i+1 (PyTorchJob)."""
    metadata = pod["metadata"]
    index = (metadata.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
    if index is not None:
        return index
    labels = metadata.get("labels") or {}
    replica = labels.get("training.kubeflow.org/replica-index")
    if replica is None:
        return "?"
    return str(int(replica) + (labels.get("training.kubeflow.org/replica-type") == "worker"))


def _stamp_key(stamp: str) -> str | None:
    """A log line's RFC 3339 timestamp in a form that sorts as time does (the kubelet trims the fraction's
    trailing zeros), or None when the line has none."""
    if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", stamp):
        return None
    seconds, _, fraction = stamp[:-1].partition(".")
    return f"{seconds}.{fraction.ljust(9, '0')}"


def _config_arg(program_args: list[str], replace: str | None = None) -> tuple[str | None, list[str]]:
    """The file `--config FILE` names in program_args, and the arguments with FILE set to `replace`."""
    args = list(program_args)
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            path = args[i + 1]
            if replace is not None:
                args[i + 1] = replace
            return path, args
    return None, args


def _read_config(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise LaunchError(f"cannot read the ranks' config file {path} ({exc.strerror})") from None


def _toleration(item: dict[str, Any]) -> Any:
    from kubernetes import client

    return client.V1Toleration(
        key=item.get("key"),
        operator=item.get("operator"),
        value=item.get("value"),
        effect=item.get("effect"),
        toleration_seconds=item.get("tolerationSeconds"),
    )


def exec_with_secret_files(argv: list[str]) -> NoReturn:
    """`python -m lejepa.train.kubernetes DIR COMMAND [ARGS...]`, a TrainJob's pod: export every file of the
    Secret folders in DIR as a variable named like the file (as envFrom would), then become COMMAND."""
    directory, *command = argv
    env = dict(os.environ)
    for secret in sorted(Path(directory).iterdir()):
        for item in sorted(secret.iterdir()):  # Kubernetes' own ..data entries start with a dot
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item.name) and item.is_file():
                env[item.name] = item.read_text()
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    exec_with_secret_files(sys.argv[1:])
