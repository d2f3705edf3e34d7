"""Configuration: presets, benchmark tables, resolution order, typed overrides, validation."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from launchers import config
from launchers.config import ConfigError, parse_time_limit, resolve

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------ data files


@pytest.mark.parametrize(
    "name,layers,hidden,heads,ffn",
    [
        ("esm2_8m", 6, 320, 20, 1280),
        ("esm2_650m", 33, 1280, 20, 5120),
        ("esm2_3b", 36, 2560, 40, 10240),
        ("esm2_15b", 48, 5120, 40, 20480),
    ],
)
def test_model_presets(name, layers, hidden, heads, ffn):
    raw = yaml.safe_load((config.CONFIGS / "models" / f"{name}.yaml").read_text())
    m = raw["trainer"]["model"]
    assert (m["num_layers"], m["hidden_size"], m["num_attention_heads"], m["ffn_hidden_size"]) == (
        layers,
        hidden,
        heads,
        ffn,
    )
    assert m["seq_length"] == 1024 and m["name"] == name
    o = raw["trainer"]["optim"]
    assert (o["lr"], o["betas"], o["weight_decay"], o["warmup_steps"]) == (
        4e-4,
        [0.9, 0.98],
        0.01,
        2000,
    )


@pytest.mark.parametrize(
    "model,mbs,tp,gpus,max_mbs",
    [
        ("esm2_8m", 64, 1, 32, 70),
        ("esm2_650m", 32, 1, 64, 48),
        ("esm2_3b", 16, 1, 128, 16),
        ("esm2_15b", 2, 2, 3120, 3),
    ],
)
def test_a100_table_is_bionemos(model, mbs, tp, gpus, max_mbs):
    _, table = config.load_table("a100_80gb")
    row = table.rows[model]
    assert (row.micro_batch_size, row.tensor_parallel, row.gpus, row.max_micro_batch_size) == (
        mbs,
        tp,
        gpus,
        max_mbs,
    )
    assert table.measured and table.kind == "gpu"
    # the reference job size trains the table's global batch without accumulation
    assert row.global_batch_size == gpus // tp * mbs


def test_h100_table_is_measured_and_matches_the_a100_memory_rows():
    _, a100 = config.load_table("a100_80gb")
    _, h100 = config.load_table("h100_80gb")
    assert h100.measured and h100.rows.keys() == a100.rows.keys()
    for model in ("esm2_8m", "esm2_650m"):  # measured on one H100 under an 80 GiB cap
        assert h100.rows[model].max_micro_batch_size >= a100.rows[model].max_micro_batch_size
        assert h100.rows[model].date and h100.rows[model].measured is not False
    assert h100.rows["esm2_15b"].measured is False  # rows not measured yet still say so
    r = resolve(model="esm2_650m", cluster="h100_example", nodes=8, now=NOW)
    assert not any("unmeasured" in w for w in r.warnings)
    r = resolve(model="esm2_15b", cluster="h100_example", nodes=390, now=NOW)
    assert any("unmeasured" in w for w in r.warnings)


def test_every_table_and_profile_loads():
    for gpu_type in config.known_names("benchmarks"):
        assert config.load_table(gpu_type)[1].gpu_type == gpu_type
    for profile in config.known_names("clusters"):
        resolve(
            model="esm2_8m" if profile == "local" else "esm2_650m",
            cluster=profile,
            nodes=8 if profile != "local" else None,
            now=NOW,
        )


@pytest.mark.parametrize(
    "model,nodes,accumulation",
    [
        ("esm2_8m", 4, 1),
        ("esm2_650m", 8, 1),
        ("esm2_650m", 4, 2),
        ("esm2_3b", 16, 1),
        ("esm2_15b", 390, 1),
    ],
)
def test_reference_sizes_resolve_on_a100(tmp_path, model, nodes, accumulation):
    prof = write(tmp_path / "a100.yaml", {"cluster": {"gpu_type": "a100_80gb", "gpus_per_node": 8}})
    cfg = resolve(model=model, cluster=str(prof), nodes=nodes, now=NOW).config
    dp = cfg.world_size // (cfg.trainer.parallel.tensor * cfg.trainer.parallel.pipeline)
    assert cfg.trainer.train.grad_accumulation(dp) == accumulation


# ------------------------------------------------------------------------------------ resolution order


def test_resolution_order(tmp_path):
    """model preset < benchmark row < cluster profile < --config < command line, key by key."""
    key = ("trainer", "train", "micro_batch_size")
    profile = {
        "cluster": {"gpu_type": "cpu", "bundled": False},
        "trainer": {"train": {"micro_batch_size": 6, "log_every": 7}},
    }
    prof = write(tmp_path / "prof.yaml", profile)
    user = write(tmp_path / "user.yaml", {"trainer": {"train": {"micro_batch_size": 5}}})

    def mbs(**kw):
        r = resolve(model="esm2_8m", now=NOW, **kw)
        return r.config.trainer.train.micro_batch_size, r.origins[key]

    # benchmark row (cpu: 4) over the preset (which has none)
    assert mbs(cluster="local") == (4, "configs/benchmarks/cpu.yaml (row esm2_8m)")
    assert mbs(cluster=str(prof))[0] == 6  # profile over row
    assert mbs(cluster=str(prof), config_files=[user]) == (5, str(user))  # file over profile
    assert mbs(
        cluster=str(prof), config_files=[user], overrides=["trainer.train.micro_batch_size=3"]
    ) == (3, "command line")
    r = resolve(model="esm2_8m", cluster=str(prof), config_files=[user], now=NOW)
    assert r.config.trainer.train.log_every == 7  # untouched keys keep their layer
    assert r.config.trainer.model.num_layers == 6  # from the preset
    assert r.layers[0].endswith("esm2_8m.yaml") and r.layers[-1] == "command line"


def test_flags_and_overrides_of_the_same_key(tmp_path):
    r = resolve(model="esm2_8m", cluster="local", nodes=3, overrides=["job.nodes=4"], now=NOW)
    assert r.config.job.nodes == 4  # key=value comes after the flags


def test_errors_name_the_file_that_set_the_value(tmp_path):
    user = write(tmp_path / "user.yaml", {"trainer": {"parallel": {"tensor": 3}}})
    with pytest.raises(ConfigError) as e:
        resolve(model="esm2_8m", cluster="local", nodes=3, config_files=[user], now=NOW)
    assert str(e.value).startswith(f"{user}: trainer.parallel.tensor: ")


def test_default_run_names_sort_in_submission_order():
    """The candidates a default run name gives way to (issue 13: submits in the same second):
    distinct, in order, and before the next second's name."""
    names = list(config.run_names("esm2_8m-2n-20250102T030405Z"))
    assert names[:3] == [
        "esm2_8m-2n-20250102T030405Z",
        "esm2_8m-2n-20250102T030405Z-02",
        "esm2_8m-2n-20250102T030405Z-03",
    ]
    assert names == sorted(names) and len(set(names)) == len(names) == 99
    assert names[-1] < "esm2_8m-2n-20250102T030406Z"
    assert resolve(model="esm2_8m", cluster="local", now=NOW).default_run
    assert not resolve(model="esm2_8m", cluster="local", overrides=["job.run=mine"]).default_run


