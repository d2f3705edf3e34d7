"""Weights between our ESM2 and Hugging Face's `EsmForMaskedLM` (the facebook/esm2_* checkpoints).

The two networks are the same function, so conversion is a key rename plus four special cases:
- HF's separate query/key/value projections are one `attn.qkv_proj` here (rows q | k | v):
  joined on the way in, split on the way out;
- the decoder weight is tied to the word embedding: HF may list it as `lm_head.decoder.weight`, we
  keep only `embed_tokens.weight`;
- rotary `inv_freq` buffers: we recompute them on every forward, so they are dropped (and HF
  rebuilds its own from the config);
- the contact-prediction head (and a pooler, if any) is not part of the MLM model: dropped.

transformers is imported inside the functions that need it; the trainer never does.
"""

from __future__ import annotations

import torch

from bionemo.config import ModelConfig
from bionemo.models.esm2.model import ESM2, MASK_ID, PAD_ID, ROPE_BASE

# HF key (without the "esm." prefix) -> ours, for everything outside the blocks.
_TOP = {
    "embeddings.word_embeddings.weight": "embed_tokens.weight",
    "encoder.emb_layer_norm_after.weight": "final_norm.weight",
    "encoder.emb_layer_norm_after.bias": "final_norm.bias",
}
_HEAD = {  # the LM head's keys carry no "esm." prefix in HF
    "lm_head.dense.weight": "lm_head.dense.weight",
    "lm_head.dense.bias": "lm_head.dense.bias",
    "lm_head.layer_norm.weight": "lm_head.norm.weight",
    "lm_head.layer_norm.bias": "lm_head.norm.bias",
    "lm_head.bias": "lm_head.bias",
}
# Inside block i: HF "esm.encoder.layer.{i}.<module>.<param>" -> ours "layers.{i}.<module>.<param>".
_BLOCK = {
    "attention.LayerNorm": "attn_norm",
    "attention.output.dense": "attn.out_proj",
    "LayerNorm": "mlp_norm",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# HF's q, k, v projections, in the order their rows are stacked in our fused projection.
_QKV_HF = ("attention.self.query", "attention.self.key", "attention.self.value")
_QKV = "attn.qkv_proj"
_TIED = "lm_head.decoder.weight"


def _ignored(key: str) -> bool:
    """HF keys with no counterpart in our model (see the module docstring)."""
    return (
        key.endswith("inv_freq")  # rotary, model-level (new HF) or per layer (older HF)
        or key.startswith(("contact_head.", "pooler."))
        or key == "embeddings.position_ids"  # a buffer older HF versions saved
    )


def hf_to_ours(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an `EsmForMaskedLM` (or `EsmModel`) state dict to ours; tensors are not copied,
    except q/k/v, which are concatenated into the fused projection."""
    out, unknown = {}, []
    qkv: dict[
        tuple[str, str], dict[str, torch.Tensor]
    ] = {}  # (layer, param) -> HF module -> tensor
    for key, value in hf_state_dict.items():
        if key == _TIED:
            continue  # checked against the embedding below
        if key in _HEAD:
            out[_HEAD[key]] = value
            continue
        k = key.removeprefix("esm.")
        if _ignored(k):
            continue
        if k in _TOP:
            out[_TOP[k]] = value
        elif k.startswith("encoder.layer."):
            i, rest = k.removeprefix("encoder.layer.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module in _QKV_HF:
                qkv.setdefault((i, param), {})[module] = value
            elif module in _BLOCK:
                out[f"layers.{i}.{_BLOCK[module]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (i, param), parts in qkv.items():
        missing = [m for m in _QKV_HF if m not in parts]
        if missing:
            raise ValueError(
                f"layer {i} {param}: HF keys {missing} missing (need query, key, value)"
            )
        out[f"layers.{i}.{_QKV}.{param}"] = torch.cat([parts[m] for m in _QKV_HF])
    if unknown:
        # e.g. position_embeddings: an absolute-position ESM (ESM-1b), not ESM-2
        raise ValueError(f"HF keys with no ESM-2 counterpart: {unknown}")
    tied = hf_state_dict.get(_TIED)
    if tied is not None and not torch.equal(tied, out["embed_tokens.weight"]):
        raise ValueError(f"{_TIED} differs from the word embedding; ESM-2 ties the two")
    return out


def ours_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in `EsmForMaskedLM` keys, with the tied decoder weight listed.

    The rotary inv_freq and contact-head entries are absent; load with strict=False (see to_hf).
    """
    top = {ours: f"esm.{hf}" for hf, ours in _TOP.items()} | {o: h for h, o in _HEAD.items()}
    block = {ours: hf for hf, ours in _BLOCK.items()}
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key.startswith("layers."):
            i, rest = key.removeprefix("layers.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module == _QKV:
                for hf_module, part in zip(_QKV_HF, value.chunk(3)):
                    out[f"esm.encoder.layer.{i}.{hf_module}.{param}"] = part
            else:
                out[f"esm.encoder.layer.{i}.{block[module]}.{param}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in an ESM2 state dict")
    out[_TIED] = state_dict["embed_tokens.weight"]
    return out


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The `config.json` of the same network as `transformers.EsmForMaskedLM` reads it (ESM-2
    settings; the dropout the model was configured with, 0 in the presets); plain data, so an
    export needs no transformers."""
    return dict(
        architectures=["EsmForMaskedLM"],
        model_type="esm",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_hidden_size,
        hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        # facebook/esm2_* use 1026 for 1024-token crops (<cls> + 1022 + <eos>, plus HF's
        # padding_idx offset of 2 in position ids). Unused with rotary positions beyond that.
        max_position_embeddings=cfg.seq_length + 2,
        initializer_range=0.02,
        layer_norm_eps=cfg.layer_norm_eps,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=cfg.token_dropout,
        pad_token_id=PAD_ID,
        mask_token_id=MASK_ID,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )


def to_hf_config(cfg: ModelConfig):
    """The `transformers.EsmConfig` of the same network."""
    from transformers import EsmConfig

    d = hf_config_dict(cfg)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    return EsmConfig(**d)


def from_hf(hf_model) -> ESM2:
    """Our ESM2 holding the weights of an HF `EsmForMaskedLM` (e.g. facebook/esm2_t6_8M_UR50D)."""
    c = hf_model.config
    if getattr(c, "position_embedding_type", "absolute") != "rotary" or c.emb_layer_norm_before:
        raise ValueError(
            "not an ESM-2 checkpoint: needs position_embedding_type='rotary' and "
            "emb_layer_norm_before=False"
        )
    if getattr(c, "rope_theta", ROPE_BASE) != ROPE_BASE:
        raise ValueError(f"rope_theta {c.rope_theta} is not ESM-2's {ROPE_BASE}")
    if (c.pad_token_id, c.mask_token_id) != (PAD_ID, MASK_ID):
        raise ValueError(
            f"pad/mask ids {c.pad_token_id}/{c.mask_token_id} are not ESM's {PAD_ID}/{MASK_ID}"
        )
    cfg = ModelConfig(
        name=getattr(c, "_name_or_path", "") or "esm2_hf",
        family="esm2",
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size,
        seq_length=c.max_position_embeddings - 2,  # inverse of to_hf_config
        vocab_size=c.vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        token_dropout=bool(c.token_dropout),
        hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
    )
    model = ESM2(cfg)
    model.load_state_dict(hf_to_ours(hf_model.state_dict()), strict=True)
    return model


def to_hf(model: ESM2):
    """An HF `EsmForMaskedLM` holding our model's weights (fp32, eval mode)."""
    from transformers import EsmForMaskedLM

    hf = EsmForMaskedLM(to_hf_config(model.cfg))
    missing, unexpected = hf.load_state_dict(ours_to_hf(model.state_dict()), strict=False)
    missing = [k for k in missing if not _ignored(k.removeprefix("esm."))]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()
