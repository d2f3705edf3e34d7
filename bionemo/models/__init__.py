"""Models the trainer can build: a family's (`model.family`), or a user's own (`model.plugin`).

A plugin is a model in the user's own package, named by `trainer.model.plugin:
"package.module:factory"` and trained by the same launcher, engine, stop protocol and checkpoints
as the built-in families. Its interface, all of it:

    factory(cfg: bionemo.config.ModelConfig) -> torch.nn.Module
        Build the model, initialised from torch's global RNG (the engine seeds it identically on
        every rank, and creates it under the training device as the default device). cfg is the
        resolved trainer.model section: use the keys that fit (hidden_size, num_layers,
        vocab_size, seq_length, ...); the shape keys are required there for every model.
    model.loss(input_ids, attention_mask, labels, cu_seqlens=None, max_seqlen=None) -> Tensor
        The mean training loss of one micro batch, a scalar. The batch is what model.family's
        data pipeline yields (bionemo.trainer.dataloader_builder): esm2, protein tokens of
        bionemo/data/tokenizer.py; geneformer, gene-rank tokens. labels hold the token to predict
        at masked positions and IGNORE_INDEX (-100) elsewhere. cu_seqlens/max_seqlen come only
        with data.pad_to=none (packed rows); a model that cannot pack should raise on them.
    model.export(out_dir: Path) -> None                           (optional)
        Write the trained model in the user's own format (save_pretrained, ...). Called at the
        end of a run and by `python -m bionemo.export`, into a fresh folder that is renamed to
        final_model/ only when it returns. Without it: model.safetensors of the state dict and a
        config.json holding trainer.model.

Everything else stays the trainer's: optimizer (AdamW over the model's parameters), DDP,
checkpoints of `state_dict()` (exact resume), metrics. Tokens/s are exact; TFLOP/s and MFU count
a transformer of trainer.model's shape, which a plugin is not. Plugins train on the torch engine.
The launcher never imports the plugin (it would import torch): it checks that the module can be
found by the job's interpreter, and the factory is checked here, when the trainer builds it.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from torch import nn

from bionemo.config import ModelConfig


class PluginError(ValueError):
    """trainer.model.plugin cannot be used; the message says why and what to do."""


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for cfg.plugin or cfg.family, freshly initialized from torch's global RNG."""
    if cfg.plugin:
        return build_plugin(cfg)
    if cfg.family == "esm2":
        from bionemo.models.esm2 import ESM2

        return ESM2(cfg)
    if cfg.family == "geneformer":
        from bionemo.models.geneformer import Geneformer

        return Geneformer(cfg)
    raise ValueError(
        f"model.family {cfg.family!r} is unknown; known families: 'esm2', 'geneformer'"
    )


def load_factory(path: str):
    """The callable that `module:factory` names."""
    module_name, _, name = path.partition(":")
    where = f"trainer.model.plugin: {path!r}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(
            f"{where}: cannot import {module_name} ({type(e).__name__}: {e}); "
            "install the package into the trainer's environment or add its folder "
            "to cluster.env.PYTHONPATH"
        ) from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise PluginError(
            f"{where}: {module_name} has no function {name!r}; name the function "
            "that builds the model (see bionemo/models/__init__.py)"
        )
    return factory


def build_plugin(cfg: ModelConfig) -> nn.Module:
    model = load_factory(cfg.plugin)(cfg)
    if not isinstance(model, nn.Module) or not callable(getattr(model, "loss", None)):
        raise PluginError(
            f"trainer.model.plugin: {cfg.plugin!r} returned {type(model).__name__}, "
            "not a torch.nn.Module with a loss(input_ids, attention_mask, labels, "
            "...) method; see bionemo/models/__init__.py"
        )
    return model


def export_model(model: nn.Module, cfg: ModelConfig, out, *, vocab_file=None) -> Path:
    """Write the trained `model` to the folder `out`: a family's as a Hugging Face folder
    (bionemo/hf.py), a plugin's through its export() (or its state dict), atomically."""
    from bionemo import hf

    if not cfg.plugin:
        return hf.export_state(model.state_dict(), cfg, out, vocab_file=vocab_file)
    with hf.folder_written(out) as tmp:
        if callable(getattr(model, "export", None)):
            model.export(tmp)
        else:
            from safetensors.torch import save_file

            state = {
                k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
            }
            save_file(state, str(tmp / hf.WEIGHTS), metadata={"format": "pt"})
            (tmp / hf.CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    return Path(out)
