"""The search space: one Param per tuned trainer flag, parsed from either study
shape, checked once, and turned into Optuna suggestions for a trial.

A parameter is named by the trainer flag it sets, and keeps that one name in
the study config, the trial's command line, Optuna, trials.csv and best.json.
Conditional parameters are suggested only when their parent took one of the
listed values, as Vertex AI's conditionalParameterSpecs do. Also owns
flag_text(), the one way a value becomes text on the trainer's command line.
"""

import dataclasses
import math
import numbers

from trainer.cli import UserError

KINDS = ("double", "integer", "categorical", "discrete")
SCALES = ("linear", "log")
FLAT_KEYS = ("type", "min", "max", "scale", "values", "default", "conditional")
VERTEX_SPECS = {
    "doubleValueSpec": "double",
    "integerValueSpec": "integer",
    "categoricalValueSpec": "categorical",
    "discreteValueSpec": "discrete",
}
VERTEX_SCALES = {"UNIT_LINEAR_SCALE": "linear", "SCALE_TYPE_UNSPECIFIED": "linear", "UNIT_LOG_SCALE": "log"}
VERTEX_PARENTS = ("parentCategoricalValues", "parentDiscreteValues", "parentIntValues")


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of KINDS
    low: float = None  # double / integer ranges, inclusive
    high: float = None
    log: bool = False
    values: tuple = ()  # categorical / discrete choices
    default: object = None  # a first trial tries it (Vertex: "a good starting point")
    children: tuple = ()  # ((parent_values tuple, (Param, ...)), ...)


def check_keys(mapping, allowed, where):
    """Unknown keys are mistakes (a misspelt `max` must not silently vanish)."""
    if not isinstance(mapping, dict):
        raise UserError(f"{where}: expected a mapping, got {type(mapping).__name__} {mapping!r}")
    for key in mapping:
        if key not in allowed:
            raise UserError(f"{where}.{key}: unknown key; valid keys: {', '.join(allowed)}")


def _number(value, where, kind):
    # Vertex's REST form writes int64 values as strings ("minValue": "1").
    try:
        number = float(value) if kind == "double" else int(str(value))
    except (TypeError, ValueError):
        what = "a number" if kind == "double" else "an integer"
        raise UserError(f"{where}: expected {what}, got {value!r}") from None
    if kind == "double" and not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return number


def _whole(number):
    return int(number) if float(number).is_integer() else number


def make_param(name, kind, where, keys, low=None, high=None, scale="linear", values=None, default=None, children=()):
    """Checks one parameter; `keys` names, per field, the key the user wrote."""
    if kind in ("double", "integer"):
        if low is None or high is None:
            raise UserError(f"{where}: a {kind} parameter needs {keys['min']} and {keys['max']}")
        low, high = _number(low, f"{where}.{keys['min']}", kind), _number(high, f"{where}.{keys['max']}", kind)
        if low > high:
            raise UserError(f"{where}: {keys['min']} {low} is greater than {keys['max']} {high}")
        if scale == "log" and low <= 0:
            raise UserError(f"{where}: a log scale needs {keys['min']} > 0, got {low}")
        if default is not None:
            default = _number(default, f"{where}.{keys['default']}", kind)
            if not low <= default <= high:
                raise UserError(f"{where}.{keys['default']}: {default} lies outside [{low}, {high}]")
        children = _check_parents(kind, low, high, (), children, where)
        return Param(name, kind, low, high, scale == "log", (), default, children)
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: a {kind} parameter needs a non-empty list {keys['values']}")
    if kind == "discrete":  # Vertex writes discrete values as doubles: 32.0 is the integer 32
        values = [_whole(_number(v, f"{where}.{keys['values']}", "double")) for v in values]
        if default is not None:
            default = _whole(_number(default, f"{where}.{keys['default']}", "double"))
    if len(set(values)) != len(values):
        raise UserError(f"{where}.{keys['values']}: {values} lists a value twice")
    if default is not None and default not in values:
        raise UserError(f"{where}.{keys['default']}: {default!r} is not one of {values}")
    children = _check_parents(kind, None, None, values, children, where)
    return Param(name, kind, values=tuple(values), default=default, children=children)


