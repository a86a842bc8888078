# Fine-tuning the demo pre-training on the six demo expressions: the tiny preset, CPU, minutes.
#   python pretrain.py config/pretrain_demo.py && python finetune.py config/finetune_demo.py
#   python finetune.py config/finetune_demo.py --init_from=scratch --out_dir=out/finetune_demo_scratch
#   python finetune.py config/finetune_demo.py --train_list=data/demo/train_10pct.txt --batch_size=8 --epochs=40 \
#       --warmup_epochs=2 --out_dir=out/finetune_demo_10pct   # 10% of the labels, as `make compare` runs it
#   regression (valence, arousal):
#   python finetune.py config/finetune_demo.py --task=regression --num_outputs=2 --class_names="('valence','arousal')" \
#       --train_list=data/demo/regression_train.txt --val_list=data/demo/regression_val.txt \
#       --test_list=data/demo/regression_test.txt --out_dir=out/finetune_demo_regression
out_dir = "out/finetune_demo"
init_from = "out/pretrain_demo/ckpt.pt"
train_list = "data/demo/train.txt"
val_list = "data/demo/val.txt"
test_list = "data/demo/test.txt"
num_classes = 6
class_names = ("happy", "sad", "angry", "surprise", "disgust", "fear")  # data/demo/classes.txt
model = "tiny"
model_args = dict(drop_path=0.0, patch_size=16)  # the patch size of config/pretrain_demo.py
sampling_rate = 1  # a demo clip is 16 frames: one window,
num_clips = 1  # so one clip per video covers it,
num_crops = 1  # and the frames are square: one crop
batch_size = 16
eval_batch_size = 16
epochs = 22  # 18 iterations per epoch on the 300 labelled clips: ~400 steps
warmup_epochs = 1
# lr = 1.6e-3 x 16/256 = 1e-4 for the encoder, 100x that for fc_norm and the head. Measured on the demo (with
# 8x8 patches): from scratch this way the tiny model learns within 400 steps; with one lr for all (3e-4 to
# 1e-3) the loss stays at ln 6 for hundreds of steps: the encoder's updates wash out its features before
# the head, initialised at 0.001 x, has grown. The same recipe serves pre-trained and scratch runs.
base_lr = 1.6e-3
head_lr_scale = 100.0
layer_decay = 1.0
grad_clip = 5.0
crop_scales = (1.0,)  # the demo faces are aligned; shifting them by multi-scale crops stalls learning
label_smoothing = 0.1
mixup = 0.0  # 300 clips and a few hundred steps: the paper's heavy regularisation stops learning here
cutmix = 0.0
random_erase = 0.0
num_workers = 1
log_interval = 5
