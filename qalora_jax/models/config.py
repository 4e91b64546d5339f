"""The hyperparameters of a LLaMA-family decoder, shared by every loader and by the model code."""

from __future__ import annotations

import dataclasses
import math

from qalora_jax.checks import check_choice

ARCHITECTURES = ("llama", "mistral", "qwen2")
DTYPES = ("float32", "bfloat16")
ROPE_SCALINGS = ("llama3",)
REMAT_KEEPS = ("", "qkv", "mlp", "qkv,mlp")  # what a rematerialised block keeps beside its attention (llama.REMAT_KEEP)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3-style frequency scaling of RoPE (rope_type "llama3" in Hugging Face configs).

  With wavelength lambda_i = 2 pi / f_i of each base frequency f_i, and L = original_max_position:
    lambda_i < L / high_freq_factor  -> f_i unchanged (high frequencies)
    lambda_i > L / low_freq_factor   -> f_i / factor   (low frequencies)
    otherwise                        -> (1 - s) f_i / factor + s f_i,
                                        s = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position: int
  kind: str = "llama3"


@dataclasses.dataclass(frozen=True)
class Config:
  """A decoder's shape and numerics. Frozen and hashable: it is a static argument of jitted functions.

  Attributes:
    arch: the checkpoint family ("llama", "mistral", "qwen2"); the code path is the same for all three.
    vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, head_dim: shapes.
    rope_theta: RoPE base; rope_scaling: optional llama-3-style scaling.
    rms_eps: epsilon of RMSNorm.
    max_seq_len: the context length; longer inputs are rejected.
    tie_embeddings: the output head is the transposed token embedding (no params["lm_head"]).
    qkv_bias: q/k/v projections carry a bias (Qwen2); o_bias: the output projection does too.
    sliding_window: keys further back than this many positions are masked (Mistral); None: no window.
    dtype: compute dtype ("float32" or "bfloat16"); parameters keep their own dtype and are cast in use.
    matmul_dtype: the operand dtype of the weight matmuls (the linears and the head) and of attention's
      products (q k^T, p v and their gradients'; the softmax keeps the compute dtype), accumulated in the
      compute dtype; None: the compute dtype. "bfloat16" with float32 compute is mixed precision, as PyTorch's
      autocast runs it: on CPUs with AMX or AVX512-BF16 and on accelerators those matmuls run several times
      faster. "int8" (for decoding):
      INT4 group-wise weights meet activations quantized to int8 per 16 inputs in a CPU kernel that reads the
      packed codes (qalora_jax.kernels.cpu_matmul); everything else keeps the compute dtype.
    remat: recompute each block's activations in the backward pass (jax.checkpoint), keeping only the
      attention's output and softmax statistics (models.attention.REMAT_SAVED) and the adapters' small
      intermediates, QA-LoRA's pooled inputs and x A (nn.adapters.REMAT_SAVED).
    remat_keep: with remat, what else each block keeps rather than recomputes: "qkv" (attention's q, k, v after
      RoPE: (heads + 2 kv_heads) head_dim floats a token), "mlp" (the gate and up projections' outputs:
      2 intermediate_size floats a token), both ("qkv,mlp") or nothing (""). Speed for memory; the numbers
      are the same.
    scan_layers: run the blocks with jax.lax.scan (one compiled block) or as an unrolled Python loop.
    bos_id, eos_ids, pad_id: special token ids (generation stops at any of eos_ids).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-5
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  sliding_window: int | None = None
  arch: str = "llama"
  dtype: str = "float32"
  matmul_dtype: str | None = None
  remat: bool = False
  remat_keep: str = ""
  scan_layers: bool = True
  bos_id: int | None = None
  eos_ids: tuple[int, ...] = ()
  pad_id: int | None = None

  def __post_init__(self):
    check_choice("arch", self.arch, ARCHITECTURES)
    check_choice("dtype", self.dtype, DTYPES)
    check_choice("matmul_dtype", self.matmul_dtype, (None, *DTYPES, "int8"))
    check_choice("remat_keep", self.remat_keep, REMAT_KEEPS)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is not supported; allowed: a positive integer")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                       f"allowed: num_kv_heads dividing num_heads")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} is not supported; allowed: an even number (RoPE rotates pairs)")
    if self.rope_scaling is not None:
      check_choice("rope_scaling.kind", self.rope_scaling.kind, ROPE_SCALINGS)
    if not isinstance(self.eos_ids, tuple):
      object.__setattr__(self, "eos_ids", tuple(self.eos_ids))

  @property
  def q_size(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def kv_size(self) -> int:
    return self.num_kv_heads * self.head_dim

  def replace(self, **changes) -> Config:
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Number of weights, counting a tied embedding once."""
    d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
    attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
    attn += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
    block = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + L * block + d + head


def rope_frequencies(config: Config):
  """The head_dim / 2 rotation frequencies f_i = theta^(-2i / head_dim), llama-3-scaled if configured."""
  import numpy as np

  d = config.head_dim
  freqs = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
  s = config.rope_scaling
  if s is not None:
    wavelength = 2 * math.pi / freqs
    low_wavelength = s.original_max_position / s.low_freq_factor
    high_wavelength = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    freqs = np.where(wavelength < high_wavelength, freqs,
                     np.where(wavelength > low_wavelength, freqs / s.factor, blended))
  return freqs.astype(np.float32)
