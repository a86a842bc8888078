# RAVDESS, speech part (1,440 video clips of 24 actors, 60 each), 8 classes (the 7 basic emotions and
# calm), 6-fold subject-independent cross-validation (4 actors per fold), fine-tuning SVFAP (TPSBT-B)
# with the recipe of section 7, finetune.py's defaults (see finetune_dfew.py). Paper: UAR 75.15 /
# WAR 75.01 over the pooled 6 folds.
#   for f in 1 2 3 4 5 6; do
#     torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_ravdess.py --fold=$f
#   done
#   python metrics.py out/finetune_ravdess/fold*/test_predictions.csv     # the pooled report
# Lists: "<path> <label>" per line, a video file or a folder of frames of the face (face crops, as in
# pre-training). The paper gives no label order; this config assumes RAVDESS's own emotion code minus 1
# (the third field of a file name, 01 neutral ... 08 surprised), the order of class_names.
# The release read each fold's test list as its validation list; here the last epoch is the model.
out_dir = "out/finetune_ravdess/fold{fold}"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/ravdess/set_{fold}/train.txt"
test_list = "data/ravdess/set_{fold}/test.txt"
val_list = ""
num_classes = 8
class_names = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
# ~1,200 training clips a fold: 12 steps (about a second) an epoch, as long as writing one 0.93 GB checkpoint:
ckpt_every_epochs = 25  # 4 in 100 epochs, ~4% of the run (resume repeats at most 25 short epochs)
