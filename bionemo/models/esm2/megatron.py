"""ESM-2 built from megatron-core: the megatron engine's model (tensor and pipeline parallel).

The same network as `bionemo.models.esm2.model.ESM2` (pre-LN blocks, rotary positions with the
"rotate half" layout, 1/sqrt(head_dim) attention scale, exact GELU, token dropout, tied decoder
with its own bias), laid out the megatron way:

    embedding.word_embeddings        VocabParallelEmbedding (vocab padded, rows split over TP)
    decoder.layers[i]                TransformerLayer from a layer spec (TE's when it imports)
    decoder.final_layernorm          ESM's emb_layer_norm_after (last pipeline stage)
    lm_head.dense / lm_head.layer_norm   replicated over TP (an H x H GEMM, as BioNeMo's)
    output_layer                     ColumnParallelLinear over the padded vocab, weight tied to
                                     the word embedding, bias = ESM's decoder bias

Activations are sequence-first [S, B, H] inside megatron. The vocabulary (33) is padded to a
multiple of 64 x TP so every TP rank holds an equal slice; the padding columns' logits are set to
-inf before the loss, so the softmax is over the real 33 tokens exactly as in the torch engine.

Attention. Megatron's local spec uses an unfused core attention that materialises the
[B, heads, S, S] scores (the seed tables' micro batches would not fit); here the local spec's
core attention is `SDPAttention`: on CUDA in bf16 it runs variable-length flash attention over
each row's real tokens (padding costs nothing, as in the torch engine), elsewhere
scaled_dot_product_attention with a key mask. With Transformer Engine installed the TE spec is
used unchanged (TE's fused attention with a padding mask).

This module imports megatron-core at import time; `bionemo.engines.megatron` imports it only
when the engine runs, so CI can import the engine's configuration without CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from bionemo.config import ModelConfig
from bionemo.data.masking import IGNORE_INDEX
from bionemo.models.esm2.model import (
    INIT_STD,
    MASK_ID,
    MASK_RATIO_TRAIN,
    PAD_ID,
    padded_segments,
    rotary_angles,
)

VOCAB_MULTIPLE = 64  # padded vocab: a multiple of this times the TP size


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    m = VOCAB_MULTIPLE * tp
    return -(-vocab_size // m) * m


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match this torch/CUDA
        return False
    return True


def transformer_config(
    cfg: ModelConfig, *, tp: int, pp: int, bf16: bool, cpu_init: bool
) -> TransformerConfig:
    """megatron-core's TransformerConfig for an ESM-2 preset."""
    recompute = {
        "none": {},
        "selective": dict(recompute_granularity="selective"),
        "full": dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        ),
    }[cfg.activation_checkpointing]
    init = lambda w: torch.nn.init.normal_(w, mean=0.0, std=INIT_STD)  # noqa: E731 (HF's init)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        normalization="LayerNorm",
        layernorm_epsilon=cfg.layer_norm_eps,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact (erf) GELU, as ESM
        bias_activation_fusion=False,  # megatron's fused bias-GELU is the tanh approximation
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        apply_query_key_layer_scaling=False,
        attention_softmax_in_fp32=True,
        fp32_residual_connection=False,  # residual stream in bf16, as the torch engine
        init_method=init,
        output_layer_init_method=init,
        init_method_std=INIT_STD,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        autocast_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=cpu_init,
        perform_initialization=True,
        sequence_parallel=False,
        **recompute,
    )


class SDPAttention(MegatronModule):
    """Megatron core-attention interface over flash / SDPA, for the local (non-TE) layer spec.

    q, k, v arrive as [S, B, heads/TP, head_dim] (rotary already applied by SelfAttention);
    attention_mask is megatron's padding mask [B, 1, 1, S], True where a key is padding (or None).
    Returns [S, B, heads/TP * head_dim].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_ignored,
    ):
        super().__init__(config=config)
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention: packed sequences / attention bias")
        S, B, nh, hd = query.shape
        p = self.dropout if self.training else 0.0
        if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and p == 0.0:
            from torch.nn.attention.varlen import varlen_attn

            q, k, v = (t.transpose(0, 1).reshape(B * S, nh, hd) for t in (query, key, value))
            real = (
                torch.ones(B, S, dtype=torch.bool, device=q.device)
                if attention_mask is None
                else ~attention_mask.view(B, S)
            )
            cu_q, cu_k = padded_segments(real)
            out = varlen_attn(q, k, v, cu_q, cu_k, S, S, scale=self.scale)  # [B*S, nh, hd]
            return out.view(B, S, nh * hd).transpose(0, 1).contiguous()
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, nh, S, hd]
        mask = None if attention_mask is None else ~attention_mask  # SDPA: True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(S, B, nh * hd)


def layer_spec(use_te: bool | None = None):
    """TransformerLayer spec: Transformer Engine's when it imports, else megatron-core's local
    modules with `SDPAttention` as core attention; bidirectional (padding mask) either way."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_te is None:
        use_te = has_transformer_engine()
    spec = (
        specs.get_gpt_layer_with_transformer_engine_spec()
        if use_te
        else specs.get_gpt_layer_local_spec()
    )
    attn = spec.submodules.self_attention
    attn.params = {**(attn.params or {}), "attn_mask_type": AttnMaskType.padding}
    if not use_te:
        attn.submodules.core_attention = SDPAttention
    return spec


