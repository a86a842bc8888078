# The demo comparison: does masked pre-training beat training the same model from scratch?
#
#   make -j2 compare     for every seed: pre-train the demo model on data/demo/pretrain.txt (unlabeled),
#                        then fine-tune on all labels (train.txt) and on 10% of them (train_10pct.txt),
#                        from the pre-trained encoder and from scratch with the same fine-tuning budget;
#                        writes out/compare/results.md (the README's table). -j2 runs two at a time, one
#                        thread each, which uses 2 CPU cores better than one run with two threads.
#   make -j2 compare SEEDS="0 1 2 3 4" OUT=out/compare5      more seeds, another folder
#
# A run is done when its results.json exists (written last), so an interrupted `make` continues where it
# stopped; delete OUT to start over. Each run's output goes to OUT/<run>.log. Run it in the environment
# of the README's Quick start.

PYTHON ?= python
SEEDS ?= 0 1 2
OUT ?= out/compare
DATA ?= data/demo
export OMP_NUM_THREADS ?= 1

PRETRAIN = $(PYTHON) pretrain.py config/pretrain_demo.py --vis_clips=0 --train_list=$(DATA)/pretrain.txt
FINETUNE = $(PYTHON) finetune.py config/finetune_demo.py
LISTS = --val_list=$(DATA)/val.txt --test_list=$(DATA)/test.txt
FULL = --train_list=$(DATA)/train.txt $(LISTS)
# 30 clips: batches of 8 and more epochs, so that the 10% runs also take a few hundred steps
FEW = --train_list=$(DATA)/train_10pct.txt $(LISTS) $(FEW_ARGS)
FEW_ARGS ?= --batch_size=8 --epochs=40 --warmup_epochs=2

RUNS = $(foreach s,$(SEEDS),pretrain_seed$(s) full_pretrained_seed$(s) full_scratch_seed$(s) \
                            10pct_pretrained_seed$(s) 10pct_scratch_seed$(s))

.PHONY: compare
compare: $(OUT)/results.md
	@cat $<

$(OUT)/results.md: $(foreach r,$(RUNS),$(OUT)/$(r)/results.json)
	$(PYTHON) metrics.py --summary \
	  "pre-training on pretrain.txt=$(OUT)/pretrain_seed*" \
	  "train.txt (all labels), pre-trained=$(OUT)/full_pretrained_seed*" \
	  "train.txt (all labels), from scratch=$(OUT)/full_scratch_seed*" \
	  "train_10pct.txt (10% of the labels), pre-trained=$(OUT)/10pct_pretrained_seed*" \
	  "train_10pct.txt (10% of the labels), from scratch=$(OUT)/10pct_scratch_seed*" > $@

# each rule: run, output to OUT/<run>.log; on failure show the end of the log
RUN = mkdir -p $(OUT) && echo "== $(@D)" && ($(1) --seed=$* --out_dir=$(@D) > $(@D).log 2>&1 \
      || { tail -n 5 $(@D).log; echo "failed: $(@D), log $(@D).log"; exit 1; })

$(OUT)/pretrain_seed%/results.json: | $(DATA)/pretrain.txt
	@$(call RUN,$(PRETRAIN))
$(OUT)/full_pretrained_seed%/results.json: $(OUT)/pretrain_seed%/results.json
	@$(call RUN,$(FINETUNE) $(FULL) --init_from=$(OUT)/pretrain_seed$*/ckpt.pt)
$(OUT)/full_scratch_seed%/results.json: | $(DATA)/pretrain.txt
	@$(call RUN,$(FINETUNE) $(FULL) --init_from=scratch)
$(OUT)/10pct_pretrained_seed%/results.json: $(OUT)/pretrain_seed%/results.json
	@$(call RUN,$(FINETUNE) $(FEW) --init_from=$(OUT)/pretrain_seed$*/ckpt.pt)
$(OUT)/10pct_scratch_seed%/results.json: | $(DATA)/pretrain.txt
	@$(call RUN,$(FINETUNE) $(FEW) --init_from=scratch)

$(DATA)/pretrain.txt:
	$(PYTHON) data.py demo --out=$(DATA)

