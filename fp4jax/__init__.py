"""fp4jax: block-scaled 4- to 8-bit numerics (MXFP4, NVFP4, MXFP6, MXFP8, MXINT8) for JAX.

``fp4jax.flax`` (linen) and ``fp4jax.nnx`` hold the Flax layers; they are
imported on demand so the core needs no Flax. ``fp4jax.checkpoints`` reads and
writes safetensors files and needs the ``checkpoints`` extra.
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
from fp4jax.matmul import PreparedWeight, prepare_weight, scaled_dot_general, scaled_matmul
from fp4jax.packing import dequantize_packed, pack_fp4, unpack_fp4
from fp4jax.params import quantize_params
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
