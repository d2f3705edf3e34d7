"""Benchmark tables (configs/benchmarks/<gpu_type>.yaml) and Section, the base of every schema
section. Moved out of launchers/config/schema.py, which re-exports these names."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bionemo.config import FP8MLPKernels, FP8Recipe, Strategy


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Benchmark tables
# --------------------------------------------------------------------------------------------


class BenchmarkRow(Section):
    micro_batch_size: int = Field(gt=0, description="-> trainer.train.micro_batch_size")
    engine: Literal["torch", "megatron"] | None = Field(
        None, description=("-> trainer.train.engine (TP/PP > 1: megatron)")
    )
    data_parallel: Strategy | None = Field(
        None, description="-> trainer.parallel.data_parallel (torch engine: ddp, fsdp, hsdp)"
    )
    fp8: FP8Recipe | None = Field(None, description="-> trainer.train.fp8 (FP8 GPUs only)")
    fp8_mlp: FP8MLPKernels | None = Field(
        None, description="-> trainer.train.fp8_mlp (the MLP's FP8 kernels, with fp8: tensorwise)"
    )
    tensor_parallel: int = Field(1, gt=0, description="-> trainer.parallel.tensor")
    pipeline_parallel: int = Field(1, gt=0, description="-> trainer.parallel.pipeline")
    global_batch_size: int | None = Field(
        None, gt=0, description=("-> trainer.train.global_batch_size")
    )
    gpus: int = Field(0, ge=0, description="the job size the row was measured at (reference only)")
    max_micro_batch_size: int | None = Field(
        None, gt=0, description=("larger micro batches draw a warning")
    )
    measured: bool | None = Field(None, description="default: the table's flag")
    source: str | None = Field(None, description="default: the table's source")
    date: str | None = Field(
        None, description=("when the row was measured (written by `make sweep --write-table`)")
    )
    notes: str | None = None

    def trainer_layer(self) -> dict:
        train: dict[str, object] = {
            "micro_batch_size": self.micro_batch_size,
            "global_batch_size": self.global_batch_size,
        }
        if self.engine is not None:
            train["engine"] = self.engine
        if self.fp8 is not None:
            train["fp8"] = self.fp8
        if self.fp8_mlp is not None:
            train["fp8_mlp"] = self.fp8_mlp
        parallel: dict[str, object] = {
            "tensor": self.tensor_parallel,
            "pipeline": self.pipeline_parallel,
        }
        if self.data_parallel is not None:
            parallel["data_parallel"] = self.data_parallel
        return {"train": train, "parallel": parallel}


# GPU types (cluster.gpu_type prefixes) with FP8 tensor cores: Hopper and Blackwell.
FP8_GPU_TYPES = ("h100", "h200", "h800", "gh200", "b100", "b200", "gb200")
# GPU types FlashAttention-4 builds for (compute capability 9.x Hopper, 10.x Blackwell): the same
# list as FP8's today; give it its own tuple if an FP8-only type (Ada: L40S, L4) joins that one.
FA4_GPU_TYPES = FP8_GPU_TYPES


class BenchmarkTable(Section):
    gpu_type: str
    kind: Literal["gpu", "cpu"] = Field(
        description=("cpu: the profile must have gpus_per_node 0; gpu: > 0")
    )
    measured: bool
    source: str
    rows: dict[str, BenchmarkRow]
