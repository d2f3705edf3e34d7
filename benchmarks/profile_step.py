"""Time and profile the training step of an ESM-2 preset on one GPU, outside the trainer's loop.

    python -m benchmarks.profile_step step --model esm2_650m --mbs 16,32 [--compile]
        [--recompute none|selective|full] [--pad max_length|none] [--profile 32] [--baseline FILE]
        [--fp32-residual] [--recompute-pointwise] [--fp8 [tensorwise|rowwise]]
        [--fp8-skip attn.out_proj] [--inductor triton.tile_reductions=True] [--json rows.jsonl]
        [--flash-attention fa4] [--fp8-mlp fused]
    python -m benchmarks.profile_step attention --model esm2_650m --mbs 32 [--flash-attention fa4]
    python -m benchmarks.profile_step gemm --model esm2_650m --tokens 32768
    python -m benchmarks.profile_step check

`step` is the trainer's step (bf16 autocast, fp32 params, MaskedLMLoss, grad clip 1.0, fused
AdamW, zero_grad(set_to_none)) on batches of the sample set (`make data`), read once and cycled,
so data loading is timed separately (ms per batch, one process, as num_workers=0 trains). One
loss.item() per step, as the sweep's log_every=1. Several micro batches run in one process, in
increasing order, until one runs out of memory. Tokens/s, TFLOP/s and MFU use the trainer's
formulas (bionemo.metrics.Throughput). --profile M: a torch.profiler kernel table at micro batch
M (GPU time per step by kernel and by kind). --baseline FILE: an ESM2 class from another file
(the model before a change) in place of bionemo's. --fp8 needs torchao (the `fp8` extra).
--inductor KEY=VALUE sets an inductor option for this process (A/B of code generation choices).
--flash-attention fa4: torch's flash attention runs FlashAttention-4's kernels in this process
(train.flash_attention; needs the `fa4` extra and a Hopper/Blackwell GPU). --fp8-mlp fused (with
--fp8 tensorwise): the MLPs' FP8 through bionemo/models/fp8_mlp.py (train.fp8_mlp).
Results on an H100: benchmarks/results/h100_80gb/speed-*.md.

`attention`: forward+backward of one attention layer's core on a padded batch of the sample set,
by implementation. `gemm`: the block's GEMM shapes in bf16 (and fp8 where torch._scaled_mm runs).
`check`: GPU numerics of the fast paths against the reference ones.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import statistics
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from bionemo.config import DataConfig, ModelConfig, TrainConfig, TrainerConfig
from bionemo.metrics import PEAK_TFLOPS, Throughput

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def model_config(name: str, **overrides) -> ModelConfig:
    raw = yaml.safe_load((REPO_ROOT / "configs" / "models" / f"{name}.yaml").read_text())
    return ModelConfig(**{**raw["trainer"]["model"], **overrides})


def host_batches(cfg: ModelConfig, mbs: int, pad: str, n: int) -> tuple[list[dict], float]:
    """n micro batches of the sample set's training split, and the loader's ms per batch."""
    from bionemo.data.dataset import build_dataloader

    loader = iter(build_dataloader(DataConfig(), cfg.seq_length, mbs, 0, 1, 1, 0, "train", pad))
    next(loader)  # opens the database, builds the first permutation
    t0 = time.perf_counter()
    out = [next(loader) for _ in range(n)]
    return out, (time.perf_counter() - t0) / n * 1e3


def to_device(batch: dict, device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


# ------------------------------------------------------------------------------------ step


def build(
    cfg: ModelConfig,
    device,
    baseline: str | None,
    compile_: bool,
    *,
    recompute_pointwise: bool | None = None,
    fp8: bool | str = False,
    fp8_skip: tuple[str, ...] = (),
    fp32_residual: bool = False,
    fp8_mlp: str = "torchao",
):
    from bionemo.engines.torch_engine import MaskedLMLoss, build_optimizer

    if baseline:
        spec = importlib.util.spec_from_file_location("baseline_esm2", baseline)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.ESM2(cfg)
    else:
        from bionemo.models.esm2 import ESM2

        model = ESM2(cfg)
    model = model.to(device).train()
    if fp32_residual:
        model.fp32_residual = True
    # The trainer's own config with its defaults (AdamW, fused on GPU, no offload), so that the
    # optimizer is built from whatever the engine reads; the micro batch is set per trial below.
    trainer_cfg = TrainerConfig(model=cfg, data=DataConfig(), train=TrainConfig(micro_batch_size=1))
    optimizer = build_optimizer(model, trainer_cfg, device)
    step_fn = MaskedLMLoss(model)
    if compile_ or fp8:
        from bionemo.distributed.parallel import wrap_for_training

        step_fn = wrap_for_training(
            step_fn,
            model,
            compile=compile_,
            dp=1,
            device=device,
            recompute_pointwise=recompute_pointwise,
            fp8=fp8,
            fp8_skip=fp8_skip,
            fp8_mlp=fp8_mlp,
        )
    return model, optimizer, step_fn


def train_step(step_fn, model, optimizer, batch):
    cuda = next(model.parameters()).is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
        loss = step_fn(**batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# Kernel name substrings -> kind, first match wins (names as cuBLAS/cuDNN/flash/inductor emit them).
KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "norm_kernel")),
    ("fp8 mlp (triton)", ("fp8_mlp_",)),  # bionemo/models/fp8_mlp_kernels.py
    ("compiled (triton)", ("triton",)),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copy / cat", ("copy", "cat", "index", "gather", "scatter")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
    ("reduction", ("reduce",)),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, subs in KINDS if any(s in low for s in subs)), "other")


def profile_table(step, steps: int = 2, top: int = 25) -> dict:
    """GPU time per step by kernel and by kind, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
        per_kernel[e.name][0] += us / 1e3 / steps
        per_kernel[e.name][1] += 1 / steps
    busy = sum(v[0] for v in per_kernel.values())
    kinds = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        kinds[kind_of(name)] += ms
    print(f"\n  GPU busy {busy:.1f} ms per step of {wall_ms:.1f} ms wall (profiler on)")
    print("  | kind | ms/step | % of GPU time |\n  |---|---:|---:|")
    for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  | {k} | {ms:.2f} | {100 * ms / busy:.1f} |")
    print("\n  | top kernels | kind | calls/step | ms/step | % |\n  |---|---|---:|---:|---:|")
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        print(f"  | `{short}` | {kind_of(name)} | {calls:.0f} | {ms:.2f} | {100 * ms / busy:.1f} |")
    return {"busy_ms": busy, "wall_ms": wall_ms, "kinds": dict(kinds)}


