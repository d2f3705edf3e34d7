"""The trainer's configuration: the one schema the launcher validates and the trainer reads.

This module is plain pydantic and imports no torch, so the launcher can validate a whole job
before anything is submitted. Every section rejects unknown keys (a typo is an error, not a
silently ignored setting). Field comments say where a default comes from.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

# The trainer's exit codes are defined once, in the torch-free run-directory contract.
from bionemo.rundir import OOM_EXIT_CODE, REQUEUE_EXIT_CODE  # noqa: E402,F401

# The data sections live in bionemo.config_data; every name stays importable from here.
from bionemo.config_data import (  # noqa: F401
    _KINDS,
    PARQUET_MAGIC,
    SQLITE_MAGIC,
    TASK_KINDS,
    CellDataConfig,
    DataConfig,
    Section,
    TaskConfig,
    _check_files,
    input_problem,
)


# A sanity bound on model.seq_length (2**16): above the longest protein (titin, 34,350 residues)
# and any cell's gene list (Geneformer's vocabulary has ~25k genes, each ranked at most once).
MAX_SEQ_LENGTH = 65_536
# The torch engine's data-parallel strategies and torchao's FP8 recipes: the trainer's keys, the
# benchmark tables' columns and the sweep's search use these names.
Strategy = Literal["ddp", "fsdp", "hsdp"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
FP8Recipe = Literal["none", "tensorwise", "rowwise"]
FP8_RECIPES: tuple[str, ...] = get_args(FP8Recipe)
FlashAttention = Literal["torch", "fa4"]
FP8MLPKernels = Literal["torchao", "fused"]
ESM2_VOCAB_SIZE = 33  # the ESM alphabet, bionemo.data.tokenizer.TOKENS (a test keeps them equal)
PLUGIN_PATH = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")  # module:factory


class ModelConfig(Section):
    name: str = Field(description="preset name, e.g. esm2_650m")
    family: Literal["esm2", "geneformer"] = Field("esm2", description="architecture and data")
    num_layers: int = Field(gt=0, description="transformer blocks")
    hidden_size: int = Field(gt=0, description="width of the residual stream")
    num_attention_heads: int = Field(gt=0, description="attention heads; must divide hidden_size")
    ffn_hidden_size: int = Field(gt=0, description="width of the MLP's hidden layer")
    seq_length: int = Field(1024, ge=3, description="counts <cls> and <eos>, as BioNeMo does")
    vocab_size: int = Field(
        ESM2_VOCAB_SIZE, gt=0, description="ESM alphabet; Geneformer: specials + genes"
    )
    layer_norm_eps: float = Field(1e-5, description="ESM-2 1e-5; Geneformer (BERT) 1e-12")
    token_dropout: bool = Field(True, description="ESM-2: zero <mask> embeddings, rescale rest")
    activation: Literal["gelu", "relu"] = Field("gelu", description="ESM-2 GELU; Geneformer ReLU")
    hidden_dropout: float = Field(0.0, ge=0, lt=1, description="ESM-2 none; Geneformer 0.02")
    attention_dropout: float = Field(0.0, ge=0, lt=1, description="dropout of attention weights")
    activation_checkpointing: Literal["none", "selective", "full"] = Field(
        "none",
        description=(
            'Activation recompute: "none"; "selective": keep no LayerNorm/GELU outputs, recompute '
            "them (no matrix multiply or attention is recomputed; eager mode checkpoints the MLP); "
            '"full": recompute each whole block in the backward pass.'
        ),
    )
    plugin: str | None = Field(
        None,
        description=(
            "a user's model instead of the family's: package.module:factory, imported by the trainer; "
            "family still picks the data (bionemo/models/__init__.py, examples/tiny_plugin)"
        ),
    )

    @field_validator("plugin")
    @classmethod
    def _plugin(cls, v: str | None) -> str | None:
        if v is not None and not PLUGIN_PATH.match(v):
            raise ValueError(
                f"{v!r} is not module:factory; write e.g. my_pkg.model:build (a "
                "dotted module path, a colon, the function that builds the model)"
            )
        return v

    @field_validator("seq_length")
    @classmethod
    def _seq_length(cls, v: int) -> int:
        if v > MAX_SEQ_LENGTH:
            raise ValueError(
                f"{v} positions is more than any input of these models has: titin, the longest "
                f"known protein, has 34,350 residues, and a Geneformer cell lists each gene of its "
                f"~25k-gene vocabulary at most once; use at most {MAX_SEQ_LENGTH}"
            )
        return v

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a head count that divides it"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.family == "esm2" and head_dim % 2:  # rotary turns pairs of channels
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} "
                f"gives heads of {head_dim} channels; ESM-2's rotary embedding needs an even head "
                f"size: pick a head count that leaves one"
            )
        if self.family == "esm2" and self.vocab_size < ESM2_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size {self.vocab_size}: ESM-2's alphabet has {ESM2_VOCAB_SIZE} tokens, "
                f"each an embedding row; set model.vocab_size={ESM2_VOCAB_SIZE} (or more, padded)"
            )
        # One family's switches on the other would be accepted and ignored: refuse them.
        if self.family == "esm2" and self.activation != "gelu":
            raise ValueError(
                f"activation {self.activation!r}: ESM-2 is built with GELU only; "
                "remove model.activation (it is Geneformer's)"
            )
        if self.family == "geneformer" and self.token_dropout:
            raise ValueError(
                "token_dropout is ESM-2's; Geneformer (BERT) has none: set "
                "model.token_dropout=false"
            )
        return self

    @property
    def num_parameters(self) -> int:
        """Parameter count (embedding tied to the decoder in both families)."""
        h, f, v, L = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.num_layers
        block = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attn qkv+out, mlp, two LNs
        head = h * h + h + 2 * h + v  # dense, LN, decoder bias (weight tied)
        if self.family == "geneformer":  # BERT: learned positions, 2 token types, embedding LN
            return v * h + self.seq_length * h + 2 * h + 2 * h + L * block + head
        return v * h + L * block + 2 * h + head  # ESM-2: rotary, final LN

    @property
    def block_matmul_parameters(self) -> int:
        """Weights one token is multiplied by in the transformer blocks (qkv, out, two MLP)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return self.num_layers * (4 * h * h + 2 * h * f)

    @property
    def head_matmul_parameters(self) -> int:
        """Weights of the LM head's GEMMs: its dense layer and the (tied) decoder."""
        return self.hidden_size * self.hidden_size + self.vocab_size * self.hidden_size

    @property
    def head_on_every_token(self) -> bool:
        """ESM-2 runs the LM head on every position; Geneformer only on the ~15% masked ones
        (its 25k-gene decoder on every position would cost more than the blocks)."""
        return self.family != "geneformer"

    def training_flops(self, tokens: float, scored: float, attention_pairs: float) -> float:
        """FLOPs of a training step (3 x forward) counting what is multiplied: 6 x the matmul
        weights per token through the blocks, 6 x the head's for each token it runs on, 12*L*h
        per attended (query, key) pair. Not 6N: N includes embedding and position tables, which
        are looked up, not multiplied (for Geneformer 106M 6N overstates by 1.15x, 10M 1.59x)."""
        head_tokens = tokens if self.head_on_every_token else scored
        return (
            6 * self.block_matmul_parameters * tokens
            + 6 * self.head_matmul_parameters * head_tokens
            + 12 * self.num_layers * self.hidden_size * attention_pairs
        )