def _check_parents(kind, low, high, values, children, where):
    """Each condition's parent values, as the parent's own values (Vertex writes integers as strings).

    A value the parent can never take would leave its parameters silently untuned.
    """
    checked = []
    for parent_values, params in children:
        if kind == "double":
            raise UserError(f"{where}: conditional parameters need a categorical, discrete or integer parent, "
                            f"not a double range")
        if kind == "categorical":
            parent_values = tuple(str(v) if not isinstance(v, str) and str(v) in values else v for v in parent_values)
        else:
            parent_values = tuple(_number(v, f"{where} (a parent value)", "double" if kind == "discrete" else kind)
                                  for v in parent_values)
            parent_values = tuple(_whole(v) for v in parent_values)
        for value in parent_values:
            possible = low <= value <= high if kind == "integer" else value in values
            if not possible:
                can_take = f"[{int(low)}, {int(high)}]" if kind == "integer" else list(values)
                raise UserError(f"{where}: conditional parameters wait for the value {value!r}, "
                                f"which the parameter never takes ({can_take})")
        checked.append((parent_values, params))
    return tuple(checked)


def check_consistent(params):
    """A name under several parents must fit one Optuna distribution: the same kind and scale, and
    for choices the same list (ranges may differ, as the learning rate per optimizer does)."""
    seen = {}
    for param in walk(params):
        ranged = param.kind in ("double", "integer")
        shape = (param.kind, param.log) if ranged else ("choices", param.values)
        if seen.setdefault(param.name, shape) != shape:
            raise UserError(f"parameter {param.name}: appears twice with a different type, scale or list of values; "
                            f"Optuna needs them equal (a double or integer range may differ)")


def parse_flat(parameters, where="parameters"):
    """Our shape: {flag_name: {type, min, max, scale, values, default, conditional}}."""
    if not isinstance(parameters, dict):
        raise UserError(f"{where}: expected a mapping of flag name -> spec, got {parameters!r}")
    if not parameters:
        raise UserError(f"{where}: give at least one parameter to tune")
    return tuple(_flat_param(name, spec, f"{where}.{name}") for name, spec in parameters.items())


def _flat_param(name, spec, where):
    check_keys(spec, FLAT_KEYS, where)
    kind = spec.get("type")
    if kind not in KINDS:
        raise UserError(f"{where}.type: {kind!r} is not a parameter type; valid: {', '.join(KINDS)}")
    scale = spec.get("scale", "linear")
    if scale not in SCALES:
        raise UserError(f"{where}.scale: {scale!r} is not a scale; valid: {', '.join(SCALES)}")
    children = []
    for i, cond in enumerate(spec.get("conditional") or []):
        cwhere = f"{where}.conditional[{i}]"
        check_keys(cond, ("parent_values", "parameters"), cwhere)
        parents = _parent_values(cond.get("parent_values"), f"{cwhere}.parent_values")
        children.append((parents, parse_flat(cond.get("parameters") or {}, f"{cwhere}.parameters")))
    keys = {k: k for k in ("min", "max", "values", "default")}
    return make_param(name, kind, where, keys, spec.get("min"), spec.get("max"), scale,
                      spec.get("values"), spec.get("default"), children)


def parse_vertex(parameters, where="studySpec.parameters"):
    """Vertex AI's ParameterSpec list, as a hyperparameter tuning job config has it."""
    if not isinstance(parameters, list) or not parameters:
        raise UserError(f"{where}: expected a non-empty list of parameter specs")
    return tuple(_vertex_param(spec, f"{where}[{i}]") for i, spec in enumerate(parameters))


def _vertex_param(spec, where):
    allowed = ("parameterId", "scaleType", "conditionalParameterSpecs", *VERTEX_SPECS)
    check_keys(spec, allowed, where)
    name = spec.get("parameterId")
    if not name:
        raise UserError(f"{where}.parameterId: missing")
    given = [key for key in VERTEX_SPECS if key in spec]
    if len(given) != 1:
        raise UserError(f"{where} ({name}): give exactly one of {', '.join(VERTEX_SPECS)}")
    kind, value_spec = VERTEX_SPECS[given[0]], spec[given[0]]
    vwhere = f"{where}.{given[0]}"
    check_keys(value_spec, ("minValue", "maxValue", "defaultValue") if kind in ("double", "integer")
               else ("values", "defaultValue"), vwhere)
    scale_type = spec.get("scaleType", "SCALE_TYPE_UNSPECIFIED")
    if scale_type not in VERTEX_SCALES:
        raise UserError(f"{where}.scaleType: {scale_type!r} is not supported; valid: {', '.join(VERTEX_SCALES)}")
    children = []
    for i, cond in enumerate(spec.get("conditionalParameterSpecs") or []):
        cwhere = f"{where}.conditionalParameterSpecs[{i}]"
        check_keys(cond, ("parameterSpec", *VERTEX_PARENTS), cwhere)
        parent_keys = [key for key in VERTEX_PARENTS if key in cond]
        if len(parent_keys) != 1:
            raise UserError(f"{cwhere}: give exactly one of {', '.join(VERTEX_PARENTS)}")
        parent = cond[parent_keys[0]]
        check_keys(parent, ("values",), f"{cwhere}.{parent_keys[0]}")
        parents = _parent_values(parent.get("values"), f"{cwhere}.{parent_keys[0]}.values")
        children.append((parents, (_vertex_param(cond.get("parameterSpec"), f"{cwhere}.parameterSpec"),)))
    keys = {"min": "minValue", "max": "maxValue", "values": "values", "default": "defaultValue"}
    return make_param(name, kind, vwhere, keys, value_spec.get("minValue"), value_spec.get("maxValue"),
                      VERTEX_SCALES[scale_type], value_spec.get("values"), value_spec.get("defaultValue"), children)