def test_text_that_is_not_utf8_is_refused_whichever_layer_brings_it():
    """Bytes that are not UTF-8 arrive as surrogates (argv; YAML's \\udcff escape without
    libyaml); no file can hold them, so resolution refuses them, naming source and key."""
    with pytest.raises(ConfigError) as e:
        resolve(model="esm2_8m", options=[("--partition", "cluster.partition", "gpu\udcff")])
    assert str(e.value).startswith("--partition: cluster.partition: 'gpu\\xff' is not UTF-8 text;")
    with pytest.raises(ConfigError, match=r"^command line: job.run: 'r\\xff' is not UTF-8"):
        resolve(model="esm2_8m", overrides=["run=r\udcff"])


def test_defaults_are_made_explicit():
    cfg = resolve(model="esm2_8m", cluster="local", now=NOW).config
    assert cfg.job.experiment == "esm2"
    assert cfg.job.run == "esm2_8m-2n-20250102T030405Z"
    assert cfg.job.time_limit == "00:30:00" and cfg.time_limit_s == 1800
    assert cfg.cluster.workdir == str(config.REPO_ROOT)
    assert cfg.cluster.python == str(config.REPO_ROOT / ".venv" / "bin" / "python")
    assert cfg.cluster.host_python == cfg.cluster.python
    assert cfg.cluster.runs_root == str(config.REPO_ROOT / "runs")
    assert cfg.world_size == 2 and cfg.tasks_per_node == 1
    assert cfg.trainer.train.global_batch_size is None  # local: micro batch x ranks


