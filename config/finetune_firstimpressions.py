# First Impressions (ChaLearn LAP 2016, 10,000 clips of about 15 s), regression of the Big Five traits,
# official split of 6,000 training / 2,000 validation / 2,000 test clips, fine-tuning SVFAP (TPSBT-B) with
# the recipe of section 7 (finetune.py's defaults) and a mean squared error loss; the epoch with the best
# mean CCC on the validation clips is the model. Paper: mean CCC 0.6645, mean ACC 0.9175 (ACC = 1 - mean
# |prediction - label|, labels in [0, 1]).
#   torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_firstimpressions.py
#   python metrics.py out/finetune_firstimpressions/test_predictions.csv     # CCC, PCC and ACC per trait
# Lists: "<path> <O> <C> <E> <A> <N>" per line, the five trait values in [0, 1] in the order of
# class_names (the dataset's annotation files key them by name: write them in this order).
out_dir = "out/finetune_firstimpressions"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/firstimpressions/train.txt"
val_list = "data/firstimpressions/val.txt"
test_list = "data/firstimpressions/test.txt"
task = "regression"
num_outputs = 5
class_names = ("openness", "conscientiousness", "extraversion", "agreeableness", "neuroticism")
best_metric = "ccc"
label_smoothing = 0.0  # classification only: finetune.py applies neither it nor mixup / cutmix to regression
mixup = 0.0
cutmix = 0.0
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
# 6,000 training clips (63 steps an epoch); evaluating the 2,000 val videos decodes 2 clips of each, about 2/3 of
# an epoch's decoding: every 10th epoch (and the last) keeps evaluation near 7% of the run, checkpoints under 1%
eval_every = 10
ckpt_every_epochs = 10
