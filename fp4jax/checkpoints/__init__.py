"""safetensors checkpoints of QArrays: read and written one tensor at a time, replaced atomically.

A QArray is stored as plain integer/float tensors under one of three naming
conventions ("layouts"). Every file fp4jax writes also records each QArray's
format and axis in the header's ``__metadata__`` under the key ``"fp4jax"``
(JSON: ``{"version": 1, "tensors": {name: {"format", "axis", "layout",
"shape"}}}``); other tools ignore it, and files without it load by the tensor
names alone.

``"gpt_oss"`` (MXFP4 blocked along the last axis; the default for those)
  ``{name}_blocks``: uint8 ``(..., G, 16)``, two E2M1 codes a byte (low nibble
  = even element); ``{name}_scales``: uint8 ``(..., G)`` E8M0 bytes. The
  QArray has shape ``(..., G * 32)``. As in Hugging Face's GPT-OSS
  checkpoints; OpenAI's original ``{name}.blocks`` / ``{name}.scales`` load
  too. Scale byte 0xFF is E8M0's NaN in a QArray, where GPT-OSS's ``ldexp``
  decoders give +-Inf (no trained checkpoint holds it).
``"deepseek"`` (MXFP4 blocked along the last axis)
  ``{name}``: uint8 ``(..., K // 2)`` packed as above; the scales, uint8 E8M0
  ``(..., K // 32)``, are ``{prefix}.scale`` when ``name`` is
  ``{prefix}.weight`` and ``{name}.scale`` otherwise (DeepSeek's fused
  layout). On load, int8 bytes and ``float8_e8m0fnu`` scales are accepted too.
``"fp4jax"`` (any format and axis; used for whatever the layouts above cannot
  express: NVFP4, MXFP8, MXFP4 along another axis)
  ``{name}.qvalues``: uint8; 4-bit elements packed two a byte along the block
  axis (so that axis is halved), 8-bit elements as their bytes, same shape.
  ``{name}.qscales``: uint8, the scale bytes (E8M0 or E4M3), the QArray's scale
  shape. ``{name}.qglobal_scale``: float32 scalar (NVFP4 only).

Quantized payloads are always written as uint8 so that every safetensors
reader can open the file (safetensors' numpy API cannot return float8 arrays as
of 0.8.0); plain float8 tensors passing through keep their ``F8_*`` dtype, and
fp4jax reads those bytes itself.

Reading checks the header before any data: a missing partner tensor, shapes
or dtypes that do not agree, and a truncated file raise ValueError naming the
tensor. Writing streams: the header is computed up front (shapes come from
``jax.eval_shape``), then each tensor is encoded, written and dropped, into a
temporary file in the destination directory that ``os.replace`` moves into
place only once complete (:mod:`fp4jax.outfile`: the destination is checked
first, errors name it and never the temporary file, and the file gets the
permissions ``open()`` would give it).

Modules: :mod:`~fp4jax.checkpoints.layout` (names, encodings, the header),
:mod:`~fp4jax.checkpoints.files` (load / save),
:mod:`~fp4jax.checkpoints.convert`.
"""

from fp4jax.checkpoints.convert import ConvertRecord, convert, sqnr_db
from fp4jax.checkpoints.files import CheckpointFile, iter_load, load, save
from fp4jax.checkpoints.layout import LAYOUTS, METADATA_KEY, Entry, read_entries

__all__ = [
    "LAYOUTS",
    "METADATA_KEY",
    "Entry",
    "CheckpointFile",
    "read_entries",
    "iter_load",
    "load",
    "save",
    "convert",
    "ConvertRecord",
    "sqnr_db",
]
