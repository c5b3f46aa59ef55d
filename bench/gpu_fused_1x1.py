"""What fusing batch norm into ResNet-50's 1x1 convolutions would save on one GPU, each shape timed alone.

XLA runs a convolution through cuDNN and the batch norm around it as separate
memory-bound passes: a reduction for the statistics of the convolution's output
and an elementwise pass for the normalisation and ReLU of its input. A hand-written
matrix product (Pallas, compiled by Triton) can do both inside the product: the
sums in its epilogue, the normalisation in its prologue. For each of ResNet-50's
1x1 convolutions at batch 256 (bfloat16; the product over channels of P pixels),
this times, best of five rounds of 20 calls:

- cuDNN's convolution alone, then with XLA's reduction of its output's sums and
  sums of squares (what the trainer's step runs), against the Pallas product with
  both sums in its epilogue (best of a few tile shapes, its sums checked against XLA's);
- for the expanding convolutions, the same sums derived from the input's: each
  output channel's sum is w . sum(x) and its sum of squares w . G w, with G the
  input's Gram matrix (x^T x, a product XLA runs through cuBLAS) over a quarter
  of the output's channels;
- for the expanding convolutions, whose input is a batch norm and ReLU's output,
  XLA's normalise-then-convolve against the Pallas product with the normalisation
  in its prologue (checked against XLA's product).

The last two rows add up each column, each shape weighted by how often
ResNet-50 has it: over all the shapes (only the columns every shape has),
then over the expanding ones. A strided shortcut is timed over its already
subsampled input, as if the stride were free. Records
bench/results/gpu-fused-1x1.json. Needs JAX on a GPU; `--interpret` checks
the kernels on small shapes on the CPU and records nothing.

    python bench/gpu_fused_1x1.py
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pallas_triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results  # found through the path above

BF16, F32 = jnp.bfloat16, jnp.float32
P1, P2, P3, P4 = (256 * side * side for side in (56, 28, 14, 7))
# (stage, role, pixels, input channels, output channels, how many ResNet-50 has); KerasHub's ResNet-50
# strides its 3x3 convolutions, so a stage's first reduction runs at the previous stage's resolution.
SHAPES = [
    (1, "reduce", P1, 64, 64, 1), (1, "reduce", P1, 256, 64, 2), (1, "expand", P1, 64, 256, 3),
    (1, "shortcut", P1, 64, 256, 1),
    (2, "reduce", P1, 256, 128, 1), (2, "reduce", P2, 512, 128, 3), (2, "expand", P2, 128, 512, 4),
    (2, "shortcut", P2, 256, 512, 1),
    (3, "reduce", P2, 512, 256, 1), (3, "reduce", P3, 1024, 256, 5), (3, "expand", P3, 256, 1024, 6),
    (3, "shortcut", P3, 512, 1024, 1),
    (4, "reduce", P3, 1024, 512, 1), (4, "reduce", P4, 2048, 512, 2), (4, "expand", P4, 512, 2048, 3),
    (4, "shortcut", P4, 1024, 2048, 1),
]
SMALL = [(1, "expand", 512, 64, 128, 1), (1, "reduce", 512, 128, 64, 1)]
TILES = [(128, 128, 32, 4, 4), (128, 64, 64, 4, 3), (128, 128, 64, 4, 3), (64, 256, 64, 4, 3),
         (128, 256, 64, 8, 3)]  # rows, columns, reduction step, warps, pipeline stages


def pallas_conv(x, w, scale=None, shift=None, *, tile, interpret):
    """x [P, K] @ w [K, N] in bfloat16 with float32 accumulation.

    Without scale and shift: the product and, per output channel, its sum and sum of squares over the
    P pixels. With them: relu(x * scale + shift) @ w alone."""
    rows, cols, step, warps, stages = tile
    (pixels, channels), outputs = x.shape, w.shape[1]
    cols, step = min(cols, outputs), min(step, channels)
    prologue = scale is not None
    scale = jnp.ones((channels,), F32) if scale is None else scale
    shift = jnp.zeros((channels,), F32) if shift is None else shift

    def kernel(x_ref, scale_ref, shift_ref, w_ref, out_ref, *sum_refs):
        def accumulate(k, total):
            part = pl.ds(k * step, step)
            a = x_ref[:, part]
            if prologue:
                a = jnp.maximum(a.astype(F32) * scale_ref[part][None, :] + shift_ref[part][None, :], 0.0)
                a = a.astype(BF16)
            return total + jax.lax.dot(a, w_ref[part, :], preferred_element_type=F32)

        product = jax.lax.fori_loop(0, channels // step, accumulate, jnp.zeros((rows, cols), F32))
        out = product.astype(BF16)
        out_ref[...] = out
        if sum_refs:
            out = out.astype(F32)
            sum_refs[0][...] = jnp.sum(out, axis=0)[None, :]
            sum_refs[1][...] = jnp.sum(out * out, axis=0)[None, :]

    partial = jax.ShapeDtypeStruct((pixels // rows, outputs), F32)
    per_tile = pl.BlockSpec((1, cols), lambda i, j: (i, j))
    outs = pl.pallas_call(
        kernel, grid=(pixels // rows, outputs // cols),
        out_shape=(jax.ShapeDtypeStruct((pixels, outputs), BF16),) + (() if prologue else (partial, partial)),
        in_specs=[pl.BlockSpec((rows, channels), lambda i, j: (i, 0)),
                  pl.BlockSpec((channels,), lambda i, j: (0,)), pl.BlockSpec((channels,), lambda i, j: (0,)),
                  pl.BlockSpec((channels, cols), lambda i, j: (0, j))],
        out_specs=(pl.BlockSpec((rows, cols), lambda i, j: (i, j)),) + (() if prologue else (per_tile, per_tile)),
        compiler_params=pallas_triton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )(x, scale, shift, w)
    return outs[0] if prologue else (outs[0], outs[1].sum(0), outs[2].sum(0))


def cudnn_conv(x, w, scale=None, shift=None):
    """The same product as XLA runs a Keras 1x1 Conv2D (NHWC), after XLA's normalisation when given."""
    if scale is not None:
        x = jnp.maximum(x.astype(F32) * scale + shift, 0.0).astype(BF16)
    images = x.reshape(256, -1, 1, x.shape[1])
    out = jax.lax.conv_general_dilated(images, w[None, None], (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out.reshape(x.shape[0], -1)


def gram_sums(x, w):
    """cuDNN's convolution, and its output's sums from the input's sums and Gram matrix."""
    wide = w.astype(F32)
    gram = jax.lax.dot_general(x, x, (((0,), (0,)), ((), ())), preferred_element_type=F32)
    return cudnn_conv(x, w), x.astype(F32).sum(0) @ wide, jnp.sum(wide * (gram @ wide), axis=0)


def with_sums(out):
    wide = out.astype(F32)
    return out, wide.sum(0), (wide * wide).sum(0)


def best_ms(f, *args, rounds=5, calls=20):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            out = f(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls * 1e3)
    return min(times)


def fastest_pallas(args, reference, interpret, compare):
    """(ms, tile) of the fastest tile shape whose result matches the reference; (None, None) when none does."""
    best = (None, None)
    for tile in TILES:
        f = jax.jit(lambda *a, tile=tile: pallas_conv(*a, tile=tile, interpret=interpret))
        try:
            got = f(*args)
        except Exception as error:  # noqa: BLE001  (a tile shape Triton refuses is skipped, and said)
            print(f"  tile {tile}: {type(error).__name__}: {str(error)[:120]}", flush=True)
            continue
        if not compare(got, reference):
            print(f"  tile {tile}: result differs from XLA's", flush=True)
            continue
        ms = 0.0 if interpret else best_ms(f, *args)
        if best[0] is None or ms < best[0]:
            best = (ms, tile)
    return best


def sums_match(got, reference):
    """Whether the batch norm would see the same statistics: means within 1% of a standard deviation,
    variances within 1%."""
    pixels = reference[0].shape[0]
    (mean, var), (ref_mean, ref_var) = ((s / pixels, q / pixels - (s / pixels) ** 2) for _, s, q in (got, reference))
    return bool(jnp.all(jnp.abs(mean - ref_mean) <= 0.01 * ref_var**0.5) and jnp.all(jnp.abs(var - ref_var) <= 0.01 * ref_var))


def product_matches(got, reference):
    return float(jnp.max(jnp.abs(got.astype(F32) - reference.astype(F32)))) < 0.1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="check the kernels on small shapes on the CPU")
    args = parser.parse_args()
    shapes = SMALL if args.interpret else SHAPES
    key = jax.random.PRNGKey(0)
    rows, measured = [], []
    for stage, role, pixels, channels, outputs, count in shapes:
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, pixels * channels + outputs), 4)
        x = jax.random.normal(k1, (pixels, channels), F32).astype(BF16)
        w = (jax.random.normal(k2, (channels, outputs), F32) / channels ** 0.5).astype(BF16)
        conv_alone = best_ms(jax.jit(cudnn_conv), x, w)
        xla_sums = jax.jit(lambda x, w: with_sums(cudnn_conv(x, w)))
        conv_sums = best_ms(xla_sums, x, w)
        pallas_sums, tile = fastest_pallas((x, w), xla_sums(x, w), args.interpret, sums_match)
        normalised = prologue = gram = None
        if role == "expand":
            if not sums_match(jax.jit(gram_sums)(x, w), xla_sums(x, w)):
                raise SystemExit(f"the Gram matrix's sums differ from XLA's for {pixels} x {channels} -> {outputs}")
            gram = best_ms(jax.jit(gram_sums), x, w)
            scale = jax.random.uniform(k3, (channels,), F32, 0.5, 1.5)
            shift = jax.random.normal(k4, (channels,), F32) * 0.1
            xla_norm = jax.jit(cudnn_conv)
            normalised = best_ms(xla_norm, x, w, scale, shift)
            prologue, _ = fastest_pallas((x, w, scale, shift), xla_norm(x, w, scale, shift), args.interpret,
                                         product_matches)
        times = (conv_alone, conv_sums, pallas_sums, gram, normalised, prologue)
        measured.append((role, count, times))
        rows.append([stage, role, f"{pixels:,} x {channels} -> {outputs}", count]
                    + [None if ms is None else round(ms, 3) for ms in times])
        print(rows[-1], f"tile {tile}", flush=True)
    for label, roles in (("all", None), ("expand", ("expand",))):
        chosen = [(count, times) for role, count, times in measured if roles is None or role in roles]
        totals = [None if any(times[i] is None for _, times in chosen) else sum(count * times[i] for count, times in chosen)
                  for i in range(6)]
        rows.append([label, "weighted by count", "", sum(count for count, _ in chosen)]
                    + [None if total is None else round(total, 2) for total in totals])
        print(rows[-1])
    if not args.interpret:
        results.record("gpu-fused-1x1", ["stage", "role", "pixels x channels -> outputs", "count",
                                         "cuDNN conv ms", "+ XLA's BN sums ms", "Pallas, sums in epilogue ms",
                                         "sums from the input's Gram ms", "XLA BN-ReLU + conv ms", "Pallas, BN-ReLU in prologue ms"], rows)


if __name__ == "__main__":
    main()
