"""Hugging Face model folders in and out of the trainer.

Import: `trainer.checkpoint.init_from` may name a Hugging Face model folder (`config.json` +
`model.safetensors`, as `save_pretrained` writes them) of either family: ESM-2 (`EsmForMaskedLM`,
e.g. facebook/esm2_*) or Geneformer (`BertForMaskedLM`). Only safetensors are read: a
`pytorch_model.bin` is a pickle, which can run code when loaded. The folder's shape must equal the
configured model's (the launcher checks it before submitting and names the keys to set), rather
than the model being derived from the folder: the preset also carries the optimizer, batch and
schedule choices, and a silent shape change would make the benchmark tables lie. ESM-2 files
from transformers 4.40-4.51 (and most facebook/esm2_* files) carry an absolute-position table
that rotary ESM-2 never uses: it is dropped with a note; any other unknown key is an error.

Export: `python -m bionemo.export RUN_DIR|CHECKPOINT_DIR OUT_DIR` (and the trainer at the end of
a run, into `<run>/final_model/`) writes `model.safetensors`, `config.json` and the tokenizer
files, which `EsmForMaskedLM.from_pretrained` / `BertForMaskedLM.from_pretrained` load as is.

The checks here are torch-free (the launcher imports this module); loading imports torch.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# HF config key -> our trainer.model key, per family; the HF model_type of each family.
MODEL_TYPE = {"esm2": "esm", "geneformer": "bert"}
SHAPE_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
}
ESM_POSITION_TABLE = "esm.embeddings.position_embeddings.weight"


def is_hf_folder(path) -> bool:
    """A folder with a Hugging Face config.json (our checkpoints never have one)."""
    return (Path(path) / CONFIG).is_file()


def read_config(path) -> dict:
    try:
        data = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{Path(path) / CONFIG} is not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{Path(path) / CONFIG} is not a JSON object")
    return data


def weights_problem(path, model) -> tuple[str, str] | None:
    """(problem, fix) when the folder `path` cannot be `checkpoint.init_from` for `model` (a
    bionemo.config.ModelConfig), else None: neither a complete checkpoint of ours nor a
    Hugging Face folder of the same family and shape. Cheap: one small JSON read."""
    from bionemo import rundir

    path = Path(path)
    if not path.is_dir():
        return (
            f"{path} is not a folder",
            "point it at a runs/.../checkpoints/step-N folder or "
            "a Hugging Face model folder (config.json + model.safetensors)",
        )
    if not is_hf_folder(path):
        if (path / rundir.COMPLETE).is_file():
            return None
        if (path / WEIGHTS).is_file() or any((path / p).is_file() for p in PICKLED):
            return (
                f"{path} has weights but no {CONFIG} (a partial Hugging Face folder)",
                "copy the complete model folder (config.json and model.safetensors)",
            )
        return (
            f"{path} is neither a complete checkpoint folder (no {rundir.COMPLETE} marker) "
            f"nor a Hugging Face model folder (no {CONFIG})",
            "point it at a runs/.../checkpoints/step-N folder or a Hugging Face model folder",
        )
    if not (path / WEIGHTS).is_file():
        pickled = [p for p in PICKLED if (path / p).is_file()]
        if pickled:
            return (
                f"{path} holds {pickled[0]} (a pickle, which can run code when loaded) and "
                f"no {WEIGHTS}",
                'convert it where you trust it: python -c "from '
                "transformers import AutoModelForMaskedLM as M; M.from_pretrained('IN')"
                ".save_pretrained('OUT', safe_serialization=True)\" and point "
                "trainer.checkpoint.init_from at OUT",
            )
        return (
            f"{path} has {CONFIG} but no {WEIGHTS}",
            "copy the complete model folder (config.json and model.safetensors)",
        )
    try:
        hf = read_config(path)
    except ValueError as e:
        return (str(e), "copy the model folder again")
    want = MODEL_TYPE[model.family]
    if hf.get("model_type") != want:
        return (
            f"{path}/{CONFIG} has model_type {hf.get('model_type')!r}, not {want!r} "
            f"({model.family})",
            "choose the preset of that model family",
        )
    if model.family == "esm2" and (
        hf.get("position_embedding_type", "absolute") != "rotary" or hf.get("emb_layer_norm_before")
    ):
        return (
            f"{path}/{CONFIG} is not an ESM-2 model (position_embedding_type "
            f"{hf.get('position_embedding_type')!r}, emb_layer_norm_before "
            f"{hf.get('emb_layer_norm_before')!r})",
            "ESM-2 needs 'rotary' and false; ESM-1 models are not supported",
        )
    mismatched = [
        (ours, hf.get(theirs), getattr(model, ours))
        for theirs, ours in SHAPE_KEYS.items()
        if hf.get(theirs) != getattr(model, ours)
    ]
    if model.family == "geneformer":
        if hf.get("max_position_embeddings") != model.seq_length:
            mismatched.append(("seq_length", hf.get("max_position_embeddings"), model.seq_length))
        if hf.get("hidden_act") != model.activation:
            mismatched.append(("activation", hf.get("hidden_act"), model.activation))
    if mismatched:
        have = ", ".join(f"{k} {theirs} (configured: {ours})" for k, theirs, ours in mismatched)
        sets = " ".join(f"trainer.model.{k}={theirs}" for k, theirs, _ in mismatched)
        return (
            f"{path}/{CONFIG} has another shape: {have}",
            f"use the preset of that size or set {sets}",
        )
    return None


def load_state(path, model_cfg) -> dict:
    """Our state dict (fp32 tensors) from the HF folder `path`, for a model of `model_cfg`."""
    from safetensors.torch import load_file

    bad = weights_problem(path, model_cfg)
    if bad:
        raise ValueError(f"checkpoint.init_from: {bad[0]}; {bad[1]}")
    sd = load_file(str(Path(path) / WEIGHTS))
    # LayerNorm parameters under their TF-era names (transformers 5 writes ESM's so, and loads
    # both): gamma is the weight, beta the bias.
    sd = {_legacy_norm_name(k): v for k, v in sd.items()}
    if model_cfg.family == "esm2":
        from bionemo.models.esm2.convert import hf_to_ours

        if ESM_POSITION_TABLE in sd:  # rotary ESM-2 never reads it (see the module docstring)
            log.info(
                "%s: dropping %s, an absolute-position table that rotary ESM-2 does not use",
                path,
                ESM_POSITION_TABLE,
            )
            del sd[ESM_POSITION_TABLE]
    else:
        from bionemo.models.geneformer.convert import hf_to_ours
    return {k: v.float() for k, v in hf_to_ours(sd).items()}


_LEGACY_NORM = {"gamma": "weight", "beta": "bias"}


def _legacy_norm_name(key: str) -> str:
    stem, dot, last = key.rpartition(".")
    return stem + dot + _LEGACY_NORM.get(last, last)


def load_into(path, model) -> None:
    """Load the HF folder `path` into our model (strict: every parameter must be set)."""
    sd = load_state(path, model.cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint.init_from: {path}: weights missing {missing}, unexpected {unexpected}"
        )


def export(model, out, *, vocab_file=None) -> Path:
    """Write `model` (our ESM2 or Geneformer, any device) as a Hugging Face folder `out`."""
    return export_state(model.state_dict(), model.cfg, out, vocab_file=vocab_file)


def export_state(
    state_dict: dict, model_cfg, out, *, vocab_file=None, extra: dict[str, bytes] | None = None
) -> Path:
    """Write our state dict as a Hugging Face folder `out` (model.safetensors, config.json,
    tokenizer files), atomically (`out.partial`, then a rename). Needs safetensors, not
    transformers: the files are what `save_pretrained` writes for the same network. `extra`:
    more files (name -> bytes) for the same folder, e.g. a fine-tuned head (bionemo/finetune.py)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    sd = {k: v.detach().float().cpu() for k, v in state_dict.items()}
    if model_cfg.family == "esm2":
        from bionemo.models.esm2.convert import _TIED, hf_config_dict, ours_to_hf
        from bionemo.models.esm2.model import ROPE_BASE

        tensors = ours_to_hf(sd)
        tensors.pop(_TIED)  # tied to the word embedding: HF re-ties it on load
        # Parts of HF's EsmModel that ESM-2's MLM does not compute with: the rotary frequencies
        # (a persistent buffer there, recomputed here) and the contact-prediction head, written
        # as HF computes the one and as zeros for the untrained other, so nothing loads missing.
        d = model_cfg.hidden_size // model_cfg.num_attention_heads
        tensors["esm.rotary_embeddings.inv_freq"] = 1.0 / (
            ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
        )
        heads = model_cfg.num_layers * model_cfg.num_attention_heads
        tensors["esm.contact_head.regression.weight"] = torch.zeros(1, heads)
        tensors["esm.contact_head.regression.bias"] = torch.zeros(1)
    else:
        from bionemo.models.geneformer.convert import _TIED, hf_config_dict, ours_to_hf

        tensors = {k: v for k, v in ours_to_hf(sd).items() if k not in _TIED}
    with folder_written(out) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(tmp / WEIGHTS),
            metadata={"format": "pt"},
        )
        (tmp / CONFIG).write_text(json.dumps(hf_config_dict(model_cfg), indent=2) + "\n")
        _write_tokenizer(model_cfg, tmp, vocab_file)
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
    return out


@contextmanager
def folder_written(out: Path):
    """Yield `out.partial` to write into; on success it replaces `out` (complete or absent, like
    a checkpoint), on an error it stays behind and `out` is untouched."""
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    _remove(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    _remove(out)
    tmp.rename(out)


def _write_tokenizer(cfg, out: Path, vocab_file) -> None:
    if cfg.family == "esm2":  # EsmTokenizer's files: the 33-token alphabet and its specials
        from bionemo.data.tokenizer import TOKENS

        (out / "vocab.txt").write_text("\n".join(TOKENS) + "\n")
        specials = {
            "cls_token": "<cls>",
            "pad_token": "<pad>",
            "eos_token": "<eos>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
        }
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {"tokenizer_class": "EsmTokenizer", "model_max_length": cfg.seq_length, **specials},
                indent=2,
            )
            + "\n"
        )
    elif vocab_file is not None and Path(vocab_file).is_file():
        # Geneformer has no HF tokenizer class: its "tokenizer" is the gene -> id dictionary.
        (out / "token_dictionary.json").write_bytes(Path(vocab_file).read_bytes())


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
