"""The sweep's result files (<out>/<gpu>/<model>.json|csv|md and PNG plots) and the benchmark-table
row that --write-table replaces."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import fields
from pathlib import Path

import yaml

from launchers.sweeping.search import Trial, variant_label


def _fmt(v, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _gib(v) -> str:
    return "none" if v is None else f"{v:g} GiB"


def markdown(result: dict) -> str:
    r = result
    lines = [
        f"# Micro-batch sweep: {r['model']} on {r['gpu']}",
        "",
        f"Command: `{r['command']}`",
        "",
        f"- date (UTC): {r['date']}; host: {r['host']}; device: {r['device']}",
        f"- torch {r['torch']}; commit {r['git_commit']}",
        f"- world size {r['world_size']} ({r['gpus_per_trial']} per node x {r['nodes']} nodes), "
        f"tensor parallel {r['tensor_parallel']}, sequence length {r['seq_length']} (padded)",
        f"- GPU memory cap: {_gib(r['memory_cap_gib'])}; CPU address-space limit per process: "
        f"{_gib(r['cpu_memory_limit_gib'])}; compile: {r['compile']}",
        f"- {r['warmup_steps']} warm-up steps dropped, median over {r['timed_steps']} timed steps",
        "",
        "## Per strategy and recompute policy",
        "",
        f"Chosen (fastest with recompute {r['best']['recompute']}): "
        f"**{variant_label(r['best'].get('data_parallel', 'ddp'), r['best'].get('fp8', 'none'))}**,"
        f" micro batch {r['best']['micro_batch_size']}.",
        "",
        "| strategy | recompute | max micro batch | fastest micro batch | tokens/s/GPU |"
        " TFLOP/s/GPU | MFU | tokens/s/GPU at max |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    # Results written before the strategy search have one unnamed variant: "policies".
    variants = r.get("variants") or [{"label": "ddp", "policies": r["policies"]}]
    for v in variants:
        for policy, s in v["policies"].items():
            largest = _fmt(s["max_micro_batch_size"], "d")
            if s.get("max_is_search_limit"):
                largest = f">= {largest} (--max)"
            lines.append(
                f"| {v['label']} | {policy} | {largest} | {_fmt(s['micro_batch_size'], 'd')}"
                f" | {_fmt(s.get('tokens_per_s_per_gpu'))}"
                f" | {_fmt(s.get('tflops_per_gpu'), '.3g')}"
                f" | {_fmt(s.get('mfu'), '.1%')} | {_fmt(s.get('tokens_per_s_per_gpu_at_max'))} |"
            )
    lines += [
        "",
        "## Trials (in the order run)",
        "",
        "| strategy | recompute | micro batch | fits | tokens/s/GPU | useful tokens/s/GPU |"
        " TFLOP/s/GPU | MFU | peak GiB | seconds |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in r["trials"]:
        label = variant_label(t.get("data_parallel", "ddp"), t.get("fp8", "none"))
        lines.append(
            f"| {label} | {t['recompute']} | {t['micro_batch_size']}"
            f" | {'yes' if t['fits'] else 'OOM'}"
            f" | {_fmt(t['tokens_per_s_per_gpu'])} | {_fmt(t['useful_tokens_per_s_per_gpu'])}"
            f" | {_fmt(t['tflops_per_gpu'], '.3g')} | {_fmt(t['mfu'], '.1%')}"
            f" | {_fmt(t['peak_memory_gib'], '.2f')} | {t['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(result: dict, folder: Path, model: str) -> list[Path]:
    from launchers.sweeping.plots import plot_memory, plot_throughput  # matplotlib: only now

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{model}.{ext}" for ext in ("json", "csv", "md")]
    paths[0].write_text(json.dumps(result, indent=2) + "\n")
    with open(paths[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[x.name for x in fields(Trial)])
        writer.writeheader()
        writer.writerows(result["trials"])
    paths[2].write_text(markdown(result))
    title = f"{model} on {result['gpu']}, world size {result['world_size']}"
    paths.append(plot_throughput(result["trials"], folder / f"{model}_throughput.png", title))
    paths.append(
        plot_memory(
            result["trials"], folder / f"{model}_memory.png", title, result["memory_cap_gib"]
        )
    )
    return paths


def table_row(result: dict, old_row: dict, source: str) -> dict:
    """The new values of a benchmark-table row, from the sweep's "none" policy."""
    s = result["policies"]["none"]
    if s.get("max_is_search_limit"):
        print(
            f"[sweep] note: --max {s['max_micro_batch_size']} itself fit; the table's "
            f"max_micro_batch_size is only a lower bound (sweep again with a larger --max)"
        )
    row = dict(old_row)
    row.update(
        micro_batch_size=s["micro_batch_size"],
        tensor_parallel=result["tensor_parallel"],
        max_micro_batch_size=s["max_micro_batch_size"],
    )
    best = result.get("best", {})
    if "data_parallel" in best:  # the strategy and FP8 recipe the figures were measured with
        row.update(data_parallel=best["data_parallel"], fp8=best["fp8"])
    # and the MLP's FP8 kernels (train.fp8_mlp, not searched: the run's config or overrides)
    mlp = ((best.get("config") or {}).get("train") or {}).get("fp8_mlp")
    if mlp is not None and (mlp != "torchao" or "fp8_mlp" in row):
        row["fp8_mlp"] = mlp
    if result["gpu"] != "cpu":  # CPU tables say gpus: 0
        row["gpus"] = result["world_size"]
    gbs = row.get("global_batch_size")
    if gbs is not None and gbs % s["micro_batch_size"]:
        print(
            f"[sweep] global_batch_size {gbs} is not a multiple of the new micro batch "
            f"{s['micro_batch_size']}: set to null (micro batch x data-parallel size)"
        )
        row["global_batch_size"] = None
    date = result["date"][:10]
    row.update(measured=True, source=f"{source} (make sweep, {date})")
    columns = table_columns()
    if columns is None or "date" in columns:  # the launcher's schema rejects unknown columns
        row["date"] = date
    return row


