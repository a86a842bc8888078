# DFEW, 5-fold cross-validation, fine-tuning SVFAP (TPSBT-B) with the recipe of section 7: 100 epochs,
# lr = 1e-3 x batch/256, min lr 1e-6, 5 warm-up epochs, cosine, AdamW betas (0.9, 0.999), weight decay
# 0.05, layer-wise lr decay 0.75, drop path 0.1, label smoothing 0.1, mixup 0.8 / cutmix 1.0, random erasing
# 0.25; test on 2 clips x 2 crops per video. Paper: UAR 62.83 / WAR 74.27 over the pooled 5 folds.
#   for f in 1 2 3 4 5; do
#     torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_dfew.py --fold=$f
#   done
#   python metrics.py out/finetune_dfew/fold*/test_predictions.csv     # the pooled report
# Lists: "<path> <label>" per line, labels 0-6 in the order of class_names. The release's split files have
# this format with absolute paths of the authors' machine: point replace_prefix=(their_prefix, yours) at them.
out_dir = "out/finetune_dfew/fold{fold}"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/dfew/set_{fold}/train.txt"
test_list = "data/dfew/set_{fold}/test.txt"
# DFEW has no validation split: the last epoch is the model. The release's val lists are byte copies of its
# test lists; to repeat its "best epoch" choice set val_list to the test list: this script then warns and
# reports the last epoch's test metrics beside the best-on-val ones.
val_list = ""
num_classes = 7
class_names = ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
model = "base"
model_args = dict(drop_path=0.1)
sampling_rate = 4  # section 1; for DFEW's 16-frame clip version (clip_224x224_16f) use sampling_rate=1
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
ckpt_every_epochs = 5  # ~9,400 training clips a fold: ~100 steps an epoch; a checkpoint (0.93 GB, ~1 s) every 5th stays near 2%
