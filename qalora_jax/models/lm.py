"""`load` a model by asset name, GGUF file, Hugging Face directory or saved model directory, as a
`LanguageModel`; `save` writes the latter (what `qalora merge` writes).

    lm = models.load("smollm2-135m")
    models.save(lm, "runs/merged")                  # QTensors kept as they are
    lm = models.load("runs/merged")
    ids = lm.tokenizer.encode("To be, or not to be")
    logits = lm(jnp.asarray([ids]))                 # [1, seq, vocab], float32
    logits = lm.apply(other_params, tokens)          # pure in the parameters (jitted)
    model = lm.decoder()                             # the same model as a Flax NNX module
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from qalora_jax import assets, tree_paths
from qalora_jax.files import atomic_dir, write_json
from qalora_jax.models import gguf, hf, llama
from qalora_jax.models.config import Config, RopeScaling
from qalora_jax.models.quantize import QuantizationRules, load_leaves, save_leaves
from qalora_jax.models.tokenizer import Tokenizer
from qalora_jax.quant import QTensor

# A saved model directory (`save`): these three files.
SAVED_JSON = "qalora_model.json"
SAVED_WEIGHTS = "model.safetensors"
SAVED_TOKENIZER = "tokenizer.json"


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
                   f"a .gguf file, a Hugging Face model directory, or a saved model directory")


def save(lm: LanguageModel, out: str | Path, info: dict | None = None, overwrite: bool = False) -> Path:
  """Writes `lm` as a model directory that `load` reads back, atomically:

    model.safetensors   every parameter leaf (models.quantize.save_leaves): a float leaf as tensor "<path>", a
                        QTensor as its arrays "<path>/<array>" with its QMeta in the file's metadata
    qalora_model.json   {"config": the Config's fields, "tokenizer": special ids, "info": `info`}
    tokenizer.json      the tokenizer (`tokenizers` JSON)

  The arrays are written as they are (dtype included), so QTensors load back bit for bit."""
  if lm.tokenizer is None:
    raise ValueError("lm.tokenizer=None: a saved model directory holds its tokenizer; allowed: a model with one")
  tok = lm.tokenizer
  with atomic_dir(out, overwrite=overwrite) as tmp:
    save_leaves(tmp / SAVED_WEIGHTS, dict(tree_paths.flatten(lm.params)))
    (tmp / SAVED_TOKENIZER).write_text(tok.backend.to_str())
    write_json(tmp / SAVED_JSON, {
        "config": dataclasses.asdict(lm.config),
        "tokenizer": {"bos_id": tok.bos_id, "eos_ids": list(tok.eos_ids), "pad_id": tok.pad_id},
        "info": info or {}})
  return Path(out)


def saved_info(model: str | Path) -> dict | None:
  """The `info` a saved model directory was written with (None for any other model)."""
  path = Path(model).expanduser()
  if not (path / SAVED_JSON).is_file():
    return None
  return json.loads((path / SAVED_JSON).read_text())["info"]


def _load_saved(path: Path, dtype, param_dtype, rules, config_overrides) -> tuple[Config, dict, Tokenizer]:
  spec = json.loads((path / SAVED_JSON).read_text())
  fields = dict(spec["config"])
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  fields["eos_ids"] = tuple(fields.get("eos_ids") or ())
  saved = Config(**fields)
  # Run-time settings start from the defaults, as for any other model; the layout follows scan_layers.
  config = saved.replace(dtype=dtype, matmul_dtype=None, remat=False, remat_keep="", scan_layers=True)
  config = config.replace(**config_overrides)
  leaves = {p: a if isinstance(a, QTensor) or not jnp.issubdtype(a.dtype, jnp.floating) else a.astype(param_dtype)
            for p, a in load_leaves(path / SAVED_WEIGHTS).items()}
  params = llama.stack_blocks(tree_paths.unflatten(leaves))
  if rules is not None:  # on the stacked layout, whose paths the rules name
    params = tree_paths.unflatten({p: rules(p, leaf) for p, leaf in tree_paths.flatten(params)})
  if not config.scan_layers:
    params = llama.unstack_blocks(params)
  t = spec["tokenizer"]
  tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(str(path / SAVED_TOKENIZER)), bos_id=t["bos_id"],
                        eos_ids=tuple(t["eos_ids"]), pad_id=t["pad_id"])
  return config, params, tokenizer


def load(model: str | Path, dtype: str = "float32", param_dtype=np.float32, quantize=None,
         keep_quantized: bool | str = False, **config_overrides) -> LanguageModel:
  """Loads a model by asset name ("smollm2-135m"), GGUF file, Hugging Face directory (config.json and
  safetensors) or a directory written by `save` (QTensors as saved). `dtype` is the compute dtype,
  `param_dtype` the storage dtype of the float parameters; `quantize` (rules as for `quantize_params`)
  quantizes each float weight as it is read, so the float model is never whole in memory; `keep_quantized`
  keeps a GGUF file's Q4_0 / Q4_1 / Q8_0 block linears and token table as the `int` QTensors they hold exactly
  (`gguf.load`; a regex keeps the parameter paths it matches only); further keywords replace Config fields (e.g.
  scan_layers=False, remat=True)."""
  path = resolve(model)
  rules = None if quantize is None else QuantizationRules(quantize)
  per_tensor = None if rules is None else (lambda p, w: rules(p, jnp.asarray(w, param_dtype)))
  if path.is_dir() and (path / SAVED_JSON).is_file():
    config, params, tokenizer = _load_saved(path, dtype, param_dtype, rules, config_overrides)
  elif path.is_dir():
    config, params, tokenizer = hf.load(path, dtype=dtype, param_dtype=param_dtype, per_tensor=per_tensor,
                                        **config_overrides)
  elif path.suffix == ".gguf":
    config, params, tokenizer = gguf.load(path, dtype=dtype, param_dtype=param_dtype, per_tensor=per_tensor,
                                          keep_quantized=keep_quantized, **config_overrides)
  else:
    raise ValueError(f"model={str(model)!r} is not supported: {path.name} is neither a .gguf file nor a "
                     f"directory; allowed: {', '.join(model_names())}, a .gguf file, or a Hugging Face model directory")
  if rules is not None:
    rules.summary()  # every rule matched a weight
  return LanguageModel(config, params, tokenizer)