def run_step(args) -> list[dict]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    overrides = {"activation_checkpointing": args.recompute}
    if args.layers:
        overrides["num_layers"] = args.layers
    cfg = model_config(args.model, **overrides)
    t0 = time.perf_counter()
    model, optimizer, step_fn = build(
        cfg,
        device,
        args.baseline,
        args.compile,
        recompute_pointwise=args.recompute_pointwise,
        fp8=args.fp8 or False,
        fp8_skip=tuple(args.fp8_skip.split(",")) if args.fp8_skip else (),
        fp32_residual=args.fp32_residual,
        fp8_mlp=args.fp8_mlp,
    )
    build_s = time.perf_counter() - t0
    label = "baseline" if args.baseline else ("compiled" if args.compile else "eager")
    label += "".join(
        f"+{name}"
        for name, on in (
            ("pointwise-recompute", args.recompute_pointwise),
            ("fp32-residual", args.fp32_residual),
            (f"fp8:{args.fp8}", args.fp8),
            (f"fp8-skip:{args.fp8_skip}", args.fp8_skip),
            (f"fp8-mlp:{args.fp8_mlp}", args.fp8_mlp != "torchao"),
            *((f"inductor:{kv}", True) for kv in args.inductor),
            (f"flash:{args.flash_attention}", args.flash_attention != "torch"),
        )
        if on
    )
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    results = []
    for mbs in [int(m) for m in args.mbs.split(",")]:
        row = {
            "model": args.model,
            "variant": label,
            "recompute": args.recompute,
            "pad": args.pad,
            "mbs": mbs,
        }
        batches = None
        try:
            host, loader_ms = host_batches(cfg, mbs, args.pad, args.distinct)
            meter = Throughput(cfg, 1, device)
            for b in host:
                meter.add(b)
            per_batch = {k: getattr(meter, k) / len(host) for k in ("padded", "useful", "flops")}
            batches = [to_device(b, device) for b in host]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            train_step(step_fn, model, optimizer, batches[0]).item()  # compiles here, if at all
            first_s = time.perf_counter() - t0
            for i in range(1, args.warmup):
                train_step(step_fn, model, optimizer, batches[i % len(batches)]).item()
            base = torch.cuda.memory_allocated() if cuda else 0  # params + optimizer state
            times, losses = [], []
            for i in range(args.steps):
                t0 = time.perf_counter()
                losses.append(
                    train_step(step_fn, model, optimizer, batches[i % len(batches)]).item()
                )
                times.append(time.perf_counter() - t0)
            dt = statistics.median(times)
            alloc = torch.cuda.max_memory_allocated() if cuda else 0
            row.update(
                fits=True,
                step_ms=dt * 1e3,
                tokens_per_s=per_batch["padded"] / dt,
                useful_tokens_per_s=per_batch["useful"] / dt,
                tflops=per_batch["flops"] / dt / 1e12,
                mfu=per_batch["flops"] / dt / 1e12 / peak if peak else None,
                peak_gib=alloc / GIB,
                reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else 0,
                static_gib=base / GIB,
                act_gib_per_seq=(alloc - base) / GIB / mbs,
                first_step_s=first_s,
                loader_ms=loader_ms,
                tokens_per_batch=per_batch["padded"],
                losses=[round(x, 4) for x in losses],
            )
            if args.profile and mbs in [int(m) for m in args.profile.split(",")]:
                print(
                    f"\n### profile: {args.model} {label} recompute={args.recompute} "
                    f"pad={args.pad} micro batch {mbs}"
                )
                it = iter(range(10**9))
                row["profile"] = profile_table(
                    lambda: train_step(step_fn, model, optimizer, batches[next(it) % len(batches)])
                )
        except torch.OutOfMemoryError:
            row.update(fits=False)
        finally:
            batches = None
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        print(json.dumps({"build_s": round(build_s, 1), **row}), flush=True)
        results.append(row)
        if not row["fits"]:
            break
    return results


