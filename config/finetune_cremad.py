# CREMA-D, 6 classes, 5-fold subject-independent cross-validation (the actors split into 5 disjoint
# groups; each fold tests on one group), fine-tuning SVFAP (TPSBT-B) with the recipe of section 7, which
# is finetune.py's defaults (see finetune_dfew.py). Paper: UAR 77.31 / WAR 77.37 over the pooled 5 folds.
#   for f in 1 2 3 4 5; do
#     torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_cremad.py --fold=$f
#   done
#   python metrics.py out/finetune_cremad/fold*/test_predictions.csv     # the pooled report
# Lists: "<path> <label>" per line, a video file or a folder of frames of the face (the paper's inputs are
# face crops, as in pre-training), labels 0-5 in the order of class_names. The paper gives no label order;
# this config assumes the order it lists the classes in (CREMA-D's file name codes HAP SAD ANG FEA DIS NEU).
# The release read each fold's test list as its validation list; here the last epoch is the model.
out_dir = "out/finetune_cremad/fold{fold}"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/cremad/set_{fold}/train.txt"
test_list = "data/cremad/set_{fold}/test.txt"
val_list = ""
num_classes = 6
class_names = ("happy", "sad", "anger", "fear", "disgust", "neutral")
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
# ~5,950 training clips a fold: 62 steps (a few seconds) an epoch; one 0.93 GB checkpoint takes ~1 s:
ckpt_every_epochs = 10  # 10 in 100 epochs, ~3% of the run