# keep finished runs when a later one fails
.PRECIOUS: $(OUT)/%/results.json

# The one-command GPU check (README, "On a GPU"), on a machine with one CUDA GPU, in under 10 minutes:
#   make gpu     python model.py --bench --device=cuda (operator calls and host ms per TPSBT-B step, step times at
#                the recipes' per-GPU batches, eager and compiled), then the demo's pre-training and fine-tuning on
#                the GPU in bf16, eager and compiled, and pre-training once under torchrun; writes GPU_OUT/report.md
#                (GPU, driver, torch, every command with its wall time, exit status and the tails of its logs).
#   make gpu DEVICE=cpu GPU_DTYPE=float32 GPU_ITERS=2 ...    the same commands on the CPU (the suite runs it small)
DEVICE ?= cuda
GPU_DTYPE ?= bfloat16
GPU_OUT ?= out/gpu
GPU_ITERS ?= 300
GPU_WORKERS ?= 8
GPU_COMPILE ?= --compile=True
BENCH ?= $(PYTHON) model.py --bench --device=$(DEVICE)
TORCHRUN ?= $(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=1
GPU_ARGS = --device=$(DEVICE) --dtype=$(GPU_DTYPE) --max_iters=$(GPU_ITERS) --num_workers=$(GPU_WORKERS)
GPU_PRETRAIN ?= pretrain.py config/pretrain_demo.py --vis_clips=0 --train_list=$(DATA)/pretrain.txt --vis_list= $(GPU_ARGS)
GPU_FINETUNE ?= finetune.py config/finetune_demo.py $(FULL) $(GPU_ARGS) --init_from=$(GPU_OUT)/pretrain_eager/ckpt.pt
# one step of the report: the command, its wall time and exit status, the end of its output and of its log.jsonl
GPU_STEP = echo "== $(1)" && t=$$(date +%s) && { $(2) > $(GPU_OUT)/$(1).log 2>&1; s=$$?; } && \
    { printf '\n\#\# %s\n`%s`\n\nexit %s after %s s\n' $(1) '$(subst ','\'',$(strip $(2)))' $$s $$(( $$(date +%s) - t )); \
      [ $$s = 0 ] || echo "FAILED"; echo '```'; tail -n 6 $(GPU_OUT)/$(1).log; \
      tail -n 4 $(GPU_OUT)/$(1)/log.jsonl 2>/dev/null; echo '```'; } >> $(GPU_OUT)/report.md

.PHONY: gpu
gpu: | $(DATA)/pretrain.txt
	@mkdir -p $(GPU_OUT) && rm -rf $(GPU_OUT)/*
	@{ echo "# make gpu, $$(date -u '+%Y-%m-%d %H:%M UTC')"; nvidia-smi --query-gpu=name,driver_version,memory.total \
	   --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; $(PYTHON) -c "import torch; print('torch', \
	   torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() \
	   else 'no GPU')"; } > $(GPU_OUT)/report.md
	@$(call GPU_STEP,bench,$(BENCH))
	@$(call GPU_STEP,pretrain_eager,$(PYTHON) $(GPU_PRETRAIN) --out_dir=$(GPU_OUT)/pretrain_eager)
	@$(call GPU_STEP,pretrain_compiled,$(PYTHON) $(GPU_PRETRAIN) $(GPU_COMPILE) --out_dir=$(GPU_OUT)/pretrain_compiled)
	@$(call GPU_STEP,pretrain_torchrun,$(TORCHRUN) $(GPU_PRETRAIN) --out_dir=$(GPU_OUT)/pretrain_torchrun)
	@$(call GPU_STEP,finetune_eager,$(PYTHON) $(GPU_FINETUNE) --out_dir=$(GPU_OUT)/finetune_eager)
	@$(call GPU_STEP,finetune_compiled,$(PYTHON) $(GPU_FINETUNE) $(GPU_COMPILE) --out_dir=$(GPU_OUT)/finetune_compiled)
	@echo "report: $(GPU_OUT)/report.md" && ! grep -q "^FAILED" $(GPU_OUT)/report.md
