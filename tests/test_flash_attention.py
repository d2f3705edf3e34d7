"""train.flash_attention: the kernels behind torch's flash attention (fa4 = FlashAttention-4).

CPU checks of what is refused and how (the config, the launcher before submitting, the trainer's
start-up line when the package or the GPU is missing); the kernels themselves run in the GPU test
at the end (marked `gpu`) and in benchmarks/results/h200_141gb/fa4/."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from bionemo.config import TrainerConfig
from launchers.config import ConfigError, resolve

REPO = Path(__file__).resolve().parents[1]
TINY = dict(
    model=dict(name="t", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128),
    train=dict(micro_batch_size=2),
)


@pytest.mark.parametrize(
    "train,model,message",
    [
        (
            dict(device="cpu"),
            {},
            "set train.flash_attention=torch for train.engine=torch train.device=cpu",
        ),
        (dict(engine="megatron"), {}, "for train.engine=megatron"),
        (
            {},
            dict(attention_dropout=0.1),
            "has no attention dropout \\(model.attention_dropout=0.1\\); set model.attention_dropout=0",
        ),
    ],
)
def test_the_config_refuses_fa4_where_it_cannot_run(train, model, message):
    cfg = {
        "model": {**TINY["model"], **model},
        "train": {"micro_batch_size": 2, "flash_attention": "fa4", **train},
    }
    with pytest.raises(ValueError, match=message):
        TrainerConfig.model_validate(cfg)
    # The default and fa4 on a GPU config are accepted.
    ok = TrainerConfig.model_validate(
        {**TINY, "train": {"micro_batch_size": 2, "flash_attention": "fa4"}}
    )
    assert ok.train.flash_attention == "fa4"
    assert TrainerConfig.model_validate(TINY).train.flash_attention == "torch"


def test_the_launcher_refuses_fa4_on_a_gpu_without_its_kernels(tmp_path):
    a100 = tmp_path / "a100.yaml"
    a100.write_text(yaml.safe_dump({"cluster": {"gpu_type": "a100_80gb", "gpus_per_node": 8}}))
    with pytest.raises(
        ConfigError, match="trainer.train.flash_attention: fa4 runs FlashAttention-4"
    ):
        resolve(
            model="esm2_650m",
            cluster=str(a100),
            nodes=1,
            overrides=["trainer.train.flash_attention=fa4"],
        )
    # On an H100 profile it resolves, and the trainer's config carries it.
    r = resolve(
        model="esm2_650m",
        cluster="h100_example",
        nodes=1,
        overrides=["trainer.train.flash_attention=fa4"],
    )
    assert r.config.trainer.train.flash_attention == "fa4"


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    a100 = tmp_path / "a100.yaml"
    a100.write_text(yaml.safe_dump({"cluster": {"gpu_type": "a100_80gb", "gpus_per_node": 8}}))
    out = subprocess.run(
        [sys.executable, "-m", "launchers", "render", "--model", "esm2_650m", "--cluster", str(a100),
         f"cluster.runs_root={tmp_path / 'runs'}", "trainer.train.flash_attention=fa4"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "trainer.train.flash_attention" in lines[0] and "flash_attention=torch" in lines[0]
    assert not (tmp_path / "runs").exists()  # nothing written
    bad = subprocess.run(
        [sys.executable, "-m", "launchers", "render", "--model", "esm2_650m", "--cluster", "h100_example",
         f"cluster.runs_root={tmp_path / 'runs'}", "trainer.train.flash_attention=fa3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "trainer.train.flash_attention" in bad.stderr, bad.stderr


def _start_up_line(tmp_path: Path, stub_package: bool) -> str:
    """use_flash_attention('fa4', cpu) in a fresh process: without flash_attn importable, or with
    a stand-in flash_attn.cute.interface on the path (the package present, the GPU missing)."""
    path = ""
    if stub_package:
        pkg = tmp_path / "stub" / "flash_attn" / "cute"
        pkg.mkdir(parents=True)
        for f in (pkg.parent / "__init__.py", pkg / "__init__.py"):
            f.write_text("")
        (pkg / "interface.py").write_text(
            "def _flash_attn_fwd(*a, **k):\n    raise AssertionError('not on CPU')\n"
            "_flash_attn_bwd = _flash_attn_fwd\n"
        )
        path = str(tmp_path / "stub")
    code = textwrap.dedent(
        f"""
        import sys
        if not {stub_package!r}:
            sys.modules['flash_attn'] = None
        else:
            sys.path.insert(0, {path!r})
        import torch
        from bionemo.engines.torch_engine import use_flash_attention
        print(use_flash_attention('fa4', torch.device('cpu')))
        print(use_flash_attention('torch', torch.device('cpu')))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    first, second = out.stdout.strip().splitlines()
    assert second == "None"
    return first


