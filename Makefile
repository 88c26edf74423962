# aclip — make demo | make demo-alpha | make test | make test-fast | make test-slurm | make bench | make lint | make layers | make install
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_out
export DS_ACCELERATOR ?= cpu

.PHONY: install demo demo-dense demo-alpha test test-fast test-slurm lint layers clean

install: $(STAMP)

# torch/torchvision first, pinned: the machine's pip takes them from local wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,dense]'
	# the peer implementation the retrieval tests compare against (its metrics need only torch)
	$(PY) -m pip install -q --no-deps clip-benchmark==1.6.2
	touch $(STAMP)

# synthetic data, training, the results table (the demo's tower is a timm ViT, the paper's
# family, which open_clip cannot express: `python -m aclip.export` refuses it with the reason)
demo: install
	$(PY) -m aclip.data.synthetic --out $(DEMO)/data --n-train 24000 --n-eval-cls 500 \
		--n-eval-ret 200 --samples-per-shard 2000 --seed 0 --object-radius 0.15 0.25
	rm -rf $(DEMO)/run
	$(PY) train.py --config configs/demo.yaml train.output_dir=$(DEMO)/run \
		'data.train_shards=$(DEMO)/data/train/{00000..00011}.tar' \
		'eval.zeroshot_sets=[$(DEMO)/data/eval_cls,$(DEMO)/data/eval_colour]' \
		'eval.retrieval_sets=[$(DEMO)/data/eval_ret]'
	$(PY) -m evals.demo_report --run $(DEMO)/run --data $(DEMO)/data

# every dense head on the demo run, over 200 synthetic segmentation scenes, with and without
# their background class (run make demo first)
demo-dense: install
	test -d $(DEMO)/run || { echo "error: no demo run in $(DEMO)/run (run make demo first)"; exit 2; }
	$(PY) -m aclip.data.synthetic --out $(DEMO)/data --n-eval-seg 200 --seg-only --seed 0
	$(PY) -m evals.segmentation --checkpoint $(DEMO)/run --dataset generic \
		--root $(DEMO)/data/eval_seg --settings configs/dense/synthetic.yaml --head all \
		--json $(DEMO)/dense_results.json --vis $(DEMO)/dense.png --no-progress
	$(PY) -m evals.segmentation --checkpoint $(DEMO)/run --dataset generic \
		--root $(DEMO)/data/eval_seg --reduce-zero-label --settings configs/dense/synthetic_nobg.yaml \
		--head all --json $(DEMO)/dense_results_nobg.json --vis $(DEMO)/dense_nobg.png --no-progress

# Alpha-CLIP: fine-tune the demo run on synthetic region scenes (2-4 objects of different
# colours, each with its mask and a caption naming it) and print the region zero-shot table of
# the demo run and of the fine-tuned one (run make demo first)
demo-alpha: install
	test -d $(DEMO)/run || { echo "error: no demo run in $(DEMO)/run (run make demo first)"; exit 2; }
	$(PY) -m aclip.data.synthetic --out $(DEMO)/data --n-train-region 6000 --n-eval-region 500 \
		--samples-per-shard 500 --region-only --seed 0
	rm -rf $(DEMO)/alpha_run
	$(PY) train.py --config configs/demo_alpha.yaml model.init_from=$(DEMO)/run \
		train.output_dir=$(DEMO)/alpha_run \
		'data.train_shards=$(DEMO)/data/train_region/{00000..00011}.tar'
	$(PY) -m evals.region --checkpoint $(DEMO)/run --data $(DEMO)/data/eval_region --no-progress \
		--json $(DEMO)/region_base.json
	$(PY) -m evals.region --checkpoint $(DEMO)/alpha_run --data $(DEMO)/data/eval_region \
		--no-progress --json $(DEMO)/region_alpha.json

test: install
	$(PY) -m ruff check aclip evals tests train.py tools
	$(PY) tools/layers.py
	$(PY) -m pytest -q -m "not slurm"

# the inner loop: no multi-process or other slow tests (marker slow), under ~2 minutes
test-fast: install
	$(PY) -m ruff check aclip evals tests train.py tools
	$(PY) tools/layers.py
	$(PY) -m pytest -q -m "not slurm and not slow"

# the real-SLURM tests: needs root on Debian (installs and starts slurm-wlm + munge if missing)
test-slurm: install
	bash tests/slurm/start_slurm.sh
	ACLIP_REQUIRE_SLURM=1 $(PY) -m pytest -q -m slurm tests/test_slurm.py

lint: install
	$(PY) -m ruff check aclip evals tests train.py tools
	$(PY) tools/layers.py
	$(PY) -m ruff format --check aclip evals tests train.py tools

# the package graph, and a failure naming each broken house rule (layers, cycles, module sizes);
# standard library only, so no install needed
layers:
	$(PYTHON) tools/layers.py

clean:
	rm -rf $(DEMO) .pytest_cache

# quick CPU benchmark (tiny model + the data loader, a few minutes); GPU: see BENCHMARKS.md
BENCH ?= runs/bench
.PHONY: bench bench-gpu
bench: install
	$(PY) -m aclip.bench --preset tiny --threads 1 --json $(BENCH)/step_tiny.json
	$(PY) -m aclip.bench loader --augment-on cpu gpu --json $(BENCH)/loader.json

# the prepared one-GPU check (< 8 min): ViT-B/16 batch 64 bf16 steps, eager and compiled, and
# both view paths; refuses without a GPU (python -m aclip.bench.gpu --cpu --preset tiny: smoke)
bench-gpu: install
	DS_ACCELERATOR=cuda $(PY) -m aclip.bench.gpu --out $(BENCH)/gpu
