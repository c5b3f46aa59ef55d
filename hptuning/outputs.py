"""What a study leaves in its job-dir: trials.csv, best.json, plots/ (Plotly
HTML: optimisation history, parameter importances, intermediate values),
report.html (the trials, links to the plots, and the best trial's own run
report shown in the page), and the one-screen summary printed at the end. All of it is rebuilt from the
storage, so every worker of a distributed study writes the whole picture;
each file is written atomically (a reader sees the old one or the new one).
"""

import csv
import html
import io
import os
import warnings

from optuna.trial import TrialState

from hptuning import params as params_lib
from hptuning.runner import USER_ERROR
from trainer.files import write_atomic, write_json

PLOTS = ("optimization_history", "param_importances", "intermediate_values")
TOP = 5  # trials listed in the summary


def duration(trial):
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def count(trials, *states):
    return sum(t.state in states for t in trials)


def retried_numbers(trials):
    """Failed trials that some later trial runs again (RetryFailedTrialCallback)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", ())}


def runs_again(trial):
    """An interrupted trial, or one that stopped the study with a user error, is queued again when
    the study resumes, up to storage.MAX_RETRIES times; after that it counts as failed."""
    from hptuning.storage import MAX_RETRIES

    stopped = trial.user_attrs.get("interrupted") or trial.user_attrs.get(USER_ERROR)
    return bool(stopped) and len(trial.system_attrs.get("retry_history", ())) < MAX_RETRIES


def unretried_failures(trials):
    """Failed trials that count against max_failed_trial_count (not the ones that run again)."""
    retried = retried_numbers(trials)
    return [t for t in trials if t.state == TrialState.FAIL and t.number not in retried and not runs_again(t)]


def write_csv(path, trials, spec):
    names = [p.name for p in params_lib.walk(spec.parameters)]
    names = list(dict.fromkeys(names))
    header = ["number", "state", "value", "duration_s", "last_step", *names, "job_dir", "worker", "retry_of", "failure"]
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    for t in trials:
        seconds = duration(t)
        writer.writerow([
            t.number, t.state.name, "" if t.value is None else t.value,
            "" if seconds is None else round(seconds, 1), _attr(t, "last_step"),
            *[t.params.get(name, "") for name in names], _attr(t, "job_dir"), _attr(t, "worker"),
            (t.system_attrs.get("retry_history") or [""])[-1], _attr(t, "failure"),
        ])
    write_atomic(path, text.getvalue())


def _attr(trial, key):
    value = trial.user_attrs.get(key)
    return "" if value is None else value


def best_trial(trials, spec):
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return None
    pick = max if spec.goal == "maximize" else min
    return pick(complete, key=lambda t: t.value)


def write_best(path, study, trials, spec, storage_shown):
    best = best_trial(trials, spec)
    summary = {
        "study_name": study.study_name,
        "storage": storage_shown,
        "metric": spec.metric,
        "goal": spec.goal,
        "trials": {"complete": count(trials, TrialState.COMPLETE), "pruned": count(trials, TrialState.PRUNED),
                   "failed": count(trials, TrialState.FAIL), "running": count(trials, TrialState.RUNNING)},
    }
    if best is not None:
        job_dir = _attr(best, "job_dir")
        summary.update(best_trial=best.number, value=best.value, params=best.params, job_dir=job_dir,
                       worker=_attr(best, "worker"), model_path=os.path.join(job_dir, "model") if job_dir else "")
    write_json(path, summary)
    return best


def write_plots(plots_dir, study):
    """Plotly HTML, sharing one plotly.min.js beside them (works offline)."""
    try:
        import optuna.visualization as vis
        import plotly  # noqa: F401
    except ImportError:
        return ["plots skipped: pip install plotly"]
    os.makedirs(plots_dir, exist_ok=True)
    notes = []
    for name in PLOTS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                figure = getattr(vis, f"plot_{name}")(study)
            figure.write_html(os.path.join(plots_dir, f"{name}.html"), include_plotlyjs="directory")
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            # e.g. importances need two completed trials with different values
            notes.append(f"plot {name} skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return notes


def summary(study, trials, spec, best, job_dir, storage_shown, notes):
    """The one screen printed when the driver ends."""
    retried = len(retried_numbers(trials))
    compute = sum(duration(t) or 0 for t in trials)
    lines = [
        "",
        f"study {study.study_name!r} ({storage_shown})",
        (f"  trials: {count(trials, TrialState.COMPLETE)} complete, {count(trials, TrialState.PRUNED)} pruned, "
         f"{count(trials, TrialState.FAIL)} failed ({retried} of them retried), "
         f"{count(trials, TrialState.RUNNING)} running elsewhere; trainer time {compute / 60:.1f} min"),
    ]
    if best is None:
        lines.append(f"  no trial has completed; see {job_dir}/trial-*/trainer.log")
    else:
        lines.append(f"  best: trial {best.number}, {spec.metric}={best.value:.4f}")
        lines += [f"    {name} = {value}" for name, value in best.params.items()]
        lines.append(f"  model: {os.path.join(_attr(best, 'job_dir'), 'model')}")
        ranked = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value,
                        reverse=spec.goal == "maximize")[:TOP]
        lines.append(f"  top {len(ranked)}:")
        for t in ranked:
            params = "  ".join(f"{k}={_short(v)}" for k, v in t.params.items())
            lines.append(f"    #{t.number:<4} {t.value:.4f}  {params}")
    lines.append(f"  report: {os.path.join(job_dir, 'report.html')}")
    plots = [name for name in PLOTS if os.path.exists(os.path.join(job_dir, "plots", f"{name}.html"))]
    if plots:
        lines.append(f"  plots: {', '.join(os.path.join(job_dir, 'plots', f'{name}.html') for name in plots)}")
    lines.append(f"  outputs: {job_dir}/trials.csv, best.json")
    lines += [f"  note: {note}" for note in notes]
    return "\n".join(lines)


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_all(study, spec, job_dir, storage_shown):
    """Writes every output and returns the summary text."""
    trials = study.get_trials(deepcopy=False)
    write_csv(os.path.join(job_dir, "trials.csv"), trials, spec)
    best = write_best(os.path.join(job_dir, "best.json"), study, trials, spec, storage_shown)
    # Optuna's plots of a study with nothing complete are empty, and it warns about each.
    complete = count(trials, TrialState.COMPLETE)
    notes = write_plots(os.path.join(job_dir, "plots"), study) if complete else []
    write_atomic(os.path.join(job_dir, "report.html"), report_page(study, trials, spec, best, job_dir))
    return summary(study, trials, spec, best, job_dir, storage_shown, notes)


def report_page(study, trials, spec, best, job_dir):
    """The study's page: counts, the best trial's parameters and its own run report (report/ in its
    job-dir, shown in a frame when this machine has it), links to the plots, and every trial."""
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(study.study_name)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}iframe{width:100%;height:80vh;"
             "border:1px solid #ccc}</style>",
             f"<h1>Study {e(study.study_name)}</h1>",
             f"<p>{count(trials, TrialState.COMPLETE)} complete, {count(trials, TrialState.PRUNED)} pruned, "
             f"{count(trials, TrialState.FAIL)} failed; {e(spec.goal)} {e(spec.metric)}.</p>"]
    plots = [name for name in PLOTS if os.path.exists(os.path.join(job_dir, "plots", f"{name}.html"))]
    if plots:
        parts.append("<p>Plots: " + " · ".join(f"<a href='plots/{name}.html'>{e(name.replace('_', ' '))}</a>"
                                                 for name in plots) + "</p>")
    if best is not None:
        parts.append(f"<h2>Best: trial {best.number}, {e(spec.metric)} = {best.value:.4f}</h2><table>")
        parts += [f"<tr><th>{e(name)}</th><td>{e(str(value))}</td></tr>" for name, value in best.params.items()]
        parts.append("</table>")
        run_report = os.path.join(_attr(best, "job_dir"), "report", "report.html")
        if _attr(best, "job_dir") and os.path.exists(run_report):
            link = e(os.path.relpath(run_report, job_dir))
            parts.append(f"<p>Its run report (<a href='{link}'>open</a>):</p><iframe src='{link}'></iframe>")
    names = list(dict.fromkeys(p.name for p in params_lib.walk(spec.parameters)))
    parts.append("<h2>Trials</h2><table><tr><th>#</th><th>state</th><th>value</th>"
                 + "".join(f"<th>{e(n)}</th>" for n in names) + "<th>failure</th></tr>")
    for t in trials:
        value = "" if t.value is None else f"{t.value:.4f}"
        parts.append(f"<tr><td>{t.number}</td><td>{t.state.name}</td><td>{value}</td>"
                     + "".join(f"<td>{e(_short(t.params.get(n, '')))}</td>" for n in names)
                     + f"<td>{e(str(_attr(t, 'failure')))}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"