class LMHead(MegatronModule):
    """dense -> GELU -> LayerNorm (the decoder itself is the model's output_layer)."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)
        h = config.hidden_size
        kw = dict(dtype=config.params_dtype)
        self.dense = torch.nn.Linear(h, h, **kw)
        self.layer_norm = torch.nn.LayerNorm(h, eps=config.layernorm_epsilon, **kw)
        with torch.no_grad():
            config.init_method(self.dense.weight)
            self.dense.bias.zero_()
        # Replicated over TP: identical inputs give identical gradients on every TP rank.
        for p in self.parameters():
            setattr(p, "sequence_parallel", False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer_norm(F.gelu(self.dense(x)))


class MegatronESM2(LanguageModule):
    """ESM-2 masked LM over megatron-core; forward returns the loss (or logits without labels).

    forward(input_ids [B, S], attention_mask [B, S] bool True = real, labels [B, S]) -> the mean
    cross-entropy over scored positions on the last pipeline stage; the hidden states [S, B, H]
    on earlier stages (the pipeline schedule passes them on).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        config: TransformerConfig,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        use_te: bool | None = None,
    ):
        super().__init__(config=config)
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = True
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        tp = config.tensor_model_parallel_size
        self.vocab_size = padded_vocab_size(cfg.vocab_size, tp)
        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=self.vocab_size,
                max_sequence_length=cfg.seq_length,
                position_embedding_type="rope",
            )
        self.decoder = TransformerBlock(
            config=config,
            spec=layer_spec(use_te),
            pre_process=pre_process,
            post_process=post_process,
        )
        if post_process:
            self.lm_head = LMHead(config)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size,
                self.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=True,
                skip_bias_add=False,
                gather_output=False,
                skip_weight_param_allocation=pre_process,
            )
            with torch.no_grad():
                self.output_layer.bias.zero_()
        if pre_process:
            with torch.no_grad():  # <pad>'s embedding row is zero, as in ESM
                rank = parallel_state.get_tensor_model_parallel_rank()
                per = self.vocab_size // tp
                if rank * per <= PAD_ID < (rank + 1) * per:
                    self.embedding.word_embeddings.weight[PAD_ID - rank * per].zero_()
        self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def _embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        x = self.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        ids = input_ids.t()
        real = attention_mask.t()
        if self.cfg.token_dropout:
            is_mask = ids == MASK_ID
            x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
            observed = is_mask.sum(0).float() / real.sum(0)  # [B], over real tokens
            x = (x * ((1 - MASK_RATIO_TRAIN) / (1 - observed))[None, :, None]).to(x.dtype)
        return x.masked_fill(~real.unsqueeze(-1), 0.0)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        cu_seqlens=None,
        max_seqlen=None,
    ) -> Tensor:
        if cu_seqlens is not None:
            raise ValueError(
                "the megatron engine does not train packed rows; set data.pad_to "
                "to 'longest' or 'max_length'"
            )
        attention_mask = attention_mask.bool()
        B, S = input_ids.shape
        x = self._embed(input_ids, attention_mask) if self.pre_process else None
        # The torch model's angles in the [S, 1, 1, head_dim] form megatron's attention applies
        # (megatron's RotaryEmbedding would put its table on the current CUDA device).
        rotary = rotary_angles(S, self.config.kv_channels, input_ids.device)[:, None, None, :]
        hidden = self.decoder(
            hidden_states=x, attention_mask=~attention_mask[:, None, None, :], rotary_pos_emb=rotary
        )
        if not self.post_process:
            return hidden
        weight = self.shared_embedding_or_output_weight()
        logits, _ = self.output_layer(self.lm_head(hidden), weight=weight)  # [S, B, V/TP]
        logits = logits.float()
        # Padding columns of the vocabulary never win: -inf before the softmax.
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        per = logits.shape[-1]
        cols = torch.arange(tp_rank * per, (tp_rank + 1) * per, device=logits.device)
        logits = logits.masked_fill(cols >= self.cfg.vocab_size, float("-inf"))
        if labels is None:
            return logits
        targets = labels.t()
        scored = targets != IGNORE_INDEX
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits, targets.masked_fill(~scored, 0)
        )
        return (losses * scored).sum() / scored.sum().clamp(min=1)


