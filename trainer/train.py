"""run(config, job_dir): the whole training story, from paths to SavedModel.

Training is Keras `fit` in "epochs" of eval_frequency steps: every epoch ends
with an evaluation, a checkpoint (weights, optimizer state, step; the input
pipeline is a pure function of seed and step, so that is the data position
too), and, when the evaluation is the best so far, best.weights.h5. The
SavedModel in model/ is exported from best.weights.h5 at the end.
"""

import functools
import math
import os
import shutil
import tempfile
import time

import keras
import numpy as np

from trainer import checkpoints, data, distribute, export, metrics, models, report, schedules
from trainer.config import UserError

def job_paths(job_dir):
    """Output locations; Vertex AI's AIP_* variables win where set."""
    return {
        "job_dir": job_dir,
        "model": os.environ.get("AIP_MODEL_DIR") or os.path.join(job_dir, "model"),
        "checkpoints": os.environ.get("AIP_CHECKPOINT_DIR") or os.path.join(job_dir, "checkpoints"),
        "logs": os.environ.get("AIP_TENSORBOARD_LOG_DIR") or os.path.join(job_dir, "logs"),
    }


def _prepare_output(paths):
    gfile = report.gfile()
    for name in ("job_dir", "checkpoints", "logs"):
        try:
            gfile.makedirs(paths[name])
            report.write_atomic(os.path.join(paths[name], ".write_test"), "ok")
            gfile.remove(os.path.join(paths[name], ".write_test"))
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot write"
            flag = "--job-dir" if name == "job_dir" else f"the {name} folder"
            raise UserError(f"{flag}: cannot write to {paths[name]} ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def run(c, job_dir):
    """Trains, evaluates and exports; returns the best value of c.metric."""
    paths = job_paths(job_dir)
    cluster = distribute.cluster_from_env()
    scope, replicas = distribute.setup(c.backend, cluster)  # before any TensorFlow op: collectives configure at start-up
    for flag in ("train_batch_size", "eval_batch_size"):
        if getattr(c, flag) % replicas:
            raise UserError(f"--{flag}={getattr(c, flag)} must be a multiple of the {replicas} devices it is split over")
    if cluster.is_chief:
        _prepare_output(paths)
    store = checkpoints.Checkpoints(paths["checkpoints"])
    state = store.load_state(checkpoints.run_fingerprint(c))  # a different run's job-dir is refused before any write
    keras.utils.set_random_seed(c.seed)
    keras.mixed_precision.set_dtype_policy(c.precision)

    fmt = data.RecordFormat(c.image_key, c.label_key, c.label_offset, c.multi_label)
    train_source = data.open_source(c.training_data_path, "training_data_path", fmt)
    eval_source = data.open_source(c.validation_data_path, "validation_data_path", fmt)
    class_names = data.class_names(train_source, eval_source, c.num_classes, c.label_map_path)
    report.say(f"scanning {c.training_data_path} and {c.validation_data_path} ...")
    train_scan = data.scan(train_source, c.num_classes, fmt, c.max_corrupt_fraction)
    eval_scan = data.scan(eval_source, c.num_classes, fmt, c.max_corrupt_fraction)
    report.say(f"{len(train_scan.keys)} training images, {len(eval_scan.keys)} validation images, "
               f"{len(train_scan.corrupt) + len(eval_scan.corrupt)} unreadable skipped")
    if cluster.is_chief:
        report.write_json(os.path.join(job_dir, "config.json"), {**c.to_dict(), "job_dir": job_dir})
        report.write_atomic(os.path.join(job_dir, "labels.txt"), "".join(f"{name}\n" for name in class_names))

    start_step = state.get("step", 0)
    train_ds = data.training_dataset(
        train_source, train_scan, fmt, c.train_batch_size, c.image_size, c.num_classes,
        c.seed, c.random_crop_min_area, c.random_flip, start_step,
    )
    with scope:
        imagenet = c.pretrained_checkpoint_path == "imagenet"
        model = models.build_model(c.model_type, c.num_classes, c.image_size, c.weight_decay, seed=c.seed, imagenet=imagenet)
        if c.pretrained_checkpoint_path and not imagenet:
            models.load_pretrained(model, c.pretrained_checkpoint_path, c.model_type, c.image_size)
        optimizer = models.make_optimizer(c.optimizer_type, schedules.from_config(c), c.optimizer_arguments)
        models.compile_classifier(model, optimizer, c.num_classes, c.label_smoothing, c.multi_label)
        if state:
            store.restore(model, state)
        distribute.prepare_fit(model, train_ds.element_spec)
    if start_step:
        report.say(f"resuming from the checkpoint at step {start_step}")

    eval_ds, num_eval = data.eval_dataset(eval_source, eval_scan, fmt, c.eval_batch_size, c.image_size, c.num_classes,
                                          c.num_eval_images, c.seed)
    evaluate = functools.partial(
        evaluate_model, dataset=eval_ds, batch_size=c.eval_batch_size, multi_label=c.multi_label,
        threshold=c.multi_label_threshold, class_names=class_names if c.eval_each_category else None,
    )
    # Saving weights is a collective step on several hosts: every process
    # saves, but only the chief's files land in the job-dir.
    out_dir = job_dir if cluster.is_chief else tempfile.mkdtemp(prefix=f"worker{cluster.index}-")
    out_paths = paths if cluster.is_chief else {name: os.path.join(out_dir, name) for name in ("model", "checkpoints", "logs")}
    progress = Progress(start_step, c.max_steps, c.train_batch_size, c.log_frequency)
    history = Evaluations(evaluate, c.metric, progress, out_paths, out_dir, state, cluster.is_chief, {
        "task": c.task, "training_images": len(train_scan.keys), "evaluation_images": num_eval,
        "corrupt_images": {"training": len(train_scan.corrupt), "validation": len(eval_scan.corrupt),
                           "examples": list((train_scan.corrupt + eval_scan.corrupt)[:20])},
        "run": checkpoints.run_fingerprint(c),
    })
    progress.tensorboard = history.tensorboard
    try:
        if start_step < c.max_steps:
            model.fit(
                train_ds,
                steps_per_epoch=c.eval_frequency,
                initial_epoch=start_step // c.eval_frequency,
                epochs=start_step // c.eval_frequency + math.ceil((c.max_steps - start_step) / c.eval_frequency),
                callbacks=[progress, history],
                shuffle=False,  # the input pipeline shuffles, reproducibly
                verbose=0,
            )
    finally:
        if not cluster.is_chief:
            shutil.rmtree(out_dir, ignore_errors=True)  # a worker's scratch copies of the chief's files
    best = history.best
    if best is None:
        raise UserError("no evaluation ran; check --max_steps and --eval_frequency")
    if not cluster.is_chief:
        report.say(f"worker {cluster.index} done; the chief exports")
        return best[c.metric]
    report.say(f"exporting the best evaluation (step {best['step']}) to {paths['model']}")
    export.export_saved_model(history.best_weights_path(), c.model_type, c.num_classes, c.image_size, class_names,
                              paths["model"], thresholds=best.get("thresholds"))
    report.say(f"{c.metric}={best[c.metric]:.4f}")
    return best[c.metric]


def evaluate_model(model, dataset, batch_size, multi_label, threshold, class_names):
    """Exact metrics over the whole evaluation set (metrics.py), from the model's predictions.

    The last, short batch is padded to batch_size: one compiled shape, and
    always divisible over data-parallel devices.
    """
    logits, targets = [], []
    for images, target in dataset.as_numpy_iterator():
        count = len(images)
        if count < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - count, *images.shape[1:]), images.dtype)])
        logits.append(keras.ops.convert_to_numpy(model.predict_on_batch(images))[:count])
        targets.append(target)
    logits, targets = np.concatenate(logits).astype(np.float64), np.concatenate(targets)
    if not multi_label:
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        return metrics.classification(probabilities / probabilities.sum(axis=1, keepdims=True), targets.argmax(axis=1))
    probabilities = 1 / (1 + np.exp(-logits))
    if threshold == "auto":
        thresholds = metrics.best_f1_thresholds(probabilities, targets)
    else:
        thresholds = np.full(targets.shape[1], float(threshold))
    result = metrics.multi_label(probabilities, targets, thresholds, class_names)
    return {**result, "thresholds": [float(t) for t in thresholds]}


