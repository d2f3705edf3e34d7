"""Geneformer: a BERT encoder over rank-value encoded cells (Theodoris et al., 2023).

Numerically the same network as Hugging Face's `BertForMaskedLM` with the same config, so that
`bionemo.models.geneformer.convert` moves weights between them by renaming keys only.

    word + learned absolute position + token-type-0 embeddings -> LN -> dropout
    -> L x [x = LN(x + drop(Attn(x))); x = LN(x + drop(MLP(x)))]   (post-LayerNorm)
                                                   = forward()'s output (no final LN in BERT)
    -> dense -> act -> LN -> tied decoder + bias   = logits()

The activation (model.activation) is used in the MLP and in the head's transform, as in HF. The
published Geneformer uses ReLU; BioNeMo's NeMo2 presets used GELU by accident. Token types are
always 0 (Geneformer has one segment); the 2-row table is kept for parity with BERT checkpoints.
Dropout (model.hidden_dropout after the embeddings and each residual branch, model.attention_dropout
on the attention probabilities) draws from torch's RNG, which checkpoints save and restore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bionemo.config import ModelConfig
from bionemo.data.masking import IGNORE_INDEX  # label of a position that is not scored (-100)
from bionemo.models.fp8_mlp import fp8_mlp

INIT_STD = 0.02  # HF BertConfig.initializer_range, BioNeMo's init_method_std
TYPE_VOCAB_SIZE = 2  # BERT's segment table (sentence A/B); Geneformer only uses row 0


def activation(name: str):
    # F.gelu is the exact (erf) GELU, HF's "gelu".
    return {"relu": F.relu, "gelu": F.gelu}[name]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // cfg.num_attention_heads
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)
        self.recompute_core = False  # set by Geneformer for activation_checkpointing="selective"

    def forward(self, x, key_mask, packing=None):
        B, S, _ = x.shape
        shape = (B, S, self.num_heads, self.head_dim)
        # [B, S, heads, head_dim]; padded batches attend as [B, heads, S, head_dim], packed rows
        # (B == 1) as [T, heads, head_dim] with the boundaries in `packing`.
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        if packing is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            core, mask_or_packing = _attention_core, key_mask
        else:
            q, k, v = q[0], k[0], v[0]
            core, mask_or_packing = _packed_attention_core, packing
        p = self.dropout if self.training else 0.0
        if self.recompute_core and self.training and torch.is_grad_enabled():
            # checkpoint() replays the RNG state, so the recomputed dropout mask is the same one.
            out = checkpoint(core, q, k, v, mask_or_packing, p, use_reentrant=False)
        else:
            out = core(q, k, v, mask_or_packing, p)
        out = out.transpose(1, 2) if packing is None else out.unsqueeze(0)
        return self.out_proj(out.reshape(B, S, -1))


def _attention_core(q, k, v, key_mask, dropout_p):
    # key_mask [B, 1, 1, S]: True where the key is a real token. Default scale 1/sqrt(head_dim).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)


def _packed_attention_core(q, k, v, packing, dropout_p):
    """q, k, v [T, heads, head_dim]; each token attends only within its own sequence."""
    cu_seqlens, max_seqlen = packing
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and dropout_p == 0.0:
        from torch.nn.attention.varlen import varlen_attn  # flash attention, torch >= 2.10

        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    # One SDPA call per sequence: the CPU/fp32 reference, and the path for attention dropout,
    # which varlen_attn does not implement (SDPA's flash kernel does). Inputs are made 4-D
    # [1, heads, L, head_dim]: with 3-D ones SDPA falls back to its unfused path on GPU.
    bounds = cu_seqlens.tolist()
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[None, a:b].transpose(1, 2),
                k[None, a:b].transpose(1, 2),
                v[None, a:b].transpose(1, 2),
                dropout_p=dropout_p,
            )[0].transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
    )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)
        self.act = activation(cfg.activation)
        self.activation = cfg.activation
        self.fused_fp8 = False  # train.fp8_mlp=fused (distributed.parallel.convert_to_fp8)

    def forward(self, x):
        if self.fused_fp8:
            return fp8_mlp(x, self.fc1, self.fc2, self.activation)
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Post-LN: the LayerNorm follows each residual sum (original BERT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x, key_mask, packing=None):
        x = self.attn_norm(x + self.dropout(self.attn(x, key_mask, packing)))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class LMHead(nn.Module):
    """dense -> act -> LayerNorm; the decoder is the word embedding (applied by logits())."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = activation(cfg.activation)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # the decoder's own bias

    def forward(self, x, decoder_weight):
        return F.linear(self.norm(self.act(self.dense(x))), decoder_weight, self.bias)


class Geneformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.token_dropout:
            raise ValueError(
                "model.token_dropout is ESM-2's; Geneformer (BERT) has none: set "
                "model.token_dropout=false"
            )
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.embed_positions = nn.Embedding(cfg.seq_length, h)  # learned absolute, from 0
        self.embed_types = nn.Embedding(TYPE_VOCAB_SIZE, h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.lm_head = LMHead(cfg)
        self.recompute_blocks = cfg.activation_checkpointing == "full"
        for block in self.layers:
            block.attn.recompute_core = cfg.activation_checkpointing == "selective"
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's BERT init: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorms.

        No embedding row is special: a <pad> is never a key and never scored, so its row gets no
        gradient whatever its value (HF zeroes it at init; that changes no output).
        """
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=INIT_STD)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.lm_head.bias)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Word + position + token-type-0 embeddings, LayerNorm, dropout. positions: [T] for a
        packed row (restarting at each sequence); None: 0..S-1 for every row."""
        S = input_ids.shape[1]
        if S > self.cfg.seq_length and positions is None:
            raise ValueError(f"{S} tokens, more than model.seq_length {self.cfg.seq_length}")
        table = self.embed_positions.weight
        pos = table[:S] if positions is None else table[positions]  # [S, H], broadcast over B
        x = self.embed_tokens(input_ids) + pos + self.embed_types.weight[0]
        return self.embed_dropout(self.embed_norm(x))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, S, H] of the last block. attention_mask: True = real token.

        Every sequence needs at least one real token (a row of all padding has no key to attend to).
        Packed rows (data.pad_to=none, bionemo.data.dataset.pack): input_ids [1, T] holding several
        sequences whose boundaries are `cu_seqlens` [N+1]; positions restart at each sequence.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        key_mask = attention_mask.bool()[:, None, None, :]  # broadcast over heads and queries
        packing = positions = None
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError("packed input must be one row [1, T]")
            cu_seqlens = cu_seqlens.to(torch.int32)
            tokens = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int32)
            seg = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
            # The padding tail of a packed row is a "sequence" of up to 127 <pad>s: clamp its
            # positions into the table (its outputs are never scored).
            positions = (tokens - cu_seqlens[seg]).long().clamp(max=self.cfg.seq_length - 1)
            packing = (cu_seqlens, max_seqlen)
        x = self.embed(input_ids, positions)
        recompute = self.recompute_blocks and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                x = checkpoint(block, x, key_mask, packing, use_reentrant=False)
            else:
                x = block(x, key_mask, packing)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM head: [..., H] -> [..., V]."""
        return self.lm_head(hidden, self.embed_tokens.weight)

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Mean cross-entropy over positions whose label is not IGNORE_INDEX.

        The head runs only on those positions (~15% of tokens): full-sequence logits over the
        ~25k-gene vocabulary would cost B x S x V values: 10 x 2048 x 25,426 is 1 GB in bf16.
        The softmax runs in fp32. With no labeled position the loss is 0 (not NaN), still
        connected to the graph.
        """
        hidden = self.forward(input_ids, attention_mask, cu_seqlens, max_seqlen)
        scored = labels != IGNORE_INDEX
        logits = self.logits(hidden[scored]).float()
        total = F.cross_entropy(logits, labels[scored], reduction="sum")
        return total / scored.sum().clamp(min=1)