# ------------------------------------------------------------------ weights between the engines
# torch-engine key -> megatron key (local spec; the TE spec fuses the pre-attention/MLP norms
# into the following linear layer, see _te_names).
_TOP = {
    "embed_tokens.weight": "embedding.word_embeddings.weight",
    "final_norm.weight": "decoder.final_layernorm.weight",
    "final_norm.bias": "decoder.final_layernorm.bias",
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.norm.weight": "lm_head.layer_norm.weight",
    "lm_head.norm.bias": "lm_head.layer_norm.bias",
    "lm_head.bias": "output_layer.bias",
}
_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "attn.qkv_proj.weight": "self_attention.linear_qkv.weight",
    "attn.qkv_proj.bias": "self_attention.linear_qkv.bias",
    "attn.out_proj.weight": "self_attention.linear_proj.weight",
    "attn.out_proj.bias": "self_attention.linear_proj.bias",
    "mlp_norm.weight": "pre_mlp_layernorm.weight",
    "mlp_norm.bias": "pre_mlp_layernorm.bias",
    "mlp.fc1.weight": "mlp.linear_fc1.weight",
    "mlp.fc1.bias": "mlp.linear_fc1.bias",
    "mlp.fc2.weight": "mlp.linear_fc2.weight",
    "mlp.fc2.bias": "mlp.linear_fc2.bias",
}
_TE_NAMES = {  # local-spec name -> TE-spec name
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def _block_name(name: str, te: bool) -> str:
    return _TE_NAMES.get(name, name) if te else name


def _qkv_to_megatron(t: Tensor, heads: int) -> Tensor:
    """Rows q | k | v (torch engine) -> megatron's per-head [q_h; k_h; v_h] groups."""
    rest = t.shape[1:]
    return t.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def _qkv_from_megatron(t: Tensor, heads: int) -> Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def torch_to_megatron(
    sd: dict[str, Tensor], cfg: ModelConfig, padded_vocab: int, *, te: bool = False
) -> dict[str, Tensor]:
    """The torch engine's full state dict -> the megatron model's full (TP=1) state dict."""
    out = {}
    for key, value in sd.items():
        if key in _TOP:
            name = _TOP[key]
            if key in ("embed_tokens.weight", "lm_head.bias"):  # pad the vocab dimension
                value = F.pad(
                    value, (0, 0) * (value.dim() - 1) + (0, padded_vocab - value.shape[0])
                )
            out[name] = value
            continue
        if not key.startswith("layers."):
            raise KeyError(f"torch-engine key {key!r} has no megatron counterpart")
        _, i, rest = key.split(".", 2)
        name = _block_name(_BLOCK[rest], te)
        if rest.startswith("attn.qkv_proj"):
            value = _qkv_to_megatron(value, cfg.num_attention_heads)
        out[f"decoder.layers.{i}.{name}"] = value
    return out


def megatron_to_torch(
    sd: dict[str, Tensor], cfg: ModelConfig, *, te: bool = False
) -> dict[str, Tensor]:
    """A full (TP=1 layout) megatron state dict -> the torch engine's state dict."""
    top = {v: k for k, v in _TOP.items()}
    block = {_block_name(v, te): k for k, v in _BLOCK.items()}
    out = {}
    for key, value in sd.items():
        if (
            key.endswith("._extra_state")
            or key.startswith("rotary_pos_emb")
            or key == "output_layer.weight"
        ):
            continue
        if key in top:
            if top[key] in ("embed_tokens.weight", "lm_head.bias"):
                value = value[: cfg.vocab_size]
            out[top[key]] = value
            continue
        if not key.startswith("decoder.layers."):
            raise KeyError(f"megatron key {key!r} has no torch-engine counterpart")
        i, rest = key.removeprefix("decoder.layers.").split(".", 1)
        name = block[rest]
        if name.startswith("attn.qkv_proj"):
            value = _qkv_from_megatron(value, cfg.num_attention_heads)
        out[f"layers.{i}.{name}"] = value
    return out


def layer_offset(config: TransformerConfig) -> int:
    """Index of this pipeline stage's first layer (uniform split)."""
    pp = config.pipeline_model_parallel_size
    return parallel_state.get_pipeline_model_parallel_rank() * (config.num_layers // pp)


@torch.no_grad()
def load_full_state(model: MegatronESM2, full: dict[str, Tensor]) -> None:
    """Copy a full (TP=1, all layers) megatron state dict into this rank's shard of the model:
    its pipeline stage's layers, its TP slice of every tensor-parallel parameter."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    offset = layer_offset(model.config)
    own = dict(model.named_parameters())
    missing = []
    for name, param in own.items():
        key = name
        if name.startswith("decoder.layers."):
            i, rest = name.removeprefix("decoder.layers.").split(".", 1)
            key = f"decoder.layers.{int(i) + offset}.{rest}"
        if key == "output_layer.weight":  # the tied copy on the last stage
            key = "embedding.word_embeddings.weight"
        if key not in full:
            missing.append(key)
            continue
        value = full[key]
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            value = value.chunk(tp, dim=param.partition_dim)[rank]
        if value.shape != param.shape:
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model {tuple(param.shape)}"
            )
        param.copy_(value)
    if missing:
        raise KeyError(f"weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def load_model_state(module: torch.nn.Module, state: dict) -> None:
    """load_state_dict of a dist_checkpointing result: strict, except for the linear layers'
    `_extra_state` entries (FP8 metadata slots), which a checkpoint need not hold."""
    # nn.Module's own method: megatron's wrappers return nothing from theirs
    missing, unexpected = torch.nn.Module.load_state_dict(module, state, strict=False)
    missing = [k for k in missing if not k.endswith("._extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("._extra_state")]
    if missing or unexpected:
        raise KeyError(
            f"checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
