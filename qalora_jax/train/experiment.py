"""An experiment: what a training run builds from its config before its first step, built and checked once.

    exp = build(cfg)                       # config validated, mesh checked, model + base + adapters + optimizer
    blocks, mask, held = training_data(cfg, exp.lm)
    init, step = exp.make_step()           # the pure train step over (trainable, frozen, batch)
    exp, trained, step = restore(workdir)  # a finished or interrupted run, for evaluation, merging and export
    lm, info = merged_model(workdir)       # its adapters folded into the base, info as `qalora merge` saves it
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from qalora_jax import calibration, data, models, nn, quant, tree_paths
from qalora_jax.models import llama
from qalora_jax.train import checkpoints
from qalora_jax.train import mesh as mesh_lib
from qalora_jax.train.bases import calibrate, load_base
from qalora_jax.train.config import from_json, quantizer_from_spec, validate
from qalora_jax.train.step import make_optimizer, make_train_step


def training_data(cfg, lm) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """(blocks [n, seq_len + 1], loss mask or None, held-out token ids for perplexity)."""
  eos = lm.config.eos_ids[0] if lm.config.eos_ids else 0
  if cfg.data.seq_len > lm.config.max_seq_len:
    raise ValueError(f"config.data.seq_len={cfg.data.seq_len} exceeds the model's context "
                     f"max_seq_len={lm.config.max_seq_len}")
  train, held = data.split_plays(data.tokenized_plays(cfg.data.corpus, lm.tokenizer), tuple(cfg.data.heldout))
  held_ids = np.concatenate(list(held.values()))[: cfg.data.eval_tokens]
  if cfg.data.jsonl:
    from qalora_jax.data.instructions import encode_instructions

    examples = data.read_instructions(cfg.data.jsonl)
    blocks, mask = encode_instructions(examples, lm.tokenizer.encode, cfg.data.seq_len, eos,
                                       lm.config.pad_id or 0)
    return blocks, mask, held_ids
  return data.pack_blocks(train.values(), cfg.data.seq_len, eos), None, held_ids


def evaluate_ppl(lm, params, ids, window: int, matmul_dtype: str | None = None) -> float:
  """Perplexity with float matmuls whatever the training's model.matmul_dtype, so that runs compare (or with
  `matmul_dtype`, e.g. "int8" to measure the decoding path's quality)."""
  lm = lm.replace(config=lm.config.replace(matmul_dtype=matmul_dtype))
  return models.perplexity(lm, ids, window=min(window, len(ids)), params=params)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run builds from its config before the first step, once: the config (validated), the device
  mesh (checked against the batch), the model and its decoder (an NNX module) split into

      graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

  `trainable` holds the adapters (nn.AdapterParam, an nnx.Param) and the leaves config.adapter.extra_trainable
  turned into nnx.Params; `frozen` holds the quantized base (nn.Frozen). The train step is a pure function of
  (trainable, frozen, batch); the optimizer sees `trainable` alone."""

  cfg: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  lm: models.LanguageModel
  graphdef: nnx.GraphDef
  frozen: nnx.State
  trainable: nnx.State  # freshly initialised
  optimizer: optax.GradientTransformation

  def model(self, trainable: nnx.State, frozen: nnx.State | None = None) -> llama.Decoder:
    """The decoder with the given trainable state (and the run's frozen state)."""
    return nnx.merge(self.graphdef, trainable, self.frozen if frozen is None else frozen)

  @staticmethod
  def nll(model: llama.Decoder, tokens, targets, dropout_rng=None):
    """-log p(targets | tokens) [batch, seq], the head and softmax fused (what training uses)."""
    return model.nll(tokens, targets, dropout_rng=dropout_rng)

  def make_step(self):
    """(init, step) of train.make_train_step over this run's states."""
    return make_train_step(self.nll, self.optimizer, self.cfg.optim.accum_steps,
                           combine=lambda frozen, trainable: self.model(trainable, frozen))

  def on_mesh(self, donate: bool):
    """(initial train state, frozen state, jitted step) on the mesh: the states placed as
    mesh_lib.param_shardings says (split over fsdp), the step's output state kept so (`donate`: its input
    state's buffers reused)."""
    init, step = self.make_step()
    state = init(self.trainable)
    shardings = mesh_lib.param_shardings(state, self.mesh)
    frozen = mesh_lib.put(self.frozen, mesh_lib.param_shardings(self.frozen, self.mesh))
    step = jax.jit(step, donate_argnums=0 if donate else (), out_shardings=(shardings, None))
    return mesh_lib.put(state, shardings), frozen, step

  def batch(self, blocks: np.ndarray, mask: np.ndarray | None, step: int) -> dict:
    """The batch of training step `step` (a pure function of the seed and the step), placed on the mesh."""
    rows = data.batch_at(blocks, self.cfg.data.batch_size, self.cfg.seed, step, mask)
    return mesh_lib.put(rows, mesh_lib.batch_sharding(self.mesh))

  def dropout_key(self, step: int) -> jax.Array:
    """The dropout key of training step `step`: fold_in(fold_in(PRNGKey(seed), 2), step)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.cfg.seed), 2), step)

  def params(self, trainable: nnx.State) -> dict:
    """The model's parameter tree (nested dicts) with the given trainable leaves."""
    return llama.params_of(self.model(trainable))

  def adapters(self, trainable: nnx.State) -> dict:
    """The adapter tree ({..: {"adapter": nn.Adapter}}) of the given trainable state (e.g. for PEFT export)."""
    return tree_paths.partition(self.params(trainable), r".*/adapter")[0]

  def base_params(self) -> dict:
    """The quantized base alone (no adapters), with the extra trainable leaves at their initial values."""
    model = self.model(self.trainable)
    for _, layer in nn.adapted_layers(model):
      layer.adapter = None
    return llama.params_of(model)

  def merged(self, trainable: nnx.State, requantize: quant.Quantizer | None = None) -> dict:
    """The adapters folded into the base (QA-LoRA: into the offsets; LoRA: float, or re-quantized with
    `requantize`), extra trained leaves kept."""
    return llama.params_of(nn.merge(self.model(trainable), requantize))

  def apply(self, params, tokens, dropout_rng=None):
    """Logits [batch, seq, vocab] (float32) of a parameter tree."""
    return models.apply(self.lm.config, params, tokens, dropout_rng=dropout_rng)


def make_trainable(model: nnx.Module, pattern: str) -> None:
  """Turns the Frozen Variables whose "/"-joined path fully matches `pattern` into nnx.Params (in place)."""
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, nn.Frozen) and re.fullmatch(pattern, "/".join(map(str, path))):
      parent = model
      for key in path[:-2]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
      owner = parent[path[-2]] if isinstance(path[-2], int) else getattr(parent, path[-2])
      setattr(owner, path[-1], nnx.Param(node.get_value()))


