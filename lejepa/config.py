"""One typed config for the whole pipeline: a section per stage, YAML in, `--set key=value` overrides.

Every section is a pydantic model with defaults that run on a laptop CPU with Fashion-MNIST. An invalid
value fails with the dotted name of the field, e.g. ``views.global_views: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
)
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    # Unknown keys are typos, not extensions: reject them so a misspelt option never silently does nothing.
    # A field's docstring is its description: the Prefect UI's form and docs/configuration.md show it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# Values that reach an sbatch script, a shell or a store path must match an allow-list pattern in full:
# then no newline, blank, quote, `$`, `;` or `/` in one can start another command, option or folder.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A Slurm partition, account or job name, or one folder of a store path (so never '.' or '..')."""
NAME_RULE = "write letters, digits, '.', '_' and '-' only, starting with a letter or digit"
LOCAL_PATH = re.compile(r"[A-Za-z0-9._/+@-]+")
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|(?i:unlimited|infinite)")
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9])?)*")
SBATCH_OPTION = re.compile(r"--([a-z-]+)(=[A-Za-z0-9._:,@+/=|&*\[\]-]+)?")
SBATCH_OPTIONS = (
    "begin comment constraint contiguous cores-per-socket cpus-per-gpu deadline dependency distribution "
    "exclude exclusive gpu-bind gpus gpus-per-task gres gres-flags hint licenses mail-type mail-user mem "
    "mem-bind mem-per-cpu mem-per-gpu mincpus nice no-requeue nodelist ntasks-per-core ntasks-per-socket "
    "overcommit oversubscribe qos requeue reservation signal sockets-per-node switches threads-per-core "
    "time-min tmp wckey"
).split()
"""What extra_sbatch may add: resources and scheduling. Options that pick files (--output, --chdir), the
job's environment (--export) or its identity (--uid) would let a config run or overwrite things."""
SSH_KEYS = (
    "AddressFamily BatchMode CheckHostIP Compression ConnectionAttempts ConnectTimeout GlobalKnownHostsFile "
    "IdentitiesOnly IdentityFile LogLevel PasswordAuthentication Port PubkeyAuthentication "
    "ServerAliveCountMax ServerAliveInterval StrictHostKeyChecking User UserKnownHostsFile"
).split()
"""What `ssh -o KEY=VALUE` may set; never a key that runs a command (ProxyCommand, LocalCommand,
KnownHostsCommand), hops through another host (ProxyJump) or loads code (PKCS11Provider)."""
SSH_SWITCHES = ("-4", "-6", "-C", "-q", "-v")
SSH_ARGUMENTS = {
    "-o": re.compile(rf"(?i:{'|'.join(SSH_KEYS)})=[A-Za-z0-9._/+@:,-]+"),
    "-i": LOCAL_PATH,
    "-F": LOCAL_PATH,
    "-p": re.compile(r"\d{1,5}"),
    "-l": NAME,
}
"""The ssh flags that take a value, and the values each accepts."""
# Kubernetes' own name rules (DNS-1123 labels and subdomains, label keys and values, quantities), and a
# container image reference: values that reach a manifest must be what the API server itself accepts.
K8S_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
K8S_SUBDOMAIN = re.compile(rf"(?=.{{1,253}}$){K8S_LABEL.pattern}(\.{K8S_LABEL.pattern})*")
K8S_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
K8S_LABEL_KEY = re.compile(rf"({K8S_SUBDOMAIN.pattern}/)?(?=.)({K8S_LABEL_VALUE.pattern})")
K8S_QUANTITY = re.compile(r"\d+(\.\d+)?([KMGTPE]i|[kMGTPE])?")
IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,499}")
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")


def _refused(value: object, what: str) -> PydanticCustomError:
    """The error of a config value that is not `what` (e.g. "a Slurm partition: write ..."), quoting it."""
    return PydanticCustomError("unsafe_value", "{value} is not {what}", {"value": repr(value), "what": what})


def _folder_name(value: str) -> str:
    if not NAME.fullmatch(value):
        raise _refused(value, f"a folder name: {NAME_RULE} (it names a folder in the store)")
    return value


FolderName = Annotated[str, AfterValidator(_folder_name)]
"""A name the pipeline joins into store paths ({root}/runs/{run_name}, ...): one plain path segment."""