class OptimConfig(Section):
    """The optimizer and learning-rate schedule; defaults: BioNeMo's train_esm2."""

    lr: float = Field(4e-4, gt=0, description="peak learning rate (AdamW)")
    betas: tuple[float, float] = Field((0.9, 0.98), description="AdamW betas")
    eps: float = Field(1e-8, description="AdamW epsilon")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    schedule: Literal["warmup_anneal_decay_hold", "cosine", "linear"] = Field(
        "warmup_anneal_decay_hold",
        description=(
            "learning-rate schedule (formulas: bionemo/lr.py): warmup_anneal_decay_hold is "
            "BioNeMo's ESM-2 schedule, cosine its Geneformer one, linear this project's earlier"
        ),
    )
    warmup_steps: int = Field(2000, ge=0, description="steps of linear warmup to lr")
    decay_steps: int | None = Field(None, gt=0, description="default max_steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="min_lr = min_lr_ratio * lr")
    hold_steps: int = Field(0, ge=0, description="cosine: steps at min_lr at the end (BioNeMo: 5%)")
    clip_grad: float | None = Field(1.0, gt=0, description="grad-norm clip (Megatron's default)")
    fused: bool = Field(True, description="fused AdamW kernel on GPU; ignored on CPU")


class TrainConfig(Section):
    micro_batch_size: int = Field(
        gt=0, description=("sequences per rank per forward pass (set by the benchmark table row)")
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description=(
            "None: micro_batch_size x data-parallel size (no accumulation). Otherwise must be a "
            "multiple of that product; the quotient is the number of accumulation steps."
        ),
    )
    max_steps: int = Field(500_000, gt=0, description="optimizer steps of the run")
    seed: int = Field(1234, description="seed of weight initialization")
    precision: Literal["bf16-mixed", "fp32"] = Field(
        "bf16-mixed", description=("bf16 autocast on GPU; fp32 on CPU")
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if any")
    compile: bool = Field(False, description="torch.compile the model")
    log_every: int = Field(10, gt=0, description="steps between metrics.jsonl records")
    val_every: int = Field(10_000, gt=0, description="steps between validations")
    limit_val_batches: int = Field(2, ge=0, description="batches per validation")
    memory_cap_gib: float | None = Field(
        None,
        gt=0,
        description=(
            "Emulate a smaller card: cap this process's GPU memory (torch's per-process memory "
            "fraction)."
        ),
    )
    stop_signal: Literal["USR1", "USR2", "TERM", "INT", "HUP"] = Field(
        "USR2",
        description=(
            "The warning signal the scheduler sends before the time limit (SIGTERM is always handled "
            "too)."
        ),
    )
    dist_timeout_s: int = Field(
        600,
        gt=0,
        description=(
            "The process group's timeout: store operations and collectives wait at most this long "
            "(connecting to the rendezvous at most 300 s of it). 600 s is torch's NCCL default, "
            "within which the 15B runs (benchmarks/results/h200_141gb) started."
        ),
    )
    watchdog_s: float = Field(
        0,
        ge=0,
        description=(
            "Hung-rank watchdog (bionemo/watchdog.py): seconds without a finished step before a rank "
            'dumps its stacks, records a "hung" event and exits 124. 0 = auto: max(10 x the slowest '
            "of the last 20 steps, 300 s, the first step's duration). Start-up, saves and validation "
            "always get at least 30 min."
        ),
    )
    engine: Literal["torch", "megatron"] = Field(
        "torch",
        description=(
            '"torch": our PyTorch modules, DDP, CPU or GPU (the default, and CI\'s). "megatron": '
            "megatron-core (CUDA only): tensor/pipeline parallel, distributed optimizer, sharded "
            "checkpoints (bionemo/engines/megatron_engine.py; docs/engines.md)."
        ),
    )
    fp8: FP8Recipe = Field(
        "none",
        description=(
            "FP8 GEMMs in the transformer blocks (torchao float8 training; torch engine, DDP or "
            'FSDP): "tensorwise" one scale per tensor, "rowwise" one per row (closer to bf16, '
            "slower). Needs an FP8 GPU (H100/H200 class) and is fast only with train.compile."
        ),
    )

    fp8_mlp: FP8MLPKernels = Field(
        "torchao",
        description=(
            "With train.fp8=tensorwise, the kernels around the MLP's FP8 GEMMs (activation, "
            "its maximum and fp8 cast, their backward, transposed copies, bias gradient): "
            '"torchao" the Float8Linear layers, with the kernels inductor generates; "fused" '
            "hand-written Triton kernels, the same recipe in fewer passes over the 4H-wide "
            "activation (bionemo/models/fp8_mlp.py). No effect without FP8 (train.fp8=none)."
        ),
    )

    flash_attention: FlashAttention = Field(
        "torch",
        description=(
            "The kernels behind torch's flash attention (ESM-2's variable-length attention, "
            'packed Geneformer rows): "torch" the FlashAttention-2 built into PyTorch, "fa4" '
            "FlashAttention-4 (the flash-attn-4 package, CuTe DSL kernels for Hopper and "
            "Blackwell) through torch.nn.attention.activate_flash_attention_impl. Torch engine "
            "on an H100/H200/B200-class GPU; no attention dropout."
        ),
    )

    def grad_accumulation(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size is None:
            return 1
        if self.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size {self.global_batch_size} is not a multiple of "
                f"micro_batch_size x data-parallel size = {self.micro_batch_size} x "
                f"{data_parallel_size} = {per_step}; set it to a multiple of {per_step}"
            )
        return self.global_batch_size // per_step


class CheckpointConfig(Section):
    enabled: bool = Field(True, description="false: nothing saved (throughput trials)")
    every_steps: int = Field(1000, gt=0, description="steps between periodic saves")
    keep_last: int = Field(2, gt=0, description="complete checkpoints kept")
    init_from: Path | None = Field(
        None,
        description=(
            "Weights-only start for fine-tuning (BioNeMo's --restore-from-checkpoint-path): a "
            "checkpoint folder of either engine, or a Hugging Face model folder (config.json + "
            "model.safetensors, bionemo/hf.py). Ignored when the run directory already has a "
            "checkpoint to resume from."
        ),
    )
    export_final: bool = Field(
        True,
        description=(
            "write <run>/final_model/ (Hugging Face folder) from the last checkpoint at the end, in a "
            "CPU process; a failure is logged only (`python -m bionemo.export` redoes it)"
        ),
    )
    async_save: bool = Field(
        False,
        description=(
            "periodic saves through DCP's async_save (torch engine): training goes on while a thread "
            "writes; stop and last saves stay synchronous; blocking time per save in metrics.jsonl"
        ),
    )


class ParallelConfig(Section):
    tensor: int = Field(1, gt=0, description="megatron engine only")
    pipeline: int = Field(1, gt=0, description="megatron engine only")
    distributed_optimizer: bool = Field(
        True,
        description=(
            "megatron engine: shard optimizer state (fp32 main weights, Adam moments) over "
            "data-parallel ranks (megatron-core's distributed optimizer); the torch engine: see "
            "data_parallel."
        ),
    )
    data_parallel: Strategy = Field(
        "ddp",
        description=(
            'torch engine\'s data parallelism: "ddp" replicates weights, gradients and Adam state on '
            'every rank (PyTorch DDP); "fsdp" shards all three over the ranks (FSDP2: each block, '
            "then the rest at the root; bf16 compute, fp32 master weights and gradient reduction); "
            '"hsdp" shards inside a node and replicates across nodes (needs more than one node).'
        ),
    )
    fsdp_cpu_offload: bool = Field(
        False,
        description=(
            "fsdp/hsdp on GPU: keep the shards of weights, gradients and Adam state in host memory "
            "(the optimizer step runs on the CPU): slower, for a model whose state does not fit the "
            "GPUs."
        ),
    )
    fp8_all_gather: bool = Field(
        False,
        description=(
            "fsdp/hsdp with train.fp8=tensorwise: cast the FP8 layers' weight shards to fp8 before "
            "FSDP gathers them (torchao's float8 all-gather; half the bytes of bf16), with one "
            "all-reduce for all their scales after each optimizer step. Off by default: its gain is "
            "in the communication between GPUs, not measured yet."
        ),
    )


class LoggingConfig(Section):
    wandb_project: str | None = Field(None, description="W&B only when a project is named")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user)")
    wandb_offline: bool = Field(True, description="W&B offline mode (sync later with `wandb sync`)")


class TrainerConfig(Section):
    """Everything the trainer needs, as written to <run_dir>/config.yaml (under `trainer`)."""

    model: ModelConfig
    data: DataConfig | CellDataConfig = Field(description="chosen by model.family")
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    parallel: ParallelConfig = ParallelConfig()
    logging: LoggingConfig = LoggingConfig()
    task: TaskConfig = Field(
        TaskConfig(), description=("mlm = pretraining; otherwise fine-tuning (bionemo/finetune.py)")
    )

    @model_validator(mode="before")
    @classmethod
    def _data_for_family(cls, raw: dict) -> dict:
        # The data section's schema follows the model family, so a typo in it is still an error.
        if isinstance(raw, dict) and not isinstance(raw.get("data"), BaseModel):
            family = (raw.get("model") or {}).get("family", "esm2")
            schema = CellDataConfig if family == "geneformer" else DataConfig
            try:
                raw = {**raw, "data": schema.model_validate(raw.get("data") or {})}
            except ValidationError as e:  # keep the key path: data.<field>
                problems = "; ".join(
                    f"data.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()
                )
                raise ValueError(f"{problems} (model.family {family!r})") from None
        return raw

    @model_validator(mode="after")
    def _task_fits(self) -> "TrainerConfig":
        t = self.task
        if not t.fine_tuning:
            if t.data is not None:
                raise ValueError(
                    "task.data is set but task.kind is mlm (pretraining reads "
                    "trainer.data); set task.kind to a fine-tuning task"
                )
            return self
        if t.data is None:
            raise ValueError(
                f"task.data is missing for task.kind={t.kind}; point it at a .csv or "
                ".parquet file with sequence and label columns"
            )
        classes = t.kind != "sequence_regression"
        if classes and t.num_classes is None:
            raise ValueError(
                f"task.num_classes is missing for task.kind={t.kind}; set it to the "
                "number of classes"
            )
        if not classes and t.num_classes is not None:
            raise ValueError(
                "task.num_classes is for classification, not sequence_regression; remove it"
            )
        if self.train.engine != "torch":
            raise ValueError(
                f"task.kind={t.kind}: fine-tuning runs on the torch engine only; "
                "set train.engine=torch (the megatron engine trains masked LM)"
            )
        if self.model.plugin:
            raise ValueError(
                f"task.kind={t.kind}: fine-tuning heads sit on the project's ESM-2 "
                "encoder, not on model.plugin's model; train the plugin with "
                "task.kind=mlm, or fine-tune an ESM-2 preset"
            )
        if self.model.family != "esm2":
            raise ValueError(
                f"task.kind={t.kind}: fine-tuning is built for ESM-2 only (model."
                f"family is {self.model.family!r}); use an ESM-2 preset"
            )
        if self.data.pad_to == "none":
            raise ValueError(
                "data.pad_to=none packs sequences into one row; fine-tuning pads "
                "them: set data.pad_to=longest or max_length"
            )
        return self

    @model_validator(mode="after")
    def _engine_supports(self) -> "TrainerConfig":
        tp, pp = self.parallel.tensor, self.parallel.pipeline
        if self.train.engine == "torch" and (tp, pp) != (1, 1):
            raise ValueError(
                f"parallel.tensor={tp} parallel.pipeline={pp} need train.engine=megatron; the "
                f"torch engine is data-parallel only (set both to 1, or train.engine=megatron)"
            )
        if self.model.num_attention_heads % tp:  # before the device: true on any machine
            raise ValueError(
                f"parallel.tensor={tp} does not divide model.num_attention_heads "
                f"{self.model.num_attention_heads}; choose a tensor-parallel size that divides "
                f"the head count"
            )
        if self.train.engine == "megatron":
            if self.model.plugin:
                raise ValueError(
                    "train.engine=megatron builds its own ESM-2, not model.plugin's "
                    "model; a plugin trains with train.engine=torch"
                )
            if self.model.family != "esm2":
                raise ValueError(
                    f"train.engine=megatron builds ESM-2 only; model.family is "
                    f"{self.model.family!r}: use train.engine=torch"
                )
            if self.data.pad_to == "none":
                raise ValueError(
                    "data.pad_to=none (packed rows) is a torch-engine feature; with "
                    "train.engine=megatron use data.pad_to=longest or max_length"
                )
            if pp > 1 and self.data.pad_to != "max_length":
                raise ValueError(
                    "data.pad_to must be max_length with parallel.pipeline > 1 "
                    "(pipeline stages exchange fixed-shape activations); set "
                    "data.pad_to=max_length"
                )
            if self.model.ffn_hidden_size % tp:  # column-parallel: each rank a slice
                raise ValueError(
                    f"parallel.tensor={tp} does not divide model.ffn_hidden_size "
                    f"{self.model.ffn_hidden_size}; choose a tensor-parallel size that divides it"
                )
            if self.model.num_layers % pp:
                raise ValueError(
                    f"model.num_layers {self.model.num_layers} is not divisible by "
                    f"parallel.pipeline {pp}; choose a pipeline size that divides it"
                )
            if self.train.device == "cpu":
                raise ValueError(
                    "train.engine=megatron needs CUDA (megatron-core is GPU-only); "
                    "use train.device=auto/cuda, or train.engine=torch on CPU"
                )
        return self

    @model_validator(mode="after")
    def _strategy_supports(self) -> "TrainerConfig":
        dp, offload, fp8, fp8_gather = (
            self.parallel.data_parallel,
            self.parallel.fsdp_cpu_offload,
            self.train.fp8,
            self.parallel.fp8_all_gather,
        )
        if dp != "ddp" and self.train.engine != "torch":
            raise ValueError(
                f"parallel.data_parallel={dp} is the torch engine's (FSDP2); the "
                f"megatron engine shards with parallel.distributed_optimizer: set "
                f"parallel.data_parallel=ddp or train.engine=torch"
            )
        if offload and dp == "ddp":
            raise ValueError(
                "parallel.fsdp_cpu_offload offloads FSDP shards; set "
                "parallel.data_parallel=fsdp (or hsdp), or remove the offload"
            )
        if offload and self.train.device == "cpu":
            raise ValueError(
                "parallel.fsdp_cpu_offload moves GPU state to the host; on "
                "train.device=cpu it is already there: remove the offload"
            )
        if fp8_gather and dp == "ddp":
            raise ValueError(
                "parallel.fp8_all_gather gathers FSDP's weight shards in fp8; set "
                "parallel.data_parallel=fsdp (or hsdp), or parallel.fp8_all_gather=false"
            )
        if fp8_gather and fp8 != "tensorwise":
            raise ValueError(
                f"parallel.fp8_all_gather needs train.fp8=tensorwise (torchao gathers fp8 "
                f"weights with one scale per tensor; here train.fp8={fp8}): set "
                f"train.fp8=tensorwise, or parallel.fp8_all_gather=false"
            )
        if fp8_gather and offload:
            raise ValueError(
                "parallel.fp8_all_gather with parallel.fsdp_cpu_offload is not supported (not "
                "tested together): set one of them to false"
            )
        fa = self.train.flash_attention
        if fa != "torch" and (self.train.engine != "torch" or self.train.device == "cpu"):
            raise ValueError(
                f"train.flash_attention={fa} swaps the torch engine's flash-attention kernels "
                f"on a GPU; set train.flash_attention=torch for train.engine="
                f"{self.train.engine} train.device={self.train.device}"
            )
        if fa != "torch" and self.model.attention_dropout:
            raise ValueError(
                f"train.flash_attention={fa} has no attention dropout (model.attention_dropout="
                f"{self.model.attention_dropout}); set model.attention_dropout=0 or "
                f"train.flash_attention=torch"
            )
        if self.train.fp8_mlp != "torchao" and fp8 not in ("tensorwise", "none"):
            raise ValueError(
                f"train.fp8_mlp={self.train.fp8_mlp} has kernels for tensorwise scales only; "
                f"here train.fp8={fp8}: set train.fp8=tensorwise, or train.fp8_mlp=torchao"
            )
        if fp8 != "none" and (self.train.engine != "torch" or self.train.device == "cpu"):
            raise ValueError(
                f"train.fp8={fp8} runs the torch engine's GEMMs in FP8 on an FP8 "
                f"GPU (H100/H200 class); set train.fp8=none for train.engine="
                f"{self.train.engine} train.device={self.train.device}"
            )
        return self

    def check_parallel(self, world_size: int) -> int:
        """Validate the layout for a world size and return the data-parallel size."""
        tp, pp = self.parallel.tensor, self.parallel.pipeline
        if world_size % (tp * pp):
            raise ValueError(
                f"parallel.tensor x parallel.pipeline = {tp} x {pp} does not divide the world "
                f"size {world_size}; choose sizes whose product divides it"
            )
        if self.model.num_attention_heads % tp:
            raise ValueError(
                f"model.num_attention_heads {self.model.num_attention_heads} is not divisible by "
                f"parallel.tensor {tp}; choose a tensor-parallel size that divides the head count"
            )
        dp = world_size // (tp * pp)
        self.train.grad_accumulation(dp)
        return dp


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives one key twice: YAML loaders would keep the last one silently."""

    def __init__(self, key: str, lines: tuple[int, int]):
        self.key, self.lines = key, lines
        super().__init__(f"{key}: given twice (lines {lines[0]} and {lines[1]})")


def refuse_duplicate_keys(node, path: tuple[str, ...] = (), seen_nodes=None) -> None:
    """Raise DuplicateKeyError for a key given twice in any mapping of a composed YAML node;
    `key` is the dotted path of the second one. Merge keys (`<<`) are YAML's own overriding."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: checked where its anchor is
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in lines and key != "<<":
                raise DuplicateKeyError(".".join((*path, key)), (lines[key], line))
            lines[key] = line
            refuse_duplicate_keys(value, (*path, key), seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            refuse_duplicate_keys(item, (*path, str(i)), seen_nodes)


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_document(self, node):
        refuse_duplicate_keys(node)
        return super().construct_document(node)


def load_trainer_config(path: str | Path) -> TrainerConfig:
    """Read a resolved config file (the launcher's, or one holding only the trainer sections)."""
    with open(path) as f:
        raw = yaml.load(f, Loader=_UniqueKeyLoader) or {}
    return TrainerConfig.model_validate(raw.get("trainer", raw))


def dump_trainer_config(cfg: TrainerConfig) -> dict:
    return cfg.model_dump(mode="json")
