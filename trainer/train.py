"""run(config, job_dir): the whole training story, from paths to SavedModel.

Prepare the inputs, resolve what depends on the data (epochs, the batch),
build the model, fit with one Reporter, export the best evaluation and write
the run report. Every eval_frequency steps (multiples of it, whatever step a
run resumed at) the Reporter evaluates, then checkpoints (weights, optimizer
state, step; the input pipeline is a pure function of seed and step, so that
is the data position too) and keeps best-STEP.weights.h5 when the evaluation
is the best so far. Stopping decides when a run ends early (time budget,
early stopping); a signal or a NaN loss ends it cleanly (stop_on_signals,
RunStopped). The SavedModel in model/ is exported from the best weights.
"""

import contextlib
import functools
import math
import signal
import threading
import time

import keras
import numpy as np

from trainer import checkpoints, cli, data, distribute, export, files, models, report, run_report, rundir, schedules
from trainer import config as config_lib
from trainer.cli import UserError
from trainer.cluster import cluster_from_env
from trainer.tasks import TASKS, EvaluationSettings


def run(c, job_dir):
    """Trains, evaluates and exports; returns the best value of c.metric."""
    task = TASKS[c.task]
    cluster = cluster_from_env()
    # Before any TensorFlow op: collectives configure at start-up.
    scope, replicas = distribute.setup(c.backend, cluster, c.classifier_parallelism, c.num_classes, c.tpu)
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
            max_corrupt_fraction=c.max_corrupt_fraction, max_image_pixels=c.max_image_pixels, tfds_data_dir=c.tfds_data_dir,
            scan_cache_dir=c.scan_cache_dir, image_size=c.image_size,
            train_batch_size=c.train_batch_size, eval_batch_size=c.eval_batch_size,
            num_eval_images=c.num_eval_images, seed=c.seed,
            random_crop_min_area=c.random_crop_min_area or task.crop_min_area, random_flip=c.random_flip,
            augmentation=c.augmentation, randaugment_magnitude=c.randaugment_magnitude, mixup_alpha=c.mixup_alpha,
            cutmix_alpha=c.cutmix_alpha, random_erasing=c.random_erasing, class_balancing=c.class_balancing,
            max_batch_fraction=c.max_batch_fraction, replicas=replicas, start_step=start_step,
            worker=cluster.index, workers=cluster.size,
        )
        c = config_lib.resolve(c, inputs.training_images, inputs.batch_size)
        if out.is_chief:
            files.write_json(out.file("config.json"), {**c.to_dict(), "job_dir": job_dir})
            files.write_atomic(out.file("labels.txt"), "".join(f"{name}\n" for name in inputs.class_names))

        with scope:
            imagenet = c.pretrained_checkpoint_path == "imagenet"
            adamw = c.optimizer_type == "adamw"  # AdamW decays the weights itself: no L2 term in the loss
            model = models.build_model(c.model_type, c.num_classes, c.image_size, 0.0 if adamw else c.weight_decay,
                                       seed=c.seed, imagenet=imagenet,
                                       head=functools.partial(task.head, **task.head_options(c)))
            evaluated = task.evaluated_model(model)  # what evaluations score: the logits, or the embedding
            if c.pretrained_checkpoint_path and not imagenet:
                models.load_pretrained(model, c.pretrained_checkpoint_path, c.model_type, c.image_size)
            if c.sync_batch_norm:
                models.set_synchronized_batch_norm(model)
            schedule = schedules.from_config(c, steps_per_epoch=max(1, inputs.training_images // inputs.batch_size))
            optimizer = models.make_optimizer(
                c.optimizer_type, schedule, c.optimizer_arguments, ema_decay=c.ema_decay,
                frozen=model.get_layer("backbone").trainable_variables, frozen_steps=c.freeze_backbone_steps,
                weight_decay=c.weight_decay if adamw else 0.0, not_decayed=models.not_decayed(model))
            loss = task.loss(c)
            models.compile_model(model, optimizer, models.HardestFraction(loss, c.ohem_top_ratio)
                                 if c.ohem_top_ratio < 1 else loss)
            if state:
                store.restore(model, state)
            distribute.prepare_fit(model, inputs.training.element_spec)
            training = distribute.training_input(inputs.training, inputs.batch_size)
        if start_step:
            cli.say(f"resuming from the checkpoint at step {start_step}")
        if start_step < c.freeze_backbone_steps:
            cli.say(f"training the head only until step {c.freeze_backbone_steps} (--freeze_backbone_steps)")

        settings = EvaluationSettings(c.multi_label_threshold, inputs.class_names if c.eval_each_category else None)
        reporter = Reporter(
            out, store, state, evaluate=lambda _model: evaluate_model(evaluated, inputs.evaluation, c.eval_batch_size,
                                                                     task, settings),
            metric=c.metric, summary={"task": c.task, **inputs.summary}, start_step=start_step,
            max_steps=c.max_steps, batch_size=c.train_batch_size, log_frequency=c.log_frequency,
            eval_frequency=c.eval_frequency,
            stopping=Stopping(config_lib.duration_seconds(c.max_training_time) if c.max_training_time else None,
                              c.early_stopping_patience, c.early_stopping_min_delta, c.freeze_backbone_steps),
        )
        reason = reporter.stopping.reason(reporter.evaluations, reporter.seconds(), c.metric) if start_step else None
        if reason:
            cli.say(f"{reason}; nothing left to train")
        elif start_step < c.max_steps:
            model.fit(
                training,
                steps_per_epoch=c.max_steps - start_step,  # the Reporter evaluates every eval_frequency steps
                callbacks=[reporter],
                shuffle=False,  # the input pipeline shuffles, reproducibly
                verbose=0,
            )
        if reporter.signalled:
            name = signal.Signals(reporter.signalled).name
            raise cli.RunStopped(f"stopped by {name} at step {reporter.step}, after saving a checkpoint there; rerun the "
                                 f"same command to resume from step {reporter.step}", 128 + reporter.signalled)
        best = reporter.best
        if best is None:
            raise UserError("no evaluation ran; check --max_steps and --eval_frequency")
        if not out.is_chief:
            cli.say(f"worker {cluster.index} done; the chief exports")
            return best[c.metric]
        cli.say(f"exporting the best evaluation (step {best['step']}) to {out.model}")
        exported = export.export_saved_model(
            store.best_path(reporter.best_weights), c.model_type, c.task, c.num_classes, c.image_size,
            inputs.class_names, out.model, evaluation=best, head_options=task.head_options(c),
            metadata=task.export_metadata(c))
        cli.say(exported.line())
        if reporter.best_outputs is None:  # the best evaluation was a resumed run's predecessor's
            model.load_weights(store.best_path(reporter.best_weights))
            _, logits, targets = evaluate_model(evaluated, inputs.evaluation, c.eval_batch_size, task, settings)
        else:
            logits, targets = reporter.best_outputs
        run_report.write(out.file("report"), config={**c.to_dict(), "job_dir": job_dir}, evaluations=reporter.evaluations,
                         training_log=reporter.training_log, best=best, metric=c.metric, task_name=c.task,
                         class_names=inputs.class_names,
                         validation=(evaluation_images(inputs.evaluation), targets, task.probabilities(logits).numpy()))
        cli.say(f"run report: {out.file('report')}/report.html")
        cli.say(f"{c.metric}={best[c.metric]:.4f}")
        return best[c.metric]
    finally:
        rundir.close_run_dir(out)  # the job-dir's lock: held until the export and the report are written


# Signals that end a run cleanly, and what the handler has seen while fit runs.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_training = threading.Event()
_requested = []


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM (what every platform sends before preempting, and the study driver before stopping a trial)
    and SIGINT end a run cleanly: while fit runs, the step in flight finishes, a checkpoint is written
    and run() raises RunStopped with status 128 + the signal; before or after fit, the signal raises
    RunStopped at once (nothing is lost: every write is atomic). Installing a handler is also what makes
    SIGTERM reach the trainer as a container's PID 1, which the kernel otherwise shields from it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if _training.is_set():
            _requested.append(signum)  # the Reporter stops after the step in flight
            return
        raise cli.RunStopped(f"stopped by {signal.Signals(signum).name} before training (or while exporting); "
                             f"what is committed in the job-dir is intact: rerun the same command", 128 + signum)

    previous = {number: signal.signal(number, handle) for number in _STOP_SIGNALS}
    _requested.clear()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def evaluate_model(model, dataset, batch_size, task, settings):
    """The task's exact metrics over the whole evaluation set, from the model's logits;
    returns (metrics, logits [N, C] float64, targets [N, C]).

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
    return task.evaluate(logits, targets, settings), logits, targets


REPORT_IMAGES_BYTES = 512 << 20  # the run report shows the worst validation images when all of them fit in this


def evaluation_images(dataset):
    """Every evaluation image (uint8 [N, S, S, 3]), or None when they would take more than REPORT_IMAGES_BYTES."""
    batches, size = [], 0
    for images, _ in dataset.as_numpy_iterator():
        size += images.nbytes
        if size > REPORT_IMAGES_BYTES:
            return None
        batches.append(images)
    return np.concatenate(batches)


DIVERGED_STATUS = 3  # exit status of a run stopped by a NaN or infinite loss


class Stopping:
    """When a run ends before max_steps: its time budget is spent, or its tuned metric stopped improving.

    Both are computed from what a checkpoint keeps (the evaluations, the seconds
    trained), so a resumed run decides as the uninterrupted one would have.
    """

    def __init__(self, budget_seconds, patience, min_delta, frozen_steps=0):
        self.budget_seconds, self.patience, self.min_delta = budget_seconds, patience, min_delta
        self.frozen_steps = frozen_steps

    def out_of_time(self, seconds):
        return self.budget_seconds is not None and seconds >= self.budget_seconds

    def reason(self, evaluations, seconds, metric):
        """Why the run should stop now, or None."""
        if self.out_of_time(seconds):
            return f"the time budget (--max_training_time, {report.format_duration(self.budget_seconds)}) is spent"
        stale = evaluations_without_improvement(evaluations, metric, self.min_delta)
        if self.patience and stale >= self.patience:
            return (f"{metric} has not improved by more than {self.min_delta:g} for {stale} evaluations "
                    f"(--early_stopping_patience)")
        return None


def evaluations_without_improvement(evaluations, metric, min_delta):
    """How many evaluations since the last one that beat every earlier one by more than min_delta."""
    reference, stale = None, 0
    for evaluation in evaluations:
        if reference is None or evaluation[metric] > reference + min_delta:
            reference, stale = evaluation[metric], 0
        else:
            stale += 1
    return stale


class Reporter(keras.callbacks.Callback):
    """What a run reports and decides while fit runs (one Keras epoch of max_steps - start_step steps).

    Every log_frequency steps: a progress line and TensorBoard's training
    scalars. Every eval_frequency steps, at the last step and when Stopping says
    so: an evaluation (with the averaged weights when the optimizer keeps an
    average), then metrics.json, the hypertune line, TensorBoard, the
    checkpoint, and the best weights when it is the best so far. Evaluations
    fall on multiples of eval_frequency whatever step a run resumed at. A
    worker that is not the chief writes into its scratch folder and reports nothing.
    """

    def __init__(self, out, store, state, *, evaluate, metric, summary, start_step, max_steps, batch_size,
                 log_frequency, eval_frequency, stopping):
        """out: the RunDir; store: the Checkpoints; state: the resumed state ({} on a fresh run)."""
        super().__init__()
        self.out, self.store, self.evaluate, self.metric, self.stopping = out, store, evaluate, metric, stopping
        self.step, self.max_steps, self.batch_size = start_step, max_steps, batch_size
        self.log_frequency, self.eval_frequency = log_frequency, eval_frequency
        files.makedirs(store.folder)
        self.tensorboard = report.TensorBoard(out.logs if out.is_chief else None)
        self.evaluations = state.get("evaluations", [])
        self.training_log = state.get("training_log", [])  # {step, loss, data_loss, learning_rate} per progress line
        self.best, self.best_weights = state.get("best"), state.get("best_weights")
        self.best_outputs = None  # (logits, targets) of the best evaluation, when this process made it
        self.summary = {**summary, "run": store.fingerprint}
        self._write_metrics()
        self.signalled = None  # the signal that stopped the run
        self.checked_step = self.committed_step = start_step  # the last step with a finite loss; the last checkpoint
        self.seconds_before = state.get("seconds", 0.0)  # trained by earlier runs of this job-dir, up to their checkpoint
        self.run_started = time.monotonic()
        self.started, self.steps_timed = time.perf_counter(), 0

    def seconds(self):
        """Seconds of training so far, earlier runs of the job-dir included."""
        return self.seconds_before + time.monotonic() - self.run_started

    def on_train_begin(self, logs=None):
        _training.set()

    def on_train_end(self, logs=None):
        _training.clear()

    def on_train_batch_end(self, batch, logs=None):
        # Batches trained, counted here rather than read from optimizer.iterations,
        # which a loss-scaling optimizer does not advance on skipped steps.
        self.step += 1
        self.steps_timed += 1
        if self.step == self.stopping.frozen_steps:
            cli.say(f"training every layer from step {self.step} on")
        last = self.step >= self.max_steps
        out_of_time = self.stopping.out_of_time(self.seconds())
        signalled = _requested[0] if _requested else None
        due_line = self.step % self.log_frequency == 0 or last or out_of_time or signalled
        due_evaluation = self.step % self.eval_frequency == 0 or last or out_of_time
        if not (due_line or due_evaluation):
            return
        if hasattr(self.model, "jax_state_sync"):
            # JAX's fit carries the variables' values apart from the variables: bring them back to
            # read them, and fit takes what is assigned here (metrics reset, weights restored) onwards.
            self.model.jax_state_sync()
        loss = float(logs["loss"])  # the mean since the last line; float() waits for the step: only when due
        self._check_finite(loss)
        if due_line:
            self._progress(loss, float(logs.get("data_loss", loss)))
        if signalled and not due_evaluation:
            self._save_checkpoint()
        elif due_evaluation:
            self._evaluate_and_checkpoint()
        reason = None if signalled else self.stopping.reason(self.evaluations, self.seconds(), self.metric)
        if reason and not last:
            cli.say(f"stopping at step {self.step}: {reason}")
        if reason or last or signalled:
            self.model.stop_training = True
            self.signalled = signalled
        # Restart the clock after each evaluation so img/s counts training only.
        self.started, self.steps_timed = time.perf_counter(), 0

    def _check_finite(self, loss):
        if not math.isfinite(loss):
            raise cli.RunStopped(
                f"the training loss became {loss} between step {self.checked_step} and step {self.step}; nothing "
                f"after step {self.committed_step} was saved. Lower --initial_learning_rate or --weight_decay, or clip "
                f"the gradients (--optimizer_arguments=clipnorm=1), then rerun to resume from the checkpoint at step "
                f"{self.committed_step}" if self.committed_step else
                f"the training loss became {loss} by step {self.step}, before any checkpoint. Lower "
                f"--initial_learning_rate or --weight_decay, or clip the gradients (--optimizer_arguments=clipnorm=1)",
                DIVERGED_STATUS)
        self.checked_step = self.step

    def _progress(self, loss, data_loss):
        """The progress line: mean losses since the last line, the data's part and weight decay shown apart."""
        elapsed = time.perf_counter() - self.started
        images_per_second = self.steps_timed * self.batch_size / max(elapsed, 1e-9)
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        eta = (self.max_steps - self.step) * self.batch_size / max(images_per_second, 1e-9)
        cli.say(report.progress_line(self.step, self.max_steps, data_loss, loss - data_loss, lr, images_per_second, eta))
        self.training_log.append({"step": self.step, "loss": loss, "data_loss": data_loss, "learning_rate": lr})
        self.tensorboard.scalars("train", self.step, {"loss": loss, "data_loss": data_loss, "learning_rate": lr,
                                                      "images_per_second": images_per_second})
        self.model.reset_metrics()  # the next line's losses are means over its own steps

    def _save_checkpoint(self):
        self.store.save(self.model, self.step, {"evaluations": self.evaluations, "best": self.best,
                                                "best_weights": self.best_weights, "seconds": self.seconds(),
                                                "training_log": self.training_log})
        self.committed_step = self.step

    def _evaluate_and_checkpoint(self):
        step = self.step
        with models.averaged_weights(self.model):
            figures, logits, targets = self.evaluate(self.model)
            result = {"step": step, **figures}
            unusable = [k for k, v in result.items() if isinstance(v, float) and not math.isfinite(v)]
            if unusable:
                raise cli.RunStopped(f"the evaluation at step {step} gave {result[unusable[0]]} for {unusable[0]}: the "
                                     f"weights have diverged; nothing after step {self.committed_step} was saved. Lower "
                                     f"--initial_learning_rate or --weight_decay", DIVERGED_STATUS)
            self.evaluations.append(result)
            if self.best is None or result[self.metric] > self.best[self.metric]:
                self.best, self.best_weights = result, self.store.save_best(self.model, step)
                self.best_outputs = (logits, targets)
        self._save_checkpoint()
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
