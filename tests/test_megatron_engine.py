"""The megatron engine without a GPU: configuration, model equivalence and weight layout.

megatron-core's training path (gradient buffers, distributed optimizer, dist_checkpointing) is
CUDA-only and is exercised on a GPU machine (benchmarks/megatron_check.py, results in
benchmarks/results/megatron/). What runs here, on CPU with gloo process groups: the engine's
modules import, the megatron-core ESM-2 computes the same loss and gradients as the torch
engine's model from the same weights at TP=1 and at TP=2 (two processes, real tensor-parallel
collectives), and weights convert between the two layouts without loss.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


def test_engine_modules_import_without_cuda():
    import bionemo.engines.convert  # noqa: F401
    import bionemo.engines.megatron_engine  # noqa: F401
    import bionemo.models.esm2.megatron as m

    assert m.padded_vocab_size(33, 1) == 64 and m.padded_vocab_size(33, 2) == 128


def test_qkv_layout_roundtrip():
    import torch

    from bionemo.models.esm2.megatron import _qkv_from_megatron, _qkv_to_megatron

    heads, hd, h = 4, 3, 12
    w = torch.arange(3 * heads * hd * h, dtype=torch.float32).view(3 * heads * hd, h)
    m = _qkv_to_megatron(w, heads)
    # megatron's rows: head 0's q, k, v, then head 1's ...
    assert torch.equal(m[hd : 2 * hd], w[heads * hd : heads * hd + hd])  # head 0's k
    assert torch.equal(_qkv_from_megatron(m, heads), w)


def test_resumed_adam_steps_are_not_shared():
    """The megatron-core loader puts one 'step' tensor into every parameter's Adam state; torch's
    AdamW then advances it once per parameter. The engine's load wrapper un-shares them, so one
    optimizer step after a resume advances each parameter's count by exactly one."""
    import torch

    from bionemo.engines.megatron_engine import _torch_adam_step_kept

    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(4)]
    adam = torch.optim.AdamW(params, lr=0.1)

    class Holder:  # the attributes of megatron's DistributedOptimizer that the wrapper touches
        optimizer = adam

        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            return tensors

    holder = Holder()
    for p in params:
        p.grad = torch.ones(3)
    adam.step()
    with _torch_adam_step_kept(holder):
        # what megatron's load does for torch Adam: one tensor object for every parameter
        saved = adam.state_dict()
        step = torch.tensor(5.0)
        for st in saved["state"].values():
            st["step"] = step
        adam.load_state_dict(saved)
        assert holder._set_main_param_and_optimizer_states(None, {"param": 1})["step"] is None
    adam.step()
    assert [float(adam.state[p]["step"]) for p in params] == [6.0] * 4
    assert "_set_main_param_and_optimizer_states" not in vars(holder)


def test_saved_optimizer_state_keeps_bucket_padding():
    """megatron-core gathers the distributed optimizer's state with the buckets back to back but
    slices it with offsets in the padded buffer; the engine's save wrapper puts each bucket's
    segment back at its offset, so parameter i reads its own state."""
    from types import SimpleNamespace

    import torch

    from bionemo.engines.megatron_engine import _bucket_padding_kept, repad_buckets

    # Two buckets as pipeline parallelism makes them: 5 elements padded to 8, then 3 (the tied
    # embedding's bucket of its own).
    buckets = [
        SimpleNamespace(offset=0, numel_unpadded=5),
        SimpleNamespace(offset=8, numel_unpadded=3),
    ]
    flat = torch.arange(1.0, 9.0)
    out = repad_buckets(flat, buckets)
    assert out.tolist() == [1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 8]
    with pytest.raises(RuntimeError, match="does not match its buckets"):
        repad_buckets(torch.arange(7.0), buckets)

    class Holder:  # the attributes of megatron's DistributedOptimizer that the wrapper touches
        buffers = [SimpleNamespace(buckets=buckets)]

        def get_parameter_state_dp_zero(
            self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False
        ):
            world = {"param": flat.clone(), "exp_avg": -flat.clone(), "numel_unpadded": 8}
            return {"buckets_coalesced": True, 0: {torch.float32: world}}

    holder = Holder()
    with _bucket_padding_kept(holder):
        world = holder.get_parameter_state_dp_zero(empty_data=False)[0][torch.float32]
        # the tied weight (second bucket, offset 8) gets its own values, not the padding's
        assert world["param"][8:11].tolist() == [6, 7, 8]
        assert world["exp_avg"][8:11].tolist() == [-6, -7, -8]
        assert world["numel_unpadded"] == 8
        # loading asks for shapes only (empty_data): untouched
        assert (
            holder.get_parameter_state_dp_zero(empty_data=True)[0][torch.float32]["param"].numel()
            == 8
        )
    assert "get_parameter_state_dp_zero" not in vars(holder)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_model_matches_torch_model(tp, tmp_path):
    """Same weights -> same loss and same gradients (fp32, CPU), gathered over TP ranks."""
    from benchmarks.sweep import free_port

    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__)), str(tp), str(tmp_path)],
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": str(tp),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "PYTHONWARNINGS": "ignore",
            },
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(tp)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}:\n{out[-3000:]}"
    assert "OK" in outs[0], outs[0][-2000:]


