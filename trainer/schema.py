"""The trainer's flags, each defined once: name, type, default, help, group, choices,
whether a resume must keep it (fingerprint) and whether a study may tune it.

Everything else derives from this table: the absl flags and --help
(trainer/task.py), the Config dataclass and its choice checks
(trainer/config.py), the run fingerprint a resume is checked against
(trainer/checkpoints.py), and the flag types the study driver checks its
search space against (hptuning/). Flag names, defaults and meanings follow
Google's built-in image classification algorithm where it has the flag.
Nothing here imports TensorFlow or Keras.
"""

from trainer.backbones import BACKBONES
from trainer.cli import JOB_DIR_FLAGS, Flag
from trainer.tasks import TASKS

GROUPS = ("data", "model", "optimisation", "evaluation", "outputs", "distribution")
# What --help says under a group's name: where its settings come from besides flags.
GROUP_NOTES = (
    ("distribution", "Data parallelism starts from the environment. Several local GPUs are used at "
                     "once; several processes form one cluster when TF_CONFIG or Vertex AI's CLUSTER_SPEC names "
                     "them (process 0 writes the job-dir). --train_batch_size is the global batch."),
    ("outputs", "Vertex AI's AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR replace model/, "
                "checkpoints/ and logs/ when set; CLOUD_ML_HP_METRIC_FILE names the hypertune metrics file."),
)
OPTIMIZERS = ("momentum", "adam", "rmsprop", "adamw")
DECAY_TYPES = ("cosine", "stepwise", "exponential", "polynomial", "strategy")
AUGMENTATIONS = ("basic", "randaugment", "augmix", "none")
CLASS_BALANCING = ("none", "weights", "sampler")
# metric_learning's losses: PAI's recommended (scale, margin) and the margin's unit.
METRIC_LOSSES = {
    "amsoftmax": (30.0, 0.4, "subtracted from the target's cosine"),
    "arcface": (64.0, 28.6, "degrees added to the target's angle (28.6 = 0.5 rad)"),
    "cosface": (64.0, 0.35, "subtracted from the target's cosine"),
    "large_margin": (1.0, 4.0, "times the target's angle (an integer)"),
    "sphereface": (1.0, 4.0, "times the target's angle (an integer)"),
    "softmax": (64.0, 0.0, "none: a normalised softmax"),
}


def _flag(name, kind, default, help, group, **kwargs):  # noqa: A002 - the Flag field's name
    return Flag(name, kind, default, help, group, **kwargs)


