"""Benchmark of the study driver on the bundled digits sample: pruning vs no
pruning and TPE vs random search, each arm given the same compute budget.

    python -m trainer.sample_data data/digits
    python bench/hptuning_bench.py --budget_minutes=12 --out=runs/hptuning-bench

The budget is trainer wall time: the sum of every trial's duration (startup,
training, evaluation, export), so pruning is credited only for what it really
saves. Each arm runs sample_configs/hptuning/digits.yaml with its sampler,
early stopping and trainer flags replaced (ARMS below), one trial at a time,
until its trials have used the budget. Cost: 4 x budget_minutes. Prints a Markdown table (best top-1, trials
completed and pruned) for docs/BENCHMARKS.md and writes it as JSON under --out.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
        "wall_minutes": round((time.time() - started) / 60, 1),
    }


def read_study(job_dir, name):
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{os.path.join(job_dir, 'study.db')}")
    return study.get_trials(deepcopy=False)


def table(rows):
    lines = ["| arm | trials completed | trials pruned | best top-1 | trainer minutes | trials per trainer-minute |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['completed']} | {r['pruned']} | {r['best_top_1']} | {r['trainer_minutes']} "
                     f"| {r['trials_per_trainer_minute']} |")
    rates = {r["arm"]: r["trials_per_trainer_minute"] for r in rows}
    for arm, rate in rates.items():
        if arm.endswith("+halving") and arm.split("+")[0] in rates:
            lines.append(f"\n{arm} vs {arm.split('+')[0]}: {rate / rates[arm.split('+')[0]]:.2f}x the trials per budget")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget_minutes", type=float, default=12.0, help="trainer minutes per arm")
    parser.add_argument("--out", default="runs/hptuning-bench", help="one job-dir per arm under it")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--study_config", default=os.path.join(ROOT, "sample_configs", "hptuning", "digits.yaml"))
    args = parser.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: {', '.join(unknown)} unknown; valid: {', '.join(ARMS)}")
    os.chdir(ROOT)  # the study config names its flag file relative to the repository
    from hptuning import spec as spec_lib

    spec = spec_lib.load(args.study_config)
    rows = [run_arm(name, spec, os.path.abspath(args.out), args.budget_minutes * 60) for name in arms]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table(rows))


if __name__ == "__main__":
    main()
