# Set-up is two commands: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
# torch/torchvision releases that pip finds on this project's machines (CPU here, CUDA build on GPU hosts).
TORCH := torch==2.14.1 torchvision==0.29.1
export PYTHONHASHSEED := 0

.PHONY: install demo test test-all bench tables audit clean

install: $(STAMP) $(FMNIST)

# Debian's Fashion-MNIST: the offline default dataset.
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	 else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	# torchattacks pins requests~=2.25.1; its real dependencies come with the project (pyproject.toml).
	$(PY) -m pip install -q --no-deps 'torchattacks==3.5.1'
	touch $(STAMP)

# Fast suite (slow-marked CPU-scale tests excluded); ≤ ~8 min on 2 cores.
test: install
	$(PY) -m pytest -m "not slow" -q -p no:cacheprovider

test-all: install
	$(PY) -m pytest -q

# The main job on the offline default: train classifiers A and B briefly on Fashion-MNIST, attack A
# white-box and by transfer from B (FGSM / PGD / DeepFool); train a small DDPM (reused when its checkpoint
# exists) and show DiffDefense under PGD (paper's oblivious protocol + a small adaptive BPDA+EOT run);
# print the table, save image grids.
# The demo keeps its small models in their own folder, so it never overwrites full-scale weights under
# checkpoints/<dataset>/; rerunning it reuses them (Lightning resumes at max_epochs, the DDPM is kept).
DEMO_DIR := multirun/demo
DEMO_CKPT := $(CURDIR)/checkpoints/demo
DEMO_TRAIN := dataset.datamodule.train_subset=20000 logger=csv trainer.enable_progress_bar=false
DENOISER := $(DEMO_CKPT)/fashion_mnist/denoiser-diffdefense_unet.pt
demo: install
	@start=$$(date +%s); export PURIFY_CHECKPOINT_DIR=$(DEMO_CKPT); \
	$(PY) train.py victim=classifier_a trainer.max_epochs=1 $(DEMO_TRAIN) && \
	$(PY) train.py victim=classifier_b trainer.max_epochs=1 $(DEMO_TRAIN) && \
	{ test -f $(DENOISER) || $(PY) train.py model=denoiser trainer.max_epochs=2 test_after_training=false $(DEMO_TRAIN); } && \
	rm -rf $(DEMO_DIR) && \
	$(PY) evaluate.py -m experiment=demo hydra.sweep.dir=$(DEMO_DIR)/none && \
	$(PY) evaluate.py -m experiment=demo_diffdefense attack=none,pgd hydra.sweep.dir=$(DEMO_DIR)/diffdefense && \
	$(PY) evaluate.py experiment=demo_diffdefense threat=white_box_adaptive threat.model.eot_samples=2 \
	  attack.builder.steps=5 attack.builder.alpha=0.075 dataset.eval_subset=32 hydra.run.dir=$(DEMO_DIR)/diffdefense_adaptive && \
	$(PY) -m evaluation.tables $(DEMO_DIR) && \
	echo "image grids: $(DEMO_DIR)/*/*/grid.png" && \
	echo "demo wall time: $$(( $$(date +%s) - start )) s"

# Aggregate a multirun folder into Markdown (default: the newest under multirun/): make tables RUN=multirun/…
tables: install
	$(PY) -m evaluation.tables $(RUN)

# Speed figures (images/s of the evaluation loop, attacks per second); prints, never asserts.
bench: install
	$(PY) -m evaluation.bench

clean:
	rm -rf outputs multirun .cache lightning_logs wandb