class Evaluations(keras.callbacks.Callback):
    """After each evaluation: metrics.json, hypertune line, TensorBoard, checkpoint, best weights."""

    def __init__(self, evaluate, metric, progress, paths, job_dir, state, is_chief, summary):
        """is_chief False: paths and job_dir are a scratch folder, and nothing is reported."""
        super().__init__()
        self.evaluate, self.metric, self.progress, self.is_chief = evaluate, metric, progress, is_chief
        report.gfile().makedirs(paths["checkpoints"])
        self.checkpoints = checkpoints.Checkpoints(paths["checkpoints"])
        self.metrics_path = os.path.join(job_dir, "metrics.json")
        self.tensorboard = report.TensorBoard(paths["logs"] if is_chief else None)
        self.evaluations = state.get("evaluations", [])
        self.best, self.best_weights = state.get("best"), state.get("best_weights")
        self.summary = summary
        self._write_metrics()

    def best_weights_path(self):
        return os.path.join(self.checkpoints.folder, self.best_weights)

    def on_epoch_end(self, epoch, logs=None):
        # Batches trained, counted here rather than read from optimizer.iterations,
        # which a loss-scaling optimizer does not advance on skipped steps.
        step = self.progress.step
        result = {"step": step, **self.evaluate(self.model)}
        self.evaluations.append(result)
        if self.best is None or result[self.metric] > self.best[self.metric]:
            self.best, self.best_weights = result, self.checkpoints.save_best(self.model, step)
        state = {"evaluations": self.evaluations, "best": self.best, "best_weights": self.best_weights, "run": self.summary["run"]}
        self.checkpoints.save(self.model, step, state)
        self._write_metrics()
        if not self.is_chief:
            return
        report.append_hypertune(self.metric, result[self.metric], step)
        scalars = {k: v for k, v in result.items() if isinstance(v, float)}
        for name, figures in result.get("per_category", {}).items():
            scalars.update({f"per_category/{name}/{k}": v for k, v in figures.items() if v is not None})
        self.tensorboard.scalars("validation", step, scalars)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        report.say(f"eval at step {step}: {shown}  (best {self.metric} {self.best[self.metric]:.4f} at step {self.best['step']})")

    def _write_metrics(self):
        report.write_json(self.metrics_path, {"metric": self.metric, "evaluations": self.evaluations, "best": self.best, **self.summary})


