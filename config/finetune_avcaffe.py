# AVCAffe, arousal or valence on a 0-4 scale, each a 5-class classification in a run of its own, on the
# official split (86 training, 20 test subjects), with the recipe of section 7 (finetune.py's defaults).
# The model scores 6-second clips; the paper reports video-level predictions (the clip scores of a source
# video averaged) with the weighted F1. Paper: weighted F1 40.36 (arousal) / 41.49 (valence).
#   torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_avcaffe.py
#   python metrics.py --video_group='(.*)/[^/]+$' out/finetune_avcaffe_arousal/test_predictions.csv
#   # valence: the same with --train_list=data/avcaffe/valence/train.txt
#   #   --test_list=data/avcaffe/valence/test.txt --out_dir=out/finetune_avcaffe_valence
# Lists: "<path> <label>" per line, one line per 6-second clip, labels 0-4 (the rating). The clips of one
# source video (one subject's task) sit in one folder, data/avcaffe/clips/<subject>_<task>/<k>.mp4, and
# share its label: video_group names the folder as the clip's video.
out_dir = "out/finetune_avcaffe_arousal"
init_from = "out/pretrain_voxceleb2_base/ckpt.pt"
train_list = "data/avcaffe/arousal/train.txt"
test_list = "data/avcaffe/arousal/test.txt"
val_list = ""  # the official split has no validation set: the last epoch is the model
num_classes = 5
class_names = ("0", "1", "2", "3", "4")
video_group = r"(.*)/[^/]+$"  # a clip's video: its folder (metrics.group_average)
compile = True  # eager, the host cannot issue a step as fast as a GPU runs it (docs/model.md, compile and compile_mode)
compile_mode = "default"
ckpt_every_epochs = 10  # a checkpoint (0.93 GB, ~1 s) every 10th epoch: at most a few % of the run
