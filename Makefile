# The demo comparison: does masked pre-training beat training the same model from scratch?
#
#   make -j2 compare     for every seed: pre-train the demo model on data/demo/pretrain.txt (unlabeled),
#                        then fine-tune on all labels (train.txt) and on 10% of them (train_10pct.txt),
#                        from the pre-trained encoder and from scratch with the same fine-tuning budget;
#                        writes out/compare/results.md (the README's table). -j2 runs two at a time, one
#                        thread each (OMP_NUM_THREADS=1), which uses 2 CPU cores better than one run with two.
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

.DELETE_ON_ERROR:  # a failed command leaves no results file that make would take as done

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
RUN = mkdir -p $(dir $(@D)) && echo "== $(@D)" && ($(1) --seed=$* --out_dir=$(@D) > $(@D).log 2>&1 \
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

# The paper's other two claims in miniature: Fig. 5 (longer pre-training: lower loss, better fine-tuning) and
# Table V (TPSBT against the plain ViT of the same width), with few labels so that the demo does not saturate.
#
#   make -j2 paper       for every seed: pre-train TPSBT-tiny on one 20-epoch schedule, keeping its checkpoint at
#                        each epoch of EPOCHS; pre-train the ViT baseline (temporal_pyramid and spatial_bottleneck
#                        off: the baseline `python model.py --bench` times for tiny) on the same schedule up to
#                        VIT_EPOCH; fine-tune each kept checkpoint, and TPSBT from scratch, on 2 labelled clips per
#                        class; writes out/paper/results.md and docs/paper.svg. 63 minutes on 2 cores (2026-12-07).
#
# 2 labels per class (train_2per_class.txt: the first two of each class in train_10pct.txt): with 5 per class a
# 10-epoch pre-training already gives 97 UAR, no room to show a trend; with 1 the result hangs on which clip was
# drawn. No val list: picking the best epoch on its 120 labelled clips would use 10x the training labels; the
# last epoch's model is tested. A stage stops the one schedule at epoch E (max_iters) and the next resumes it,
# so a kept checkpoint is the uninterrupted run's (its lr not yet decayed); a stage is done when
# <run>/ckpt_epoch<E>.pt exists. To change EPOCHS (its last is the schedule) start over: delete PAPER.
PAPER ?= out/paper
EPOCHS ?= 1 2 5 10 20
VIT_EPOCH ?= 5
BATCH ?= 32
PAPER_SVG ?= docs/paper.svg
VIT = --model_args.temporal_pyramid=False --model_args.spatial_bottleneck=False
FEW2 = --train_list=$(DATA)/train_2per_class.txt --val_list= --test_list=$(DATA)/test.txt --batch_size=4 \
       --epochs=40 --warmup_epochs=2

# $(1): model arguments, $(2): the epochs to stop at and keep the checkpoint of (n iterations per epoch)
STAGES = mkdir -p $(@D) && echo "== $(@D)" && n=$$(($$(wc -l < $(DATA)/pretrain.txt) / $(BATCH))) && \
  for e in $(2); do \
    [ -f $(@D)/ckpt_epoch$$e.pt ] && continue; \
    $(PRETRAIN) $(1) --batch_size=$(BATCH) --epochs=$(lastword $(EPOCHS)) --max_iters=$$((e * n)) --seed=$* \
      --out_dir=$(@D) --init_from=$$([ -f $(@D)/ckpt.pt ] && echo resume || echo scratch) >> $(@D).log 2>&1 \
      || { tail -n 5 $(@D).log; echo "failed: $(@D), log $(@D).log"; exit 1; }; \
    cp $(@D)/ckpt.pt $(@D)/tmp.pt && mv $(@D)/tmp.pt $(@D)/ckpt_epoch$$e.pt || exit 1; done
LAST = $(PAPER)/pretrain_tpsbt_seed%/ckpt_epoch$(lastword $(EPOCHS)).pt
VIT_LAST = $(PAPER)/pretrain_vit_seed%/ckpt_epoch$(VIT_EPOCH).pt

.PHONY: paper
paper: $(PAPER)/results.md
	@cat $<

$(PAPER)/results.md: $(foreach s,$(SEEDS),$(foreach e,$(EPOCHS),$(PAPER)/few_tpsbt_e$(e)_seed$(s)/results.json) \
                       $(PAPER)/few_scratch_seed$(s)/results.json $(PAPER)/few_vit_e$(VIT_EPOCH)_seed$(s)/results.json)
	$(PYTHON) metrics.py --paper=$(PAPER) --svg=$(PAPER_SVG) > $@

$(LAST): | $(DATA)/pretrain.txt
	@$(call STAGES,,$(EPOCHS))
$(VIT_LAST): | $(DATA)/pretrain.txt
	@$(if $(filter $(VIT_EPOCH),$(EPOCHS)),,$(error VIT_EPOCH=$(VIT_EPOCH) must be one of EPOCHS=$(EPOCHS)))
	@$(call STAGES,$(VIT),$(VIT_EPOCH))
# fine-tune the checkpoint of epoch $(1)
define FEW_TPSBT
$(PAPER)/few_tpsbt_e$(1)_seed%/results.json: $(LAST) $(DATA)/train_2per_class.txt
	@$$(call RUN,$$(FINETUNE) $$(FEW2) --init_from=$(PAPER)/pretrain_tpsbt_seed$$*/ckpt_epoch$(1).pt)
endef
$(foreach e,$(EPOCHS),$(eval $(call FEW_TPSBT,$(e))))
$(PAPER)/few_vit_e$(VIT_EPOCH)_seed%/results.json: $(VIT_LAST) $(DATA)/train_2per_class.txt
	@$(call RUN,$(FINETUNE) $(FEW2) --init_from=$<)
$(PAPER)/few_scratch_seed%/results.json: $(DATA)/train_2per_class.txt
	@$(call RUN,$(FINETUNE) $(FEW2) --init_from=scratch)

$(DATA)/train_2per_class.txt: | $(DATA)/pretrain.txt
	awk '++n[$$2] <= 2' $(DATA)/train_10pct.txt > $@

.PRECIOUS: $(LAST) $(VIT_LAST)  # kept when make stops: a stage's checkpoint is not redone

# The one-command GPU check (README, "Scaling out"; docs/model.md, "On a GPU"), on a machine with one CUDA GPU, in under 10 minutes:
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
GPU_STEPS = bench pretrain_eager pretrain_compiled pretrain_torchrun finetune_eager finetune_compiled  # written below
GPU_STEP = echo "== $(1)" && t=$$(date +%s) && { $(2) > $(GPU_OUT)/$(1).log 2>&1; s=$$?; } && \
    { printf '\n\#\# %s\n`%s`\n\nexit %s after %s s\n' $(1) '$(subst ','\'',$(strip $(2)))' $$s $$(( $$(date +%s) - t )); \
      [ $$s = 0 ] || echo "FAILED"; echo '```'; tail -n 6 $(GPU_OUT)/$(1).log; \
      tail -n 4 $(GPU_OUT)/$(1)/log.jsonl 2>/dev/null; echo '```'; } >> $(GPU_OUT)/report.md

.PHONY: gpu
gpu: | $(DATA)/pretrain.txt
	@mkdir -p $(GPU_OUT) && rm -rf $(GPU_OUT)/report.md $(foreach s,$(GPU_STEPS),$(GPU_OUT)/$(s) $(GPU_OUT)/$(s).log)
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