def test_the_trainer_names_the_missing_package_and_the_fix(tmp_path):
    line = _start_up_line(tmp_path, stub_package=False)
    assert line.startswith(
        "train.flash_attention=fa4 needs torch >= 2.11 and the flash-attn-4 package"
    )
    assert "pip install 'bionemo-hpc[fa4]'" in line and line.endswith(
        "set train.flash_attention=torch"
    )


def test_the_trainer_names_the_gpu_it_needs(tmp_path):
    line = _start_up_line(tmp_path, stub_package=True)
    assert line.startswith("train.flash_attention=fa4 needs a Hopper or Blackwell GPU")
    assert "this rank runs on cpu" in line and line.endswith("set train.flash_attention=torch")


@pytest.mark.gpu
def test_fa4_matches_torchs_flash_attention_on_the_models_segments():
    """On a Hopper/Blackwell GPU with flash-attn-4: ESM-2's variable-length attention (query-only
    and key-only padding segments, as the model builds them) gives the same output and gradients
    with FA4's kernels as with torch's FlashAttention-2, within bf16 rounding (both against an
    fp32 reference: FA4's error at most 1.5x FA2's plus 1e-3), and padding rows stay zero."""
    if not torch.cuda.is_available():
        pytest.fail("needs a CUDA device; run `make test-gpu` on a GPU machine")
    from torch.nn.attention import restore_flash_attention_impl
    from torch.nn.attention.varlen import varlen_attn

    from bionemo.engines.torch_engine import use_flash_attention
    from bionemo.models.esm2.model import padded_segments

    g = torch.Generator(device="cuda").manual_seed(0)
    B, S, H, D = 4, 256, 8, 64
    lengths = torch.tensor([256, 17, 130, 200], device="cuda")
    mask = torch.arange(S, device="cuda")[None, :] < lengths[:, None]
    cu_q, cu_k = padded_segments(mask)
    q, k, v, grad = (
        torch.randn(B * S, H, D, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(4)
    )

    def run():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = varlen_attn(qq, kk, vv, cu_q, cu_k, S, S, scale=D**-0.5)
        out.backward(grad)
        return [t.float() for t in (out, qq.grad, kk.grad, vv.grad)]

    ref = []  # fp32, one sequence at a time over its real tokens (padding rows: not compared)
    real = mask.flatten()
    qf, kf, vf = (t.float().detach().requires_grad_() for t in (q, k, v))
    outs = []
    for b in range(B):
        n, a = int(lengths[b]), b * S
        sl = slice(a, a + n)
        o = torch.nn.functional.scaled_dot_product_attention(
            qf[sl].transpose(0, 1), kf[sl].transpose(0, 1), vf[sl].transpose(0, 1), scale=D**-0.5
        ).transpose(0, 1)
        outs.append((sl, o))
    total = sum((o.float() * grad[sl].float()).sum() for sl, o in outs)
    total.backward()
    ref_out = torch.zeros(B * S, H, D, device="cuda")
    for sl, o in outs:
        ref_out[sl] = o.detach()
    ref = [ref_out, qf.grad, kf.grad, vf.grad]

    fa2 = run()
    assert use_flash_attention("fa4", torch.device("cuda")) is None
    try:
        fa4 = run()
    finally:
        restore_flash_attention_impl()
    # Padding rows are segments without keys: output 0 and no gradient, as FA2 gives them (a
    # NaN there would reach the weight gradients through 0 * NaN).
    for name, a, b in zip(("out", "dq", "dk", "dv"), fa2, fa4):
        assert torch.isfinite(b).all(), name
        assert torch.equal(b[~real], a[~real]), name
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), fa2, fa4, ref):
        e2 = ((a[real] - r[real]).norm() / r[real].norm()).item()
        e4 = ((b[real] - r[real]).norm() / r[real].norm()).item()
        assert e4 <= 1.5 * e2 + 1e-3, (name, e2, e4)