def _rank_main(tp: int) -> None:
    """One rank of test_megatron_model_matches_torch_model."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from bionemo.config import ModelConfig
    from bionemo.models.esm2 import megatron as M
    from bionemo.models.esm2.model import ESM2

    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    rank = dist.get_rank()
    cfg = ModelConfig(
        name="t",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        seq_length=32,
    )
    torch.manual_seed(0)
    ref = ESM2(cfg)
    model = M.MegatronESM2(
        cfg, M.transformer_config(cfg, tp=tp, pp=1, bf16=False, cpu_init=True), use_te=False
    )
    M.load_full_state(model, M.torch_to_megatron(ref.state_dict(), cfg, model.vocab_size))

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 24, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 15:] = False
    mask[2, 9:] = False
    ids[~mask] = 1  # <pad>
    ids[0, 3] = ids[2, 5] = 32  # <mask>
    labels = torch.full((3, 20), -100)
    labels[0, 3], labels[1, 4], labels[2, 5], labels[2, 1] = 5, 7, 9, 11

    ref_loss = ref.loss(ids, mask, labels)
    loss = model(ids, mask, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    loss.backward()

    # Gradients: gather each tensor-parallel parameter's slices, convert back, compare.
    grads = {}
    for name, p in model.named_parameters():
        gr = p.grad
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            parts = [torch.empty_like(gr) for _ in range(tp)]
            dist.all_gather(parts, gr.contiguous(), group=ps.get_tensor_model_parallel_group())
            gr = torch.cat(parts, dim=p.partition_dim)
        grads[name] = gr
    grads = M.megatron_to_torch(grads, cfg)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys()
    for name, gr in ref_grads.items():
        torch.testing.assert_close(grads[name], gr, rtol=1e-4, atol=1e-6, msg=name)

    if tp == 1:  # the weights convert back exactly
        back = M.megatron_to_torch(model.state_dict(), cfg)
        assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    if rank == 0:
        print("OK")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]))


def _tiny_trainer_config():
    from bionemo.config import TrainerConfig

    return TrainerConfig.model_validate(
        {
            "model": {
                "name": "t",
                "num_layers": 1,
                "hidden_size": 32,
                "num_attention_heads": 4,
                "ffn_hidden_size": 64,
            },
            "train": {"micro_batch_size": 2, "device": "cpu"},
        }
    )


def test_engines_refuse_each_others_checkpoints(tmp_path):
    """A megatron checkpoint is not resumed by the torch engine (nor used as its init weights):
    the errors say which engine wrote it and how to go on."""
    import torch

    from bionemo import rundir
    from bionemo.checkpoint import Checkpointer
    from bionemo.distributed import DistEnv
    from bionemo.engines.torch_engine import TorchEngine

    run = tmp_path / "run"
    ckpt = rundir.step_dir(run, 3)
    ckpt.mkdir(parents=True)
    (ckpt / rundir.COMPLETE).write_text("3\n")
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (ckpt / "trainer_state.json").write_text(
        '{"step": 3, "engine": "megatron", "tensor_parallel": 2}'
    )

    env = DistEnv.from_environ("USR2", {})
    with pytest.raises(ValueError, match="python -m bionemo.engines.convert"):
        TorchEngine(_tiny_trainer_config(), env, torch.device("cpu"), init_from=ckpt)
    engine = TorchEngine(_tiny_trainer_config(), env, torch.device("cpu"))
    with pytest.raises(ValueError, match="written by the megatron engine .* train.engine=megatron"):
        Checkpointer(run, keep_last=2, rank=0).load(ckpt, engine)