def test_container_profile_defaults():
    cfg = resolve(model="esm2_650m", cluster="h100_example", nodes=8, now=NOW).config
    assert cfg.cluster.host_python == "python3" and cfg.cluster.python == "python"
    assert cfg.cluster.container_workdir == cfg.cluster.workdir
    assert cfg.world_size == 64 and cfg.tasks_per_node == 8


# ------------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("01:00:00", 3600),
        ("4:00:00", 14400),
        ("1-00", 86400),
        ("1-02:03", 93780),
        ("2-00:00:01", 172801),
    ],
)
def test_time_limits(text, seconds):
    assert parse_time_limit(text) == seconds
    assert parse_time_limit(config.format_time_limit(seconds)) == seconds


@pytest.mark.parametrize("text", ["1h", "", "1:2:3:4", "-5", "00:00:00", "1-", "a-01"])
def test_bad_time_limits(text):
    with pytest.raises(ValueError):
        parse_time_limit(text)


def test_overrides_are_typed_by_the_schema():
    layer = config.cli_layer(
        {},
        [
            "job.run=0100",
            "job.time_limit=1:30:00",
            "trainer.train.max_steps=100",
            "trainer.train.global_batch_size=null",
            "cluster.env.NCCL_DEBUG=INFO",
            "cluster.container_mounts=[/a:/a, /b:/b]",
            "trainer.optim.lr=1e-3",
            "job.hold=true",
            "max_steps=7",
        ],
    )
    d = layer.data
    assert d["job"]["run"] == "0100" and d["job"]["time_limit"] == "1:30:00"
    assert d["trainer"]["train"]["global_batch_size"] is None
    assert d["trainer"]["train"]["max_steps"] == 7  # the alias, given later, wins
    assert d["cluster"]["env"] == {"NCCL_DEBUG": "INFO"}
    assert d["cluster"]["container_mounts"] == ["/a:/a", "/b:/b"]
    assert d["job"]["hold"] is True and float(d["trainer"]["optim"]["lr"]) == 1e-3


def test_yaml_time_limits_stay_text(tmp_path):
    user = tmp_path / "u.yaml"
    user.write_text("job:\n  time_limit: 1:30:00\n")  # YAML 1.1 would read 5400
    cfg = resolve(model="esm2_8m", cluster="local", config_files=[user], now=NOW).config
    assert cfg.job.time_limit == "1:30:00" and cfg.time_limit_s == 5400


def test_resolved_config_round_trips_and_the_trainer_reads_it(tmp_path):
    from bionemo.config import load_trainer_config

    r = resolve(model="esm2_650m", cluster="h100_example", nodes=8, now=NOW)
    text = config.dump(r.config, r.layers)
    assert text.startswith("# Resolved by")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again = config.LaunchConfig.model_validate(yaml.safe_load(text))
    assert again == r.config
    assert load_trainer_config(path) == r.config.trainer
    # resuming from the written file reproduces it
    assert resolve(base=yaml.safe_load(text)).config == r.config


def test_warning_when_micro_batch_exceeds_the_table():
    r = resolve(
        model="esm2_650m",
        cluster="h100_example",
        nodes=8,
        now=NOW,
        overrides=["trainer.train.micro_batch_size=64", "trainer.train.global_batch_size=null"],
    )
    assert any("exceeds" in w for w in r.warnings)


