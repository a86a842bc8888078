# Pre-training on the demo videos (make them with `python data.py demo`): the tiny preset, CPU, minutes.
#   python pretrain.py config/pretrain_demo.py
# Measured on the demo (docs/demo.md, "How the demo recipe was chosen"): with the paper's multi-scale crops the tiny model learns next
# to nothing in a CPU budget (loss still 0.91 after 5 epochs, above the 0.69 of predicting each position's
# mean patch; features no better than random ones); with whole aligned frames it passes that floor
# within 3 epochs and its features beat random ones. 16x16 patches on 64x64 frames make a step ~4x
# cheaper than 8x8 ones (128 tokens instead of 512), which buys the epochs; with only 16 positions per
# slice the 75% tube mask (the paper's ablation) leaves 4 of them visible rather than 2 at 90%.
out_dir = "out/pretrain_demo"
train_list = "data/demo/pretrain.txt"
vis_list = "data/demo/val.txt"  # the reconstruction video shows held-out clips
model = "tiny"
model_args = dict(patch_size=16, mask_ratio=0.75)
sampling_rate = 1  # a demo clip is 16 frames: one window
crop_scales = (1.0,)  # the demo faces are aligned: flip only
batch_size = 32
epochs = 10
warmup_epochs = 1
base_lr = 6e-3  # lr 7.5e-4 at batch 32: higher than the paper's, for a short run of a small model
num_workers = 1
log_interval = 5
vis_clips = 4