TIMM_WEIGHT_ARGUMENTS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
"""Arguments of timm.create_model that load weights from the hub or from a file (which older timm
unpickles): never passed, so weights come only from our own safetensors."""


def no_weight_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for timm.create_model, if none of them would make timm load weights (else ValueError)."""
    named = [key for key in TIMM_WEIGHT_ARGUMENTS if key in kwargs]
    if named:
        raise ValueError(
            f"{', '.join(named)} would make timm load weights from the hub or a file: remove it "
            "(weights come from pretrain.init_from or a release's safetensors)"
        )
    return kwargs


TimmArguments = Annotated[dict[str, Any], AfterValidator(no_weight_arguments)]


class ModelConfig(Section):
    backbone: str = "resnet18"
    """Any timm model name; created with pretrained=False."""
    proj_dim: int = Field(128, gt=0)
    proj_hidden_dim: int = Field(2048, gt=0)
    proj_layers: int = Field(3, ge=1)
    """Number of Linear layers in the projector (Linear-BN-GELU blocks, then a final Linear)."""
    backbone_kwargs: TimmArguments = Field(default_factory=dict)
    """Extra keyword arguments passed to timm.create_model (e.g. patch_size for a ViT); none that loads
    weights."""
    small_input: bool = False
    """Give a ResNet or ConvNeXt a 3x3 stride-1 stem (CIFAR-style) so 28-32 px images keep their detail."""


class ViewsConfig(Section):
    global_views: int = Field(2, gt=0)
    local_views: int = Field(6, ge=0)
    global_size: int | None = Field(None, gt=0)
    """Side of a global view in pixels; None scales it from the dataset's resolution."""
    local_size: int | None = Field(None, gt=0)
    global_scale: tuple[float, float] = (0.3, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.3)
    on_device: bool = False
    """Make the views on the training device from the decoded uint8 batch instead of in the loader's
    workers: for large images on GPUs, whose CPU-side augmentation would starve them."""


class LossConfig(Section):
    lamb: float = Field(0.05, ge=0.0, le=1.0)
    """Trade-off between SIGReg (lamb) and the prediction loss (1 - lamb); the paper's default is 0.05."""
    num_slices: int = Field(1024, gt=0)
    knots: int = Field(17, ge=3)
    t_max: float = Field(3.0, gt=0.0)


CREDENTIAL_FIELDS = ("access_key_id", "secret_access_key", "session_token")
"""The `storage` fields that hold secrets: never written to files, parameters, artifacts or logs."""
SECRET_NAME = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)
"""What names a secret: an entry of storage.options (at any depth), or a variable forwarded to ranks."""
MASK = "**********"
"""How pydantic writes a SecretStr in JSON, and so how Prefect stores and shows one."""
REDACTED = "**redacted**"
"""What written configs (config.json, metrics.json, model cards) hold in place of a secret."""
MASKS = (MASK, REDACTED)
SECRETS_ENV = "LEJEPA_STORAGE_SECRETS"
"""The variable in which the pretrain launcher hands its ranks the storage secrets (storage_secrets, as JSON),
since the config file they read holds none. lejepa.store.storage fills what the config leaves blank
from it."""


def replace_secrets(options: dict[str, Any], replace: Callable[[Any], Any]) -> dict[str, Any]:
    """A copy of `options` with each entry named by SECRET_NAME (at any depth) set to replace(value), or
    left out where that is None."""
    copied: dict[str, Any] = {}
    for key, value in options.items():
        if SECRET_NAME.search(str(key)):
            value = replace(value)
        elif isinstance(value, dict):
            value = replace_secrets(value, replace)
        if value is not None:
            copied[key] = value
    return copied


class StorageConfig(Section):
    root: str = "./lejepa-store"
    """Where every stage reads and writes: a local path, file://..., or s3://bucket/prefix."""
    endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, moto); None uses AWS_ENDPOINT_URL or AWS itself."""
    region: str | None = None
    """S3 region; None uses AWS_DEFAULT_REGION / the profile's region."""
    profile: str | None = None
    """AWS profile name from ~/.aws; None uses AWS_PROFILE or the default chain."""
    access_key_id: SecretStr | None = None
    """Explicit S3 credentials; None falls back to AWS_ACCESS_KEY_ID and the standard chain. The three
    credentials are never shown: repr, JSON (Prefect parameters), logs and written files mask or omit them."""
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    """Extra fsspec storage options passed as-is (e.g. {"default_block_size": 8388608}). Entries whose name
    matches SECRET_NAME, at any depth (key, secret, client_kwargs.aws_secret_access_key, ...), are secrets
    like the credentials: masked in JSON, left out of every written file."""

    @field_validator(*CREDENTIAL_FIELDS, mode="before")
    @classmethod
    def _unmask_credential(cls, value: Any) -> Any:
        # A mask read back (a stored Prefect parameter, a written config) means: not given here.
        return None if isinstance(value, str) and value in MASKS else value

    @field_validator("options")
    @classmethod
    def _unmask_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        return replace_secrets(options, lambda value: None if value in MASKS else value)

    @field_serializer("options", when_used="json")
    def _mask_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return replace_secrets(options, lambda value: MASK)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, replace_secrets(value, lambda secret: MASK) if name == "options" else value


