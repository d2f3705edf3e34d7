"""ESM-2: a pre-LayerNorm BERT-style encoder with rotary positions (Lin et al., 2023).

Numerically the same network as BioNeMo's ESM-2 and Hugging Face's `EsmForMaskedLM` with the ESM-2
settings (rotary positions, no LayerNorm before the first block, token dropout), so that
`bionemo.models.esm2.convert` moves weights between them (renaming keys, joining q/k/v).

    embed (token dropout, padding zeroed)
    -> L x [x + Attn(LN(x)); x + MLP(LN(x))]
    -> final LN                                  = forward()'s output
    -> dense -> GELU -> LN -> tied decoder + bias = logits()

Dropout (model.hidden_dropout, model.attention_dropout; 0 in every preset, as ESM-2 was
pretrained without it) sits where HF's EsmForMaskedLM puts hidden_dropout_prob and
attention_probs_dropout_prob: after the attention output projection and after the MLP's second
GEMM (before each residual add), and on the attention probabilities; training mode only. Its
random draws come from torch's per-rank generators, which checkpoints save (bionemo/checkpoint.py),
so a resumed run draws the same masks.

Layout for speed. Inside the blocks the residual stream is one flat row of tokens [T, H] (T = B*S
for padded batches, the packed row's length otherwise), so one compiled block serves every batch
shape. On GPU in bf16/fp16 attention is always variable-length flash attention over segments:
a packed row's sequences, or for padded batches each row's real tokens, with the padding split
off into segments that have keys but no queries or queries but no keys (`padded_segments`): the
kernel does no work for padding, and padding positions get a zero attention output (they are
never scored). The CPU/fp32 reference paths (SDPA with a key mask, one SDPA per packed sequence)
compute the same function on real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bionemo.config import ModelConfig
from bionemo.data.masking import IGNORE_INDEX  # label of a position that is not scored (-100)
from bionemo.data.tokenizer import MASK_ID, PAD_ID  # 32 and 1 in the ESM alphabet
from bionemo.models.fp8_mlp import fp8_mlp

ROPE_BASE = 10_000.0  # rotary base period used by every ESM-2 model
# Token dropout's training-time mask ratio, hard-coded in ESM-2 (15% of tokens are selected for
# masking and 80% of those become <mask>), used to rescale embeddings by the observed ratio.
MASK_RATIO_TRAIN = 0.15 * 0.8
INIT_STD = 0.02  # HF EsmConfig.initializer_range
# max_seqlen handed to flash attention is rounded up to this: the kernel grid is ceil(max/128)
# query tiles anyway, and few distinct values mean few recompiles of a compiled block.
MAX_SEQLEN_BUCKET = 128


class Layout(NamedTuple):
    """How the tokens of the flat [T, H] stream group into sequences, for attention."""

    cu_seqlens: torch.Tensor | None  # int32 [N+1] query segment bounds (flash, CPU packed SDPA)
    cu_seqlens_k: torch.Tensor | None  # key segment bounds (differ from the queries' for padding)
    max_seqlen: int  # longest segment, rounded up to MAX_SEQLEN_BUCKET
    key_mask: torch.Tensor | None  # bool [B, 1, 1, S]: padded rows on the SDPA path
    rows: int  # B, to view [T, ...] as [B, S, ...] on the SDPA path
    flash: bool  # variable-length flash attention (CUDA, half precision)


def rotary_angles(seq_len: int, head_dim: int, device) -> torch.Tensor:
    """Rotary angles [S, head_dim] in fp32 for positions 0..S-1, "rotate half" layout (first and
    second halves pair up).

    Computed on every forward (S x head_dim/2 multiplies, negligible) rather than kept in a buffer,
    so nothing depends on buffers surviving meta-device initialization or checkpoints.
    """
    dims = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE ** (dims / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((freqs, freqs), dim=-1)


def rotary_cos_sin(seq_len: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [S, head_dim] in fp32 for positions 0..S-1."""
    emb = rotary_angles(seq_len, head_dim, device)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, ..., head_dim] by position, in fp32 as ESM does; returns x's dtype.

    cos, sin [T, 1, 1, head_dim]. Autograd keeps only cos and sin for the backward (the rotation
    is linear in x), so no fp32 copy of q or k outlives the forward; compiled, it is one kernel.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


