# FERV39k fine-tuning of SVFAP (TPSBT-B), recipe of section 7 (see finetune_dfew.py). Paper: UAR 42.14 /
# WAR 52.29 on the test split.
#   torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_ferv39k.py
# FERV39k has a train and a test split only; the release read test.csv as its validation list, so its best
# epoch was chosen on test. Here the last epoch is the model (val_list = "").
out_dir = "out/finetune_ferv39k"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/ferv39k/train.txt"
test_list = "data/ferv39k/test.txt"
val_list = ""
num_classes = 7
class_names = ()  # the names of labels 0-6 in the order your lists use (the reference does not give them)
model = "base"
model_args = dict(drop_path=0.1)
sampling_rate = 4  # section 1
num_clips = 2
num_crops = 2
batch_size = 96  # the paper gives no fine-tuning batch size; lr follows it
epochs = 100
warmup_epochs = 5
base_lr = 1e-3
min_lr = 1e-6
layer_decay = 0.75
weight_decay = 0.05
beta1, beta2 = 0.9, 0.999
label_smoothing = 0.1
mixup = 0.8
cutmix = 1.0
random_erase = 0.25
num_workers = 10
log_interval = 20
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
ckpt_every_epochs = 5  # ~31,000 training clips: ~330 steps an epoch; a checkpoint (0.93 GB, ~1 s) every 5th is well under 1%
