"""Command-line plumbing shared by every entry point (trainer.task, trainer.sample_data,
trainer.serving.predict, trainer.serving.serve, hptuning.study).

Owns: UserError and the one way a user mistake ends a program (`fail`: one
`error:` line, exit status 2); defining absl flags from a table of `Flag`s and
parsing the command line; the `--help` text, grouped as the table groups the
flags; the job-dir flags; the quiet TensorFlow import; and `say`, the one way
a program prints a line of progress. Nothing here imports TensorFlow or Keras
at import time.
"""

import dataclasses
import gc
import os
import sys
import textwrap
import threading


class UserError(Exception):
    """A mistake the user can fix; reported as one line, without a traceback, and exit status 2."""

    status = 2


class RunStopped(UserError):
    """A run that ended early for a reason it explains (divergence, a signal): its own exit status,
    so that a study does not take it for a mistake every trial would repeat."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


def fail(message, status=2):
    """Ends the program after a user mistake (status 2) or a failure it explains (another status):
    one `error:` line on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


_say_lock = threading.Lock()


def say(text):
    """One line of progress on stdout, whole even when several threads print (the study driver's trials)."""
    with _say_lock:
        print(text, file=sys.stdout, flush=True)


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag: its type, default, help and where --help shows it.

    kind: "string" | "integer" | "float" | "boolean", or a structured value
    read from a string: "int_list" and "float_list" ('100,200') and "pairs"
    ('momentum=0.9,nesterov=true'). The trainer's own table (trainer/schema.py)
    also says which flags a resume must keep (fingerprint) and which a study
    may tune (tunable).
    """

    name: str
    kind: str
    default: object
    help: str
    group: str
    choices: tuple = ()
    required: bool = False
    fingerprint: bool = False
    tunable: bool = False

    @property
    def absl_type(self):
        """The type absl parses (structured kinds arrive as strings and are parsed by config.py)."""
        return {"integer": "int", "float": "float", "boolean": "bool"}.get(self.kind, "string")

    def shown_default(self):
        if self.default is None or self.default == "":
            return ""
        if self.kind == "boolean":
            return "true" if self.default else "false"
        return str(self.default)


def define(table, flag_values):
    """Defines every Flag of table in flag_values (required ones default to None: main() reports them)."""
    from absl import flags

    definers = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float, "bool": flags.DEFINE_boolean,
                "string": flags.DEFINE_string}
    for flag in table:
        default = None if flag.required else flag.default
        definers[flag.absl_type](flag.name, default, flag.help, flag_values=flag_values)


@dataclasses.dataclass(frozen=True)
class Program:
    """What --help says about an entry point besides its flags."""

    usage: str  # e.g. "python -m trainer.task --flag=value ..."
    summary: str  # one sentence: what it does
    example: str  # a command a user can copy
    groups: tuple  # group names in the order --help shows them
    notes: str = ""  # a closing paragraph (where the flags' values may also come from)
    group_notes: tuple = ()  # ((group, text), ...): a paragraph under a group's name, e.g. its environment


def help_text(program, table):
    """A tool's help: usage, one sentence, an example, then the flags by group; required ones marked."""
    lines = [f"usage: {program.usage}", "", program.summary, "", "example:", f"  {program.example}", ""]
    group_notes = dict(program.group_notes)
    for group in program.groups:
        members = [flag for flag in table if flag.group == group]
        if not members and group not in group_notes:
            continue
        lines.append(f"{group}:")
        if group in group_notes:
            lines.extend(textwrap.wrap(group_notes[group], width=100, initial_indent=" " * 2, subsequent_indent=" " * 2))
        for flag in members:
            value = {"boolean": "=true|false", "integer": "=N", "float": "=X"}.get(flag.kind, "=TEXT")
            head = f"  --{flag.name}{value}" + ("    [required]" if flag.required else "")
            notes = []
            if not flag.required and flag.shown_default():
                notes.append(f"default {flag.shown_default()}")
            if flag.choices:
                notes.append("one of " + " | ".join(flag.choices))
            text = flag.help + (f" ({'; '.join(notes)})" if notes else "")
            body = textwrap.wrap(text, width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
            lines.append(head)
            lines.extend(body)
        lines.append("")
    lines.append("general:")
    if table:
        lines.append("  --flagfile=FILE")
        lines.append("      Read flags from FILE, one --flag=value per line; flags after it override it.")
    lines.append("  --help")
    lines.append("      Show this help and exit.")
    if program.notes:
        lines += [""] + textwrap.wrap(program.notes, width=100)
    return "\n".join(lines) + "\n"


HELP_ARGS = ("-h", "--help", "--helpfull")


def parse_command_line(flag_values, argv=None, help_of=None):
    """Parses argv into absl flag_values; a misspelt flag, a bad value or a stray argument ends in fail().

    `--flag value` and `--flag False` (as SageMaker's and PAI's command lines write them) read as
    `--flag=value` (join_values). help_of: a (Program, table) pair; --help prints help_text() of it and exits 0.
    """
    from absl import flags

    argv = list(sys.argv if argv is None else argv)
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print(help_text(*help_of) if help_of else flag_values.get_help(), end="")
        sys.exit(0)
    flag_values.unparse_flags()  # a second parse in one process (tests) starts from the defaults

    def kind(name):
        if name == "flagfile":
            return "value"
        return ("boolean" if flag_values[name].boolean else "value") if name in flag_values else None

    try:
        rest = flag_values(join_values(argv, kind))
    except UserError as e:
        fail(str(e))
    except flags.Error as e:
        fail(str(e).replace("\n", " "))
    if len(rest) > 1:
        fail(f"unexpected argument {rest[1]!r}; flags are written --name=value")


BOOLEAN_WORDS = ("true", "false", "1", "0")


def join_values(argv, kind):
    """argv with each `--name value` written `--name=value`, for the names kind(name) knows.

    kind(name) -> "boolean", "value" or None (not a flag it knows: left as it is). A boolean takes
    the next word only when it is true/false/1/0 (any case), so `--random_flip extra` still leaves
    `extra` a stray argument; a value flag takes the next word unless that is another flag, which is
    an error (absl would take `--num_classes=3` as the value of `--training_data_path` without a word);
    a word with spaces before any `=` (PAI's param_config string) is a value.
    Words after a bare `--` are left alone.
    """
    out, i = list(argv[:1]), 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return out + list(argv[i:])
        name = arg.lstrip("-") if arg.startswith("-") and "=" not in arg else None
        what = kind(name) if name else None
        following = argv[i + 1] if i + 1 < len(argv) else None
        if what == "boolean" and following is not None and following.lower() in BOOLEAN_WORDS:
            out.append(f"--{name}={following}")
            i += 2
        elif what == "value" and following is not None:
            if _is_flag(following):
                raise UserError(f"--{name} needs a value before {following} (write --{name}=VALUE)")
            out.append(f"--{name}={following}")
            i += 2
        else:
            out.append(arg)
            i += 1
    return out


def _is_flag(word):
    """`--name` or `--name=value`; not a value that starts with dashes, like PAI's whole param_config string."""
    name = word.partition("=")[0]
    return word.startswith("--") and not any(c.isspace() for c in name)


def missing_flags(flag_values, table):
    """The required flags of table that were not given, or given empty (--model_dir=)."""
    return [flag.name for flag in table if flag.required and flag_values[flag.name].value in (None, "")]


def check_choices(flag_values, table):
    """Raises UserError for the first flag whose value is not one of its table's choices."""
    for flag in table:
        value = flag_values[flag.name].value
        if flag.choices and value is not None and value not in flag.choices:
            raise UserError(f"--{flag.name} must be one of {', '.join(flag.choices)} (got {value!r})")


def require(names, help_hint="see --help"):
    """Raises one UserError naming every missing required flag together."""
    if names:
        listed = ", ".join(f"--{name}" for name in names)
        raise UserError(f"{listed} {'is' if len(names) == 1 else 'are'} required ({help_hint})")


JOB_DIR_FLAGS = (
    Flag("job-dir", "string", None, "Output folder. Required (trainer: unless $AIP_MODEL_DIR names its model/).",
         "outputs"),
    Flag("job_dir", "string", None, "Same as --job-dir.", "outputs"),
)


def given_job_dir(flag_values, environ=os.environ):
    """The one job-dir of --job-dir / --job_dir, else $AIP_MODEL_DIR's parent; None when nothing names one.

    Pass environ={} where $AIP_MODEL_DIR must not count (the study driver).
    """
    dashed, underscored = flag_values["job-dir"].value, flag_values["job_dir"].value
    if dashed and underscored and dashed != underscored:
        raise UserError("--job-dir and --job_dir disagree; give one of them")
    if dashed or underscored:
        return dashed or underscored
    if environ.get("AIP_MODEL_DIR"):
        return os.path.dirname(environ["AIP_MODEL_DIR"].rstrip("/"))
    return None


# Optional packages that TensorFlow and Keras import when installed, for features no entry point here
# uses (TFLite's JAX converter, Keras's scikit-learn wrappers and image-gallery plots): about 1 s of
# CPU per process. They are kept out while TensorFlow imports; importing them afterwards works as usual.
_UNUSED_BY_TENSORFLOW = ("sklearn", "matplotlib")
_UNUSED_BY_KERAS_ON_TENSORFLOW = ("jax",)  # Keras's JAX backend needs it


def import_tensorflow_quietly():
    """Imports TensorFlow (and with it Keras), quietly and quickly; returns the tensorflow module.

    Quietly: the C++ start-up chatter (oneDNN, CUDA probes) is kept off stderr;
    TF_CPP_MIN_LOG_LEVEL no longer silences those lines. A user who sets it to
    0 sees everything; a failing import still raises after stderr is restored.
    Quickly: without _UNUSED_BY_TENSORFLOW (and jax, when Keras's backend is
    TensorFlow), and with the cyclic garbage collector off during the import,
    then frozen: the 400,000 objects the import leaves are never garbage, yet
    every full collection would walk them (together about 1.5 s of CPU per run).
    """
    quiet = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2") != "0"
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    unused = _UNUSED_BY_TENSORFLOW
    if os.environ.get("KERAS_BACKEND") == "tensorflow":
        unused += _UNUSED_BY_KERAS_ON_TENSORFLOW
    kept_out = [name for name in unused if name not in sys.modules]
    collecting = gc.isenabled()
    saved, devnull = (os.dup(2), os.open(os.devnull, os.O_WRONLY)) if quiet else (None, None)
    sys.stderr.flush()
    try:
        gc.disable()
        sys.modules.update(dict.fromkeys(kept_out))  # None: `import name` raises ImportError
        if quiet:
            os.dup2(devnull, 2)
        import tensorflow as tf

        if quiet:
            tf.config.list_physical_devices()  # the CUDA probe logs here, once
    finally:
        if quiet:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        for name in kept_out:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
        if collecting:
            gc.enable()
    gc.freeze()
    return tf
