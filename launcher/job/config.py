"""The experiment file: one typed model, validated with pydantic.

Defaults are the well-known Llama-2 QLoRA Colab notebook recipe, so an experiment file only
says what differs from it. Field names follow the libraries users already know (transformers'
TrainingArguments, trl's SFTConfig, peft's LoraConfig, bitsandbytes' BitsAndBytesConfig).

This module must stay importable without torch: it runs on login nodes and laptops.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import __version__

NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"


# train.padding_free: auto flattens a micro-batch only while its row can hold no more than this
# many tokens (batch × max_length): without a varlen kernel (a T4 has no FlashAttention-2) SDPA
# gets a block-diagonal mask over the whole row, whose memory and attention work grow with the
# square of the row (4096 tokens: 48 MiB; 65536: 12 GiB). Larger token budgets: train.packing.
# Read by preflight (its estimate) and by the job (training/levers.py), which must agree.
PADDING_FREE_MAX_ROW = 8192


class Section(BaseModel):
    """Every section rejects unknown keys: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = "NousResearch/Llama-2-7b-chat-hf"
    # A GGUF file inside name_or_path (transformers dequantises it on load).
    gguf_file: str | None = None
    revision: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    tokenizer_revision: str | None = None  # of a separate tokenizer repo (default: its main)
    trust_remote_code: bool = False
    # The HF token is never written anywhere: a job reads it at run time from this
    # environment variable, or from this file.
    hf_token_env: str = "HF_TOKEN"
    hf_token_file: str | None = None
    # "random" builds the architecture from the model's config without loading weights
    # (benchmarks of 7B shapes with no download).
    init: Literal["pretrained", "random"] = "pretrained"


class DatasetConfig(Section):
    # A hub dataset id, or a local .jsonl/.json/.csv/.parquet file (relative paths are
    # resolved against the experiment file's folder).
    path: str = "mlabonne/guanaco-llama2-1k"
    revision: str | None = None  # of a hub dataset: a branch, tag or commit
    split: str = "train"
    # auto: "text" if the text field exists, else "messages", else instruction/response.
    format: Literal["auto", "text", "instruction", "messages"] = "auto"
    text_field: str = "text"
    instruction_field: str = "instruction"
    input_field: str | None = None
    response_field: str = "response"
    system_field: str | None = None
    messages_field: str = "messages"
    max_samples: int | None = Field(default=None, ge=1)
    # Fraction or count of examples held out for evaluation (0 = none).
    test_size: float = Field(default=0.0, ge=0)
    seed: int = 42


class PromptConfig(Section):
    # llama2: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>"
    # chat_template: the tokenizer's own chat template.
    # none: the text field is used as it is.
    template: Literal["llama2", "chat_template", "none"] = "llama2"
    system_prompt: str | None = None


