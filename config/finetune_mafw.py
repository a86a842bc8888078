# MAFW (single-label, 11 classes), 5-fold cross-validation, fine-tuning SVFAP (TPSBT-B) with the recipe
# of section 7 (see finetune_dfew.py). Paper: UAR 41.19 / WAR 54.28.
#   for f in 1 2 3 4 5; do
#     torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_mafw.py --fold=$f
#   done
#   python metrics.py out/finetune_mafw/fold*/test_predictions.csv     # the pooled report
# The release read each fold's test list as its validation list; here the last epoch is the model.
out_dir = "out/finetune_mafw/fold{fold}"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/mafw/set_{fold}/train.txt"
test_list = "data/mafw/set_{fold}/test.txt"
val_list = ""
num_classes = 11
class_names = ()  # the names of labels 0-10 in the order your lists use (the reference does not give them)
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
ckpt_every_epochs = 5  # ~8,000 training clips a fold: ~85 steps an epoch; a checkpoint (0.93 GB, ~1 s) every 5th stays near 2%