def print_table(rows: list[dict]) -> None:
    print(
        "\n| model | variant | recompute | pad | mbs | tokens/s | useful tokens/s | TFLOP/s | MFU "
        "| peak GiB | act GiB/seq | step ms | 1st step s | loader ms/batch |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if not r["fits"]:
            print(
                f"| {r['model']} | {r['variant']} | {r['recompute']} | {r['pad']} | {r['mbs']} "
                "| OOM |  |  |  |  |  |  |  |  |"
            )
            continue
        print(
            f"| {r['model']} | {r['variant']} | {r['recompute']} | {r['pad']} | {r['mbs']} "
            f"| {r['tokens_per_s']:,.0f} | {r['useful_tokens_per_s']:,.0f} | {r['tflops']:.0f} "
            f"| {100 * (r['mfu'] or 0):.1f}% | {r['peak_gib']:.1f} | {r['act_gib_per_seq']:.3f} "
            f"| {r['step_ms']:.1f} | {r['first_step_s']:.1f} | {r['loader_ms']:.1f} |"
        )


# ------------------------------------------------------------------------------------ micro benches


def bench(fn, reps: int = 20) -> float:
    """Median ms of fn() over reps runs, CUDA events, after 3 warm-up runs."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run_attention(args) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.varlen import varlen_attn

    from bionemo.models.esm2.model import padded_segments

    cfg = model_config(args.model)
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    mbs = int(args.mbs.split(",")[0])
    host, _ = host_batches(cfg, mbs, "max_length", 1)
    mask = host[0]["attention_mask"].cuda()
    B, S = mask.shape
    lengths = mask.sum(-1)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(B * S, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
    )
    grad = torch.randn_like(q)
    scale = D**-0.5
    key_mask = mask[:, None, None, :]
    real = mask.flatten()
    cu_packed = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_real = int(lengths.max())

    def padded(t):  # [T, H, D] -> [B, H, S, D]
        return t.unflatten(0, (B, S)).transpose(1, 2)

    def sdpa(backend=None, with_mask=True):
        def f(q, k, v):
            ctx = sdpa_kernel(backend) if backend is not None else nullcontext()
            with ctx:
                o = F.scaled_dot_product_attention(
                    padded(q),
                    padded(k),
                    padded(v),
                    attn_mask=key_mask if with_mask else None,
                    scale=scale,
                )
            return o.transpose(1, 2).flatten(0, 1)

        return f

    def varlen(piece_cu, m):
        return lambda q, k, v: varlen_attn(q, k, v, piece_cu, piece_cu, m, m, scale=scale)

    def varlen2(cu_q, cu_k, m):
        return lambda q, k, v: varlen_attn(q, k, v, cu_q, cu_k, m, m, scale=scale)

    def pieces(mask, piece=128):  # padding cut into 128-token segments that attend to themselves
        n = mask.sum(-1, dtype=torch.int32)[:, None]
        cuts = torch.arange(1, S // piece + 1, device="cuda", dtype=torch.int32) * piece
        ends = torch.cat([n, torch.maximum(cuts[None, :], n)], 1)
        ends = ends + torch.arange(B, device="cuda", dtype=torch.int32)[:, None] * S
        return F.pad(ends.flatten(), (1, 0))

    def packed(q, k, v):  # only the real tokens (what packing computes), scattered back
        out = varlen_attn(
            q[real], k[real], v[real], cu_packed, cu_packed, max_real, max_real, scale=scale
        )
        return torch.zeros_like(q).index_put_((real.nonzero()[:, 0],), out)

    variants = {
        "sdpa + key mask (default backend)": sdpa(),
        "sdpa + key mask, efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "sdpa + key mask, cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa flash, no mask (wrong: attends to pads; floor of full SxS)": sdpa(
            SDPBackend.FLASH_ATTENTION, False
        ),
        "varlen, padding as key-only/query-only segments (model)": varlen2(
            *padded_segments(mask), S
        ),
        "varlen, padding in 128-token pieces": varlen(pieces(mask), S),
        "varlen, real tokens only (packed; gather+scatter)": packed,
    }
    ref = None
    flops = (
        4 * 2 * float((lengths.double() ** 2).sum()) * H * D * 3.5 / 2
    )  # fwd 4*n^2*H*D, bwd 2.5x
    print(
        f"\nattention {args.model}: B={B} S={S} heads={H} head_dim={D}; real tokens "
        f"{int(lengths.sum())} of {B * S} (mean length {float(lengths.float().mean()):.0f})"
    )
    print(
        "| implementation | fwd ms | fwd+bwd ms | useful TFLOP/s | max rel err vs fp32 (real rows) |"
    )
    print("|---|---:|---:|---:|---:|")
    qf, kf, vf = (t.float() for t in (q, k, v))
    with torch.no_grad():
        o = F.scaled_dot_product_attention(
            padded(qf), padded(kf), padded(vf), attn_mask=key_mask, scale=scale
        )
        ref = o.transpose(1, 2).flatten(0, 1)[real]
    for name, fn in variants.items():
        try:
            with torch.no_grad():
                err = ((fn(q, k, v).float()[real] - ref).norm() / ref.norm()).item()
                fwd = bench(lambda: fn(q, k, v))
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

            def fb():
                fn(qq, kk, vv).backward(grad)

            both = bench(fb)
            print(f"| {name} | {fwd:.2f} | {both:.2f} | {flops / both / 1e9:.0f} | {err:.1e} |")
        except Exception as e:  # a backend that refuses the inputs
            print(f"| {name} | - | - | - | {type(e).__name__}: {str(e).splitlines()[0][:80]} |")

    # The real tokens alone, packed (what data.pad_to=none trains on): flash varlen vs cuDNN's
    # ragged attention (torch's private ops, the backend torch's varlen API leaves switched off).
    class CudnnRagged(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            o, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._cudnn_attention_forward(
                q,
                k,
                v,
                None,
                cu_packed,
                cu_packed,
                max_real,
                max_real,
                True,
                0.0,
                False,
                False,
                scale=scale,
            )
            ctx.save_for_backward(q, k, v, o, lse, seed, offset)
            return o

        @staticmethod
        def backward(ctx, g):
            q, k, v, o, lse, seed, offset = ctx.saved_tensors
            # torch versions differ on the bias argument: None, or an empty tensor
            for bias in (None, torch.empty(0, device=q.device, dtype=q.dtype)):
                try:
                    grads = torch.ops.aten._cudnn_attention_backward(
                        g.contiguous(), q, k, v, o, lse, seed, offset, bias,
                        cu_packed, cu_packed, max_real, max_real, 0.0, False, scale=scale,
                    )  # fmt: skip
                    break
                except (TypeError, RuntimeError):
                    if bias is not None:
                        raise
            return grads

    qp, kp, vp = (t[real].contiguous() for t in (q, k, v))
    gp = grad[real].contiguous()
    print(
        "\n| packed real tokens only | fwd ms | fwd+bwd ms | useful TFLOP/s | rel err out / dq dk dv vs flash |"
    )
    print("|---|---:|---:|---:|---:|")

    def flash_packed(q, k, v):
        return varlen_attn(q, k, v, cu_packed, cu_packed, max_real, max_real, scale=scale)

    grads_ref = None
    for name, fn in {"flash varlen": flash_packed, "cudnn ragged": CudnnRagged.apply}.items():
        try:
            qq, kk, vv = (t.detach().requires_grad_() for t in (qp, kp, vp))
            out = fn(qq, kk, vv)
            out.backward(gp)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            grads = [t.grad.float() for t in (qq, kk, vv)]
            if grads_ref is None:
                grads_ref = grads
            gerr = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, grads_ref))
            with torch.no_grad():
                fwd = bench(lambda: fn(qp, kp, vp))
            both = bench(lambda: fn(qq, kk, vv).backward(gp))
            print(
                f"| {name} | {fwd:.2f} | {both:.2f} | {flops / both / 1e9:.0f} | {err:.1e} / {gerr:.1e} |"
            )
        except Exception as e:
            print(f"| {name} | - | - | - | {type(e).__name__}: {str(e).splitlines()[0][:100]} |")


def run_gemm(args) -> None:
    cfg = model_config(args.model)
    h, f, T = cfg.hidden_size, cfg.ffn_hidden_size, args.tokens
    shapes = {
        "qkv": (T, h, 3 * h),
        "out": (T, h, h),
        "fc1": (T, h, f),
        "fc2": (T, f, h),
        "wgrad fc1 (K=T)": (f, T, h),
        "dgrad fc2": (T, h, f),
    }
    print(f"\nGEMMs of a {args.model} block, {T} tokens: TFLOP/s")
    print("| GEMM | M x K x N | bf16 | fp8 e4m3 (tensorwise scales) |\n|---|---|---:|---:|")
    for name, (M, K, N) in shapes.items():
        a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        tf = 2 * M * K * N / 1e9
        bf16 = tf / bench(lambda: a @ b.t())
        try:
            a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            one = torch.ones((), device="cuda")
            fp8 = tf / bench(
                lambda: torch._scaled_mm(
                    a8, b8.t(), one, one, out_dtype=torch.bfloat16, use_fast_accum=True
                )
            )
            fp8s = f"{fp8:.0f}"
        except Exception as e:
            fp8s = f"{type(e).__name__}"
        print(f"| {name} | {M} x {K} x {N} | {bf16:.0f} | {fp8s} |")


def run_check(args) -> None:
    """The GPU fast paths against the reference paths, same weights, bf16 autocast."""
    from bionemo.data.dataset import collate
    from bionemo.distributed.parallel import compile_regions
    from bionemo.models.esm2 import ESM2

    torch.manual_seed(0)
    cfg = ModelConfig(
        name="check",
        num_layers=4,
        hidden_size=320,
        num_attention_heads=20,
        ffn_hidden_size=1280,
        seq_length=256,
    )
    model = ESM2(cfg).cuda().train()
    rng = torch.Generator().manual_seed(0)
    lengths = [256, 200, 17, 129, 128, 64, 3, 255]  # a full row: zero-length padding pieces
    samples = []
    for n in lengths:
        ids = torch.randint(4, 24, (n,), generator=rng)
        ids[0], ids[-1] = 0, 2
        pick = torch.rand(n, generator=rng) < 0.15
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        ids[pick & (torch.rand(n, generator=rng) < 0.8)] = 32
        samples.append({"input_ids": ids.numpy(), "labels": labels.numpy()})
    padded = to_device(collate(samples, "max_length", 256), "cuda")
    packed = to_device(collate(samples, "none", 256), "cuda")
    mask = padded["attention_mask"]

    def grads_and_loss(fn, **batch):
        owner = fn.__self__
        owner.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(**batch)
        loss.backward()
        return loss.detach().float(), torch.cat([p.grad.flatten() for p in owner.parameters()])

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    flash_ok = model._flash
    with torch.no_grad():
        h32 = model(padded["input_ids"], mask)[mask]  # fp32, SDPA + key mask: the reference
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h_flash = model(padded["input_ids"], mask)[mask]
            hp = model(
                packed["input_ids"],
                packed["attention_mask"],
                packed["cu_seqlens"],
                packed["max_seqlen"],
            )[0, : int(mask.sum())]
            model._flash = lambda device: False
            h_sdpa = model(padded["input_ids"], mask)[mask]
            model._flash = flash_ok
    print("\n| check (bf16 autocast unless fp32) | rel. error | finite |\n|---|---:|---|")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        hall = model(padded["input_ids"], mask)
    print(f"| padded, all positions finite (padding too) | - | {bool(hall.isfinite().all())} |")
    print(
        f"| padded, flash (padding segments) vs fp32 SDPA | {rel(h_flash, h32):.2e} | {bool(h_flash.isfinite().all())} |"
    )
    print(
        f"| padded, bf16 SDPA vs fp32 SDPA | {rel(h_sdpa, h32):.2e} | {bool(h_sdpa.isfinite().all())} |"
    )
    print(f"| packed flash vs padded fp32 | {rel(hp, h32):.2e} | {bool(hp.isfinite().all())} |")
    l_pad, g_pad = grads_and_loss(model.loss, **padded)
    l_pack, g_pack = grads_and_loss(model.loss, **packed)
    model._flash = lambda device: False
    l_ref, g_ref = grads_and_loss(model.loss, **padded)
    model._flash = flash_ok
    print(
        f"| loss padded flash vs SDPA | {abs(l_pad - l_ref).item() / l_ref.item():.2e} | "
        f"{bool(l_pad.isfinite())} |"
    )
    print(
        f"| grads padded flash vs SDPA | {rel(g_pad, g_ref):.2e} | {bool(g_pad.isfinite().all())} |"
    )
    print(
        f"| loss packed vs padded SDPA | {abs(l_pack - l_ref).item() / l_ref.item():.2e} | "
        f"{bool(l_pack.isfinite())} |"
    )
    print(
        f"| grads packed vs padded SDPA | {rel(g_pack, g_ref):.2e} | {bool(g_pack.isfinite().all())} |"
    )
    model.fp32_residual = True
    l_f, g_f = grads_and_loss(model.loss, **padded)
    model.fp32_residual = False
    print(
        f"| bf16 vs fp32 residual stream: loss / grads | "
        f"{abs(l_pad - l_f).item() / l_f.item():.2e} / {rel(g_pad, g_f):.2e} | - |"
    )
    eager = model
    model = copy.deepcopy(eager)
    compile_regions(model)
    for policy in ("none", "selective", "full"):
        for block in [*eager.layers, *model.layers]:
            block.recompute = policy
        l_e, g_e = grads_and_loss(eager.loss, **padded)
        l_c, g_c = grads_and_loss(model.loss, **padded)
        l_k, g_k = grads_and_loss(model.loss, **packed)
        print(
            f"| compiled vs eager, recompute={policy}: loss / grads | "
            f"{abs(l_c - l_e).item() / l_e.item():.2e} / {rel(g_c, g_e):.2e} | "
            f"{bool(g_c.isfinite().all())} |"
        )
        print(
            f"| compiled packed vs eager padded, recompute={policy}: loss / grads | "
            f"{abs(l_k - l_e).item() / l_e.item():.2e} / {rel(g_k, g_e):.2e} | "
            f"{bool(g_k.isfinite().all())} |"
        )


def set_inductor_option(kv: str) -> None:
    """KEY=VALUE -> torch._inductor.config.KEY = VALUE (int/float/bool literals or a string);
    an unknown key is an error (option names change between torch releases)."""
    import ast

    import torch._inductor.config as inductor

    key, _, raw = kv.partition("=")
    *parents, leaf = key.split(".")
    node = inductor
    for name in parents:
        node = getattr(node, name, None)
    if node is None or not hasattr(node, leaf):
        raise ValueError(f"--inductor {kv}: torch {torch.__version__} has no inductor option {key}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    setattr(node, leaf, value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["step", "attention", "gemm", "check"])
    p.add_argument("--model", default="esm2_650m")
    p.add_argument(
        "--mbs", default="16,32", help="micro batches, increasing (step); first: attention"
    )
    p.add_argument("--compile", action="store_true", help="regional compile (distributed.parallel)")
    p.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    p.add_argument(
        "--recompute-pointwise",
        action="store_true",
        default=None,
        help="compiled: partitioner recomputes elementwise results (default: selective)",
    )
    p.add_argument("--fp32-residual", action="store_true", help="residual stream in fp32")
    p.add_argument(
        "--fp8",
        nargs="?",
        const="tensorwise",
        default=None,
        choices=["tensorwise", "rowwise"],
        help="torchao float8 GEMMs in the blocks (recipe; default tensorwise)",
    )
    p.add_argument(
        "--fp8-skip", default=None, help="Linear layers kept bf16, name suffixes: attn.out_proj"
    )
    p.add_argument(
        "--fp8-mlp",
        default="torchao",
        choices=["torchao", "fused"],
        help="with --fp8 tensorwise: the MLPs' kernels (train.fp8_mlp)",
    )
    p.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set torch._inductor.config.KEY (dotted: triton.tile_reductions=1) before compiling",
    )
    p.add_argument(
        "--flash-attention",
        default="torch",
        choices=["torch", "fa4"],
        help="the kernels behind torch's flash attention (train.flash_attention)",
    )
    p.add_argument("--pad", default="max_length", choices=["max_length", "none", "longest"])
    p.add_argument("--steps", type=int, default=8, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    p.add_argument("--distinct", type=int, default=4, help="distinct batches, cycled")
    p.add_argument("--layers", type=int, default=None, help="override num_layers")
    p.add_argument("--profile", default=None, help="micro batches to profile, comma-separated")
    p.add_argument("--baseline", default=None, help="file with the ESM2 class to time instead")
    p.add_argument("--tokens", type=int, default=32768, help="gemm: tokens (rows)")
    p.add_argument("--device", default="cuda", help="step: cpu for a smoke test of the script")
    p.add_argument("--json", type=Path, default=None, help="step: append result rows here")
    args = p.parse_args(argv)
    for kv in args.inductor:
        try:
            set_inductor_option(kv)
        except ValueError as e:
            p.error(str(e))  # exit 2, before anything runs
    if args.flash_attention != "torch":
        from bionemo.engines.torch_engine import use_flash_attention

        problem = use_flash_attention(args.flash_attention, torch.device(args.device))
        if problem:
            p.error(problem)
    if args.what == "step":
        rows = run_step(args)
        print_table(rows)
        if args.json:
            with open(args.json, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
    elif args.what == "attention":
        run_attention(args)
    elif args.what == "gemm":
        run_gemm(args)
    else:
        run_check(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