def table_columns() -> set[str] | None:
    """The columns the launcher accepts in a table row (None: launcher not importable)."""
    try:
        from launchers.config import BenchmarkRow
    except ImportError:
        return None
    return set(BenchmarkRow.model_fields)


def update_table(path: Path, gpu: str, model: str, row: dict) -> None:
    """Replace (or add) the row `model` under `rows:` in a benchmark table, keeping the text,
    comments included, of everything else; a new table gets a short header."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"# Benchmark table: {gpu}, measured by `make sweep` (docs/sweep.md).\n"
            f"gpu_type: {gpu}\nkind: {'cpu' if gpu == 'cpu' else 'gpu'}\n"
            f"measured: true\nsource: make sweep\nrows:\n"
        )
    text = path.read_text()
    before = yaml.safe_load(text) or {}
    block = yaml.safe_dump({model: row}, sort_keys=False, width=100)
    block = "".join(f"  {line}\n" for line in block.splitlines())
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    rows_at = next((i for i, ln in enumerate(lines) if re.match(r"rows:\s*(#.*)?$", ln)), None)
    if rows_at is None:
        lines += ["rows:\n", block]
    else:
        # The rows section runs until the next top-level key; a row until the next line indented
        # two spaces or less (blank lines and deeper comments belong to it).
        end = next(
            (
                i
                for i in range(rows_at + 1, len(lines))
                if lines[i].strip()
                and not lines[i].startswith(" ")
                and not lines[i].startswith("#")
            ),
            len(lines),
        )
        start = next(
            (
                i
                for i in range(rows_at + 1, end)
                if re.match(rf"  {re.escape(model)}:\s*(#.*)?$", lines[i])
            ),
            None,
        )
        if start is None:
            while end > rows_at + 1 and not lines[end - 1].strip():
                end -= 1  # append after the last row, before trailing blank lines
            lines.insert(end, block)
        else:
            stop = start + 1
            while stop < end and (not lines[stop].strip() or lines[stop].startswith("   ")):
                stop += 1
            while stop > start + 1 and not lines[stop - 1].strip():
                stop -= 1  # keep the blank lines that separate it from what follows
            lines[start:stop] = [block]
    new_text = "".join(lines)
    after = yaml.safe_load(new_text)
    expected = {**before, "rows": {**(before.get("rows") or {}), model: row}}
    if after != expected:  # an unusual layout: fall back to a plain dump (comments are lost)
        print(
            f"[sweep] {path}: could not edit the row in place; rewriting the file without comments"
        )
        new_text = yaml.safe_dump(expected, sort_keys=False, width=100)
    path.write_text(new_text)
