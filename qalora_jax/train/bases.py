"""The frozen base of a config: its model loaded with the weights the config quantizes quantized as they are
read, or, for a calibrated quantizer (GPTQ), calibrated on the training plays and cached.

    lm, frozen, summary = load_base(cfg)
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import ml_collections

from qalora_jax import assets, calibration, data, models, nn, provenance, quant


def kept_table(cfg: ml_collections.ConfigDict) -> str | bool:
  """What `models.load` keeps as stored: the token table, when the file holds it in exact 8-bit blocks (SmolLM2's
  Q8_0: a quarter of float32's memory, the same values), unless it trains or a base rule quantizes it."""
  table = models.quantize.EMBEDDING
  trains = bool(cfg.adapter.extra_trainable) and re.fullmatch(cfg.adapter.extra_trainable, table)
  requantized = cfg.base.quantizer != "none" and re.fullmatch(cfg.base.targets, table)
  return False if trains or requantized else table


def build_model(cfg: ml_collections.ConfigDict, quantize=None) -> models.LanguageModel:
  """The config's model; `quantize` (rules) quantizes its weights as they are read (see `models.load`)."""
  m = cfg.model
  if m.name == "tiny":
    lm = models.tiny_model(cfg.seed)
    lm = lm.replace(config=lm.config.replace(dtype=m.dtype, matmul_dtype=m.matmul_dtype, remat=m.remat,
                                             remat_keep=m.remat_keep, scan_layers=m.scan_layers))
    return lm if quantize is None else lm.replace(params=models.quantize_params(lm.params, quantize)[0])
  return models.load(m.name, dtype=m.dtype, matmul_dtype=m.matmul_dtype, remat=m.remat, remat_keep=m.remat_keep,
                     scan_layers=m.scan_layers, quantize=quantize, keep_quantized=kept_table(cfg))


def load_base(cfg: ml_collections.ConfigDict, log=print) -> tuple[models.LanguageModel, dict, str]:
  """(model, frozen base, summary): the model's params with the weights matching cfg.base.targets quantized
  (or all float). A plain quantizer quantizes each weight as it is read, so the float model is never whole
  in memory; a calibrated one (GPTQ) needs the float model first (`calibrated_base`)."""
  if cfg.base.quantizer == "none":
    lm = build_model(cfg)
    return lm, lm.params, "float base"
  quantizer = quant.get(cfg.base.quantizer, **cfg.base.options.to_dict())
  if quantizer.needs_calibration:
    lm = build_model(cfg)
    return lm, *calibrated_base(cfg, lm, quantizer, log)
  lm = build_model(cfg, quantize=[(cfg.base.targets, quantizer)])
  return lm, lm.params, f"{quantizer} on {cfg.base.targets}: {nn.tree_nbytes(lm.params):,} bytes"


def bases_dir() -> Path:
  """Where calibrated bases are cached."""
  return assets.cache_dir() / "bases"


def model_sha256(cfg) -> str:
  """What the config's model is, by content: an asset's pinned sha256s, a file's or a directory's content
  hash, or the tiny model's seed (its weights are a function of it)."""
  name = cfg.model.name
  if name == "tiny":
    return f"tiny:{cfg.seed}"
  if name in assets.ASSETS:
    return hashlib.sha256(json.dumps(assets.ASSETS[name].files_sha256, sort_keys=True).encode()).hexdigest()
  path = models.resolve(name)
  return provenance.files_sha256(path.rglob("*"), path) if path.is_dir() else provenance.file_sha256(path)


# what a cached calibrated base depends on: the quantizers, the calibration driver and the model's forward pass
BASE_CODE = ("quant", "calibration.py", "models", "nn", "data")


def calibrated_base(cfg, lm: models.LanguageModel, quantizer: quant.Quantizer, log=print) -> tuple[dict, str]:
  """(frozen tree, summary) of a quantizer that takes calibration data (GPTQ: `quantize_with_hessian`): it
  sees cfg.base.calibration segments of cfg.base.calibration_len tokens of the training plays, drawn with
  cfg.base.calibration_seed (not the run's seed: the runs of a seed sweep share one base). The result is
  cached under the asset cache, keyed by the model's and the corpus's content, the quantizer and its
  options and the calibration; an entry made by other code (`BASE_CODE`) is rebuilt."""
  if cfg.base.targets != models.BLOCK_LINEARS:
    raise ValueError(f"config.base.targets={cfg.base.targets!r}: a calibrated quantizer "
                     f"({cfg.base.quantizer}) quantizes all block linears; allowed: {models.BLOCK_LINEARS!r}")
  root, files = data.corpus_files(cfg.data.corpus)
  inputs = {"model": model_sha256(cfg), "quantizer": cfg.base.quantizer, "options": cfg.base.options.to_dict(),
            "calibration": [cfg.base.calibration, cfg.base.calibration_len, cfg.base.calibration_seed],
            "corpus": provenance.files_sha256(files, root)}
  key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]
  cached = bases_dir() / f"{key}.safetensors"
  version = provenance.code_version(*BASE_CODE)
  if provenance.is_current(cached, version, log):
    return models.load_quantized(cached, lm.params), f"{quantizer} base from the cache ({cached})"
  frozen, stats = calibrate(cfg, lm, lm.params, quantizer)
  models.save_quantized(cached, frozen)
  provenance.write_stamp(cached, version, **inputs)
  return frozen, (f"{quantizer} on {stats.tokens} calibration tokens in {stats.seconds:.0f} s: mean output error "
                  f"{stats.output_rel_error:.3e} (cached in {cached})")


def calibrate(cfg, lm: models.LanguageModel, params: dict, quantizer: quant.Quantizer):
  """(frozen tree, stats): the block linears of `params` quantized on the config's calibration tokens."""
  tokens = calibration.calibration_tokens(lm, cfg.base.calibration, cfg.base.calibration_len,
                                          cfg.base.calibration_seed, corpus=cfg.data.corpus, heldout=cfg.data.heldout)
  return calibration.quantize_model(lm.config, params, tokens, quantizer)
