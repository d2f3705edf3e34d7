# One entry point for users and CI. Every target that needs the environment depends on it, so a
# fresh clone needs nothing but `make submit ...` or `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Pinned first so that nothing later pulls another torch build; a GPU cluster overrides it, e.g.
# make install TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC ?= torch==2.13.0

MODEL ?= esm2_8m
NODES ?=
CLUSTER ?= local
BACKEND ?=
ENGINE ?=
CONFIG ?=
RUN ?=
# Extra key=value overrides, e.g. ARGS="trainer.train.max_steps=100 job.time_limit=00:30:00"
ARGS ?=

LAUNCH = $(VPY) -m launchers
# With CONFIG=file, the file's job.model and job.cluster apply (a recipe names both), so the
# defaults above are not passed; MODEL=/CLUSTER= given to make still win over the file.
_default = $(and $(CONFIG),$(filter file,$(origin $(1))))
JOB_ARGS = $(if $(call _default,MODEL),,--model $(MODEL)) \
	$(if $(call _default,CLUSTER),,--cluster $(CLUSTER)) $(if $(NODES),--nodes $(NODES)) \
	$(if $(BACKEND),--backend $(BACKEND)) $(if $(CONFIG),--config $(CONFIG)) \
	$(if $(ENGINE),trainer.train.engine=$(ENGINE)) $(ARGS)

.PHONY: install lint test test-fast test-unit test-gpu test-cluster data debug submit render finetune recipe status logs cancel resume \
	sweep cluster-up cluster-down bench-submit stamp clean

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements/nemo-run.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_SPEC)
	# compat: a .pth path entry, so this regular `bionemo` package wins over bionemo-scdl's
	# `bionemo` namespace folder in site-packages from any working directory.
	$(VPY) -m pip install -q -e '.[test,plots]' --config-settings editable_mode=compat
	# NeMo-Run backend: what `import nemo_run` needs, then nemo_run 0.11.1 and the two packages it
	# imports with --no-deps, last (their full trees pull ray and downgrade urllib3; pip's resolver
	# would list those unmet pins as a red ERROR after any later install; docs/design.md)
	$(VPY) -m pip install -q -r requirements/nemo-run.txt
	$(VPY) -m pip install -q --no-deps nemo_run==0.11.1 leptonai==0.27.3 torchx==0.7.0
	@echo "installed. NeMo-Run 0.11.1 with leptonai 0.27.3 and torchx 0.7.0 without their dependency trees (on purpose: docs/design.md, NeMo-Run's dependencies)"
	touch $@

# Sample data of the model's family: proteins (ESM-2) or single cells (Geneformer).
ifneq (,$(findstring geneformer,$(MODEL)))
data: data/geneformer_sample/.built
else
data: data/sample/.built
endif
data/sample/.built: | install
	$(VPY) -m bionemo.data.sample --out data/sample
	touch $@
data/geneformer_sample/.built: | install
	$(VPY) -m bionemo.data.cells_sample --out data/geneformer_sample
	touch $@

test: install data/sample/.built data/geneformer_sample/.built lint
	$(VPY) -m pytest -q tests -m "not gpu" --durations=25

# Quality gates (also run by make test): ruff lint and format, mypy on the config and requeue code.
lint: install
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy

test-gpu: install data/sample/.built  # on a GPU machine with megatron-core: the megatron engine's checks
	$(VPY) -m pytest -q tests -m gpu

# The edit loop's tier: everything but the real-cluster and GPU tests (make test runs them all).
test-fast: install data/sample/.built data/geneformer_sample/.built
	$(VPY) -m pytest -q tests -m "not cluster and not gpu"
test-unit: test-fast

debug: install data
	$(LAUNCH) debug --model $(MODEL) $(if $(ENGINE),trainer.train.engine=$(ENGINE)) $(ARGS)

submit: install data
	$(LAUNCH) submit $(JOB_ARGS)

render: install
	$(LAUNCH) render $(JOB_ARGS)

# Fine-tuning (README, "Fine-tune and export"): the submit job with configs/finetune/$(TASK).yaml
# as a --config layer, the labelled table DATA (.csv/.parquet; columns `sequence` and `label`, or
# ARGS="trainer.task.label_column=..."), weights from INIT (a Hugging Face folder or a checkpoint)
# and CLASSES for classification. DATA and INIT are single-quoted for the shell.
TASK ?=
DATA ?=
INIT ?=
CLASSES ?=
shell_quote = '$(subst ','"'"',$(1))'
finetune: install
	@test -n "$(TASK)" -a -n "$(DATA)" || { echo "usage: make finetune TASK=sequence_regression|sequence_classification|token_classification DATA=labels.csv [INIT=hf_folder_or_checkpoint] [CLASSES=N] [MODEL=esm2_650m CLUSTER=... NODES=... ARGS=...]" >&2; exit 2; }
	$(LAUNCH) submit --config $(call shell_quote,configs/finetune/$(TASK).yaml) $(JOB_ARGS) \
		$(call shell_quote,trainer.task.data=$(DATA)) \
		$(if $(INIT),$(call shell_quote,trainer.checkpoint.init_from=$(INIT))) \
		$(if $(CLASSES),$(call shell_quote,trainer.task.num_classes=$(CLASSES)))

# The resolved config as an editable, commented file; `make submit CONFIG=$(OUT)` runs it.
OUT ?= recipe.yaml
recipe: install
	$(LAUNCH) recipe $(JOB_ARGS) --out $(OUT)

status: install
	$(LAUNCH) status $(RUN)

logs: install
	$(LAUNCH) logs $(RUN)

cancel: install
	$(LAUNCH) cancel $(RUN)

resume: install
	$(LAUNCH) resume $(RUN)

# Every run under CLUSTER's runs_root (or ROOT=dir): backend, state, latest checkpoint, decision.
ROOT ?=
.PHONY: runs plot
runs: install
	$(LAUNCH) list $(if $(ROOT),$(call shell_quote,$(ROOT)),--cluster $(CLUSTER))

# <run>/plots/loss.png and throughput.png from metrics.jsonl (default: the newest run).
plot: install
	$(LAUNCH) plot $(if $(RUN),$(call shell_quote,$(RUN)))

# One command either way (docs/sweep.md): without BACKEND the local backend runs the sweep here,
# on one node of CLUSTER's profile; with BACKEND=sbatch|submitit|nemo_run, one job on CLUSTER whose
# allocation runs it, every trial an srun step of it. ARGS takes the same flags and key=value
# overrides either way, e.g. ARGS="--memory-cap-gib 80".
sweep: install data
	$(LAUNCH) sweep $(JOB_ARGS) $(if $(BACKEND),,--backend local)

cluster-up: install
	$(LAUNCH) cluster up

cluster-down: install
	$(LAUNCH) cluster down

bench-submit: install data
	$(VPY) benchmarks/submit_latency.py $(ARGS)

# The trainer's container image for GPU clusters (Dockerfile; README.md, Container), e.g.
# make docker IMAGE=bionemo-hpc:latest MEGATRON=1
IMAGE ?= bionemo-hpc:latest
.PHONY: docker
docker:
	docker build -t $(IMAGE) $(if $(filter 1,$(MEGATRON)),--build-arg MEGATRON=1) .

# Before copying the project without its git history (an image, a GPU machine): results written
# from the copy then record this commit (launchers/paths.py: project_commit).
stamp:
	@{ git rev-parse HEAD && git status --porcelain --untracked-files=no | grep -q . && echo dirty; } \
		| paste -sd- - > COMMIT_STAMP; echo "COMMIT_STAMP: $$(cat COMMIT_STAMP)"

clean:
	rm -rf runs
