# Pre-training on the demo videos (make them with `python data.py demo`): the tiny preset, CPU, minutes.
#   python pretrain.py config/pretrain_demo.py
out_dir = "out/pretrain_demo"
train_list = "data/demo/pretrain.txt"
vis_list = "data/demo/val.txt"  # the reconstruction video shows held-out clips
model = "tiny"
sampling_rate = 1  # a demo clip is 16 frames: one window
batch_size = 32
epochs = 1
warmup_epochs = 0.2
base_lr = 1.5e-3  # higher than the paper's 3e-4: a short run on a small model
num_workers = 1
log_interval = 5
vis_clips = 4