class DataConfig(Section):
    source: Literal["fashion-mnist", "digits", "imagefolder", "webdataset", "huggingface"] = "fashion-mnist"
    """Where images come from; see lejepa.data.sources for what each one reads."""
    path: str | None = None
    """Source location (local path or URL); None uses the source's default (fashion-mnist: Debian's). For
    huggingface: a `save_to_disk` folder, Parquet files (a folder, a file or a glob), or
    hf://datasets/OWNER/NAME for a dataset on the hub."""
    image_column: str = "image"
    """huggingface: the column holding the images (an Image feature, or encoded image bytes)."""
    label_column: str | None = None
    """huggingface: the column holding the class labels (a ClassLabel, integers or strings); None:
    unlabelled."""
    name: FolderName | None = None
    """Dataset name in the store ({root}/datasets/{name}/...); None uses the source's name."""
    manifest: str | None = None
    """The exact dataset every stage reads: the URL of a committed manifest.json. When set, nothing is
    resolved again; when None, the pipeline and the pretrain stage resolve it once (the source's own dataset,
    else the latest of `name`) and set it for every rank and later stage."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Seeded hold-out of the train split that becomes the `val` split: a sample is in it when a hash of its
    own id (seeded by split_seed) falls below this fraction, so its split never depends on other samples."""
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Seeded hold-out that becomes `test` (the next hash interval after val_fraction), only for sources
    without a test split of their own."""
    split_seed: int = 0
    """Seed of the hold-outs and of the sample order inside shards."""
    image_size: int | None = Field(None, gt=0)
    """Side the loaders resize/crop to; None uses the most common size of the train split."""
    mode: Literal["auto", "L", "RGB"] = "auto"
    """Channels the loaders decode to; auto is RGB when any image is colour, else L (grey)."""
    limit: int | None = Field(None, gt=0)
    """Use only the first `limit` samples of each source split (quick runs and tests)."""


class ShardConfig(Section):
    samples_per_shard: int = Field(2048, gt=0)
    """Samples per tar shard; one shard is one independently writable group of work."""
    workers: int | None = Field(None, ge=1)
    """Processes writing shard groups; None uses every core."""
    start_method: Literal["auto", "spawn", "fork", "forkserver"] = "auto"
    """How worker processes start; auto forks when source and store are local (cheap), else spawns
    (s3fs holds threads and sockets a forked child must not inherit)."""
    png_compress_level: int = Field(1, ge=0, le=9)
    """zlib level for raw pixels (fashion-mnist, digits) encoded to PNG; lossless at any level."""


class PretrainConfig(Section):
    run_name: FolderName = "default"
    """The run's folder is {storage.root}/runs/{run_name}; starting a run with the same name resumes it."""
    init_from: str | None = None
    """Warm start: a published release or run folder (with encoder.safetensors, and projector.safetensors
    when present) whose weights initialise a new run; a resumed run loads its checkpoint instead."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to train for; when None, `epochs` sets the budget."""
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(128, gt=0)
    """Images per rank per micro-step (each image gives global_views + local_views views)."""
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate of AdamW after the linear warm-up; a cosine decays it to lr * min_lr_ratio."""
    min_lr_ratio: float = Field(1e-3, ge=0, le=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    """None picks the paper's setting: 5e-2 for ViTs, 5e-4 for ConvNets and ResNets."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip; 0 turns clipping off."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "native", "fp32", "bf16"] = "auto"
    """auto: bf16 on CUDA, fp32 on the CPU. native: bf16 also on a CPU with AVX512-BF16 or AMX, where the
    tuned ResNet-10 step ran ~1.6x faster (infra/cpu.yaml and the demo use it); see lejepa.train.precision.
    Master weights, the optimizer and the loss stay float32."""
    num_workers: int = Field(1, ge=0)
    """Data-loader worker processes per rank (decoding and the multi-crop views run there)."""
    time_budget_s: float | None = Field(None, gt=0)
    """Seconds of training steps (start-up, checkpoints and export aside). The step count is re-estimated
    from the pace at every log line, and the learning-rate schedule follows it, so a run ends on time on a
    slower or faster machine; max_steps or epochs is then an upper bound."""
    checkpoint_every: int = Field(100, gt=0)
    log_every: int = Field(10, gt=0)
    online_probe: bool = True
    """Train a linear classifier on detached embeddings to report accuracy while training (labelled data)."""
    deepspeed_config: str | None = None
    """Path of a raw DeepSpeed JSON config whose keys override the generated ones."""


