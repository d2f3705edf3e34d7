"""train.fp8_mlp=fused: the MLP's FP8 through bionemo/models/fp8_mlp.py instead of torchao's
Float8Linear layers. The recipe must be torchao's tensorwise one, so on CPU (the reference kernels,
emulated GEMMs) it is compared with torchao's emulation bit for bit; the Triton kernels are compared
with the references on a GPU (marked `gpu`); speed is measured in benchmarks/results/h200_141gb/."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.float8 import Float8LinearConfig, convert_to_float8_training
from torchao.float8.float8_linear import Float8Linear

from benchmarks.profile_step import model_config
from bionemo.config import TrainerConfig
from bionemo.distributed.parallel import convert_to_fp8
from bionemo.models import fp8_mlp as mlp8
from bionemo.models.esm2 import ESM2

REPO = Path(__file__).resolve().parents[1]
H, FFN = 64, 256


class PlainMLP(nn.Module):
    def __init__(self, act: str):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(H, FFN), nn.Linear(FFN, H), act

    def forward(self, x):
        return self.fc2(mlp8.act_fn(self.fc1(x), self.act))


class FusedMLP(PlainMLP):
    def forward(self, x):
        return mlp8.fp8_mlp(x, self.fc1, self.fc2, self.act)


def _torchao(module: nn.Module) -> nn.Module:
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name("tensorwise"), emulate=True)
    convert_to_float8_training(module, config=config)
    return module


def _run(module, x, grad, autocast: bool):
    for p in module.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x)
    y.backward(grad.to(y.dtype))
    inner = getattr(module, "_orig_mod", module)  # a torch.compile'd module's names are its own
    return y, x.grad, {n: p.grad for n, p in inner.named_parameters()}


def _pair(act: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = PlainMLP(act)
    fused = FusedMLP(act)
    fused.load_state_dict(ref.state_dict())
    _torchao(ref)
    assert isinstance(ref.fc1, Float8Linear)
    return ref, fused


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("rows", [48, 40])
def test_the_fused_mlp_is_torchaos_tensorwise_recipe(act, rows):
    """Output, input gradient and weight gradients equal torchao's (emulated) bit for bit: the
    same scales, the same fp8 roundings. 40 rows is not a multiple of 16: the weight-gradient
    GEMMs' inner dimension is padded with zeros. Only fc1's bias gradient may differ, in the last
    bits of an fp32 sum (the tiles' column sums are added in another order than torch's):
    relative 1e-5."""
    ref, fused = _pair(act)
    x, grad = torch.randn(rows, H), torch.randn(rows, H)
    y0, dx0, g0 = _run(ref, x, grad, False)
    y1, dx1, g1 = _run(fused, x, grad, False)
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0)
    for name in ("fc1.weight", "fc2.weight", "fc2.bias"):
        assert torch.equal(g1[name].to(g0[name].dtype), g0[name]), name
    rel = (g1["fc1.bias"] - g0["fc1.bias"]).norm() / g0["fc1.bias"].norm()
    assert rel < 1e-5, rel
    # and it is FP8: against the same MLP in full precision it differs by the quantization
    plain = PlainMLP(act)
    plain.load_state_dict(fused.state_dict())
    y2, _, _ = _run(plain, x, grad, False)
    assert 1e-3 < ((y1.float() - y2).norm() / y2.norm()) < 0.1


def test_under_autocast_it_computes_in_bf16_as_torchao():
    """Under bf16 autocast the GEMMs' inputs and outputs are bf16, as torchao's: the same numbers
    as the fused MLP on the input cast to bf16 without autocast. Against torchao not bit for bit:
    its CPU emulation multiplies the dequantized operands under autocast, in bf16, where this one
    (like the GPU's fp8 GEMM) accumulates in fp32, and a changed maximum moves many fp8
    roundings. So both are held against the MLP in fp32: the fused error is no larger than
    torchao's plus a fifth."""
    ref, fused = _pair("gelu")
    x, grad = torch.randn(40, H), torch.randn(40, H)
    y0, dx0, g0 = _run(ref, x, grad, True)
    y1, dx1, g1 = _run(fused, x, grad, True)
    assert y1.dtype == y0.dtype == torch.bfloat16 and dx1.dtype == torch.float32
    y2, dx2, g2 = _run(fused, x.bfloat16(), grad, False)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2.float())
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    plain = PlainMLP("gelu")
    plain.load_state_dict(fused.state_dict())
    y3, dx3, g3 = _run(plain, x, grad, False)

    def err(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    for ours, theirs, exact in [
        (y1, y0, y3),
        (dx1, dx0, dx3),
        *((g1[n], g0[n], g3[n]) for n in g0),
    ]:
        assert err(ours, exact) < 1.2 * err(theirs, exact) + 1e-3


def test_compiled_equals_eager():
    """Under torch.compile (dynamo through the autograd function, the custom ops opaque, inductor
    around them) the numbers are the eager ones, for a padded row count too; fc2's bias gradient,
    a column sum inductor generates in its own order, to fp32 rounding."""
    torch.manual_seed(0)
    eager = FusedMLP("gelu")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module)
    for rows in (48, 40):
        x, grad = torch.randn(rows, H), torch.randn(rows, H)
        y0, dx0, g0 = _run(eager, x, grad, False)
        y1, dx1, g1 = _run(compiled, x, grad, False)
        assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
        assert all(torch.equal(g0[n], g1[n]) for n in g0 if n != "fc2.bias")
        torch.testing.assert_close(g1["fc2.bias"], g0["fc2.bias"], rtol=1e-5, atol=1e-5)


