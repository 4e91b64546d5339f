"""`load` a model by asset name, GGUF file or Hugging Face directory, as a `LanguageModel`.

    lm = models.load("smollm2-135m")
    ids = lm.tokenizer.encode("To be, or not to be")
    logits = lm(jnp.asarray([ids]))                 # [1, seq, vocab], float32
    logits = lm.apply(other_params, tokens)          # pure in the parameters (jitted)
    model = lm.decoder()                             # the same model as a Flax NNX module
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from qalora_jax import assets
from qalora_jax.models import gguf, hf, llama
from qalora_jax.models.config import Config
from qalora_jax.models.quantize import Quantizing
from qalora_jax.models.tokenizer import Tokenizer


@dataclasses.dataclass
class LanguageModel:
  """A decoder's configuration, parameters and tokenizer. `apply(params, tokens)` is a pure function of
  its arguments; `lm(tokens)` applies the held parameters."""

  config: Config
  params: dict
  tokenizer: Tokenizer | None = None

  def apply(self, params: dict, tokens, positions=None, padding_mask=None) -> jax.Array:
    """Logits [batch, seq, vocab] (float32), see `llama.apply`."""
    llama.check_tokens(self.config, tokens)
    return llama.apply_jit(self.config, params, tokens, positions, padding_mask)

  def __call__(self, tokens, positions=None, padding_mask=None) -> jax.Array:
    return self.apply(self.params, tokens, positions, padding_mask)

  def decoder(self, params: dict | None = None) -> llama.Decoder:
    """The Flax NNX decoder around `params` (default: the held parameters), e.g. for nnx.split / nnx.display."""
    return llama.decoder(self.config, self.params if params is None else params)

  def replace(self, **changes) -> LanguageModel:
    """A copy with fields replaced, e.g. lm.replace(params=frozen) or lm.replace(config=lm.config.replace(...))."""
    return dataclasses.replace(self, **changes)


def model_names() -> list[str]:
  """The asset names that are models (their entry is a GGUF file)."""
  return sorted(name for name, a in assets.ASSETS.items() if a.entry.endswith(".gguf"))


def resolve(model: str | Path) -> Path:
  """The local path of `model`: an existing GGUF file or model directory, else a model asset name."""
  path = Path(model).expanduser()
  if path.exists():
    return path
  if str(model) in model_names():
    return assets.fetch(str(model))
  raise ValueError(f"model={str(model)!r} is not supported; allowed: {', '.join(model_names())}, "
                   f"a .gguf file, or a Hugging Face model directory")


def load(model: str | Path, dtype: str = "float32", param_dtype=np.float32, quantize=None, **config_overrides
           ) -> LanguageModel:
  """Loads a model by asset name ("smollm2-135m"), GGUF file or Hugging Face directory (config.json and
  safetensors). `dtype` is the compute dtype, `param_dtype` the storage dtype of the float parameters;
  `quantize` (rules as for `quantize_params`) quantizes each weight as it is read, so the float model is
  never whole in memory; further keywords replace Config fields (e.g. scan_layers=False, remat=True)."""
  path = resolve(model)
  quantizing = None if quantize is None else Quantizing(quantize)
  finish = None if quantizing is None else (lambda p, w: quantizing(p, jnp.asarray(w, param_dtype)))
  if path.is_dir():
    config, params, tokenizer = hf.load(path, dtype=dtype, param_dtype=param_dtype, finish=finish,
                                        **config_overrides)
  elif path.suffix == ".gguf":
    config, params, tokenizer = gguf.load(path, dtype=dtype, param_dtype=param_dtype, finish=finish,
                                          **config_overrides)
  else:
    raise ValueError(f"model={str(model)!r} is not supported: {path.name} is neither a .gguf file nor a "
                     f"directory; allowed: {', '.join(model_names())}, a .gguf file, or a Hugging Face model directory")
  if quantizing is not None:
    quantizing.summary()  # every rule matched a weight
  return LanguageModel(config, params, tokenizer)