def test_debug_layer(tmp_path):
    r = resolve(
        model="esm2_8m", cluster="local", extra_layers=[config.CONFIGS / "debug.yaml"], now=NOW
    )
    t = r.config.trainer
    assert r.config.job.backend == "local" and r.config.job.nodes == 1
    assert (t.train.max_steps, t.train.log_every, t.checkpoint.every_steps) == (50, 5, 25)
    assert t.train.device == "auto" and t.train.micro_batch_size <= 8


def test_many_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        resolve(
            model="esm2_8m",
            cluster="local",
            now=NOW,
            overrides=["job.nodes=0", "trainer.train.max_steps=0"],
        )
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and "job.nodes" in lines[0] and "trainer.train.max_steps" in lines[1]


def test_presets_of_other_families_resolve_without_launcher_code():
    """Model-specific knowledge lives in configs/ and bionemo.config, not in the launcher."""
    for name in config.known_names("models"):
        raw = yaml.safe_load((config.CONFIGS / "models" / f"{name}.yaml").read_text())
        if raw["trainer"]["model"].get("family", "esm2") != "esm2":
            cfg = resolve(model=name, cluster="local", now=NOW).config
            assert cfg.trainer.model.name == name


def test_a_data_key_of_another_family_is_named_as_such():
    with pytest.raises(ConfigError) as e:
        resolve(model="esm2_8m", cluster="local", now=NOW, overrides=["trainer.data.vocab=x"])
    assert "trainer.data.vocab: belongs to another model family" in str(e.value)


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        (
            "esm2_8m",
            ["trainer.model.hidden_size=100", "trainer.model.num_attention_heads=7"],
            "hidden_size 100 is not divisible by num_attention_heads 7",
        ),
        (  # token ids up to 32 would index past the embedding
            "esm2_650m",
            ["trainer.model.vocab_size=10"],
            "vocab_size 10: ESM-2's alphabet has 33 tokens",
        ),
        (  # megatron splits the MLP's columns over the tensor-parallel ranks
            "esm2_650m",
            [
                "trainer.train.engine=megatron",
                "trainer.train.device=cuda",
                "trainer.parallel.tensor=2",
                "trainer.model.ffn_hidden_size=5121",
            ],
            "parallel.tensor=2 does not divide model.ffn_hidden_size 5121",
        ),
        (  # 21 / 3 = 7 channels a head: rotary turns pairs of channels
            "esm2_8m",
            ["trainer.model.hidden_size=21", "trainer.model.num_attention_heads=3"],
            "gives heads of 7 channels; ESM-2's rotary embedding needs an even head size",
        ),
    ],
)
def test_model_shapes_the_model_cannot_build_are_refused(model, overrides, message):
    """A held-out shape is refused before anything is written, not by a traceback in the job."""
    with pytest.raises(ConfigError) as e:
        resolve(model=model, cluster="local", now=NOW, overrides=overrides)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)


def test_odd_head_sizes_are_fine_without_rotary():
    """Geneformer's positions are a learned table: any head size builds."""
    overrides = ["trainer.model.hidden_size=21", "trainer.model.num_attention_heads=3"]
    cfg = resolve(model="geneformer_10m", cluster="local", now=NOW, overrides=overrides).config
    assert cfg.trainer.model.hidden_size // cfg.trainer.model.num_attention_heads == 7


def test_the_configs_esm_alphabet_size_is_the_tokenizers():
    from bionemo.config import ESM2_VOCAB_SIZE
    from bionemo.data.tokenizer import VOCAB_SIZE

    assert ESM2_VOCAB_SIZE == VOCAB_SIZE


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_numbers_that_are_not_finite_are_refused(value):
    with pytest.raises(ConfigError) as e:
        resolve(model="esm2_8m", cluster="local", now=NOW, overrides=[f"trainer.optim.lr={value}"])
    assert "trainer.optim.lr: input should be" in str(e.value), str(e.value)