def padded_segments(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention query and key segment bounds [3B+1] of right-padded rows [B, S].

    Row b, with n real tokens at [bS, bS+n), gives three segments:
        real tokens:   queries [bS, bS+n)    keys [bS, bS+n)
        padding keys:  no queries            keys [bS+n, bS+S)
        padding rows:  queries [bS+n, bS+S)  no keys (output 0, no gradient)
    so the kernel skips all padding work. Built on the device: no host sync.
    """
    B, S = attention_mask.shape
    n = attention_mask.sum(-1, dtype=torch.int32)  # [B]
    base = torch.arange(B, device=n.device, dtype=torch.int32) * S
    q_ends = torch.stack([base + n, base + n, base + S], dim=1).flatten()
    k_ends = torch.stack([base + n, base + S, base + S], dim=1).flatten()
    return F.pad(q_ends, (1, 0)), F.pad(k_ends, (1, 0))  # leading 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        # One projection for q, k and v (rows q | k | v): one GEMM with a 3x wider output instead
        # of three, and one bf16 copy of its input for the backward instead of three.
        # convert.py splits it into HF's query/key/value.
        self.qkv_proj = nn.Linear(h, 3 * h)
        self.out_proj = nn.Linear(h, h)
        self.attention_dropout = cfg.attention_dropout  # on the probabilities, training only
        self.dropout = nn.Dropout(cfg.hidden_dropout)  # HF EsmSelfOutput's, before the residual

    def forward(self, x: torch.Tensor, cos, sin, layout: Layout) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, 3, self.num_heads, self.head_dim)
        # Rotate q and k together, and copy v beside them: the projection's output is not kept
        # for the backward (only this [T, 3, heads, head_dim] buffer, which attention needs).
        qkv = torch.cat((apply_rotary(qkv[:, :2], cos, sin), qkv[:, 2:]), dim=1)
        q, k, v = qkv.unbind(1)  # [T, heads, head_dim] each
        # ESM scales q before the rotation; the attention kernels scale the scores instead (the
        # rotation is linear, so the two differ by rounding only).
        p = self.attention_dropout if self.training else 0.0
        out = _attention(q, k, v, layout, self.head_dim**-0.5, p)
        return self.dropout(self.out_proj(out.reshape(T, -1)))


def _attention(q, k, v, layout: Layout, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """q, k, v [T, heads, head_dim] -> [T, heads, head_dim]; tokens attend within their segment.
    dropout_p: dropout on the attention probabilities (the caller passes 0 outside training)."""
    if layout.flash:
        from torch.nn.attention.varlen import varlen_attn  # flash attention, torch >= 2.10

        cu_q, cu_k, m = layout.cu_seqlens, layout.cu_seqlens_k, layout.max_seqlen
        assert not dropout_p, "varlen_attn has no dropout: ESM2._flash() is off for it"
        return varlen_attn(q, k, v, cu_q, cu_k, m, m, scale=scale)
    if layout.key_mask is not None:  # padded rows: [B, heads, S, head_dim] with a key mask
        B = layout.rows
        q, k, v = (t.unflatten(0, (B, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=layout.key_mask, scale=scale, dropout_p=dropout_p
        )
        return out.transpose(1, 2).flatten(0, 1)
    # Packed rows without flash attention (CPU, fp32): one SDPA call per sequence. Slower.
    bounds = layout.cu_seqlens.tolist()
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1),
                k[a:b].transpose(0, 1),
                v[a:b].transpose(0, 1),
                scale=scale,
                dropout_p=dropout_p,
            ).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
    )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout)  # HF EsmOutput's, before the residual add
        self.fused_fp8 = False  # train.fp8_mlp=fused (distributed.parallel.convert_to_fp8)

    def forward(self, x):
        if self.fused_fp8:
            return self.dropout(fp8_mlp(x, self.fc1, self.fc2, "gelu"))
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as ESM


class Block(nn.Module):
    """x + Attn(LN(x)), then + MLP(LN(x)); x is [T, H]. Compiled per block (distributed.parallel).

    Activation recompute (model.activation_checkpointing):
      "selective": recompute what is cheap, never a GEMM or attention. Compiled (the way to train),
        the partitioner recomputes the elementwise results that a GEMM reads in the backward
        (LayerNorm outputs, GELU output) instead of keeping them: ~45% less activation memory for
        a few % more memory traffic (distributed.parallel.compile_regions turns this on). Eager,
        where nothing can choose at that grain, the MLP half (LN, fc1, GELU, fc2) is checkpointed:
        its 4H-wide activations are the largest thing a block keeps.
      "full": the whole block; only its input is kept. The checkpoint is taken by ESM2.forward,
        around the (compiled) block, so that everything, flash attention included, is recomputed:
        inside a compiled region the partitioner will not recompute a custom op such as flash
        attention and keeps q, k, v and the attention output instead.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.recompute = cfg.activation_checkpointing

    def forward(self, x, cos, sin, layout: Layout):
        x = x + self.attn(self.attn_norm(x), cos, sin, layout)
        if (
            self.recompute == "selective"
            and self.training
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
        ):
            return x + checkpoint(self._mlp, x, use_reentrant=False)
        return x + self._mlp(x)

    def _mlp(self, x):
        return self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (the word embedding, passed in) + bias.

    With labels it returns the masked-LM loss instead of logits: the head runs on every position
    (for ESM's 33-token vocabulary that costs about one extra HxH GEMM) and unscored positions are
    ignored by the cross-entropy, so the step has no data-dependent shapes and no host sync.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder's own bias

    def forward(self, x, decoder_weight, labels=None):
        logits = F.linear(self.norm(F.gelu(self.dense(x))), decoder_weight, self.bias)
        if labels is None:
            return logits
        # Softmax in fp32; mean over scored positions; 0 (not NaN) when none is scored.
        total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


class ESM2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=PAD_ID)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # HF calls this one emb_layer_norm_after.
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.lm_head = LMHead(cfg)
        # Under autocast the residual stream (the blocks' input and output) is kept in the autocast
        # dtype, as Megatron/BioNeMo do (fp32_residual_connection=False): half the bytes of every
        # residual add and LayerNorm input, and of the two [T, H] tensors each block keeps for the
        # backward (650M: +4% tokens/s, -6% activation memory). LayerNorm statistics, softmax
        # and the loss stay fp32. True keeps the stream fp32 (the embedding's dtype), as HF does.
        self.fp32_residual = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's init: N(0, 0.02) weights, zero biases, unit LayerNorms, zero <pad> embedding row."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=INIT_STD)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=INIT_STD)
                m.weight[PAD_ID].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.lm_head.bias)

    def embed(self, input_ids, attention_mask, segments=None) -> torch.Tensor:
        """Token embeddings with token dropout. `segments` (packed rows): each token's sequence
        index [T] and the sequence lengths [N]; otherwise each row is one sequence."""
        x = self.embed_tokens(input_ids)
        if self.cfg.token_dropout:
            # ESM's "token dropout": a <mask> contributes nothing, and the rest is rescaled as a
            # dropout layer would at eval time, from the training mask ratio to this sequence's.
            # Applied in eval too (it is part of the function the checkpoints were trained as).
            is_mask = input_ids == MASK_ID
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            if segments is None:
                observed = is_mask.sum(-1).float() / attention_mask.sum(-1)  # over real tokens
                scale = ((1 - MASK_RATIO_TRAIN) / (1 - observed))[:, None, None]
            else:
                seg, lengths = segments
                masks = torch.zeros(len(lengths), device=x.device).index_add_(
                    0, seg, is_mask[0].float()
                )
                scale = ((1 - MASK_RATIO_TRAIN) / (1 - masks / lengths))[seg][None, :, None]
            x = (x * scale).to(x.dtype)
        return x.masked_fill(~attention_mask.unsqueeze(-1), 0.0)  # padding embeddings are zero

    def _flash(self, device: torch.device) -> bool:
        """Variable-length flash attention: CUDA with bf16/fp16 activations, and no attention
        dropout in training (torch's varlen_attn hard-codes dropout 0; with dropout the SDPA
        paths run instead, which on CUDA use its fused kernels with dropout)."""
        if device.type != "cuda" or (self.training and self.cfg.attention_dropout > 0):
            return False
        dtype = (
            torch.get_autocast_dtype("cuda")
            if torch.is_autocast_enabled("cuda")
            else self.embed_tokens.weight.dtype
        )
        return dtype in (torch.bfloat16, torch.float16)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, S, H] after the final LayerNorm. attention_mask: True = real token.

        Padded rows must be right-padded (real tokens first, as `collate` makes them); values at
        padding positions are unspecified. Every sequence needs at least one real token.
        Packed rows (bionemo.data.dataset.pack): input_ids [1, T] holding several sequences whose
        boundaries are `cu_seqlens` [N+1]; positions restart at each sequence.
        """
        B, S = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        flash = self._flash(device)
        segments = None
        if cu_seqlens is None:
            cos, sin = rotary_cos_sin(S, self.head_dim, device)
            cos, sin = cos.repeat(B, 1), sin.repeat(B, 1)  # [B*S, head_dim]: per token
            if flash:
                # Right padding is assumed; a violation stops the step on the device, no sync.
                prefix = torch.arange(S, device=device) < attention_mask.sum(-1, keepdim=True)
                torch._assert_async((prefix == attention_mask).all())
                cu_q, cu_k = padded_segments(attention_mask)
                layout = Layout(cu_q, cu_k, S, None, B, True)
            else:
                layout = Layout(None, None, S, attention_mask[:, None, None, :], B, False)
        else:
            if B != 1:
                raise ValueError("packed input must be one row [1, T]")
            cu_seqlens = cu_seqlens.to(torch.int32)
            tokens = torch.arange(S, device=device)
            seg = torch.searchsorted(cu_seqlens[1:], tokens.to(torch.int32), right=True)
            positions = tokens - cu_seqlens[seg]
            cos, sin = rotary_cos_sin(max_seqlen, self.head_dim, device)
            cos, sin = cos[positions], sin[positions]
            segments = (seg, cu_seqlens.diff().float())
            bucketed = -(-max_seqlen // MAX_SEQLEN_BUCKET) * MAX_SEQLEN_BUCKET
            layout = Layout(cu_seqlens, cu_seqlens, bucketed, None, 1, flash)
        x = self.embed(input_ids, attention_mask, segments).flatten(0, 1)  # [T, H]
        if not self.fp32_residual and torch.is_autocast_enabled(device.type):
            x = x.to(torch.get_autocast_dtype(device.type))
        cos, sin = cos[:, None, None, :], sin[:, None, None, :]  # [T, 1, 1, head_dim]
        recompute = self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute and block.recompute == "full":
                x = checkpoint(block, x, cos, sin, layout, use_reentrant=False)
            else:
                x = block(x, cos, sin, layout)
        return self.final_norm(x).view(B, S, -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [..., H] -> [..., V]."""
        return self.lm_head(hidden, self.embed_tokens.weight)

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over positions whose label is not IGNORE_INDEX (softmax in fp32).

        With no labeled position at all the loss is 0 (not NaN), still connected to the graph.
        """
        hidden = self.forward(input_ids, attention_mask, cu_seqlens, max_seqlen)
        return self.lm_head(hidden.flatten(0, 1), self.embed_tokens.weight, labels.flatten())