class Progress(keras.callbacks.Callback):
    """A progress line every log_frequency steps; stops training at max_steps."""

    def __init__(self, start_step, max_steps, batch_size, log_frequency):
        super().__init__()
        self.step, self.max_steps = start_step, max_steps
        self.batch_size, self.log_frequency = batch_size, log_frequency
        self.tensorboard = None  # set by run(): Evaluations owns the writers
        self.started = None

    def on_epoch_begin(self, epoch, logs=None):
        # Restart the clock after each evaluation so img/s counts training only.
        self.started, self.steps_timed = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        self.steps_timed += 1
        if self.step >= self.max_steps:
            self.model.stop_training = True
        if self.step % self.log_frequency and self.step < self.max_steps:
            return
        loss = float(logs["loss"])  # waits for the step to finish: only every log_frequency steps
        elapsed = time.perf_counter() - self.started
        images_per_second = self.steps_timed * self.batch_size / max(elapsed, 1e-9)
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        eta = (self.max_steps - self.step) * self.batch_size / max(images_per_second, 1e-9)
        report.say(report.progress_line(self.step, self.max_steps, loss, lr, images_per_second, eta))
        self.tensorboard.scalars("train", self.step, {"loss": loss, "learning_rate": lr, "images_per_second": images_per_second})