def test_the_conversion_keeps_parameter_names_and_swaps_only_attention():
    """fused_mlp: every block's MLP runs through fp8_mlp, its Linear layers stay (checkpoints and
    exports see the same names), and torchao swaps the attention's two projections only."""
    torch.manual_seed(0)
    model = ESM2(model_config("esm2_8m", num_layers=2))
    names = [n for n, _ in model.named_parameters()]
    assert convert_to_fp8(model, "tensorwise", emulate=True, fused_mlp=True) == 8
    assert [n for n, _ in model.named_parameters()] == names
    swapped = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert swapped == {f"layers.{i}.attn.{p}" for i in range(2) for p in ("qkv_proj", "out_proj")}
    assert all(b.mlp.fused_fp8 and type(b.mlp.fc1) is nn.Linear for b in model.layers)
    with pytest.raises(ValueError, match="fused MLP needs the tensorwise recipe"):
        convert_to_fp8(ESM2(model_config("esm2_8m", num_layers=2)), "rowwise", fused_mlp=True)


def test_training_with_it_is_training_with_torchao():
    """The tiny ESM-2, 6 AdamW steps, torchao's FP8 everywhere against fused MLPs (emulated GEMMs
    in both): the same losses to 1e-5 (only the bias gradient's summation order differs)."""
    torch.manual_seed(1)
    batches = [torch.randint(4, 29, (4, 64)) for _ in range(2)]
    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = ESM2(model_config("esm2_8m", num_layers=2))
        convert_to_fp8(model, "tensorwise", emulate=True, fused_mlp=fused)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses[fused] = []
        for step in range(6):
            ids = batches[step % 2]
            loss = model.loss(ids, torch.ones_like(ids), ids, None, None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]


def test_the_config_refuses_it_with_rowwise_scales():
    base = dict(
        model=dict(name="t", num_layers=2, hidden_size=64, num_attention_heads=4,
                   ffn_hidden_size=128),
        train=dict(micro_batch_size=2, fp8_mlp="fused"),
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match="has kernels for tensorwise scales only; here "
        "train.fp8=rowwise: set train.fp8=tensorwise, or train.fp8_mlp=torchao",
    ):
        TrainerConfig.model_validate({**base, "train": {**base["train"], "fp8": "rowwise"}})
    for recipe in ("tensorwise", "none"):  # none: nothing in FP8, nothing to fuse
        cfg = TrainerConfig.model_validate({**base, "train": {**base["train"], "fp8": recipe}})
        assert cfg.train.fp8_mlp == "fused"


def test_the_cli_refuses_it_in_one_line_before_writing(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "render", "--model", "esm2_3b", "--cluster", "h100_example",
         f"cluster.runs_root={tmp_path / 'runs'}", "trainer.train.fp8=rowwise",
         "trainer.train.fp8_mlp=fused"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "train.fp8_mlp=fused" in lines[0] and "train.fp8=tensorwise" in lines[0]
    assert not (tmp_path / "runs").exists()


def _fp8_gpu() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.fail("needs an FP8 GPU (H100/H200 class); run `make test-gpu` on one")


def _dequant_close(a8, a_scale, b8, b_scale, ulp: float) -> None:
    """Two fp8 tensors hold the same values to within one step of the format (ulp: its relative
    step, 2^-3 e4m3, 2^-2 e5m2), and all but 1 in 1,000 elements bit for bit."""
    a, b = a8.float() / a_scale, b8.float() / b_scale
    assert torch.allclose(a, b, rtol=ulp, atol=float(b.abs().max()) * 2**-10)
    assert (a8.view(torch.uint8) != b8.view(torch.uint8)).float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("rows", [4096, 1000])
def test_the_triton_kernels_match_the_references(act, rows):
    """The CUDA implementation of the two custom ops (Triton) against the torch references on the
    same GPU, ESM-2 3B's FFN width: scales, fp8 tensors in both layouts (with the zero padding of
    1000 -> 1008 rows) and the bias gradient. Triton's exp is not torch's to the last bit, so a
    rare bf16 rounding of the GELU may land the other way."""
    _fp8_gpu()
    torch.manual_seed(0)
    f = 10240
    h = (torch.randn(rows, f, device="cuda") * 2).to(torch.bfloat16)
    dg = (torch.randn(rows, f, device="cuda") * 1e-3).to(torch.bfloat16)
    g8, gs = mlp8.act_to_fp8(h, act)
    r8, rs = mlp8.reference_act_to_fp8(h, act)
    assert torch.allclose(gs, rs, rtol=1e-2)
    _dequant_close(g8, gs, r8, rs, 2**-3)
    k_rows = mlp8.padded_rows(rows)
    out = mlp8.act_backward_fp8(dg, h, gs, act, k_rows)
    ref = mlp8.reference_act_backward_fp8(dg, h, gs, act, k_rows)
    assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in ref]
    assert torch.allclose(out[1], ref[1], rtol=1e-2)
    _dequant_close(out[0], out[1], ref[0], ref[1], 2**-2)
    _dequant_close(out[2], out[1], ref[2], ref[1], 2**-2)
    _dequant_close(out[3], gs, ref[3], gs, 2**-3)
    assert not out[2][:, rows:].float().any() and not out[3][:, rows:].float().any()
    assert torch.allclose(out[4], ref[4], rtol=1e-3, atol=float(ref[4].abs().max()) * 1e-3)


