"""Benchmark of the study driver on the bundled digits sample: pruning vs no
pruning and TPE vs random search, each arm given the same compute budget;
and, with --sample, the sample study itself.

    python -m trainer.sample_data data/digits
    python bench/hptuning_bench.py --budget_minutes=12 --out=runs/hptuning-bench
    python bench/hptuning_bench.py --sample --out=runs/hptuning-bench

The budget is trainer wall time: the sum of every trial's duration (startup,
training, evaluation, export), so pruning is credited only for what it really
saves. Each arm runs sample_configs/hptuning/digits.yaml with its sampler,
early stopping and trainer flags replaced (ARMS below), one trial at a time,
until its trials have used the budget. Cost: 4 x budget_minutes. Records the
table (bench/results/hptuning-arms.json: trials completed and pruned, best
top-1, mean seconds per trial by how far it ran) and writes every arm's
details, best parameters included, to results.json under --out.

--sample runs `python -m hptuning.study` on sample_configs/hptuning/digits.yaml
as it is and records its trials by how far each ran, trial 0
(the quickstart's own configuration) and the best (bench/results/hptuning-sample.json).
Every study starts in a fresh job-dir under --out: a kept one would resume.
"""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import results  # noqa: E402  (found through the path above)

# Trials run the quickstart at its full length (1,000 steps), so the fixed
# cost of a trial (process start, TensorFlow import, data scan, first trace,
# export: about 16 s) is a small share of a completed one. Successive halving
# judges every trial at 50 steps, keeps the best third for 150, the best third
# of those for 450, and lets the rest run to 1,000; it needs an evaluation at
# each of those steps. Arms without early stopping evaluate at the quickstart's
# own frequency, since they gain nothing from more evaluations.
TPE = {"type": "tpe", "seed": 0, "n_startup_trials": 4}
RANDOM = {"type": "random", "seed": 0}
HALVING = {"type": "successive_halving", "min_resource": 50, "reduction_factor": 3}
PRUNED_FLAGS = {"max_steps": "1000", "eval_frequency": "50", "log_frequency": "50"}
FULL_FLAGS = {"max_steps": "1000", "eval_frequency": "250", "log_frequency": "250"}
ARMS = {
    "tpe+halving": (TPE, HALVING, PRUNED_FLAGS),
    "tpe": (TPE, {"type": "none"}, FULL_FLAGS),
    "random+halving": (RANDOM, HALVING, PRUNED_FLAGS),
    "random": (RANDOM, {"type": "none"}, FULL_FLAGS),
}


class Budget:
    """Stops a study once its finished trials have used `seconds` of trainer time."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, study, trial):
        from hptuning import outputs

        if sum(outputs.duration(t) or 0 for t in study.get_trials(deepcopy=False)) >= self.seconds:
            study.stop()


def run_arm(name, spec, out, budget_seconds):
    from hptuning import driver, outputs, storage

    sampler, pruner, trainer_flags = ARMS[name]
    flags = dict(spec.trainer_flags, **trainer_flags)
    spec = dataclasses.replace(spec, sampler=sampler, early_stopping=pruner, max_trial_count=1000,
                               parallel_trial_count=1, trainer_flags=tuple(flags.items()))
    job_dir = os.path.join(out, name)
    shutil.rmtree(job_dir, ignore_errors=True)
    started = time.time()
    driver.quiet_optuna()
    driver.run_study(spec, job_dir, storage.default_url(job_dir), name, callbacks=[Budget(budget_seconds)])
    trials = read_study(job_dir, name)
    best = outputs.best_trial(trials, spec)
    return {
        "arm": name,
        "completed": outputs.count(trials, outputs.TrialState.COMPLETE),
        "pruned": outputs.count(trials, outputs.TrialState.PRUNED),
        "failed": outputs.count(trials, outputs.TrialState.FAIL),
        "best_top_1": None if best is None else round(best.value, 4),
        "best_params": None if best is None else best.params,
        "trainer_minutes": round(sum(outputs.duration(t) or 0 for t in trials) / 60, 1),
        "trials_per_trainer_minute": round(len(trials) / (sum(outputs.duration(t) or 0 for t in trials) / 60), 3),
        "pruned_at_steps": sorted(t.user_attrs.get("last_step") for t in trials if t.state == outputs.TrialState.PRUNED),
        "mean_seconds": mean_seconds(trials),
        "wall_minutes": round((time.time() - started) / 60, 1),
    }


def read_study(job_dir, name=None):
    """The trials of the study in job_dir (name None: its only study)."""
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{os.path.join(job_dir, 'study.db')}")
    return study.get_trials(deepcopy=False)


def by_outcome(trials):
    """{"completed" or "pruned at step N": the trials that ended so}, completed first, then by step."""
    from hptuning import outputs

    groups = {"completed": [t for t in trials if t.state == outputs.TrialState.COMPLETE]}
    for step in sorted({t.user_attrs.get("last_step") for t in trials if t.state == outputs.TrialState.PRUNED}):
        groups[f"pruned at step {step}"] = [t for t in trials if t.state == outputs.TrialState.PRUNED
                                            and t.user_attrs.get("last_step") == step]
    return groups


def mean_seconds(trials):
    """One line: each outcome's mean seconds per trial, e.g. "completed 164; pruned at step 50 20"."""
    from hptuning import outputs

    return "; ".join(f"{outcome} {sum(outputs.duration(t) for t in group) / len(group):.0f}"
                     for outcome, group in by_outcome(trials).items() if group)