def check(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """Validates `cfg` (every field) and returns its device mesh, checked against the batch: what can be known
  wrong about a config before anything is loaded."""
  validate(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  mesh_lib.check_batch(cfg.data.batch_size, cfg.optim.accum_steps, mesh)
  return mesh


def build(cfg: ml_collections.ConfigDict, log=print) -> Experiment:
  """The experiment of `cfg`: checked (`check`), then its model, quantized base, adapters and optimizer."""
  mesh = check(cfg)
  lm, frozen, summary = load_base(cfg, log)
  log(summary)
  key = jax.random.PRNGKey(cfg.seed)
  adapters = nn.add_adapters(frozen, cfg.adapter.method, rank=cfg.adapter.rank, alpha=cfg.adapter.alpha,
                             key=jax.random.fold_in(key, 1), targets=cfg.adapter.targets, rslora=cfg.adapter.rslora,
                             dropout=cfg.adapter.dropout)
  model = llama.decoder(lm.config, nn.combine(frozen, adapters))
  if cfg.adapter.extra_trainable:
    make_trainable(model, cfg.adapter.extra_trainable)
  graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)
  optimizer = make_optimizer(cfg.optim.learning_rate, total_steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps,
                             schedule=cfg.optim.schedule, max_grad_norm=cfg.optim.max_grad_norm or None,
                             weight_decay=cfg.optim.weight_decay, b1=cfg.optim.b1, b2=cfg.optim.b2, eps=cfg.optim.eps)
  return Experiment(cfg, mesh, lm.replace(params=None), graphdef, frozen, trainable, optimizer)


def restore(workdir: str | Path, log=print) -> tuple[Experiment, dict, int]:
  """(the experiment, its trained leaves, the step) from a workdir's config.json and its adapter checkpoint, or the
  newest readable training checkpoint when the run has not finished (or its adapter checkpoint is unreadable)."""
  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise ValueError(f"--workdir {workdir}: no config.json; not a training workdir")
  exp = build(from_json(json.loads((workdir / "config.json").read_text())), log=lambda m: None)
  step, trainable = checkpoints.restore_adapters(workdir / "adapters", exp.trainable, report=log)
  if trainable is not None:
    return exp, trainable, step
  init, _ = exp.make_step()
  step, state = checkpoints.restore_latest(checkpoints.manager(workdir / "checkpoints"), init(exp.trainable),
                                           report=log)
  if state is None:
    raise ValueError(f"--workdir {workdir}: no readable checkpoint")
  return exp, state.trainable, step


def run_config(workdir: str | Path) -> dict | None:
  """A training workdir's config.json (None when absent: restoring the run then names what is missing)."""
  path = Path(workdir) / "config.json"
  return json.loads(path.read_text()) if path.is_file() else None


def merged_model(workdir: str | Path, requantize: str | None = None, log=print) -> tuple[models.LanguageModel, dict]:
  """(the model with a run's adapters folded into its base, info): QA-LoRA into the offsets (exact), LoRA into
  float weights, re-quantized with `requantize` ("name:k=v,...") when given. info is what `qalora merge` saves
  with the model: {"step", "workdir" (absolute), "source" (config.model.name), "requantize", "run_config"}."""
  exp, trainable, step = restore(workdir, log=log)
  params = exp.merged(trainable, quantizer_from_spec(requantize) if requantize else None)
  info = {"step": step, "workdir": str(Path(workdir).absolute()), "source": exp.cfg.model.name,
          "requantize": requantize, "run_config": run_config(workdir)}
  return exp.lm.replace(params=params), info


def heldout_ids(lm: models.LanguageModel, config_json: dict | None = None, n_tokens: int = 8192) -> np.ndarray:
  """The held-out token ids of the run of `config_json` (its config.json), else The Tempest's first `n_tokens`."""
  if config_json:
    return training_data(from_json(config_json), lm)[2]
  return calibration.heldout_tokens(lm, n_tokens)


def requantized_ppl(exp: Experiment, trainable: dict, spec: str, held_ids, window: int) -> float:
  """Held-out perplexity of the merged float model re-quantized with `spec` ("name:k=v,...")."""
  quantizer = quantizer_from_spec(spec)
  if quantizer.needs_calibration:
    params, _ = calibrate(exp.cfg, exp.lm, exp.merged(trainable), quantizer)
  else:
    params = exp.merged(trainable, quantizer)
  return evaluate_ppl(exp.lm, params, held_ids, window)


def sample(exp: Experiment, params: dict) -> str:
  """Greedy continuation of the config's sample prompt."""
  return models.generate(exp.lm, [exp.cfg.sample_prompt], exp.cfg.sample_tokens, params=params)[0]
