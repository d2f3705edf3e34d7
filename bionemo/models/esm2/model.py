"""ESM-2: a pre-LayerNorm BERT-style encoder with rotary positions (Lin et al., 2023).

Numerically the same network as BioNeMo's ESM-2 and Hugging Face's `EsmForMaskedLM` with the ESM-2
settings (rotary positions, no LayerNorm before the first block, token dropout), so that
`bionemo.models.esm2.convert` moves weights between them by renaming keys only.

    embed (token dropout, padding zeroed)
    -> L x [x + Attn(LN(x)); x + MLP(LN(x))]
    -> final LN                                  = forward()'s output
    -> dense -> GELU -> LN -> tied decoder + bias = logits()

No dropout anywhere: ESM-2 was pretrained without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bionemo.config import ModelConfig
from bionemo.data.masking import IGNORE_INDEX  # label of a position that is not scored (-100)
from bionemo.data.tokenizer import MASK_ID, PAD_ID  # 32 and 1 in the ESM alphabet

ROPE_BASE = 10_000.0  # rotary base period used by every ESM-2 model
# Token dropout's training-time mask ratio, hard-coded in ESM-2 (15% of tokens are selected for
# masking and 80% of those become <mask>), used to rescale embeddings by the observed ratio.
MASK_RATIO_TRAIN = 0.15 * 0.8
INIT_STD = 0.02  # HF EsmConfig.initializer_range


def rotary_cos_sin(seq_len: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [S, head_dim] in fp32 for positions 0..S-1.

    Computed on every forward (S x head_dim/2 multiplies, negligible) rather than kept in a buffer,
    so nothing depends on buffers surviving meta-device initialization or checkpoints.
    """
    dims = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE ** (dims / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # "rotate half" layout: first and second halves pair up
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, S, head_dim] by position, in fp32 as ESM does; returns x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        # Separate projections, as in HF, so conversion is a rename (and tensor parallelism can
        # shard each one column-wise).
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)
        self.recompute_core = False  # set by ESM2 for activation_checkpointing="selective"

    def forward(self, x, key_mask, cos, sin, packing=None):
        B, S, _ = x.shape
        shape = (B, S, self.num_heads, self.head_dim)
        # [B, S, heads, head_dim]; padded batches attend as [B, heads, S, head_dim], packed rows
        # (B == 1) as [T, heads, head_dim] with the boundaries in `packing`.
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if packing is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            q, k, v = q[0], k[0], v[0]
        # ESM scales the query before the rotation (not the scores after it); the two differ in
        # rounding only, but this is the order the checkpoints were trained with.
        q = q * self.head_dim**-0.5
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        core = _attention_core if packing is None else _packed_attention_core
        mask_or_packing = key_mask if packing is None else packing
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(core, q, k, v, mask_or_packing, use_reentrant=False)
        else:
            out = core(q, k, v, mask_or_packing)
        out = out.transpose(1, 2) if packing is None else out.unsqueeze(0)
        return self.out_proj(out.reshape(B, S, -1))


def _attention_core(q, k, v, key_mask):
    # key_mask [B, 1, 1, S]: True where the key is a real token. scale=1: q is already scaled.
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=1.0)


def _packed_attention_core(q, k, v, packing):
    """q, k, v [T, heads, head_dim]; each token attends only within its own sequence."""
    cu_seqlens, max_seqlen = packing
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn  # flash attention, torch >= 2.10

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=1.0)
    # Reference path (CPU, fp32): one SDPA call per sequence. Same function, slower.
    bounds = cu_seqlens.tolist()
    return torch.cat([
        F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), scale=1.0
        ).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as ESM


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, key_mask, cos, sin, packing=None):
        x = x + self.attn(self.attn_norm(x), key_mask, cos, sin, packing)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm; the decoder is the word embedding (ESM2.logits applies it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder's own bias

    def forward(self, x, decoder_weight):
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, decoder_weight, self.bias)


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
        self.recompute_blocks = cfg.activation_checkpointing == "full"
        for block in self.layers:
            block.attn.recompute_core = cfg.activation_checkpointing == "selective"
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
                masks = torch.zeros(len(lengths), device=x.device).index_add_(0, seg, is_mask[0].float())
                scale = ((1 - MASK_RATIO_TRAIN) / (1 - masks / lengths))[seg][None, :, None]
            x = (x * scale).to(x.dtype)
        return x.masked_fill(~attention_mask.unsqueeze(-1), 0.0)  # padding embeddings are zero

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, S, H] after the final LayerNorm. attention_mask: True = real token.

        Every sequence needs at least one real token (a row of all padding has no key to attend to).
        Packed rows (bionemo.data.dataset.pack): input_ids [1, T] holding several sequences whose
        boundaries are `cu_seqlens` [N+1]; positions restart at each sequence.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        packing = segments = None
        if cu_seqlens is None:
            cos, sin = rotary_cos_sin(input_ids.shape[1], self.head_dim, input_ids.device)
        else:
            if input_ids.shape[0] != 1:
                raise ValueError("packed input must be one row [1, T]")
            cu_seqlens = cu_seqlens.to(torch.int32)
            tokens = torch.arange(input_ids.shape[1], device=input_ids.device)
            seg = torch.searchsorted(cu_seqlens[1:], tokens.to(torch.int32), right=True)
            positions = tokens - cu_seqlens[seg]
            cos, sin = rotary_cos_sin(max_seqlen, self.head_dim, input_ids.device)
            cos, sin = cos[positions][:, None, :], sin[positions][:, None, :]  # [T, 1, head_dim]
            packing, segments = (cu_seqlens, max_seqlen), (seg, cu_seqlens.diff().float())
        x = self.embed(input_ids, attention_mask, segments)
        key_mask = attention_mask[:, None, None, :]  # broadcast over heads and queries
        recompute = self.recompute_blocks and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                x = checkpoint(block, x, key_mask, cos, sin, packing, use_reentrant=False)
            else:
                x = block(x, key_mask, cos, sin, packing)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head: [..., H] -> [..., V]."""
        return self.lm_head(hidden, self.embed_tokens.weight)

    def loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over positions whose label is not IGNORE_INDEX.

        The head runs only on those positions (~15% of tokens), and the softmax in fp32. With no
        labeled position at all the loss is 0 (not NaN), still connected to the graph.
        """
        hidden = self.forward(input_ids, attention_mask, cu_seqlens, max_seqlen)
        scored = labels != IGNORE_INDEX
        logits = self.logits(hidden[scored]).float()
        total = F.cross_entropy(logits, labels[scored], reduction="sum")
        return total / scored.sum().clamp(min=1)
