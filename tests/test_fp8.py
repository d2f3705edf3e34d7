"""FP8 training (train.fp8) through torchao, on CPU: the conversion, the recipes' quantization and
the start-up check are tested without a GPU (speed is measured on GPUs:
benchmarks/results/h200_141gb/fp8/). The fp8 GEMMs run through torchao's emulation (the
fp8-rounded operands multiplied in fp32, convert_to_fp8(emulate=True)), as the engine runs them
off CUDA: torch's CPU `_scaled_mm` is a reference loop, about a minute for one step of this
2-layer model. The trainer itself refuses FP8 on CPU
(it would be slow there, and pointless); these tests drive the engine's functions directly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.float8.float8_linear import Float8Linear  # the test extra has it (`make install`)

from benchmarks.profile_step import model_config
from bionemo.distributed.parallel import convert_to_fp8
from bionemo.engines.torch_engine import fp8_problem
from bionemo.models.esm2 import ESM2

LAYERS, STEPS = 2, 8


def tiny_esm2(seed: int = 0) -> ESM2:
    torch.manual_seed(seed)
    return ESM2(model_config("esm2_8m", num_layers=LAYERS))


def test_conversion_swaps_the_blocks_linears_and_nothing_else():
    model = tiny_esm2()
    assert convert_to_fp8(model, "tensorwise") == 4 * LAYERS  # qkv, out, fc1, fc2 per block
    fp8 = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert fp8 and all(n.startswith("layers.") for n in fp8)
    assert plain and not any(n.startswith("layers.") for n in plain)  # the LM head stays out of FP8


def test_skipped_layers_stay_in_bf16():
    """`skip` (benchmarks/profile_step.py --fp8-skip) keeps the named layers out of FP8 in every
    block, and only them."""
    model = tiny_esm2()
    assert convert_to_fp8(model, "tensorwise", skip=("attn.out_proj",)) == 3 * LAYERS
    plain = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {f"layers.{i}.attn.out_proj" for i in range(LAYERS)} <= plain
    assert not any(n.startswith("layers.") and not n.endswith("attn.out_proj") for n in plain)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_training_tracks_full_precision(recipe):
    """Same weights, same batches, AdamW: FP8 GEMMs (e4m3 forward, e5m2 gradients: 3 and 2
    mantissa bits) give fp32's first loss within 1% (the same weights: only the forward's
    quantization differs), then trajectories that drift apart as updates compound, by at most
    3% of the starting loss over 8 steps (measured with emulated GEMMs: 0.9% tensorwise, 0.8%
    rowwise); the loss falls as much in both."""
    torch.manual_seed(1)
    batches = [torch.randint(4, 29, (4, 64)) for _ in range(2)]
    losses = {}
    for name in ("fp32", recipe):
        model = tiny_esm2()
        if name != "fp32":
            convert_to_fp8(model, recipe, emulate=True)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses[name] = []
        for step in range(STEPS):
            ids = batches[step % len(batches)]
            loss = model.loss(ids, torch.ones_like(ids), ids, None, None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    full, low = losses["fp32"], losses[recipe]
    assert low != full  # the fp8 path ran: quantization changes the numbers
    assert abs(low[0] - full[0]) < 0.01 * full[0], (low, full)
    assert all(abs(a - b) < 0.03 * full[0] for a, b in zip(low, full)), (low, full)
    assert full[-1] < 0.3 * full[0] and low[-1] < 0.3 * low[0]


def test_the_start_up_check_names_the_missing_library_and_the_fix():
    """A cluster without torchao (an optional dependency, which a benchmark table row may turn
    on): one line naming torchao, how to install it and how to turn FP8 off, before the model is
    built. Run in a process where `import torchao` fails."""
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "import torch; from bionemo.engines.torch_engine import fp8_problem\n"
        "print(fp8_problem('tensorwise', torch.device('cpu')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = out.stdout.strip()
    assert "\n" not in line and line.startswith("train.fp8=tensorwise runs through torchao")
    assert "pip install 'bionemo-hpc[fp8]'" in line and line.endswith("set train.fp8=none")
    # With torchao, on a device without FP8 tensor cores: the GPU line; and none is always fine.
    assert "needs an FP8 GPU" in fp8_problem("rowwise", torch.device("cpu"))
    assert fp8_problem("none", torch.device("cpu")) is None


def _gather_worker(out: str, modes: str, first: str, save_at: str, load: str) -> None:
    """One of 2 gloo ranks: the tiny ESM-2 in fp32 under FSDP with FP8 (tensorwise), once per
    mode in `modes` ("1,0"), a fresh model each: "1" gathers its weights in fp8, "0" in fp32
    and casts after, as the trainer wires it (wrap_for_training, update_fp8_scales after each
    step). Each trains on per-rank batches `first` to 2*STEPS (from the DCP checkpoint `load`,
    if named); rank 0 writes {mode: mean loss of each step} to `out`. Mode "1" saves model
    and optimizer after step `save_at` (0: never) into ckpt/ beside `out`."""
    import json

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor as Fp8GatheredWeight

    from bionemo.distributed.parallel import update_fp8_scales, wrap_for_training
    from bionemo.engines.torch_engine import MaskedLMLoss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("shard",))
    torch.manual_seed(10 + rank)
    batches = [torch.randint(4, 29, (4, 64)) for _ in range(2 * STEPS)]
    results = {}
    for mode in modes.split(","):
        gather = mode == "1"
        model = tiny_esm2()
        step_fn = wrap_for_training(
            MaskedLMLoss(model),
            model,
            compile=False,
            dp=2,
            device=torch.device("cpu"),
            fp8="tensorwise",
            fp8_all_gather=gather,
            mesh=mesh,
        )
        # the all-gather is on exactly when asked: torchao's weight wrapper in the DTensor shards
        wrapped = [
            n for n, p in model.named_parameters() if isinstance(p.to_local(), Fp8GatheredWeight)
        ]
        assert len(wrapped) == (4 * LAYERS if gather else 0), wrapped
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        if load:
            msd, osd = get_state_dict(model, opt)
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=load)
            set_state_dict(
                model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        losses = []
        for step in range(int(first), 2 * STEPS):
            ids = batches[step]
            loss = step_fn(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gather:
                update_fp8_scales(model)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / 2)
            if gather and step + 1 == int(save_at):
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(out).parent / "ckpt"))
        results[mode] = losses
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_fp8_all_gather_under_fsdp_gives_the_same_steps_and_checkpoints(tmp_path):
    """parallel.fp8_all_gather: 2 gloo ranks under FSDP with FP8 tensorwise. Casting each weight
    shard to fp8 before the gather (with the whole weight's scale: one all-reduce of all the
    maxima after each step) gives the GEMMs the same fp8 weights as gathering fp32 and casting
    after: the same losses, bit for bit. Its checkpoints are plain DCP: a run resumed from one
    continues exactly as the uninterrupted run, and a run without the all-gather loads it too."""
    import json
    import os

    from tests.test_resume import free_port

    def run(name: str, modes: str, first: int = 0, save_at: int = 0, load: str = "") -> dict:
        out = tmp_path / f"{name}.json"
        code = "import sys; from tests.test_fp8 import _gather_worker as w; w(*sys.argv[1:])"
        args = [str(out), modes, str(first), str(save_at), load]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, *args],
                cwd=Path(__file__).resolve().parents[1],
                env={**env, "RANK": str(r)},
            )
            for r in range(2)
        ]
        assert [p.wait(timeout=300) for p in procs] == [0, 0]
        return json.loads(out.read_text())

    whole = run("whole", "0,1", save_at=STEPS)
    plain, gathered = whole["0"], whole["1"]
    assert gathered == plain  # bitwise: the same fp8 weights reach the GEMMs
    assert gathered[-1] < gathered[0]
    resumed = run("resumed", "1,0", first=STEPS, load=str(tmp_path / "ckpt"))
    assert resumed["1"] == gathered[STEPS:]  # exact resume with the all-gather
    assert resumed["0"] == gathered[STEPS:]  # and its checkpoint loads without it