@pytest.mark.gpu
def test_on_a_gpu_it_trains_as_torchao_does():
    """The 3B's block shape (hidden 2560, FFN 10240), 2 layers, bf16 autocast, compiled: three
    AdamW steps with torchao's FP8 MLPs and with the fused ones. On the GPU the two differ in
    last bits (fc1's bias is added in the GEMM's epilogue here, after it in bf16 by torchao;
    Triton's exp is not torch's), which move a few fp8 roundings and a maximum, and AdamW's
    first steps amplify that: call 1 measured 6e-5, 3e-4 and 3.6e-3 relative over three steps.
    1% over three steps, the first to 1e-3: a wrong weight gradient (a transposed copy) breaks
    that at once; the kernel test above checks every output of the kernels directly."""
    _fp8_gpu()
    torch.manual_seed(0)
    ids = torch.randint(4, 29, (8, 512), device="cuda")
    losses = {}
    for fused in (False, True):
        torch.manual_seed(0)
        cfg = model_config("esm2_3b", num_layers=2)
        with torch.device("cuda"):
            model = ESM2(cfg)
        convert_to_fp8(model, "tensorwise", fused_mlp=fused)
        for block in model.layers:
            block.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses[fused] = []
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model.loss(ids, torch.ones_like(ids), ids, None, None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-2), losses
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-3)


def _fsdp_worker(out: str) -> None:
    """One of 2 gloo ranks: the tiny ESM-2 in fp32 under FSDP2 with FP8 tensorwise (emulated
    GEMMs), 4 AdamW steps on per-rank batches, torchao's MLPs then the fused ones; rank 0 writes
    {mode: mean loss of each step} to `out`."""
    import json

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from bionemo.distributed.parallel import wrap_for_training
    from bionemo.engines.torch_engine import MaskedLMLoss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("shard",))
    torch.manual_seed(10 + rank)
    batches = [torch.randint(4, 29, (4, 64)) for _ in range(4)]
    results = {}
    for mode in ("torchao", "fused"):
        torch.manual_seed(0)
        model = ESM2(model_config("esm2_8m", num_layers=2))
        step_fn = wrap_for_training(
            MaskedLMLoss(model), model, compile=False, dp=2, device=torch.device("cpu"),
            fp8="tensorwise", fp8_mlp=mode, mesh=mesh,
        )  # fmt: skip
        assert all(b.mlp.fused_fp8 == (mode == "fused") for b in model.layers)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
        losses = []
        for ids in batches:
            loss = step_fn(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / 2)
        results[mode] = losses
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_under_fsdp_it_trains_as_torchao_does(tmp_path):
    """2 gloo ranks, FSDP2 (the weights are gathered shards, the gradients reduce-scattered):
    the fused MLPs give torchao's losses to 1e-5 (fc1's bias gradient is summed in another
    order; everything else is the same arithmetic)."""
    import json
    import os

    from tests.test_resume import free_port

    out = tmp_path / "losses.json"
    code = "import sys; from tests.test_fp8_mlp import _fsdp_worker as w; w(sys.argv[1])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO,
                         env={**env, "RANK": str(r)})
        for r in range(2)
    ]  # fmt: skip
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    losses = json.loads(out.read_text())
    assert losses["fused"] == pytest.approx(losses["torchao"], rel=1e-5), losses
    assert losses["fused"][-1] < losses["fused"][0]


def test_the_cli_refuses_a_hostile_value_before_writing(tmp_path):
    """The key is a closed set: a value with a shell payload is one line naming the key and its
    choices, exit 2, and no run directory."""
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "render", "--model", "esm2_3b", "--cluster", "h100_example",
         f"cluster.runs_root={tmp_path / 'runs'}", "trainer.train.fp8_mlp=fused;rm -rf ~"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "trainer.train.fp8_mlp" in lines[0] and "'torchao' or 'fused'" in lines[0]
    assert not (tmp_path / "runs").exists()
