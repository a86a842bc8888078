# Werewolf-XL, speaker samples (14,632 clips), regression of arousal, valence and dominance, 5-fold
# session-independent cross-validation (the game sessions split into 5 disjoint groups), fine-tuning SVFAP
# (TPSBT-B) with the recipe of section 7 (finetune.py's defaults) and a mean squared error loss. Paper,
# over the pooled 5 folds: PCC 0.2351 / 0.6711 / 0.3461, CCC 0.1896 / 0.6427 / 0.2969 (A / V / D).
#   for f in 1 2 3 4 5; do
#     torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_werewolfxl.py --fold=$f
#   done
#   python metrics.py out/finetune_werewolfxl/fold*/test_predictions.csv     # CCC and PCC per dimension
# Lists: "<path> <arousal> <valence> <dominance>" per line (the order of class_names), the values as the
# dataset gives them; a path is a video file or a folder of frames of the speaker's face.
out_dir = "out/finetune_werewolfxl/fold{fold}"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/werewolfxl/set_{fold}/train.txt"
test_list = "data/werewolfxl/set_{fold}/test.txt"
val_list = ""
task = "regression"
num_outputs = 3
class_names = ("arousal", "valence", "dominance")
label_smoothing = 0.0  # classification only: finetune.py applies neither it nor mixup / cutmix to regression
mixup = 0.0
cutmix = 0.0
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
# ~11,700 training clips a fold: 122 steps an epoch; one 0.93 GB checkpoint takes ~1 s:
ckpt_every_epochs = 10  # ~1% of the run
