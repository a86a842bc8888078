# eNTERFACE'05, 6 classes, 5-fold subject-independent cross-validation (the subjects split into 5
# disjoint groups), fine-tuning SVFAP (TPSBT-B) with the recipe of section 7, finetune.py's defaults
# (see finetune_dfew.py). Paper: UAR 60.58 / WAR 60.54 over the pooled 5 folds.
#   for f in 1 2 3 4 5; do
#     torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_enterface05.py --fold=$f
#   done
#   python metrics.py out/finetune_enterface05/fold*/test_predictions.csv     # the pooled report
# Lists: "<path> <label>" per line, a video file or a folder of frames of the face (face crops, as in
# pre-training). The paper gives no label order; this config assumes the order it lists the classes in
# (alphabetical), the order of class_names.
# The release read each fold's test list as its validation list; here the last epoch is the model.
out_dir = "out/finetune_enterface05/fold{fold}"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/enterface05/set_{fold}/train.txt"
test_list = "data/enterface05/set_{fold}/test.txt"
val_list = ""
num_classes = 6
class_names = ("anger", "disgust", "fear", "happy", "sad", "surprise")
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
# ~1,030 training clips a fold: 11 steps (about a second) an epoch, as long as writing one 0.93 GB checkpoint:
ckpt_every_epochs = 25  # 4 in 100 epochs, ~4% of the run (resume repeats at most 25 short epochs)
