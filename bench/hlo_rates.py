"""How fast each kernel of a compiled training step runs for its work: convolutions in TFLOP/s, XLA's
fusions in GB/s.

Joins the step's optimized HLO, which gives every kernel's shapes and so its work
(XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_module_re=.*train_step.*"), with a JAX profiler trace of a
few steps, which gives every kernel's time. `bench/gpu_throughput.py --profile DIR` dumps both and
prints this; on its own:

    python bench/hlo_rates.py DUMP_DIR TRACE.json.gz --steps 3

A convolution is counted by its role in the step (forward, data gradient, weight gradient), whatever
cuDNN kernel XLA runs it with. A fusion's bytes are its operands' and results' sizes, each read or
written once: a lower bound on its traffic, so its GB/s is too.
"""

import argparse
import glob
import gzip
import json
import math
import os
import re

STEP_MODULES = ("jit_train_step", "jit_multi_train_steps")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}
SHAPE = re.compile(r"\b(pred|s8|u8|bf16|f16|s16|f32|s32|u32|f64|s64)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\([^)]*\)|\S+) ([\w\-]+)\(([^)]*)\)(.*)")


def shapes(text):
    """[(dtype, dims)] of a shape or tuple of shapes as HLO prints them."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in SHAPE.findall(text)]


def size(dtype, dims):
    return BYTES[dtype] * math.prod(dims)


def step_module(dump_dir):
    """The text of the training step's module after optimizations (the largest, if there are several)."""
    files = glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt"))
    if not files:
        raise FileNotFoundError(f"no *train_step*after_optimizations.txt in {dump_dir}")
    with open(max(files, key=os.path.getsize)) as f:
        return f.read()


def instructions(text):
    """name -> (result shapes, opcode, operand names, the rest of the line) for every instruction."""
    found = {}
    for line in text.splitlines():
        m = INSTRUCTION.match(line)
        if m:
            name, result, opcode, args, rest = m.groups()
            found[name] = (shapes(result), opcode, [a.strip().lstrip("%") for a in args.split(",") if a.strip()], rest)
    return found


def operand_shape(insts, operand):
    """An operand's shape; `fusion.3#1` names the second result of a multi-output `fusion.3`."""
    name, _, index = operand.partition("#")
    result = insts[name][0] if name in insts else []
    return result[int(index or 0)] if len(result) > int(index or 0) else None


def convolutions(insts):
    """name -> {role, flops, bytes, what}: every cuDNN convolution of the step.

    Forward: x, kernel -> y. Data gradient: dy, kernel -> dx. Weight gradient: x, dy -> kernel. Each does
    2 * |y| * |kernel| / filters multiply-adds' worth of FLOPs (filters: the kernel's 'o' dimension).
    """
    convs = {}
    for name, (result, opcode, args, rest) in insts.items():
        target = re.search(r'custom_call_target="__cudnn\$(conv\w*)"', rest)
        labels = re.search(r"dim_labels=\w+_(\w+)->\w+", rest)
        if opcode != "custom-call" or not target or not labels:
            continue
        ops = [operand_shape(insts, a) for a in args]
        if target.group(1).startswith("convBackwardInput"):
            kernel, y = ops[1], ops[0]
        elif target.group(1).startswith("convBackwardFilter"):
            kernel, y = result[0], ops[1]
        else:  # convForward, or with a bias, an added side input or an activation fused in
            kernel, y = ops[1], result[0]
        op_name = re.search(r'op_name="([^"]*)"', rest)
        op_name = op_name.group(1) if op_name else ""
        role = ("forward" if "transpose(" not in op_name
                else "weight gradient" if target.group(1).startswith("convBackwardFilter") else "data gradient")
        filters = kernel[1][labels.group(1).index("o")]
        layer = [p for p in op_name.split("/") if p and "(" not in p and p != "conv_general_dilated"]
        convs[name] = {"role": role, "flops": 2 * math.prod(y[1]) * math.prod(kernel[1]) // filters,
                       "bytes": sum(size(*s) for s in [*filter(None, ops), result[0]]),
                       "what": f"{layer[-1] if layer else name} {'x'.join(map(str, kernel[1]))} -> {list(y[1])}"}
    return convs


def fusions(insts):
    """name -> {kind, bytes, what}: XLA's fusions, with the bytes they read and write at least."""
    found = {}
    for name, (result, opcode, args, rest) in insts.items():
        if opcode != "fusion":
            continue
        kind = re.search(r"kind=k(\w+)", rest)
        kind = {"Loop": "elementwise", "Input": "reduction"}.get(kind.group(1) if kind else "", "other")
        read = sum(size(*s) for s in filter(None, (operand_shape(insts, a) for a in args)))
        op_name = re.search(r'op_name="([^"]*)"', rest)
        found[name] = {"kind": kind, "bytes": read + sum(size(*s) for s in result),
                       "what": "/".join((op_name.group(1) if op_name else "").split("/")[-2:])}
    return found