class QuantizationConfig(Section):
    load_in_4bit: bool = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = False
    # On a machine without CUDA the job computes in float32 (half-precision autocast on CPU is
    # about 10x slower) and says so in its log.
    bnb_4bit_compute_dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class LoraConfig(Section):
    r: int = Field(default=64, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    # null: peft's default for the architecture (q_proj, v_proj for Llama);
    # "all-linear", or a list of module names.
    target_modules: str | list[str] | None = None


class TrainConfig(Section):
    num_train_epochs: float = Field(default=1.0, gt=0)
    max_steps: int = -1
    per_device_train_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.001, ge=0)
    optim: str = "paged_adamw_32bit"
    max_grad_norm: float = Field(default=0.3, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, le=1)
    lr_scheduler_type: str = "constant"
    group_by_length: bool = True
    # Activation checkpointing: recompute each decoder layer in the backward pass instead of
    # keeping its activations. "selective" (trl's SAC) keeps the attention output too, so
    # attention is not recomputed: one more hidden-size tensor per layer and token.
    gradient_checkpointing: bool | Literal["selective"] = True
    fp16: bool = False
    bf16: bool = False
    max_seq_length: int | None = Field(default=None, ge=8)  # null: trl's default (1024)
    packing: bool = False
    # Loss on the answers only (trl's completion_only_loss; Axolotl's train_on_inputs: false).
    # null: answer-only for instruction and messages data, the whole text for format: text.
    completion_only_loss: bool | None = None
    # auto: Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) when CUDA and liger-kernel are there;
    # they change no math (bench/RESULTS.md). Resolved when the job starts (training/arguments.py).
    use_liger_kernel: bool | Literal["auto"] = "auto"
    # auto: without packing, each micro-batch's examples are concatenated into one row with
    # position ids restarting at every example (trl's padding-free collator): no padding is
    # computed, each example attends only to itself, same examples per step and same loss per
    # example as padded rows. false: pad each micro-batch to its longest example (the notebook).
    padding_free: bool | Literal["auto"] = "auto"
    # Memory levers that change no math (examples/profiles/t4-lean.yaml): trl's offloading of
    # checkpointed activations to CPU memory ("sync": copies on the compute stream, no side
    # stream and its memory pool: least memory, slower), and PyTorch's expandable segments.
    activation_offloading: bool | Literal["sync"] = False
    expandable_segments: bool = False
    seed: int = 42
    logging_steps: int = Field(default=25, ge=1)
    # Checkpoints are what a preempted job resumes from; a signal also forces one.
    save_steps: int = Field(default=100, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    dataloader_num_workers: int = Field(default=0, ge=0)
    # Evaluation during training on the dataset.test_size split (TrainingArguments names).
    # load_best_model_at_end keeps the best checkpoint through rotation and makes it the adapter.
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = Field(default=None, ge=1)  # null: logging_steps (transformers' default)
    load_best_model_at_end: bool = False
    metric_for_best_model: str | None = None  # null: eval_loss
    # Any further trl SFTConfig / TrainingArguments keyword, passed through unchanged
    # (checked against SFTConfig when the job starts).
    sft_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("eval_strategy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value  # YAML reads a bare `no` as false


class StorageConfig(Section):
    # Shared filesystem (Slurm), the PVC mount path (Kubernetes) or a local folder.
    # Relative paths are resolved against the experiment file's folder.
    root: str = "./qlaunch-runs"


class ResourcesConfig(Section):
    nodes: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=1, ge=0)
    gpu_type: str = "t4"
    cpus_per_task: int = Field(default=8, ge=1)
    memory: str = "32G"
    time_limit: str = "24:00:00"  # [D-]HH:MM:SS
    # The requeue guard (launcher/job/requeue.py): a training job that checkpointed and stopped (exit
    # 75: time limit, preemption) is requeued at most max_requeues times, and no more once
    # max_requeues_without_progress requeues in a row saved no newer checkpoint.
    max_requeues: int = Field(default=10, ge=0)
    max_requeues_without_progress: int = Field(default=2, ge=0)

    @field_validator("time_limit")
    @classmethod
    def _time_format(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", value):
            raise ValueError("expected [D-]HH:MM:SS, e.g. 24:00:00 or 1-12:00:00")
        return value

    @field_validator("memory")
    @classmethod
    def _memory_format(cls, value: str) -> str:
        if not re.fullmatch(r"\d+[KMGT]?", value):
            raise ValueError("expected a size like 32G or 64000M")
        return value

    def time_limit_seconds(self) -> int:
        days, _, hms = self.time_limit.rpartition("-")
        h, m, s = (int(x) for x in hms.split(":"))
        return int(days or 0) * 86400 + h * 3600 + m * 60 + s


class InferenceResources(Section):
    """What the inference job asks for; null: derived from training's request and the model's
    size (launcher/jobspec.py inference_resources): at most one GPU, 4 CPUs, one hour."""

    gpus_per_node: int | None = Field(default=None, ge=0)  # 0: answer on CPU
    cpus_per_task: int | None = Field(default=None, ge=1)
    memory: str | None = None  # like resources.memory
    time_limit: str | None = None  # like resources.time_limit

    @field_validator("time_limit")
    @classmethod
    def _time_format(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"(\d+-)?\d{1,3}:\d{2}:\d{2}", value):
            raise ValueError("expected [D-]HH:MM:SS, e.g. 01:00:00")
        return value

    @field_validator("memory")
    @classmethod
    def _memory_format(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+[KMGT]?", value):
            raise ValueError("expected a size like 16G or 16000M")
        return value


class LmEvalConfig(Section):
    """inference.lm_eval: lm-evaluation-harness tasks scored in the grid evaluation job for the base
    model and every adapter (training/lm_eval_run.py); names checked at plan time
    (launcher/job/lm_eval_tasks.py)."""

    tasks: list[str] = Field(min_length=1)  # lm-eval task, group or tag names
    # Examples per task (a whole number), or a fraction of each task (0 < limit < 1); null: all.
    limit: int | float | None = None
    num_fewshot: int | None = Field(default=None, ge=0, le=64)  # null: each task's own default
    # A folder of the user's own task YAMLs (relative to the experiment file); their relative
    # dataset_kwargs.data_files are relative to it.
    include_path: str | None = None
    batch_size: int = Field(default=8, ge=1)  # requests per forward pass
    # Cluster backends: tasks whose dataset is on the hub are refused at plan time unless the
    # nodes can download it (qlaunch prefetch does not fetch lm-eval datasets).
    allow_hub: bool = False

    @field_validator("tasks", mode="before")
    @classmethod
    def _one_task(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("limit", mode="before")
    @classmethod
    def _limit(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        if isinstance(value, float) and not isinstance(value, bool) and 0 < value < 1:
            return value
        raise ValueError(
            f"must be a whole number of examples per task (at least 1) or a fraction of each task "
            f"between 0 and 1; got {value!r}"
        )


class InferenceConfig(Section):
    enabled: bool = True  # run the inference job after training
    resources: InferenceResources = Field(default_factory=InferenceResources)
    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = None  # .jsonl with a "prompt" field, or one prompt per line
    # Held-out examples (.jsonl with "prompt" and "reference") scored for base vs fine-tuned.
    eval_file: str | None = None
    metric: str | None = None
    max_new_tokens: int = Field(default=128, ge=1)
    temperature: float = Field(default=0.0, ge=0)  # 0 = greedy
    load_in_4bit: bool = True
    compare_base: bool = True  # also answer with the base model, side by side
    # true: an inference job per run, as soon as it has trained. Unset: one evaluation job for the
    # grid (base model loaded once) on every backend.
    per_run: bool | None = None
    # Answers per generate call: auto (the per-run job: 8; the grid job: whole prompts × every
    # adapter up to 192 rows, fewer where the GPU's free memory would not hold them), or a number.
    batch_size: Literal["auto"] | int = "auto"
    # Standard benchmarks (lm-evaluation-harness) in the grid evaluation job; null: none.
    lm_eval: LmEvalConfig | None = None

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(
            f"must be auto (chosen by memory) or a whole number of answers per batch, at least 1; got {value!r}"
        )

    def rows(self, auto: int) -> int:
        """Answers per generate call: the number set, or `auto`'s."""
        return auto if self.batch_size == "auto" else int(self.batch_size)


class EnvironmentConfig(Section):
    # Shell lines run before the job on a cluster node: module loads, a venv or conda activate.
    setup: list[str] = Field(default_factory=list)
    # Non-secret environment variables for the job.
    variables: dict[str, str] = Field(default_factory=dict)
    python: str = "python"
    # An image the Slurm job runs in: a .sif (or docker://...) for apptainer, an image name for
    # docker/podman (docker/Dockerfile builds one).
    container: str | None = None
    # apptainer: apptainer, else singularity, whichever the node has. docker/podman: `run` with
    # the same binds, host network and the job's variables passed by name.
    container_runtime: Literal["apptainer", "docker", "podman"] = "apptainer"

    @field_validator("variables")
    @classmethod
    def _no_secret_values(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            # Whole words only: HF_TOKEN is a secret, TOKENIZERS_PARALLELISM is not.
            if re.search(r"(^|_)(TOKEN|SECRET|PASSWORD|API_?KEY)(_|$)", key, re.IGNORECASE):
                raise ValueError(
                    f"{key!r} looks like a secret; secrets are never written into job files. "
                    "Use model.hf_token_env / model.hf_token_file (Slurm) or "
                    "kubernetes.hf_token_secret / kubernetes.secrets (Kubernetes); other secrets "
                    "(WANDB_API_KEY) come from the job's environment"
                )
        return value


class TrackingConfig(Section):
    """Experiment trackers (training/tracking.py): one tracked run per grid run, across attempts."""

    # Any of tensorboard, wandb, mlflow; each needs its package in the job (qlaunch[tracking]).
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    project: str | None = None  # W&B project; null: the experiment name
    tags: list[str] = Field(default_factory=list)  # W&B and MLflow tags
    # null: MLFLOW_TRACKING_URI from the job's environment, else a file store
    # <storage root>/<experiment>/mlflow.
    mlflow_uri: str | None = None
    # null: WANDB_MODE from the job's environment, else online. offline: run folders under
    # <storage root>/<experiment>/wandb/ for a later `wandb sync`.
    wandb_mode: Literal["online", "offline"] | None = None
    wandb_entity: str | None = None  # null: the API key's default entity

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class LocalConfig(Section):
    max_parallel: int = Field(default=1, ge=1)


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Seconds before the time limit (or at preemption) at which the job gets SIGUSR1 to checkpoint.
    signal_seconds: int = Field(default=300, ge=0)
    requeue: bool = True
    extra_directives: list[str] = Field(default_factory=list)  # e.g. ["--exclusive"]
    inference_partition: str | None = None
    # Array tasks of one array running at once (the `%K` of `--array`); null: no throttle.
    # `qlaunch throttle EXP K` changes it on the arrays already queued.
    array_parallelism: int | None = Field(default=None, ge=1, strict=True)


class SecretRef(Section):
    name: str
    key: str = "token"


class SecretEnv(Section):
    """An environment variable of the job filled from a Kubernetes Secret (e.g. WANDB_API_KEY)."""

    env: str
    name: str
    key: str


class Toleration(Section):
    key: str
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"


class KubernetesConfig(Section):
    namespace: str = "default"
    # docker/Dockerfile built at this qlaunch's version (README "The job image": build and push
    # it, or name your own); a versioned tag, so every pod of a grid runs the same image.
    image: str = f"ghcr.io/qlaunch/qlaunch-train:{__version__}"
    # null: IfNotPresent for a pinned image (a version tag or a digest), Always for :latest or
    # no tag (launcher/backends/kubernetes/manifests.py pull_policy), as Kubernetes itself defaults.
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    # Node label whose value is resources.gpu_type on GPU pods: nvidia.com/gpu.product (GPU
    # feature discovery), cloud.google.com/gke-accelerator (GKE), any other key, or "none".
    gpu_node_label: str = "nvidia.com/gpu.product"
    node_selector: dict[str, str] = Field(default_factory=dict)  # merged over the GPU label
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists")])
    pvc: str = "qlaunch-storage"  # ReadWriteMany claim mounted at storage.root
    hf_token_secret: SecretRef | None = None
    # Further secrets as environment variables: [{env: WANDB_API_KEY, name: wandb, key: api-key}]
    secrets: list[SecretEnv] = Field(default_factory=list)
    service_account: str | None = None
    # Kueue LocalQueue: both Jobs are created suspended with this queue label; Kueue starts
    # each once the queue's quota admits it.
    queue_name: str | None = None
    priority_class: str | None = None  # PriorityClass of both pods (manifests/priority.yaml)
    backoff_limit: int = Field(default=3, ge=0)
    ttl_seconds_after_finished: int | None = Field(default=7 * 24 * 3600, ge=0)
    termination_grace_period_seconds: int = Field(default=300, ge=0)
    shm_size: str = "8Gi"
    run_as_user: int = 1000


class SearchConfig(Section):
    """How a grid spends its GPU time: every run to the end (`grid`), or asynchronous successive
    halving (`asha`), decided by each run on shared storage (training/asha.py; README "Stop
    losing runs early"). Not part of the run id: a run never stopped trains exactly as in a grid."""

    strategy: Literal["grid", "asha"] = "grid"
    # What the trainer computes at a rung on the held-out examples: eval_loss, or trl's
    # eval_mean_token_accuracy (the share of answer tokens predicted exactly; mode: max).
    metric: Literal["eval_loss", "eval_mean_token_accuracy"] = "eval_loss"
    mode: Literal["min", "max"] = "min"
    # The first rung, in optimizer steps or in training tokens (tokens compare runs of different
    # batch shapes); rung k is first × reduction_factor^k, below the run's own budget.
    first_rung_steps: int | None = Field(default=None, ge=1)
    first_rung_tokens: int | None = Field(default=None, ge=1)
    reduction_factor: int = Field(default=3, ge=2)

    @model_validator(mode="after")
    def _one_first_rung(self) -> "SearchConfig":
        if self.strategy == "asha" and (self.first_rung_steps is None) == (self.first_rung_tokens is None):
            raise ValueError("asha needs exactly one of first_rung_steps or first_rung_tokens")
        if self.metric == "eval_mean_token_accuracy" and self.mode == "min":
            raise ValueError("metric eval_mean_token_accuracy is better when higher: set search.mode: max")
        return self


class Experiment(Section):
    name: str
    description: str = ""
    # A name from launcher/backends' registry (aliases included), checked and made canonical
    # when the launcher builds the plan (grid.py): the job does not depend on the list.
    backend: str = "local"
    model: ModelConfig = Field(default_factory=ModelConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    environment: EnvironmentConfig = Field(default_factory=EnvironmentConfig)
    local: LocalConfig = Field(default_factory=LocalConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    # Dotted key -> list of values; the runs are their cartesian product.
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(NAME_PATTERN, value):
            raise ValueError(
                "must be 1-40 characters of lowercase letters, digits and '-', starting and "
                "ending with a letter or digit (it names jobs, folders and Kubernetes objects)"
            )
        return value

    @model_validator(mode="after")
    def _precision(self) -> "Experiment":
        if self.train.fp16 and self.train.bf16:
            raise ValueError("train.fp16 and train.bf16 cannot both be true")
        if self.train.eval_strategy != "no" and not self.dataset.test_size:
            raise ValueError(
                f"train.eval_strategy is {self.train.eval_strategy!r} but dataset.test_size is 0: "
                "set dataset.test_size to hold out examples to evaluate on"
            )
        if self.train.load_best_model_at_end and self.train.eval_strategy == "no":
            raise ValueError("train.load_best_model_at_end needs train.eval_strategy steps or epoch")
        if self.search.strategy == "asha":
            if not self.dataset.test_size:
                raise ValueError(
                    f"search.strategy asha compares runs by {self.search.metric} on held-out examples, but "
                    "dataset.test_size is 0: set dataset.test_size (e.g. 0.1)"
                )
            budget = self.train.max_steps
            if budget > 0 and self.search.first_rung_steps and self.search.first_rung_steps >= budget:
                raise ValueError(
                    f"search.first_rung_steps {self.search.first_rung_steps} is not below train.max_steps "
                    f"{budget}: no run could be stopped early"
                )
        return self


# Sections that define what is trained: a run's id hashes these and nothing else, so moving a
# run to another partition or cluster does not make it a new run.
IDENTITY_SECTIONS = ("model", "dataset", "prompt", "quantization", "lora", "train")
# Values at their defaults are left out of the hash (launcher/grid.py run_id_for).


class HubPin(Section):
    """One hub repo of a run at the commit `qlaunch prefetch` resolved and downloaded."""

    key: str  # the experiment key naming the repo: model.name_or_path, model.tokenizer, dataset.path
    repo_id: str
    repo_type: Literal["model", "dataset"]
    requested: str | None = None  # the revision the experiment file asks for (None: main)
    revision: str  # the commit hash
    files: list[str] = Field(default_factory=list)  # what the job reads from the cache


class RunConfig(Experiment):
    """One grid point, fully resolved: what a job is started from (`run.yaml`)."""

    run_id: str
    run_dir: str  # absolute <storage root>/<experiment>/<run id>
    # The grid values of this run, by dotted key (for tables and job labels).
    overrides: dict[str, Any] = Field(default_factory=dict)
    experiment_dir: str = "."  # where relative dataset/prompt paths are resolved
    # Set by `qlaunch prefetch` / submit (launcher.prefetch): the hub repos this run reads, pinned
    # and already in the shared cache, so the job runs offline. Not part of the run id.
    hub_pins: list[HubPin] = Field(default_factory=list)

    def resolve_path(self, value: str) -> Path:
        """A user-supplied path: absolute as is, relative to the experiment file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.experiment_dir) / path
