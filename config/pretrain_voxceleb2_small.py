# SVFAP pre-training of TPSBT-S (C 384, 6 heads, depths (8, 4, 2): our reading of the paper's 30M small
# model) on the VoxCeleb2 dev set, with the recipe of section 7: 100 epochs, batch 256, lr = 3e-4 x 256/256,
# 5 warm-up epochs, cosine, AdamW betas (0.9, 0.95), weight decay 0.05, tube masking 90%, 16 frames every
# 4th, the 160x160 face square (rows 0-160, columns 32-192) of the 224x224 videos, multi-scale crop + flip.
#   torchrun --standalone --nproc_per_node=4 pretrain.py config/pretrain_voxceleb2_small.py
#   2 nodes: torchrun --nnodes=2 --node_rank=NODE --nproc_per_node=4 --master_addr=IP_OF_NODE_0 \
#       --master_port=29500 pretrain.py config/pretrain_voxceleb2_small.py
#   after a crash: the same command with --init_from=resume
out_dir = "out/pretrain_voxceleb2_small"
train_list = "data/voxceleb2/pretrain.txt"  # "<path> 0" per line, one line per clip (1,092,009)
crop_box = (0, 160, 32, 192)  # (top, bottom, left, right): data.VOXCELEB2_CROP_BOX
model = "small"
model_args = dict(mask_ratio=0.9)
batch_size = 256
epochs = 100
warmup_epochs = 5
base_lr = 3e-4
beta1, beta2 = 0.9, 0.95
weight_decay = 0.05
sampling_rate = 4
repeated_sampling = 1  # the release's option: >1 draws several clips per decoded video
num_workers = 10
ckpt_every = 1000  # 1,092,009 / 256 = 4265 iterations per epoch: a checkpoint every ~quarter epoch
log_interval = 20
compile = True  # the host cannot issue TPSBT's ~4,350 eager operator calls a step as fast as a GPU runs them
compile_mode = "default"  # see the README's GPU section for when to try "reduce-overhead"