def _parent_values(values, where):
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: expected a non-empty list of the parent's values")
    return tuple(values)


def walk(params):
    """Every parameter, conditional ones included, parents first."""
    for param in params:
        yield param
        for _, children in param.children:
            yield from walk(children)


def check_against_flags(params, reserved, flag_types=None, tunable=None):
    """Each parameter must be a trainer flag of a compatible type (before any trial runs).

    flag_types: {flag: absl type} of the built-in trainer; None for another trainer_command, whose
    parameters may have any name. tunable: the flags a parameter may set; None allows any flag.
    """
    for param in walk(params):
        if param.name in reserved:
            raise UserError(f"parameter {param.name}: the study driver sets --{param.name} itself (one per trial)")
        if flag_types is None:
            continue
        if param.name not in flag_types:
            raise UserError(f"parameter {param.name}: not a trainer flag; see `python -m trainer.task --help` "
                            f"for the flags (e.g. initial_learning_rate, optimizer_type, label_smoothing)")
        if tunable is not None and param.name not in tunable:
            raise UserError(f"parameter {param.name}: the trainer does not let a study tune --{param.name}; give "
                            f"it one value for every trial under trainer_flags instead (tunable: {', '.join(tunable)})")
        flag_type = flag_types[param.name]
        if param.kind == "double" and flag_type != "float":
            raise UserError(f"parameter {param.name}: a double range for a {flag_type} flag; "
                            f"use {'integer' if flag_type == 'int' else 'categorical'}")
        if param.kind == "integer" and flag_type not in ("int", "float"):
            raise UserError(f"parameter {param.name}: an integer range for a {flag_type} flag; use categorical")
        if param.kind == "discrete" and flag_type == "int" and any(not isinstance(v, int) for v in param.values):
            raise UserError(f"parameter {param.name}: an int flag; its values {list(param.values)} must be integers")


def flag_text(value):
    """A value from YAML or Optuna (NumPy scalars too) as the trainer's command line wants it: true, 0.1, 32, adam."""
    if type(value).__name__ in ("bool", "bool_"):  # NumPy's bool is no subclass of bool (nor of int)
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))  # numpy.int64 too
    return str(value)  # str(), not repr(): repr(numpy.float64(0.1)) is 'np.float64(0.1)', str() is 0.1 for both


def suggest(trial, params):
    """The trial's values for params (and the conditional parameters they switch on)."""
    chosen = {}
    for param in params:
        if param.kind == "double":
            value = trial.suggest_float(param.name, param.low, param.high, log=param.log)
        elif param.kind == "integer":
            value = trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log)
        else:
            value = trial.suggest_categorical(param.name, list(param.values))
        chosen[param.name] = value
        for parent_values, children in param.children:
            if value in parent_values:
                chosen.update(suggest(trial, children))
    return chosen


def defaults(params):
    """{name: default} for parameters that give one (the first trial tries them).

    A conditional parameter's default counts only under its parent's default.
    """
    chosen = {}
    for param in params:
        if param.default is None:
            continue
        chosen[param.name] = param.default
        for parent_values, children in param.children:
            if param.default in parent_values:
                chosen.update(defaults(children))
    return chosen


def grid(params):
    """GridSampler's search space; a grid needs finite choices and no conditions."""
    space = {}
    for param in params:
        if param.children:
            raise UserError(f"parameter {param.name}: grid search cannot follow conditional parameters")
        if param.kind == "double":
            raise UserError(f"parameter {param.name}: grid search needs finite choices; "
                            f"make it discrete (a list of values) or pick another sampler")
        if param.kind == "integer":
            if param.high - param.low > 1000:
                raise UserError(f"parameter {param.name}: {param.high - param.low + 1} integers is too big a grid")
            space[param.name] = list(range(int(param.low), int(param.high) + 1))
        else:
            space[param.name] = list(param.values)
    return space
