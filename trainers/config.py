"""The `model:` and `train:` sections of a run config."""

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from core.section import Section


class LoraConfig(Section):
    r: int = Field(8, ge=1, le=65_536)
    """Rank of the adapter matrices."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the adapters' update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapters' input."""
    target_modules: list[str] | Literal["all-linear"] | None = None
    """Module names (or suffixes) that get adapters, `all-linear`, or null for peft's default for the
    architecture (the attention projections of the common ones)."""
    export: Literal["merged", "adapter"] = "merged"
    """What `model/` (and `zeray export`) holds: the base model with the adapters merged into its weights, or
    only the adapters (with `adapter_config.json` naming the base model)."""


class ModelConfig(Section):
    name_or_path: str = "./artifacts/tiny-chat"
    """A Hugging Face causal LM directory (config, safetensors weights, tokenizer with a chat template) or hub id."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision: `auto` is bf16 on a GPU that supports it and fp32 on CPU."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model directory. Off unless you trust that code."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """The attention kernel transformers uses: `auto` is its own choice for the model (sdpa where supported);
    flash_attention_2 needs the flash-attn package and CUDA GPUs."""
    lora: LoraConfig | None = None
    """Train LoRA adapters (peft) instead of every weight: {r, alpha, dropout, target_modules, export}; null
    trains the full model."""


class TrainConfig(Section):
    num_workers: int | tuple[int, int] = 2
    """Ray Train workers (one DeepSpeed rank each), or `[min, max]` for an elastic run: it starts with as many as
    the cluster holds (at least min), and grows towards max as nodes arrive. The global batch stays
    micro_batch_size x grad_accum x max whatever the number running (fewer workers accumulate more)."""
    elastic_resize_s: float = Field(60.0, gt=0, le=86_400)
    """An elastic run checks this often whether more workers fit (growing restarts the workers from the last
    checkpoint)."""
    use_gpu: Literal["auto"] | bool = "auto"
    """One GPU per worker: `auto` uses GPUs when the cluster has them."""
    cpus_per_worker: float = Field(1.0, gt=0, le=512)
    """Logical CPUs each training worker reserves (and torch threads it uses on CPU)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    """Where Ray places the workers: PACK on as few nodes as possible (fast collectives), SPREAD across nodes
    where it can, STRICT_SPREAD one per node (or not at all)."""
    epochs: int = Field(1, ge=1, le=100_000)
    """Passes over the training split."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides `epochs` when reached first)."""
    micro_batch_size: int = Field(4, ge=1, le=65_536)
    """Sequences per worker per forward pass."""
    grad_accum: int = Field(1, ge=1, le=65_536)
    """Micro-batches accumulated per optimizer step; global batch = micro_batch_size * grad_accum * num_workers
    (its max for an elastic run)."""
    lr: float = Field(2.0e-4, gt=0, le=10.0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0, le=10.0)
    """AdamW weight decay."""
    warmup_ratio: float = Field(0.03, ge=0, lt=1.0)
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear to 0, or constant."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this value (0 disables clipping)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 + gradients, 3 + parameters."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward and recompute the rest there (transformers' gradient
    checkpointing): activations shrink from whole layers to one hidden state per layer, for about a third more
    compute per step."""
    chunked_loss: bool = True
    """Compute the loss through the LM head a chunk of tokens at a time (only where labels are), never holding a
    [tokens x vocabulary] logits tensor; the same loss and gradients as the plain one. Used where the model's
    logits are its LM head applied to its last hidden states (checked at start); other models get the plain loss."""
    offload: Literal["none", "cpu"] = "none"
    """Offload optimizer states to CPU memory (and parameters too at stage 3)."""
    eval_base: bool = True
    """Before the first step, evaluate the model as loaded on the validation split (`base_eval_loss` in the
    summary, beside the final `eval_loss`: what the fine-tune gained). Not repeated when a run resumes."""
    eval_every: int = Field(100, ge=1)
    """Evaluate on the validation split every this many optimizer steps (and at the end)."""
    checkpoint_every: int = Field(100, ge=1)
    """Report a sharded checkpoint to Ray Train every this many optimizer steps (and at the end); each is
    evaluated on the validation split first (if that step did not evaluate anyway), so it can be ranked."""
    keep_checkpoints: int = Field(2, ge=1, le=1000)
    """Checkpoints kept: the best this many by validation loss, plus always the latest (to resume from)."""
    log_every: int = Field(10, ge=1)
    """Write a metrics line and a progress line every this many optimizer steps."""
    deepspeed: str | None = None
    """A DeepSpeed JSON config to merge under zeray's: it may tune what zeray does not set (overlap_comm, bucket
    sizes, activation checkpointing, ...); a key zeray sets from this config must be absent or equal."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts Ray Train attempts after a failure (-1: unlimited)."""
    seed: int = 42
    """Seed for weight init of new heads, data order and dropout."""
    tensorboard: bool = False
    """Also write every logged metric as TensorBoard event files to `<run>/tensorboard/` (tensorboardX)."""
    mlflow_uri: str | None = None
    """Also log the run to MLflow at this tracking URI (http(s)://..., databricks, sqlite:///...); credentials
    only from MLflow's environment variables (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD)."""
    mlflow_experiment: str = "zeray"
    """The MLflow experiment the run goes into (created if missing)."""
    wandb_project: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^/\\#?%:]+$")
    """Also log the run to Weights & Biases, in this project; credentials only from W&B's environment
    (WANDB_API_KEY, or `wandb login`); WANDB_MODE=offline keeps the run in files under `<run>/wandb/`."""
    wandb_entity: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[^/\\#?%:]+$")
    """The W&B user or team the project belongs to (W&B's default entity when not set)."""
    wandb_run_name: str | None = Field(None, min_length=1, max_length=128)
    """The run's name in W&B (the config's `name` when not set)."""

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, value):
        if value is not None:
            parts = urlsplit(value)
            if parts.username is not None or parts.password is not None:
                raise ValueError(
                    "credentials do not belong in the config (it is saved with the run): give the URI "
                    "without them and set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                    "MLFLOW_TRACKING_TOKEN"
                )
        return value

    @field_validator("num_workers")
    @classmethod
    def _range(cls, value):
        low, high = value if isinstance(value, tuple) else (value, value)
        if not 1 <= low <= high <= 4096:
            raise ValueError(
                "give a number of workers from 1 to 4096, or an elastic range [min, max] with 1 <= min <= max <= 4096"
            )
        return value if low != high else low  # [n, n] is a fixed run of n

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The number of workers the global batch is defined by (all of them for a fixed run)."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    def workers_label(self) -> str:
        return f"{self.min_workers}-{self.max_workers} (elastic)" if self.elastic else str(self.max_workers)
