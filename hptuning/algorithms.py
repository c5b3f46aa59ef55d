"""Optuna samplers (which configuration to try next) and pruners (early
stopping: which running trial to stop), built from the study config's
`sampler` and `early_stopping` settings.

Pruner settings are counted in trainer steps, because the driver reports each
evaluation at the trainer's global_step.
"""

import optuna

from hptuning import params as params_lib
from trainer.cli import UserError

SAMPLER_SETTINGS = {
    "tpe": ("seed", "n_startup_trials", "multivariate", "group", "constant_liar", "n_ei_candidates"),
    "random": ("seed",),
    "grid": ("seed",),
    "cmaes": ("seed", "n_startup_trials", "sigma0", "restart_strategy", "warn_independent_sampling"),
    "gp": ("seed", "n_startup_trials", "deterministic_objective"),
}
PRUNER_SETTINGS = {
    "none": (),
    "median": ("n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"),
    "hyperband": ("min_resource", "max_resource", "reduction_factor", "bootstrap_count"),
    "successive_halving": ("min_resource", "reduction_factor", "min_early_stopping_rate", "bootstrap_count"),
}
# Which package each optional sampler needs, for the error that says so.
SAMPLER_NEEDS = {"cmaes": "cmaes", "gp": "torch"}


def _kwargs(key, settings, allowed):
    kwargs = {k: v for k, v in settings.items() if k != "type"}
    for name in kwargs:
        if name not in allowed[settings["type"]]:
            valid = ", ".join(allowed[settings["type"]]) or "none"
            raise UserError(f"{key}.{name}: not a setting of {settings['type']}; valid: {valid}")
    return kwargs


def make_sampler(settings, parameters):
    kind = settings["type"]
    kwargs = _kwargs("sampler", settings, SAMPLER_SETTINGS)
    if kind in SAMPLER_NEEDS:
        try:
            __import__(SAMPLER_NEEDS[kind])
        except ImportError:
            raise UserError(f"sampler: {kind} needs the {SAMPLER_NEEDS[kind]} package "
                            f"(pip install {SAMPLER_NEEDS[kind]}); or use tpe") from None
    build = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "grid": lambda **kw: optuna.samplers.GridSampler(params_lib.grid(parameters), **kw),
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": lambda **kw: optuna.samplers.GPSampler(**kw),
    }[kind]
    try:
        return build(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"sampler: {kind}: {e}") from None


def make_pruner(settings):
    kind = settings["type"]
    kwargs = _kwargs("early_stopping", settings, PRUNER_SETTINGS)
    build = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }[kind]
    try:
        return build(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"early_stopping: {kind}: {e}") from None
