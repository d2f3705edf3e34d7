"""Export a run's weights as a Hugging Face model folder.

    python -m bionemo.export SOURCE OUT_DIR [--config RUN/config.yaml]

SOURCE is a run directory (its newest complete checkpoint is exported) or one complete
checkpoint folder (runs/.../checkpoints/step-N). Either engine's checkpoint: a megatron one is
reassembled from its TP/PP shards first (bionemo.engines.convert). OUT_DIR gets model.safetensors,
config.json and the tokenizer files (bionemo/hf.py); `EsmForMaskedLM.from_pretrained(OUT_DIR)`
(Geneformer: `BertForMaskedLM`) loads it. The trainer runs this at the end of every run with a
checkpoint, into `<run>/final_model/`. Runs on CPU, one process; exit 2 on a bad SOURCE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bionemo import rundir

FINAL_MODEL = "final_model"


def resolve(source: Path, config: Path | None) -> tuple[Path, Path]:
    """(complete checkpoint folder, the run's config.yaml) for SOURCE; ValueError when neither."""
    source = Path(source)
    if (source / rundir.COMPLETE).is_file():
        ckpt = source
        config = config or source.parents[1] / rundir.CONFIG
    elif (source / rundir.CONFIG).is_file():
        step = rundir.latest_complete_step(source)
        if step is None:
            raise ValueError(
                f"{source} has no complete checkpoint to export "
                f"(checkpoints/step-N with a {rundir.COMPLETE} marker)"
            )
        ckpt = rundir.step_dir(source, step)
        config = config or source / rundir.CONFIG
    else:
        raise ValueError(
            f"{source} is neither a run directory (with {rundir.CONFIG}) nor a "
            f"complete checkpoint folder (with {rundir.COMPLETE})"
        )
    if not Path(config).is_file():
        raise ValueError(f"{config} does not exist; pass the run's config with --config")
    return ckpt, Path(config)


def export_checkpoint(ckpt: Path, config: Path, out: Path) -> Path:
    from bionemo.checkpoint import load_weights
    from bionemo.config import load_trainer_config
    from bionemo.engines import checkpoint_engine
    from bionemo.models import build_model

    cfg = load_trainer_config(config)
    from bionemo.finetune import task_model

    model = task_model(cfg, build_model(cfg.model), read_labels=False)  # mlm: the model itself
    if checkpoint_engine(ckpt) == "megatron":
        from bionemo.engines.convert import megatron_state_to_torch

        model.load_state_dict(megatron_state_to_torch(ckpt, cfg.model), strict=True)
    else:
        load_weights(ckpt, model)
    return export_module(model, cfg, out)


def export_module(model, cfg, out: Path) -> Path:
    """The trained module (a family's, fine-tuned or not, or a plugin's) to the folder `out`."""
    if cfg.model.plugin:  # the plugin's own export() (bionemo/models/__init__.py)
        from bionemo.models import export_model

        return export_model(model, cfg.model, out, vocab_file=getattr(cfg.data, "vocab", None))
    return export_state(model.state_dict(), cfg, out)


def export_state(state_dict: dict, cfg, out: Path) -> Path:
    """Our model's state dict as a Hugging Face folder; a fine-tuned model's encoder the same
    way, with its head beside it (head.safetensors, head_config.json: bionemo/finetune.py)."""
    from bionemo import hf

    extra = None
    if cfg.task.fine_tuning:
        from bionemo.finetune import head_files, split_state

        state_dict, head = split_state(state_dict)
        extra = head_files(head, cfg)
    # Geneformer's gene dictionary (relative paths are the run's working directory's, as in the
    # trainer); ESM-2's tokenizer is fixed and written from bionemo.data.tokenizer.
    return hf.export_state(
        state_dict, cfg.model, out, vocab_file=getattr(cfg.data, "vocab", None), extra=extra
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bionemo.export", description=__doc__.split("\n")[0])
    p.add_argument("source", type=Path, help="a run directory or a complete checkpoint folder")
    p.add_argument("out", type=Path, help="the Hugging Face model folder to write")
    p.add_argument("--config", type=Path, help="the run's config.yaml (default: found from SOURCE)")
    args = p.parse_args(argv)
    try:
        ckpt, config = resolve(args.source, args.config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = export_checkpoint(ckpt, config, args.out)
    print(f"exported {ckpt} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
