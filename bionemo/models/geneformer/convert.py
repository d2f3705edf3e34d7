"""Weights between our Geneformer and Hugging Face's `BertForMaskedLM` (e.g. ctheodoris/Geneformer).

The two networks are the same function, so conversion is a key rename plus the tied decoder:
HF lists `cls.predictions.decoder.weight` (the word embedding) and `cls.predictions.decoder.bias`
(the head's bias); we keep `embed_tokens.weight` and `lm_head.bias` once each. A pooler (BertModel
checkpoints) is not part of the MLM model and is dropped; so are HF's position_ids/token_type_ids
buffers. transformers is imported inside the functions that need it; the trainer never does.
"""

from __future__ import annotations

import torch

from bionemo.config import ModelConfig
from bionemo.models.geneformer.model import INIT_STD, TYPE_VOCAB_SIZE, Geneformer

_TOP = {  # HF key -> ours, outside the blocks
    "bert.embeddings.word_embeddings.weight": "embed_tokens.weight",
    "bert.embeddings.position_embeddings.weight": "embed_positions.weight",
    "bert.embeddings.token_type_embeddings.weight": "embed_types.weight",
    "bert.embeddings.LayerNorm.weight": "embed_norm.weight",
    "bert.embeddings.LayerNorm.bias": "embed_norm.bias",
    "cls.predictions.transform.dense.weight": "lm_head.dense.weight",
    "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "lm_head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "lm_head.norm.bias",
    "cls.predictions.bias": "lm_head.bias",
}
# Inside block i: HF "bert.encoder.layer.{i}.<module>.<param>" -> "layers.{i}.<module>.<param>".
_BLOCK = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "output.LayerNorm": "mlp_norm",
}
_TIED = {
    "cls.predictions.decoder.weight": "embed_tokens.weight",
    "cls.predictions.decoder.bias": "lm_head.bias",
}
_LAYER = "bert.encoder.layer."


def _ignored(key: str) -> bool:
    return key.startswith("bert.pooler.") or key.endswith(("position_ids", "token_type_ids"))


def hf_to_ours(hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a `BertForMaskedLM` state dict to ours; tensors are not copied."""
    out, unknown = {}, []
    for key, value in hf_state_dict.items():
        if key in _TIED or _ignored(key):
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key.startswith(_LAYER):
            i, rest = key.removeprefix(_LAYER).split(".", 1)
            module, param = rest.rsplit(".", 1)
            if module not in _BLOCK:
                unknown.append(key)
                continue
            out[f"layers.{i}.{_BLOCK[module]}.{param}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"HF keys with no Geneformer counterpart: {unknown}")
    for hf_key, ours in _TIED.items():
        if hf_key in hf_state_dict and not torch.equal(hf_state_dict[hf_key], out[ours]):
            raise ValueError(f"{hf_key} differs from {ours}; Geneformer ties the two")
    return out


def ours_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in `BertForMaskedLM` keys, tied decoder weight and bias listed."""
    top = {ours: hf for hf, ours in _TOP.items()}
    block = {ours: hf for hf, ours in _BLOCK.items()}
    out = {}
    for key, value in state_dict.items():
        if key in top:
            out[top[key]] = value
        elif key.startswith("layers."):
            i, rest = key.removeprefix("layers.").split(".", 1)
            module, param = rest.rsplit(".", 1)
            out[f"{_LAYER}{i}.{block[module]}.{param}"] = value
        else:
            raise ValueError(f"unexpected key {key!r} in a Geneformer state dict")
    for hf_key, ours in _TIED.items():
        out[hf_key] = state_dict[ours]
    return out


def hf_config_dict(cfg: ModelConfig, pad_token_id: int = 2) -> dict:
    """The `config.json` of the same network as `transformers.BertForMaskedLM` reads it; plain
    data, so an export needs no transformers. pad_token_id: the vocabulary's <pad> (2 in
    BioNeMo's order and the sample set's; 0 in the original Geneformer dictionary); it only
    chooses the embedding row HF zeroes at init."""
    return dict(
        architectures=["BertForMaskedLM"],
        model_type="bert",
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.ffn_hidden_size,
        hidden_act=cfg.activation,
        hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.seq_length,
        type_vocab_size=TYPE_VOCAB_SIZE,
        initializer_range=INIT_STD,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=pad_token_id,
        position_embedding_type="absolute",
        tie_word_embeddings=True,
        torch_dtype="float32",
    )


def to_hf_config(cfg: ModelConfig, pad_token_id: int = 2):
    """The `transformers.BertConfig` of the same network."""
    from transformers import BertConfig

    d = hf_config_dict(cfg, pad_token_id)
    for k in ("architectures", "model_type", "torch_dtype"):
        d.pop(k)
    return BertConfig(**d)


def from_hf(hf_model, name: str | None = None) -> Geneformer:
    """Our Geneformer holding the weights of an HF `BertForMaskedLM`."""
    c = hf_model.config
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type {c.position_embedding_type!r}: need 'absolute'")
    if c.hidden_act not in ("relu", "gelu"):
        raise ValueError(f"hidden_act {c.hidden_act!r}: model.activation supports relu and gelu")
    if c.type_vocab_size != TYPE_VOCAB_SIZE:
        raise ValueError(f"type_vocab_size {c.type_vocab_size}: BERT's is {TYPE_VOCAB_SIZE}")
    cfg = ModelConfig(
        name=name or getattr(c, "_name_or_path", "") or "geneformer_hf",
        family="geneformer",
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        num_attention_heads=c.num_attention_heads,
        ffn_hidden_size=c.intermediate_size,
        seq_length=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        layer_norm_eps=c.layer_norm_eps,
        token_dropout=False,
        activation=c.hidden_act,
        hidden_dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
    )
    model = Geneformer(cfg)
    model.load_state_dict(hf_to_ours(hf_model.state_dict()), strict=True)
    return model


def to_hf(model: Geneformer, pad_token_id: int = 2):
    """An HF `BertForMaskedLM` holding our model's weights (fp32, eval mode)."""
    from transformers import BertForMaskedLM

    hf = BertForMaskedLM(to_hf_config(model.cfg, pad_token_id))
    missing, unexpected = hf.load_state_dict(ours_to_hf(model.state_dict()), strict=False)
    missing = [k for k in missing if not _ignored(k)]
    if missing or unexpected:
        raise RuntimeError(f"HF conversion mismatch: missing {missing}, unexpected {unexpected}")
    return hf.eval()