class LaunchConfig(Section):
    mode: Literal["local", "hostfile", "slurm", "kubernetes"] = "local"
    """Where the ranks run: this machine, the hosts of a hostfile (DeepSpeed's launcher), a Slurm job, or a
    Kubernetes job (see lejepa.train.kubernetes)."""
    nproc_per_node: int | None = Field(None, gt=0)
    """Ranks per node; None: one per GPU, else 2 on a CPU-only machine (local), the hostfile's slots
    (hostfile), gpus_per_node or 1 (slurm, kubernetes)."""
    accelerator: Literal["auto", "cuda", "cpu"] = "auto"
    """cpu sets DS_ACCELERATOR=cpu on every rank (gloo); auto is cuda when this machine sees a GPU
    (slurm: when gpus_per_node is set)."""
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    """Process launcher of local mode; torchrun prefixes every output line with its rank."""
    master_addr: str | None = None
    """Address of the node of rank 0; None: 127.0.0.1 (local), the hostfile's first host (hostfile), the
    allocation's first node (slurm). Required with no_ssh."""
    master_port: int | None = Field(None, gt=0, lt=65536)
    """Rendezvous port; None picks a free one on this machine (slurm: derived from the job id; kubernetes:
    29500 on node 0's pod, or what a TrainJob's runtime sets). Required with no_ssh, where every node's
    launcher must name the same port."""
    hostfile: str | None = None
    """MPI-style hostfile for hostfile mode, one `host slots=N` per line (see infra/hostfile.example)."""
    multinode_launcher: Literal["pdsh", "openmpi", "mpich", "impi", "mvapich"] = "pdsh"
    """DeepSpeed's backend that starts the per-node launchers in hostfile mode (pdsh runs them over ssh)."""
    no_ssh: bool = False
    """Hostfile mode without ssh: run the launcher on every node yourself (one agent per node, e.g. from a
    scheduler), each with its node_rank and the same master_addr and master_port."""
    node_rank: int | None = Field(None, ge=0)
    """This node's index in the hostfile (0 = the node of rank 0); required with no_ssh."""
    nnodes: int | None = Field(None, gt=0)
    """Nodes to use: the hostfile's first nnodes hosts (None: all), or the nodes Slurm allocates or the
    Kubernetes pods (None: 1)."""
    ssh_port: int | None = Field(None, gt=0, lt=65536)
    """Port of sshd on the hosts (hostfile mode with pdsh); None uses ssh's default or ssh_config."""
    ssh_options: list[str] = Field(default_factory=list)
    """Extra ssh arguments for every connection, e.g. ["-F", "/etc/lejepa/ssh_config"] or ["-i", "KEY"]: only
    -o KEY=VALUE with a KEY of SSH_KEYS, -i, -F, -p, -l and -4/-6/-C/-q/-v (nothing that runs a command)."""
    env: list[str] = Field(default_factory=list)
    """Environment variables forwarded to remote hostfile ranks besides AWS_* and DS_ACCELERATOR; NAME or
    PREFIX_*. Those named like a secret (SECRET_NAME) travel in a file only the user can read, the others in
    DeepSpeed's .deepspeed_env (see lejepa.train.launch); secret values are masked in all output."""
    partition: str | None = None
    """Slurm partition (sbatch --partition); None uses the cluster's default."""
    account: str | None = None
    """Slurm account to charge (sbatch --account)."""
    time: str | None = None
    """Slurm time limit, e.g. "04:00:00" or "2-00:00:00"; None uses the partition's default."""
    gpus_per_node: int | None = Field(None, ge=0)
    """GPUs Slurm allocates on each node (kubernetes: each pod's nvidia.com/gpu); None or 0 runs a CPU job."""
    cpus_per_task: int | None = Field(None, gt=0)
    """CPU cores per rank in a Slurm job (kubernetes: each pod requests this times its ranks); also the
    ranks' OMP_NUM_THREADS."""
    extra_sbatch: list[str] = Field(default_factory=list)
    """More sbatch options, one per item, written as `#SBATCH <item>` (e.g. "--exclusive", "--qos=high"); the
    options of SBATCH_OPTIONS only."""
    job_name: str = "lejepa-pretrain"
    """Slurm job name; also names the generated script and its log. Kubernetes: the start of the job's name
    (lower-case letters, digits and '-')."""
    slurm_dir: str = "slurm"
    """Directory (on the shared file system) for the generated sbatch script and the job's log."""
    wait: bool = True
    """Slurm: follow the job to its end (through requeues), streaming its log; False only submits."""
    requeue_on_timeout: bool = False
    """Slurm: a job about to reach launch.time requeues itself (its ranks commit a checkpoint) and comes
    back to resume, until the run is done; False lets it end at the time limit (run the stage again)."""
    timeout_signal_s: int = Field(120, ge=10)
    """With requeue_on_timeout: seconds before the time limit at which the job requeues itself (Slurm's
    --signal=B:USR1@N; Slurm may signal up to a minute early)."""
    image: str | None = None
    """Kubernetes: the ranks' container image, with this package installed (e.g.
    registry.example.com/lejepa:0.1.0); required in that mode."""
    namespace: str = "default"
    """Kubernetes namespace of the job, its pods, its ConfigMap and its Service."""
    job_kind: Literal["auto", "TrainJob", "PyTorchJob", "Job"] = "auto"
    """Kubernetes object that runs the ranks; auto: a Kubeflow Trainer TrainJob where the cluster serves that
    API, else a training operator PyTorchJob where it serves that one, else an indexed batch/v1 Job."""
    runtime_ref: str = "torch-distributed"
    """The ClusterTrainingRuntime a TrainJob runs on (Kubeflow Trainer's PyTorch runtime by default)."""
    service_account: str | None = None
    """Kubernetes service account of the rank pods; None uses the namespace's default."""
    secret_env: list[str] = Field(default_factory=list)
    """Names of Kubernetes Secrets in the namespace whose keys become environment variables of every rank
    pod (e.g. one holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY). The manifests only name them: on
    Kubernetes the storage secrets reach the ranks this way, never from the launcher's environment."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Kubernetes Secrets with the registry credentials that pull `image` (imagePullSecrets)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels the rank pods must run on, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}."""
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    """Kubernetes tolerations of the rank pods, as in a pod spec, e.g. [{"key": "nvidia.com/gpu", "operator":
    "Exists", "effect": "NoSchedule"}]: the fields key, operator, value, effect and tolerationSeconds."""
    memory: str | None = None
    """Kubernetes memory request and limit of each rank pod, e.g. "64Gi"; None sets none."""

    @field_validator("partition", "account", "job_name")
    @classmethod
    def _slurm_name(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not NAME.fullmatch(value):
            raise _refused(value, f"a Slurm {info.field_name.replace('_', ' ')}: {NAME_RULE}")
        return value

    @field_validator("time", mode="before")
    @classmethod
    def _slurm_time(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            # YAML reads an unquoted 90 as a number, and 30:00 as the number 1800: guessing would be wrong.
            raise _refused(value, 'text: quote the time limit, e.g. launch.time="90" or "04:00:00"')
        if isinstance(value, str) and not SLURM_TIME.fullmatch(value):
            raise _refused(
                value,
                "a Slurm time limit: write MINUTES, MINUTES:SECONDS, HOURS:MINUTES:SECONDS, DAYS-HOURS, "
                "DAYS-HOURS:MINUTES or DAYS-HOURS:MINUTES:SECONDS (e.g. 90, 04:00:00, 2-00:00:00)",
            )
        return value

    @field_validator("master_addr")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None or HOST_NAME.fullmatch(value):
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise _refused(value, "a host name or IP address, e.g. node-01.cluster or 10.0.0.1") from None
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and not IMAGE.fullmatch(value):
            raise _refused(value, "a container image reference, e.g. registry.example.com/lejepa:0.1.0")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not K8S_LABEL.fullmatch(value):
            raise _refused(value, "a Kubernetes namespace: lower-case letters, digits and '-', at most 63")
        return value

    @field_validator("runtime_ref", "service_account", "secret_env", "image_pull_secrets")
    @classmethod
    def _k8s_names(cls, value: str | list[str] | None, info: ValidationInfo) -> str | list[str] | None:
        for name in [value] if isinstance(value, str) else value or []:
            if not K8S_SUBDOMAIN.fullmatch(name):
                raise _refused(
                    name, f"a Kubernetes name for {info.field_name}: lower-case letters, digits, '-' and '.'"
                )
        return value

    @field_validator("node_selector")
    @classmethod
    def _node_selector(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not K8S_LABEL_KEY.fullmatch(key) or not K8S_LABEL_VALUE.fullmatch(value):
                raise _refused(
                    f"{key}: {value}", "a Kubernetes node label, e.g. node.kubernetes.io/instance-type"
                )
        return labels

    @field_validator("tolerations")
    @classmethod
    def _tolerations(cls, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in items:
            seconds = item.get("tolerationSeconds")
            if (
                set(item) - set(TOLERATION_FIELDS)
                or not K8S_LABEL_KEY.fullmatch(str(item.get("key", "x")))
                or not K8S_LABEL_VALUE.fullmatch(str(item.get("value", "")))
                or item.get("operator", "Equal") not in ("Equal", "Exists")
                or item.get("effect", "") not in ("", "NoSchedule", "PreferNoSchedule", "NoExecute")
                or not (seconds is None or (isinstance(seconds, int) and not isinstance(seconds, bool)))
            ):
                raise _refused(
                    item,
                    f"a Kubernetes toleration: fields {', '.join(TOLERATION_FIELDS)}; operator Equal or "
                    "Exists; effect NoSchedule, PreferNoSchedule or NoExecute",
                )
        return items

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not K8S_QUANTITY.fullmatch(value):
            raise _refused(value, 'a Kubernetes quantity, e.g. "64Gi" or "500M"')
        return value

    @field_validator("hostfile", "slurm_dir")
    @classmethod
    def _local_path(cls, value: str | None) -> str | None:
        if value is not None and not LOCAL_PATH.fullmatch(value):
            raise _refused(value, "a plain path: write letters, digits and '._/+@-' only (no blank or ~)")
        return value

    @field_validator("extra_sbatch")
    @classmethod
    def _sbatch_options(cls, items: list[str]) -> list[str]:
        for item in items:
            option = SBATCH_OPTION.fullmatch(item)
            if not option or option.group(1) not in SBATCH_OPTIONS:
                raise _refused(
                    item,
                    f"an allowed sbatch option: write --NAME or --NAME=VALUE with NAME one of "
                    f"{', '.join(SBATCH_OPTIONS)} and VALUE of letters, digits and '._:,@+/=|&*[]-' "
                    "(partition, account, time and job_name have fields of their own)",
                )
        return items

    @field_validator("ssh_options")
    @classmethod
    def _ssh_options(cls, items: list[str]) -> list[str]:
        # An item may hold a flag and its value ("-o BatchMode=yes"): split it, one ssh argument per item.
        words = [word for item in items for word in item.split()]
        rest = iter(words)
        for word in rest:
            if word in SSH_SWITCHES:
                continue
            flag, value = word[:2], word[2:] or next(rest, "")
            pattern = SSH_ARGUMENTS.get(flag)
            if pattern is None or not pattern.fullmatch(value):
                raise _refused(
                    word if word[2:] else f"{word} {value}".strip(),
                    f"an allowed ssh option: write -o KEY=VALUE with KEY one of {', '.join(SSH_KEYS)}; "
                    f"or -i FILE, -F FILE, -p PORT, -l USER, {', '.join(SSH_SWITCHES)} (nothing that runs a "
                    "command, such as ProxyCommand)",
                )
        return words


class EvaluateConfig(Section):
    train_split: str = "train"
    """Split the linear probe and kNN are fitted on."""
    test_split: str | None = None
    """Split the top-1 is measured on; None uses `test` when the dataset has one, else `val`."""
    batch_size: int = Field(256, gt=0)
    """Images per batch of feature extraction."""
    num_workers: int = Field(1, ge=0)
    """Loader worker processes decoding images during feature extraction."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where feature extraction, the probes and the diagnostics run; auto is cuda when torch sees a GPU,
    else cpu. The features are the same numbers up to rounding, so the cache serves either device."""
    precision: Literal["auto", "native", "fp32", "bf16"] = "auto"
    """Arithmetic of the networks during feature extraction (the features are stored as float32 either
    way), as for pretrain.precision: auto is bf16 on CUDA, fp32 on the CPU; native is bf16 also on a CPU
    with AVX512-BF16 or AMX, where it ran 2.6x faster and the linear probe scored the same."""
    probe_epochs: int = Field(100, gt=0)
    """Linear-probe epochs over the cached features (100 x 54k x 256 takes ~15-30 s on 2 cores). Fewer
    underfit: on a Fashion-MNIST encoder 30 epochs at lr 2e-3 scored 85.4% where 100 at 1e-2 reached 87.3%."""
    probe_batch_size: int = Field(1024, gt=0)
    """Cached features per linear-probe step."""
    probe_lr: float = Field(1e-2, gt=0)
    """Peak AdamW learning rate of the linear probe (after the warm-up; a cosine decays it to 0)."""
    probe_weight_decay: float = Field(1e-6, ge=0)
    """AdamW weight decay of the linear probe (the paper's 1e-6)."""
    probe_warmup_fraction: float = Field(0.1, ge=0, lt=1)
    """Fraction of the probe's steps spent in the linear learning-rate warm-up."""
    features: Literal["last", "last2"] = "last"
    """What the probes read. last: the backbone's pooled output (timm's `forward`). last2: the protocol of
    the LeJEPA paper's code: for a ViT, the class tokens of the last two blocks, each through the final norm,
    concatenated (the mean patch token where there is no class token); for a CNN, the pooled last stage,
    the same as last. The random-init baseline is read the same way."""
    probe_seeds: int = Field(2, gt=0)
    """Linear probes trained per feature set, with seeds seed, seed+1, ...: their mean is the top-1, their
    spread (max - min) the probe's noise that the report marks each gap to a baseline against."""
    knn_k: int = Field(20, gt=0)
    """Neighbours that vote in the kNN classifier (20, as in DINO)."""
    knn_temperature: float = Field(0.07, gt=0)
    """kNN votes are weighted by exp(cosine similarity / temperature)."""
    baselines: bool = True
    """Also score the same architecture at random initialisation and logistic regression on raw pixels."""
    pixel_size: int = Field(32, gt=0)
    """Raw-pixel baseline: images larger than this are area-downsampled to pixel_size x pixel_size first."""
    calibration_samples: int = Field(2048, gt=1)
    """Training images that set the random-init baseline's BatchNorm statistics (its weights stay random)."""
    diagnostic_samples: int = Field(1024, gt=1)
    """Held-out (test split) images the label-free diagnostics use: RankMe, SIGReg, the LeJEPA loss."""


class PublishConfig(Section):
    name: FolderName | None = None
    """Model name: releases go to {storage.root}/models/{name}/{version}/; None uses pretrain.run_name."""
    min_top1: float = Field(0.0, ge=0.0, le=1.0)
    """Promotion gate: a release becomes `latest` only with a linear-probe top-1 at least this (and not
    below the current latest's); `--force` promotes regardless."""
    beat_raw_pixels: bool = True
    """Promotion also needs the encoder's linear-probe top-1 above the raw-pixel baseline measured in the
    same run, the first release included: an encoder that pixels beat is not worth a release. The reason
    records the comparison either way."""
    hf_repo: str | None = None
    """Hugging Face Hub model repo (OWNER/NAME) that each promoted release's timm folder and model card are
    uploaded to, with the token in HF_TOKEN (created private when missing); None: no upload. Without
    HF_TOKEN the release is published and not uploaded, with one warning line."""

    @field_validator("hf_repo")
    @classmethod
    def _hub_repo(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", value):
            raise _refused(value, "a Hugging Face repo id: OWNER/NAME, e.g. my-org/lejepa-resnet18")
        return value


class StagePolicy(Section):
    """How the orchestrator runs one stage's task: retries after a failure, and a time limit."""

    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(10.0, ge=0)
    """Seconds to wait before a retry (a flaky endpoint often needs a moment)."""
    timeout_s: float | None = Field(None, gt=0)
    """Fail the attempt after this many seconds (then retry); None: no limit."""


class OrchestrationConfig(Section):
    """Prefect settings of the pipeline's tasks (read by flows/ and tasks/ only)."""

    task_runner: Literal["threads", "dask"] = "threads"
    """Where the shard groups run: a thread pool here, or a Dask cluster (prefect-dask)."""
    max_workers: int | None = Field(None, gt=0)
    """Threads (threads) or local Dask worker processes (dask without an address); None: every core."""
    dask_address: str | None = None
    """Scheduler of an existing Dask cluster, e.g. tcp://10.0.0.5:8786; None starts a local one."""
    shard: StagePolicy = Field(default_factory=lambda: StagePolicy(retry_delay_s=5))
    """Applies to each shard group's task (a thread pool cannot interrupt a group: set limits with dask)."""
    pretrain: StagePolicy = Field(default_factory=lambda: StagePolicy(retry_delay_s=30))
    """A retried pretrain resumes from its latest checkpoint."""
    evaluate: StagePolicy = Field(default_factory=StagePolicy)
    publish: StagePolicy = Field(default_factory=lambda: StagePolicy(retries=3, timeout_s=3600))


class TrackingConfig(Section):
    """Experiment trackers that mirror a run (lejepa.tracking): its config, training curves, evaluation and
    releases. Any of them may be on at once; all are off by default. A tracker that is down never stops a
    stage: it gets one warning line, and what could not be sent is sent when it is back."""

    mlflow_uri: str | None = None
    """MLflow tracking server, e.g. http://mlflow.internal:5000; None: off. Its credentials come from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN, never from the config."""
    experiment: str | None = None
    """MLflow experiment and W&B group of the runs; None: the dataset's name (data.name, else the source)."""
    tensorboard: bool = False
    """Write TensorBoard event files to {storage.root}/runs/{run_name}/tensorboard/."""
    wandb_project: str | None = None
    """Weights & Biases project; None: off. Its key comes from WANDB_API_KEY (or `wandb login`)."""
    wandb_mode: Literal["online", "offline"] = "online"
    """offline writes the W&B run under WANDB_DIR (default: ./wandb) for a later `wandb sync`."""

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials_in_uri(cls, value: str | None) -> str | None:
        # The URI is logged and shown (parameters, warnings, Prefect links): a password in it would leak.
        if value is not None and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@]*@", value):
            raise _refused(
                "<a URI with a user name>",
                "a URI without credentials: put them in MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
            )
        return value


class PipelineConfig(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    seed: int = 0
    """Seed of what is random in training and evaluation: initialisation, data order, views, probes."""


class ConfigError(ValueError):
    """A config a user wrote is invalid; the message names the field and what is wrong."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides.

    Override values are parsed as YAML, so `--set loss.lamb=0.1` gives a float and
    `--set views.global_scale=[0.4,1.0]` a list.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass an existing YAML file to --config")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must map sections to fields, got {type(tree).__name__}")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set loss.lamb=0.1")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid config: {field}: {first['msg']}") from None


def blank_credentials(tree: dict[str, Any], placeholder: str | None = REDACTED) -> dict[str, Any]:
    """A copy of a config tree (as `model_dump(mode="json")` gives, or a written config.json) with every set
    credential and every secret entry of storage.options replaced by `placeholder` (None: left out)."""
    tree = copy.deepcopy(tree)
    storage = tree.get("storage") or {}
    for key in CREDENTIAL_FIELDS:
        if storage.get(key) is not None:
            storage[key] = placeholder
    if isinstance(storage.get("options"), dict):
        storage["options"] = replace_secrets(storage["options"], lambda value: placeholder)
    return tree


def redacted(cfg: PipelineConfig) -> dict[str, Any]:
    """The config as JSON-ready data with storage credentials blanked, for run folders and model cards."""
    return blank_credentials(cfg.model_dump(mode="json"))


def storage_secrets(storage: StorageConfig) -> dict[str, Any]:
    """The real values that `blank_credentials(..., placeholder=None)` leaves out of `storage`: the set
    credentials, and the whole `options` when it holds a secret entry; {} when it has no secret."""
    found: dict[str, Any] = {
        key: value.get_secret_value() for key in CREDENTIAL_FIELDS if (value := getattr(storage, key))
    }
    if replace_secrets(storage.options, lambda value: None) != storage.options:
        found["options"] = storage.options
    return found