def seconds_span(trials):
    """A group's trial seconds as "min-max" (or the one value)."""
    from hptuning import outputs

    seconds = sorted(round(outputs.duration(t)) for t in trials)
    return f"{seconds[0]}-{seconds[-1]}" if seconds[0] != seconds[-1] else str(seconds[0])


def params_text(params):
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def run_sample(study_config, out):
    """The sample study as a user runs it; records its table."""
    from hptuning import outputs, spec as spec_lib

    job_dir = os.path.join(out, "sample")
    shutil.rmtree(job_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "hptuning.study", f"--study_config={study_config}", f"--job-dir={job_dir}"]
    started = time.perf_counter()
    if subprocess.run(argv, cwd=ROOT).returncode:
        sys.exit(f"the study failed: {' '.join(argv)}")
    wall = time.perf_counter() - started
    trials = read_study(job_dir)
    best, first = outputs.best_trial(trials, spec_lib.load(study_config)), trials[0]
    rows = [(outcome, len(group), seconds_span(group), None) for outcome, group in by_outcome(trials).items() if group]
    rows += [(f"best: trial {best.number} ({params_text(best.params)})", 1, seconds_span([best]), round(best.value, 4)),
             (f"trial 0, the quickstart's configuration ({params_text(first.params)})", 1, seconds_span([first]),
              None if first.value is None else round(first.value, 4)),
             ("the whole study, wall time", len(trials), round(wall), round(best.value, 4))]
    results.record("hptuning-sample", ("trials", "count", "seconds", "best top-1"), rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_minutes", type=float, default=12.0, help="trainer minutes per arm")
    parser.add_argument("--out", default="runs/hptuning-bench", help="one job-dir per arm under it")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--study_config", default=os.path.join(ROOT, "sample_configs", "hptuning", "digits.yaml"))
    parser.add_argument("--sample", action="store_true", help="run the sample study as it is instead of the arms")
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: {', '.join(unknown)} unknown; valid: {', '.join(ARMS)}")
    out = os.path.abspath(args.out)
    os.chdir(ROOT)  # the study config names its flag file relative to the repository
    if args.sample:
        run_sample(args.study_config, out)
        return
    from hptuning import spec as spec_lib

    spec = spec_lib.load(args.study_config)
    rows = [run_arm(name, spec, out, args.budget_minutes * 60) for name in arms]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    results.record("hptuning-arms", ("arm", "trials completed", "trials pruned", "trials in all", "best top-1",
                                     "trainer minutes", "trials per trainer-minute", "mean seconds per trial"),
                   [(r["arm"], r["completed"], r["pruned"], r["completed"] + r["pruned"] + r["failed"], r["best_top_1"],
                     r["trainer_minutes"], r["trials_per_trainer_minute"], r["mean_seconds"]) for r in rows])


if __name__ == "__main__":
    main()