def kernel_events(trace_path):
    """The step's kernel events on one device (the first GPU, where the trace names it) from a JAX profiler
    trace: [(kernel name, XLA instruction, microseconds)]."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    devices = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    step = [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") in STEP_MODULES]
    first = sorted(pid for pid in {e["pid"] for e in step} if "GPU:0" in devices.get(pid, ""))
    return [(e["name"], e["args"].get("hlo_op", ""), float(e.get("dur", 0))) for e in step
            if not first or e["pid"] == first[0]]


def rates(dump_dir, trace_path, steps):
    """Per-step time and work of the step's convolutions (by role) and fusions (by kind), and the single
    kernels furthest below their group's rate: printable lines."""
    insts = instructions(step_module(dump_dir))
    convs, fused = convolutions(insts), fusions(insts)
    conv_us, fusion_us, fusion_runs = {}, {}, {}
    for kernel, instruction, us in kernel_events(trace_path):
        if instruction in convs:  # cuDNN's kernels carry their instruction's name
            conv_us[instruction] = conv_us.get(instruction, 0.0) + us / steps
        else:  # XLA's carry the fusion's name (fusion.12 runs as fusion_12); identical fusions share one
            name = re.sub(r"_(\d+)$", r".\1", kernel)
            if name in fused:
                fusion_us[name] = fusion_us.get(name, 0.0) + us / steps
                fusion_runs[name] = fusion_runs.get(name, 0) + 1 / steps
    return convolution_lines(convs, conv_us) + fusion_lines(fused, fusion_us, fusion_runs)


def convolution_lines(convs, conv_us):
    """Time and TFLOP/s per role, and the convolutions furthest below their role's rate."""
    if not conv_us:
        return ["convolutions: none of cuDNN's in the trace (not a GPU's step?)"]
    groups = {}
    for name, us in conv_us.items():
        group = groups.setdefault(convs[name]["role"], [0.0, 0.0])
        group[0], group[1] = group[0] + us, group[1] + convs[name]["flops"]
    lines = [f"convolutions: {sum(g[0] for g in groups.values()) / 1e3:.2f} ms per step, "
             f"{sum(g[1] for g in groups.values()) / 1e12:.2f} TFLOP"]
    for role, (us, flops) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {role:16s} {us / 1e3:6.2f} ms  {flops / us / 1e6:5.0f} TFLOP/s")
    rate = {role: flops / us for role, (us, flops) in groups.items()}
    lost = sorted(((us - convs[n]["flops"] / rate[convs[n]["role"]], us, n) for n, us in conv_us.items()), reverse=True)
    lines.append("  furthest below their role's rate (ms beyond it):")
    for extra, us, name in lost[:5]:
        c = convs[name]
        lines.append(f"    {us / 1e3:.3f} ms (+{extra / 1e3:.3f})  {c['flops'] / us / 1e6:4.0f} TFLOP/s "
                     f"{c['bytes'] / us / 1e3:5.0f} GB/s  {c['role']}  {c['what']}")
    return lines


def fusion_lines(fused, fusion_us, fusion_runs):
    """Time and GB/s per kind of fusion, and the fusions furthest below their kind's rate."""
    groups = {}
    for name, us in fusion_us.items():
        group = groups.setdefault(fused[name]["kind"], [0.0, 0.0])
        group[0], group[1] = group[0] + us, group[1] + fused[name]["bytes"] * fusion_runs[name]
    lines = [f"XLA fusions: {sum(g[0] for g in groups.values()) / 1e3:.2f} ms per step"]
    for kind, (us, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {kind:16s} {us / 1e3:6.2f} ms  {nbytes / 1e9:6.1f} GB  {nbytes / us / 1e3:5.0f} GB/s")
    rate = {kind: nbytes / us for kind, (us, nbytes) in groups.items()}
    lost = sorted(((us - fused[n]["bytes"] * fusion_runs[n] / rate[fused[n]["kind"]], us, n)
                   for n, us in fusion_us.items()), reverse=True)
    lines.append("  furthest below their kind's rate (ms beyond it):")
    for extra, us, name in lost[:5]:
        f, runs = fused[name], fusion_runs[name]
        lines.append(f"    {us / 1e3:.3f} ms (+{extra / 1e3:.3f})  {f['bytes'] * runs / us / 1e3:4.0f} GB/s  "
                     f"{runs:.0f}x {name}  {f['what']}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dump_dir")
    p.add_argument("trace", help="perfetto_trace.json.gz of the JAX profiler")
    p.add_argument("--steps", type=int, default=3, help="training steps the trace holds")
    a = p.parse_args(argv)
    print("\n".join(rates(a.dump_dir, a.trace, a.steps)))


if __name__ == "__main__":
    main()