TRAINER_FLAGS = (
    # data
    _flag("training_data_path", "string", None, "TFRecord glob (or a folder of TFRecord files), folder with one "
          "subfolder per class, image-list .txt/.lst file (local or gs://), or tfds:NAME[/CONFIG][:VERSION]/SPLIT.",
          "data", required=True, fingerprint=True),
    _flag("validation_data_path", "string", None, "Same forms as --training_data_path; evaluated every "
          "--eval_frequency steps.", "data", required=True),
    _flag("num_classes", "integer", None, "Number of classes; labels must lie in [0, num_classes) after "
          "--label_offset (metric_learning: the training labels; validation labels may be any ids >= 0).", "data",
          required=True, fingerprint=True),
    _flag("task", "string", "classification", "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()) + ".",
          "data", choices=tuple(TASKS), fingerprint=True),
    _flag("image_key", "string", "image/encoded", "TFRecord feature holding the encoded image.", "data"),
    _flag("label_key", "string", "image/class/label", "TFRecord feature holding the integer label(s).", "data"),
    _flag("label_offset", "integer", 0, "Subtracted from every label (1 for Google's 1-based converters).", "data"),
    _flag("label_map_path", "string", "", "Text file with one class name per line, in label order.", "data"),
    _flag("max_corrupt_fraction", "float", 0.01, "Stop with an error when more than this fraction of images cannot "
          "be decoded.", "data"),
    _flag("tfds_data_dir", "string", "", "Where tfds: datasets are prepared (local or gs://); default TFDS's own "
          "~/tensorflow_datasets. Nothing is downloaded.", "data"),
    _flag("max_image_pixels", "integer", 40_000_000, "An image whose header declares more pixels than this is "
          "left out as unreadable, without being decoded (decompression bombs); 0 = no limit.", "data"),
    _flag("scan_cache_dir", "string", "", "Folder (local or gs://) that keeps what the pre-training scan of the data "
          "found, keyed by the data's file names (TFRecords: also sizes and times) and label settings, so a later "
          "run on the same data skips the scan. The study driver gives its trials one.", "data"),
    _flag("random_flip", "boolean", True, "Flip training images left-right at random (turn off for text or digits).",
          "data", tunable=True),
    _flag("random_crop_min_area", "float", 0.0, "Smallest fraction of an image a random training crop keeps; 0 = "
          "the task's default: " + ", ".join(f"{t.name} {t.crop_min_area:g}" for t in TASKS.values()) + " (1 = no "
          "crop: the whole image, resized).", "data", tunable=True),
    _flag("augmentation", "string", "basic", "basic: random crop and flip; randaugment and augmix: Keras's "
          "RandAugment or AugMix after them; none: the whole image, resized.", "data", choices=AUGMENTATIONS,
          tunable=True),
    _flag("randaugment_magnitude", "float", 0.5, "--augmentation=randaugment: strength of each operation, in (0, 1].",
          "data", tunable=True),
    _flag("mixup_alpha", "float", 0.0, "MixUp: blend pairs of images and their labels by a Beta(alpha, alpha) "
          "draw; 0 = off. With --cutmix_alpha as well, batches alternate between the two.", "data", tunable=True),
    _flag("cutmix_alpha", "float", 0.0, "CutMix: paste a patch of another image, labels mixed by its area; 0 = off.",
          "data", tunable=True),
    _flag("random_erasing", "float", 0.0, "Probability of erasing a random rectangle of a training image.", "data",
          tunable=True),
    _flag("class_balancing", "string", "none", "weights: weight each image's loss by the inverse frequency of its "
          "class (multi_label: the mean over its labels); sampler: keep each image with probability (images of the "
          "rarest class) / (images of its class), so every class comes equally often in expectation (multi_label: "
          "by its rarest label).", "data", choices=CLASS_BALANCING,
          fingerprint=True, tunable=True),
    _flag("pai_param_config", "string", "", "Alibaba PAI EasyVision's param_config string, unchanged, over "
          "several lines if need be ('--model_type Classification --backbone resnet_v1_50 --num_classes 10 "
          "--num_epochs 1 --train_data ... --test_data ... --model_dir ...'): translated into these flags, "
          "printed, then run.", "data"),
    _flag("max_batch_fraction", "float", 0.1, "Lower --train_batch_size, with a note, when it exceeds this "
          "fraction of the training images; 0 = never.", "data"),
    # model
    _flag("model_type", "string", "efficientnet-b0", "The backbone, built offline (nothing is downloaded). Each "
          "was designed for 224-pixel images except " + ", ".join(
              f"{b.name} ({b.image_size})" for b in BACKBONES.values() if b.image_size != 224) + ". --image_size "
          "must be a multiple of " + ", of ".join(dict.fromkeys(
              f"{b.size_multiple} for {b.family}-*" for b in BACKBONES.values() if b.size_multiple > 1)) + ". "
          "(XCiT is not offered: it has no maintained Keras implementation.)", "model",
          choices=tuple(BACKBONES), fingerprint=True, tunable=True),
    _flag("image_size", "integer", 224, "Side in pixels of the square image the network sees.", "model",
          fingerprint=True, tunable=True),
    _flag("pretrained_checkpoint_path", "string", "", "Weights (.weights.h5 or .keras, local or gs://) of the same "
          "model_type, the head skipped when num_classes differs; or 'imagenet' (efficientnet-*: Keras downloads "
          "them).", "model", tunable=True),
    _flag("precision", "string", "float32", "Compute precision.", "model",
          choices=("float32", "mixed_bfloat16", "mixed_float16"), tunable=True),
    _flag("ema_decay", "float", 0.0, "Keep an exponential moving average of the weights with this decay (e.g. "
          "0.999) and evaluate, choose the best and export with it; 0 = off.", "model", fingerprint=True, tunable=True),
    _flag("freeze_backbone_steps", "integer", 0, "Train only the head for this many steps, then every layer "
          "(fine-tuning from --pretrained_checkpoint_path).", "model", tunable=True),
    _flag("backend", "string", "tensorflow", "Keras backend; when not given, $KERAS_BACKEND if set.", "model",
          choices=("tensorflow", "jax")),
    _flag("embedding_size", "integer", 1536, "metric_learning: width of the embedding (the neck: a dense layer "
          "after the backbone's pooled features, L2-normalised).", "model", fingerprint=True, tunable=True),
    _flag("metric_loss", "string", "amsoftmax", "metric_learning: the margin loss on the embedding's cosines to "
          "the class centres. Defaults (scale, margin, the margin's unit): " + "; ".join(
              f"{name} {scale:g}, {margin:g} {unit}" for name, (scale, margin, unit) in METRIC_LOSSES.items()) + ".",
          "model", choices=tuple(METRIC_LOSSES), fingerprint=True, tunable=True),
    _flag("loss_scale", "float", None, "metric_learning: the scale s multiplying the cosines; default: "
          "--metric_loss's.", "model", tunable=True),
    _flag("loss_margin", "float", None, "metric_learning: the margin, in --metric_loss's unit (see there); "
          "default: --metric_loss's.", "model", tunable=True),
    _flag("loss_weight", "float", 1.0, "metric_learning: loss = loss_weight * margin loss + (1 - loss_weight) * "
          "softmax cross-entropy of a plain classifier on the same embedding; in (0, 1].", "model", tunable=True),
    # optimisation
    _flag("max_steps", "integer", None, "Training steps (batches); give this or --num_epochs.", "optimisation",
          tunable=True),
    _flag("num_epochs", "float", 0.0, "Passes over the training images, instead of --max_steps.", "optimisation",
          tunable=True),
    _flag("max_training_time", "string", "", "Time budget: '90m', '2h', '45s', or a number of hours. When it is "
          "spent the run finishes its step, evaluates, exports the best and exits 0.", "optimisation"),
    _flag("train_batch_size", "integer", 32, "Images per training step (over every device).", "optimisation",
          fingerprint=True, tunable=True),
    _flag("optimizer_type", "string", "momentum", "momentum is SGD with momentum 0.9 unless --optimizer_arguments "
          "says otherwise. adamw is Adam with decoupled weight decay instead of the L2 loss term: every step each "
          "kernel w becomes w * (1 - learning rate * --weight_decay), as in PyTorch's AdamW (typically "
          "--weight_decay=0.05; 0.0001 is hardly any decay); biases, norms and position embeddings are not decayed.",
          "optimisation", choices=OPTIMIZERS, fingerprint=True, tunable=True),
    _flag("optimizer_arguments", "pairs", "", "name=value pairs for the optimizer, e.g. "
          "'momentum=0.9,nesterov=true'.", "optimisation", fingerprint=True, tunable=True),
    _flag("learning_rate_decay_type", "string", "cosine", "cosine: to 0 at the last step; stepwise: "
          "--stepwise_learning_rate_steps and _levels; exponential: times --decay_factor every --decay_epochs; "
          "polynomial: to --end_learning_rate with --decay_power; strategy: --learning_rate_strategy.",
          "optimisation", choices=DECAY_TYPES, tunable=True),
    _flag("initial_learning_rate", "float", 0.0001, "Learning rate after warmup (cosine starts its decay from it).",
          "optimisation", tunable=True),
    _flag("warmup_learning_rate", "float", 0.0, "Learning rate at step 0; rises linearly over warmup_steps to the "
          "schedule's rate at warmup_steps (initial_learning_rate, or the strategy's rate there).", "optimisation", tunable=True),
    _flag("warmup_steps", "integer", 0, "Steps of linear warmup.", "optimisation", tunable=True),
    _flag("stepwise_learning_rate_steps", "int_list", "100,200", "Stepwise decay: steps at which the learning rate "
          "changes.", "optimisation", tunable=True),
    _flag("stepwise_learning_rate_levels", "float_list", "0.008,0.0008", "Stepwise decay: the learning rate from "
          "each of those steps on.", "optimisation", tunable=True),
    _flag("decay_epochs", "float", 2.0, "exponential: epochs between two multiplications by --decay_factor.",
          "optimisation", tunable=True),
    _flag("decay_factor", "float", 0.94, "exponential: the factor applied every --decay_epochs.", "optimisation",
          tunable=True),
    _flag("staircase", "boolean", False, "exponential: change the rate in steps every --decay_epochs instead of "
          "continuously.", "optimisation", tunable=True),
    _flag("decay_power", "float", 1.0, "polynomial: the power of the decay (1 = linear).", "optimisation",
          tunable=True),
    _flag("end_learning_rate", "float", 0.0, "polynomial: the rate at the last step; 0 = initial/1000.",
          "optimisation", tunable=True),
    _flag("learning_rate_strategy", "string", "", "strategy: segments 'END:RATE' (constant) or "
          "'END:FROM->TO' (linear), '=>' (exponential), '~>' (cosine), END in epochs, comma-separated, e.g. "
          "'5:0.1->0.4,10:0.4=>0.8,15:0.8~>0.001,20:0.001'. The last rate holds after the last END.",
          "optimisation", tunable=True),
    _flag("weight_decay", "float", 0.0001, "loss = task loss + weight_decay * sum(w**2)/2 over conv and dense "
          "kernels (adamw: decoupled decay instead, see --optimizer_type).", "optimisation", tunable=True),
    _flag("label_smoothing", "float", 0.0, "Label smoothing in [0, 1).", "optimisation", tunable=True),
    _flag("ohem_top_ratio", "float", 1.0, "Online hard example mining: average the loss over only this fraction "
          "of each batch, its hardest images; 1 = all.", "optimisation", tunable=True),
    _flag("seed", "integer", 42, "Seed for initialisation, shuffling and augmentation.", "optimisation",
          fingerprint=True, tunable=True),
    # evaluation
    _flag("eval_frequency", "string", "1000", "Steps between evaluations, or epochs with an e suffix ('1e', "
          "'0.5e'); one always runs at the last step.", "evaluation"),
    _flag("early_stopping_patience", "integer", 0, "Stop after this many evaluations without an improvement of "
          "the tuned metric by more than --early_stopping_min_delta; 0 = never.", "evaluation", tunable=True),
    _flag("early_stopping_min_delta", "float", 0.0, "The smallest change of the tuned metric that counts as an "
          "improvement.", "evaluation"),
    _flag("eval_batch_size", "integer", 32, "Images per evaluation batch.", "evaluation"),
    _flag("num_eval_images", "integer", 0, "Validation images per evaluation (a seeded draw); 0 = all.",
          "evaluation"),
    _flag("hyperparameter_metric_tag", "string", "", "Metric that picks the best evaluation and is reported for "
          "tuning; default: " + ", ".join(f"{t.metrics[0]} ({t.name})" for t in TASKS.values()) + ".", "evaluation"),
    _flag("multi_label_threshold", "string", "0.5", "multi_label: a probability, or 'auto' for per-class "
          "thresholds that maximise F1 on validation; stored in the export.", "evaluation", tunable=True),
    _flag("eval_each_category", "boolean", False, "Also report every class's AP, precision, recall and F1 "
          "(multi_label) in metrics.json and TensorBoard.", "evaluation"),
    # outputs
    *JOB_DIR_FLAGS,
    _flag("log_frequency", "integer", 100, "Steps between progress lines.", "outputs"),
    _flag("max_to_keep", "integer", 5, "Step checkpoints kept (the oldest are removed; the best evaluation's "
          "weights are always kept).", "outputs"),
    # distribution
    _flag("classifier_parallelism", "string", "data", "data: every device holds the whole head; model: the head's "
          "class weights are split over all devices along the class axis, so the class count grows with the devices "
          "(JAX backend).", "distribution", choices=("data", "model"), fingerprint=True),
    _flag("sync_batch_norm", "boolean", False, "Batch-norm statistics over the global batch on several devices "
          "(instead of each device's share).", "distribution", tunable=True),
    _flag("tpu", "string", "", "TensorFlow backend: the TPU to train on with TPUStrategy ('local' on a TPU VM); "
          "when not given, $TPU_NAME if set. JAX finds a TPU VM's chips itself.", "distribution"),
)

# Flags that are not Config fields: where the run writes is not part of what it is, and PAI's
# param_config string is translated into the other flags before they are parsed (platforms.py).
NOT_CONFIG = (*(flag.name for flag in JOB_DIR_FLAGS), "pai_param_config")
BY_NAME = {flag.name: flag for flag in TRAINER_FLAGS}


def config_flags():
    return tuple(flag for flag in TRAINER_FLAGS if flag.name not in NOT_CONFIG)


def fingerprint_fields():
    """Settings a resume must keep: the weights, optimizer slots or data position would not mean the same."""
    return tuple(flag.name for flag in TRAINER_FLAGS if flag.fingerprint)


def flag_types():
    """{flag name: absl type name} of every trainer flag a study may set (its fixed flags and its parameters)."""
    return {flag.name: flag.absl_type for flag in config_flags()}


def tunable():
    return tuple(flag.name for flag in TRAINER_FLAGS if flag.tunable)
