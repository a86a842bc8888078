# SVFAP pre-training of TPSBT-S (C 384, 6 heads, depths (8, 4, 2): our reading of the paper's 30M small
# model) on the VoxCeleb2 dev set, with the recipe of section 7: 100 epochs, batch 256, lr = 3e-4 x 256/256,
# 5 warm-up epochs, cosine, AdamW betas (0.9, 0.95), weight decay 0.05, tube masking 90%, 16 frames every
# 4th, the 160x160 face square (rows 0-160, columns 32-192) of the 224x224 videos, multi-scale crop + flip.
# First prepare the dataset once (training-ready copies: the face crop, every 4th frame; a worker then needs 0.18
# of the CPU time of the raw files), then train (init_from="auto": the same command resumes after a crash):
#   python data.py prepare --list=data/voxceleb2/pretrain.txt --out=data/voxceleb2_prepared \
#       --crop_box="(0, 160, 32, 192)" --keep_every=4 --workers=32
#   torchrun --standalone --nproc_per_node=4 pretrain.py config/pretrain_voxceleb2_small.py
#   2 nodes: torchrun --nnodes=2 --node_rank=NODE --nproc_per_node=4 --master_addr=IP_OF_NODE_0 \
#       --master_port=29500 pretrain.py config/pretrain_voxceleb2_small.py
# Batches in flight: 4 GPUs x 10 workers x 2 x 64 clips x 1.23 MB = 6.3 GB of /dev/shm (docker: --shm-size=16g).
out_dir = "out/pretrain_voxceleb2_small"
init_from = "auto"  # resume from out_dir/ckpt.pt when it exists (torchrun --max-restarts, a requeued job)
train_list = "data/voxceleb2_prepared/pretrain.txt"  # data.py prepare's list: one line per clip (1,092,009)
crop_box = ()  # prepared clips are the face square already
model = "small"
model_args = dict(mask_ratio=0.9)
batch_size = 256
epochs = 100
warmup_epochs = 5
base_lr = 3e-4
beta1, beta2 = 0.9, 0.95
weight_decay = 0.05
sampling_rate = 1  # prepared clips hold every 4th frame: the paper's rate 4
# the raw files instead: train_list = "data/voxceleb2/pretrain.txt"; crop_box = (0, 160, 32, 192); sampling_rate = 4
repeated_sampling = 1  # the release's option: >1 draws several clips per decoded video
# per GPU: 10 workers x 186 clips per CPU-second (data.py --bench, prepared files) = 1,860 clips/s, above an A100's
# ~1,600 (docs/data.md: What a worker costs); an H100 (~5,100 clips/s) wants 28 where the node has the cores
num_workers = 10
ckpt_every = 1000  # 1,092,009 / 256 = 4265 iterations per epoch: a checkpoint every ~quarter epoch
log_interval = 20
compile = True  # the host cannot issue TPSBT's ~4,350 eager operator calls a step as fast as a GPU runs them
compile_mode = "default"  # docs/model.md says when to try "reduce-overhead"
