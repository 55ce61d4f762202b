"""fp4jax: block-scaled 4- to 8-bit numerics (MXFP4, NVFP4, MXFP6, MXFP8, MXINT8) for JAX.

``fp4jax.flax`` (linen) and ``fp4jax.nnx`` hold the Flax layers; they are
imported on demand so the core needs no Flax. ``fp4jax.checkpoints`` reads and
writes safetensors files and needs the ``checkpoints`` extra.

Layers, from the bottom up. A module imports only modules listed before it
(on an earlier line, or earlier on its own line; a package's submodules are
listed in brackets, in order, and its ``__init__`` comes after them), never a
private name of another module, and a ``_private`` module only from inside its
own package. ``tests/test_layering.py`` enforces this list.

  1. formats, _bits, hadamard
  2. qarray, packing
  3. prepared, sharding
  4. scales [elements, fixed, search]
  5. reference [blocks, quantize, dot]
  6. kernels [common, matmul_common, e2m1_bits, quantize_pack, dequantize, hadamard, fake_quant, w4a16_matmul, mx_matmul, int8_rebase, int8_gemm, int8_quantize]
  7. backend
  8. quantize, int8_matmul, matmul, layouts
  9. stats, params, qat [config, rounding, fake, dot]
 10. flax, nnx
 11. outfile, checkpoints [_safetensors, layout, files, convert], report
 12. cli, __main__

What each holds: formats, bit helpers and the Hadamard transform's order (1); the QArray data type and
packing (2); the kernels' weight layout (QArray storage conversions) and
sharding helpers (3); the scale
rules (4); the pure-jnp reference every kernel equals (5); the Pallas kernels
(6); the one place that picks an implementation (7); the public numerics API
(8); QAT, PTQ and diagnostics (9); Flax layers (10); output files,
checkpoints and reports (11); the command line (12).
"""

from fp4jax import layouts
from fp4jax.formats import (
    ALL_FORMATS,
    FORMATS,
    MXFP4,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP8_E4M3,
    MXFP8_E5M2,
    MXINT8,
    NVFP4,
    FixedPoint,
    Format,
    get_format,
)
from fp4jax.int8_matmul import Int8Weight, int8_weight
from fp4jax.matmul import prepare_weight, scaled_dot_general, scaled_matmul
from fp4jax.packing import dequantize_packed, pack_fp4, unpack_fp4
from fp4jax.params import quantize_params
from fp4jax.prepared import with_layout
from fp4jax.qarray import QArray, validate_qarray
from fp4jax.qat import (
    OperandConfig,
    QatConfig,
    fake_quant,
    quantized_dot_general,
    quantized_einsum,
    random_hadamard,
    stochastic_quantize,
)
from fp4jax.quantize import dequantize, global_amax, global_scale_from_amax, quantize
from fp4jax.scales import ALL_SCALE_RULES, SCALE_RULES, block_hessians
from fp4jax.stats import AmaxHistory, Stats, stats

__version__ = "0.1.0"


def __getattr__(name):
  if name == "PreparedWeight":  # removed; say what replaces it rather than a bare AttributeError
    from fp4jax.prepared import PREPARED_WEIGHT_GONE

    raise AttributeError(PREPARED_WEIGHT_GONE)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
