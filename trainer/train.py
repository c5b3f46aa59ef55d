"""run(config, job_dir): the whole training story, from paths to SavedModel.

Prepare the inputs, build the model, fit in chunks of eval_frequency steps
with one Reporter, export the best evaluation. Each chunk ends with an
evaluation, a checkpoint (weights, optimizer state, step; the input pipeline
is a pure function of seed and step, so that is the data position too), and,
when the evaluation is the best so far, best-STEP.weights.h5. The SavedModel
in model/ is exported from the best weights at the end.
"""

import math
import time

import keras
import numpy as np

from trainer import checkpoints, cli, config, data, distribute, export, files, models, report, rundir, schedules
from trainer.cli import UserError
from trainer.cluster import cluster_from_env
from trainer.tasks import TASKS, EvaluationSettings


def run(c, job_dir):
    """Trains, evaluates and exports; returns the best value of c.metric."""
    task = TASKS[c.task]
    cluster = cluster_from_env()
    scope, replicas = distribute.setup(c.backend, cluster)  # before any TensorFlow op: collectives configure at start-up
    for flag in ("train_batch_size", "eval_batch_size"):
        if getattr(c, flag) % replicas:
            raise UserError(f"--{flag}={getattr(c, flag)} must be a multiple of the {replicas} devices it is split over")
    out = rundir.open_run_dir(job_dir, cluster.is_chief, cluster.index)
    try:
        store = checkpoints.Checkpoints(out.checkpoints, out.own_checkpoints, c)
        state = store.load_state()  # a different run's job-dir is refused before any write
        start_step = state.get("step", 0)
        keras.utils.set_random_seed(c.seed)
        keras.mixed_precision.set_dtype_policy(c.precision)

        inputs = data.prepare_inputs(
            c.training_data_path, c.validation_data_path, c.num_classes, task, image_key=c.image_key,
            label_key=c.label_key, label_offset=c.label_offset, label_map_path=c.label_map_path,
            max_corrupt_fraction=c.max_corrupt_fraction, scan_cache_dir=c.scan_cache_dir, image_size=c.image_size,
            train_batch_size=c.train_batch_size, eval_batch_size=c.eval_batch_size,
            num_eval_images=c.num_eval_images, seed=c.seed,
            random_crop_min_area=c.random_crop_min_area or task.crop_min_area, random_flip=c.random_flip,
            augmentation=c.augmentation, randaugment_magnitude=c.randaugment_magnitude, mixup_alpha=c.mixup_alpha,
            cutmix_alpha=c.cutmix_alpha, random_erasing=c.random_erasing, class_balancing=c.class_balancing,
            max_batch_fraction=c.max_batch_fraction, replicas=replicas, start_step=start_step,
        )
        c = config.resolve(c, inputs.training_images, inputs.batch_size)
        if out.is_chief:
            files.write_json(out.file("config.json"), {**c.to_dict(), "job_dir": job_dir})
            files.write_atomic(out.file("labels.txt"), "".join(f"{name}\n" for name in inputs.class_names))

        with scope:
            imagenet = c.pretrained_checkpoint_path == "imagenet"
            model = models.build_model(c.model_type, c.num_classes, c.image_size, c.weight_decay, seed=c.seed,
                                       imagenet=imagenet, head=task.head)
            if c.pretrained_checkpoint_path and not imagenet:
                models.load_pretrained(model, c.pretrained_checkpoint_path, c.model_type, c.image_size)
            optimizer = models.make_optimizer(c.optimizer_type, schedules.from_config(c, steps_per_epoch=max(1, inputs.training_images // inputs.batch_size)), c.optimizer_arguments)
            models.compile_model(model, optimizer, task.loss(c.label_smoothing))
            if state:
                store.restore(model, state)
            distribute.prepare_fit(model, inputs.training.element_spec)
        if start_step:
            cli.say(f"resuming from the checkpoint at step {start_step}")

        settings = EvaluationSettings(c.multi_label_threshold, inputs.class_names if c.eval_each_category else None)
        reporter = Reporter(
            out, store, state, evaluate=lambda model: evaluate_model(model, inputs.evaluation, c.eval_batch_size,
                                                                     task, settings),
            metric=c.metric, summary={"task": c.task, **inputs.summary}, start_step=start_step,
            max_steps=c.max_steps, batch_size=c.train_batch_size, log_frequency=c.log_frequency,
        )
        if start_step < c.max_steps:
            model.fit(
                inputs.training,
                steps_per_epoch=c.eval_frequency,
                initial_epoch=start_step // c.eval_frequency,
                epochs=start_step // c.eval_frequency + math.ceil((c.max_steps - start_step) / c.eval_frequency),
                callbacks=[reporter],
                shuffle=False,  # the input pipeline shuffles, reproducibly
                verbose=0,
            )
    finally:
        rundir.close_run_dir(out)
    best = reporter.best
    if best is None:
        raise UserError("no evaluation ran; check --max_steps and --eval_frequency")
    if not out.is_chief:
        cli.say(f"worker {cluster.index} done; the chief exports")
        return best[c.metric]
    cli.say(f"exporting the best evaluation (step {best['step']}) to {out.model}")
    export.export_saved_model(store.best_path(reporter.best_weights), c.model_type, c.task, c.num_classes,
                              c.image_size, inputs.class_names, out.model, evaluation=best)
    cli.say(f"{c.metric}={best[c.metric]:.4f}")
    return best[c.metric]


def evaluate_model(model, dataset, batch_size, task, settings):
    """The task's exact metrics over the whole evaluation set, from the model's logits.

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
    return task.evaluate(np.concatenate(logits).astype(np.float64), np.concatenate(targets), settings)


class Reporter(keras.callbacks.Callback):
    """What a run reports while fit runs.

    Every log_frequency steps: a progress line and TensorBoard's training
    scalars. After every chunk (a Keras epoch of eval_frequency steps): an
    evaluation, then metrics.json, the hypertune line, TensorBoard, the
    checkpoint, and the best weights when it is the best so far. A worker that
    is not the chief writes into its scratch folder and reports nothing.
    """

    def __init__(self, out, store, state, *, evaluate, metric, summary, start_step, max_steps, batch_size,
                 log_frequency):
        """out: the RunDir; store: the Checkpoints; state: the resumed state ({} on a fresh run)."""
        super().__init__()
        self.out, self.store, self.evaluate, self.metric = out, store, evaluate, metric
        self.step, self.max_steps, self.batch_size, self.log_frequency = start_step, max_steps, batch_size, log_frequency
        files.makedirs(store.folder)
        self.tensorboard = report.TensorBoard(out.logs if out.is_chief else None)
        self.evaluations = state.get("evaluations", [])
        self.best, self.best_weights = state.get("best"), state.get("best_weights")
        self.summary = {**summary, "run": store.fingerprint}
        self._write_metrics()
        self.started, self.steps_timed = None, 0

    def on_epoch_begin(self, epoch, logs=None):
        # Restart the clock after each evaluation so img/s counts training only.
        self.started, self.steps_timed = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        # Batches trained, counted here rather than read from optimizer.iterations,
        # which a loss-scaling optimizer does not advance on skipped steps.
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
        cli.say(report.progress_line(self.step, self.max_steps, loss, lr, images_per_second, eta))
        self.tensorboard.scalars("train", self.step, {"loss": loss, "learning_rate": lr,
                                                      "images_per_second": images_per_second})

    def on_epoch_end(self, epoch, logs=None):
        step = self.step
        result = {"step": step, **self.evaluate(self.model)}
        self.evaluations.append(result)
        if self.best is None or result[self.metric] > self.best[self.metric]:
            self.best, self.best_weights = result, self.store.save_best(self.model, step)
        self.store.save(self.model, step, {"evaluations": self.evaluations, "best": self.best,
                                           "best_weights": self.best_weights})
        self._write_metrics()
        if not self.out.is_chief:
            return
        report.append_hypertune(self.out.hypertune_file, self.metric, result[self.metric], step)
        scalars = {k: v for k, v in result.items() if isinstance(v, float)}
        for name, figures in result.get("per_category", {}).items():
            scalars.update({f"per_category/{name}/{k}": v for k, v in figures.items() if v is not None})
        self.tensorboard.scalars("validation", step, scalars)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        cli.say(f"eval at step {step}: {shown}  (best {self.metric} {self.best[self.metric]:.4f} "
                f"at step {self.best['step']})")

    def _write_metrics(self):
        files.write_json(self.out.file("metrics.json"),
                         {"metric": self.metric, "evaluations": self.evaluations, "best": self.best, **self.summary})
