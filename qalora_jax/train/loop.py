"""A training run from a config: model, quantized base, adapters, data, the loop, evaluation, result.json.

    result = run(config, workdir)

The workdir holds config.json (the resolved config), metrics.jsonl (one line per logged step and per
evaluation: {"step": 0, "base_ppl"}, {"step", "loss", "grad_norm", "tokens_per_s", "learning_rate"},
{"step", "eval_ppl"} every config.eval_every steps, and {"step": steps, "ppl", "merged_ppl"} at the end),
tensorboard/ (the same scalars as TensorBoard events, unless config.tensorboard is off; see `MetricsLog`),
checkpoints/ (orbax: trainable leaves + optimizer state + step) and, at the end, adapters/ (the trained leaves
alone) and result.json.
A workdir that already holds a checkpoint of the same config is resumed; batches and dropout keys are pure
functions of (seed, step), so a resumed run computes exactly what an uninterrupted one would.
One run at a time uses a workdir: a second run on it is refused while the first lives (`workdir_lock`; the
lock of a killed run is taken over, so a killed run resumes). In a multi-host run, process 0 alone writes
config.json, metrics.jsonl, the events and result.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from qalora_jax import assets, data, hardware, models, nn, provenance, quant
from qalora_jax.files import write_json
from qalora_jax.models import llama
from qalora_jax.train import checkpoints
from qalora_jax.train import mesh as mesh_lib
from qalora_jax.train import workdir_lock
from qalora_jax.train.config import base_config, flat, from_json, quantizer_from_spec, validate
from qalora_jax.train.partition import partition
from qalora_jax.train.step import learning_rate_at, learning_rate_schedule, make_optimizer, make_train_step

TENSORBOARD_DIR = "tensorboard"
FINAL_KEYS = ("ppl", "merged_ppl")  # the last line of metrics.jsonl: the trained and the merged model


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------- model


def tiny_model(seed: int = 0, max_seq_len: int = 256) -> models.LanguageModel:
  """A 2-block random LLaMA over bytes (vocab 256 + BOS + EOS): the tests' model."""
  import tokenizers
  from tokenizers import decoders, pre_tokenizers

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
  vocab.update({"<s>": 256, "</s>": 257})
  backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, []))
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens(["<s>", "</s>"])
  config = models.Config(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=max_seq_len, tie_embeddings=True,
                         bos_id=256, eos_ids=(257,))
  params = models.init_params(config, jax.random.PRNGKey(seed))
  return models.LanguageModel(config, params, models.Tokenizer(backend, bos_id=256, eos_ids=(257,)))


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
    lm = tiny_model(cfg.seed)
    lm = lm.replace(config=lm.config.replace(dtype=m.dtype, matmul_dtype=m.matmul_dtype, remat=m.remat,
                                             scan_layers=m.scan_layers))
    return lm if quantize is None else lm.replace(params=models.quantize_params(lm.params, quantize)[0])
  return models.load(m.name, dtype=m.dtype, matmul_dtype=m.matmul_dtype, remat=m.remat, scan_layers=m.scan_layers,
                     quantize=quantize, keep_quantized=kept_table(cfg))


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


def corpus_files(cfg) -> tuple[Path, list[Path]]:
  """(root, its text files) of the config's corpus."""
  root = assets.fetch(cfg.data.corpus) if cfg.data.corpus in assets.ASSETS else Path(cfg.data.corpus)
  if not root.is_dir():
    raise ValueError(f"config.data.corpus={cfg.data.corpus!r}: not an asset name or a directory")
  return root, sorted(root.rglob("*.md"))


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
  root, files = corpus_files(cfg)
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
  from qalora_jax import calibration

  tokens = calibration.calibration_tokens(lm, cfg.base.calibration, cfg.base.calibration_len,
                                          cfg.base.calibration_seed, corpus=cfg.data.corpus)
  return calibration.quantize_model(lm.config, params, tokens, quantizer)


def requantized_ppl(r: Run, trainable: dict, spec: str, held_ids, window: int) -> float:
  """Held-out perplexity of the merged float model re-quantized with `spec` ("name:k=v,...")."""
  quantizer = quantizer_from_spec(spec)
  if quantizer.needs_calibration:
    params, _ = calibrate(r.cfg, r.lm, r.merged(trainable), quantizer)
  else:
    params = r.merged(trainable, quantizer)
  return evaluate_ppl(r.lm, params, held_ids, window)


# ----------------------------------------------------------------------------------------------- data


# what the token cache depends on: the corpus reader and the tokenizer
TOKENS_CODE = ("data", "models/tokenizer.py")


def corpus_tokens(cfg, tokenizer, log=print) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(train documents, held-out documents) as token arrays; tokenized once, cached under the asset cache keyed
  by the corpus's content and the tokenizer (an entry made by other code, `TOKENS_CODE`, is rebuilt)."""
  root, files = corpus_files(cfg)
  plays = data.load_plays(root)
  key = hashlib.sha256(f"{tokenizer.backend.to_str()}\0{provenance.files_sha256(files, root)}".encode())
  cache = assets.cache_dir() / "tokens" / f"{key.hexdigest()[:20]}.npz"
  version = provenance.code_version(*TOKENS_CODE)
  if provenance.is_current(cache, version, log):
    with np.load(cache, allow_pickle=False) as z:
      tokens = {k: z[k] for k in z.files}
  else:
    tokens = {name.replace("/", "__"): np.asarray(tokenizer.encode(text), np.int32) for name, text in plays.items()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp.npz")
    np.savez(tmp, **tokens)
    tmp.replace(cache)
    provenance.write_stamp(cache, version, corpus=str(root))
  docs = {k.replace("__", "/"): v for k, v in tokens.items()}
  train, held = data.split_plays(docs, tuple(cfg.data.heldout))
  return train, held


def training_data(cfg, lm) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
  """(blocks [n, seq_len + 1], loss mask or None, held-out token ids for perplexity)."""
  eos = lm.config.eos_ids[0] if lm.config.eos_ids else 0
  if cfg.data.seq_len > lm.config.max_seq_len:
    raise ValueError(f"config.data.seq_len={cfg.data.seq_len} exceeds the model's context "
                     f"max_seq_len={lm.config.max_seq_len}")
  train, held = corpus_tokens(cfg, lm.tokenizer)
  held_ids = np.concatenate(list(held.values()))[: cfg.data.eval_tokens]
  if cfg.data.jsonl:
    from qalora_jax.data.instructions import encode_instructions

    examples = data.read_instructions(cfg.data.jsonl)
    blocks, mask = encode_instructions(examples, lm.tokenizer.encode, cfg.data.seq_len, eos,
                                       lm.config.pad_id or 0)
    return blocks, mask, held_ids
  return data.pack_blocks(train.values(), cfg.data.seq_len, eos), None, held_ids


# ----------------------------------------------------------------------------------------------- run


def _config_json(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort())


def _check_workdir(workdir: Path, cfg, overwrite: bool) -> None:
  """Refuses a workdir holding another config (unless overwriting, which clears the old run's outputs)."""
  saved = workdir / "config.json"
  if saved.exists() and not overwrite:
    old, new = flat(json.loads(saved.read_text())), flat(_config_json(cfg))
    # a field added to the schema after the run was written counts as its default there
    defaults = {k: v for k, v in flat(_config_json(base_config())).items() if not k.startswith("base.options.")}
    # the mesh may change between a run and its resumption (same computation, other devices), and so may the
    # TensorBoard switch (what is written, not what is computed)
    diff = sorted(k for k in old.keys() | new.keys()
                  if old.get(k, defaults.get(k)) != new.get(k) and not k.startswith("mesh.") and k != "tensorboard")
    if diff:
      raise ValueError(f"workdir {workdir} holds a run with a different config (differs in: {', '.join(diff)}); "
                       f"use another workdir or --overwrite")
  if overwrite and workdir.exists():
    for name in ("checkpoints", "adapters", TENSORBOARD_DIR):
      shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "result.json"):
      (workdir / name).unlink(missing_ok=True)


def evaluate_ppl(lm, params, ids, window: int, matmul_dtype: str | None = None) -> float:
  """Perplexity with float matmuls whatever the training's model.matmul_dtype, so that runs compare (or with
  `matmul_dtype`, e.g. "int8" to measure the decoding path's quality)."""
  lm = lm.replace(config=lm.config.replace(matmul_dtype=matmul_dtype))
  return models.perplexity(lm, ids, window=min(window, len(ids)), params=params)


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a run builds from its config before the first step: the decoder (an NNX module) split into

      graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

  `trainable` holds the adapters (nn.AdapterParam, an nnx.Param) and the leaves config.adapter.extra_trainable
  turned into nnx.Params; `frozen` holds the quantized base (nn.Frozen). The train step is a pure function of
  (trainable, frozen, batch); the optimizer sees `trainable` alone."""

  cfg: ml_collections.ConfigDict
  lm: models.LanguageModel
  graphdef: nnx.GraphDef
  frozen: nnx.State
  trainable: nnx.State  # freshly initialised
  optimizer: optax.GradientTransformation

  def model(self, trainable: nnx.State, frozen: nnx.State | None = None) -> llama.Decoder:
    """The decoder with the given trainable state (and the run's frozen state)."""
    return nnx.merge(self.graphdef, trainable, self.frozen if frozen is None else frozen)

  def combine(self, frozen: nnx.State, trainable: nnx.State) -> llama.Decoder:
    """`model` in the argument order of train.make_train_step's `combine`."""
    return nnx.merge(self.graphdef, trainable, frozen)

  @staticmethod
  def nll(model: llama.Decoder, tokens, targets, dropout_rng=None):
    """-log p(targets | tokens) [batch, seq], the head and softmax fused (what training uses)."""
    return model.nll(tokens, targets, dropout_rng=dropout_rng)

  def make_step(self):
    """(init, step) of train.make_train_step over this run's states."""
    return make_train_step(self.nll, self.optimizer, self.cfg.optim.accum_steps, combine=self.combine)

  def params(self, trainable: nnx.State) -> dict:
    """The model's parameter tree (nested dicts) with the given trainable leaves."""
    return llama.params_of(self.model(trainable))

  def adapters(self, trainable: nnx.State) -> dict:
    """The adapter tree ({..: {"adapter": nn.Adapter}}) of the given trainable state (e.g. for PEFT export)."""
    return partition(self.params(trainable), r".*/adapter")[0]

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


def build(cfg: ml_collections.ConfigDict, log=print) -> Run:
  """Model, quantized base, adapters and optimizer of `cfg`."""
  validate(cfg)
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
                             weight_decay=cfg.optim.weight_decay)
  return Run(cfg, lm.replace(params=None), graphdef, frozen, trainable, optimizer)


def train_steps(r: Run, steps: int):
  """(state after `steps` plain training steps of the run's config, held-out token ids): the loop's batches
  and keys without its checkpoints, evaluation or logging (for experiments and tests), on the config's mesh."""
  mesh = mesh_lib.make_mesh(r.cfg.mesh.data, r.cfg.mesh.fsdp)
  mesh_lib.check_batch(r.cfg.data.batch_size, r.cfg.optim.accum_steps, mesh)
  blocks, mask, held = training_data(r.cfg, r.lm)
  init, step = r.make_step()
  state = init(r.trainable)
  state_shardings = mesh_lib.param_shardings(state, mesh)
  state = mesh_lib.put(state, state_shardings)
  frozen = mesh_lib.put(r.frozen, mesh_lib.param_shardings(r.frozen, mesh))
  step = jax.jit(step, out_shardings=(state_shardings, None))
  key = jax.random.fold_in(jax.random.PRNGKey(r.cfg.seed), 2)
  for s in range(steps):
    batch = mesh_lib.put(data.batch_at(blocks, r.cfg.data.batch_size, r.cfg.seed, s, mask),
                         mesh_lib.batch_sharding(mesh))
    state, _ = step(state, frozen, batch, jax.random.fold_in(key, s))
  return state, held


def restore(workdir: str | Path, log=print) -> tuple[Run, dict, int]:
  """(the run, its trained leaves, the step) from a workdir's config.json and its adapter checkpoint, or the
  newest readable training checkpoint when the run has not finished (or its adapter checkpoint is unreadable)."""
  workdir = Path(workdir)
  if not (workdir / "config.json").exists():
    raise ValueError(f"--workdir {workdir}: no config.json; not a training workdir")
  r = build(from_json(json.loads((workdir / "config.json").read_text())), log=lambda m: None)
  step, trainable = checkpoints.restore_adapters(workdir / "adapters", r.trainable, report=log)
  if trainable is not None:
    return r, trainable, step
  init, _ = r.make_step()
  step, state = checkpoints.restore_latest(checkpoints.manager(workdir / "checkpoints"), init(r.trainable), report=log)
  if state is None:
    raise ValueError(f"--workdir {workdir}: no readable checkpoint")
  return r, state.trainable, step


def run(cfg: ml_collections.ConfigDict, workdir: str | Path, *, overwrite: bool = False, progress: bool = True,
        log=print) -> dict:
  """Trains `cfg` in `workdir` (resuming when it holds a checkpoint) and returns the result dict. Raises
  workdir_lock.WorkdirBusy, before anything in the workdir is written, while another run uses it."""
  validate(cfg)
  mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
  mesh_lib.check_batch(cfg.data.batch_size, cfg.optim.accum_steps, mesh)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.locked(workdir, log):
    return _run_locked(cfg, workdir, mesh, overwrite, progress, log)


def _run_locked(cfg, workdir: Path, mesh, overwrite: bool, progress: bool, log) -> dict:
  """`run` inside the workdir's lock."""
  primary = jax.process_index() == 0  # the process that writes the run's files
  if primary:
    _check_workdir(workdir, cfg, overwrite)
    write_json(workdir / "config.json", _config_json(cfg))
  t_start = time.time()

  r = build(cfg, log)
  lm, frozen = r.lm, r.frozen
  key = jax.random.PRNGKey(cfg.seed)
  blocks, mask, held_ids = training_data(cfg, lm)
  window = min(512, lm.config.max_seq_len)
  init, step_fn = r.make_step()
  state = init(r.trainable)
  state_shardings = mesh_lib.param_shardings(state, mesh)
  state = mesh_lib.put(state, state_shardings)  # before the restore: it restores into these shardings
  frozen = mesh_lib.put(frozen, mesh_lib.param_shardings(frozen, mesh))
  r = dataclasses.replace(r, frozen=frozen)
  step_fn = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_shardings, None))
  lr = learning_rate_schedule(cfg.optim.learning_rate, total_steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps,
                              schedule=cfg.optim.schedule)

  mgr = checkpoints.manager(workdir / "checkpoints")
  start, restored = checkpoints.restore_latest(mgr, state, report=log)
  metrics_path = workdir / "metrics.jsonl"
  if restored is not None:
    state = restored
    log(f"resuming from step {start}")
    base_ppl = json.loads(metrics_path.read_text().splitlines()[0])["base_ppl"]
    if primary:
      _truncate_metrics(metrics_path, start)
  else:
    start = 0
    base_ppl = evaluate_ppl(lm, r.base_params(), held_ids, window)
    log(f"held-out perplexity of the base: {base_ppl:.3f}")
    if cfg.sample_prompt:
      log(f"sample before training: {cfg.sample_prompt!r} -> {sample(r, r.base_params())!r}")
    if primary:
      metrics_path.write_text("")  # a fresh run (lines of an earlier attempt without checkpoints are dropped)

  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  bar = tqdm(total=cfg.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True)
  t_loop, steps_timed, compile_s = None, 0, None
  last_saved = start
  with MetricsLog(workdir, tensorboard=cfg.tensorboard, write=primary) as metrics:
    if restored is None:
      metrics.write({"step": 0, "base_ppl": base_ppl})
    for step in range(start, cfg.steps):
      batch = mesh_lib.put(data.batch_at(blocks, cfg.data.batch_size, cfg.seed, step, mask),
                           mesh_lib.batch_sharding(mesh))
      t0 = time.time()
      state, m = step_fn(state, frozen, batch, jax.random.fold_in(jax.random.fold_in(key, 2), step))
      loss = float(m["loss"])
      if compile_s is None:
        compile_s = time.time() - t0
        t_loop = time.time()
      else:
        steps_timed += 1
      if not math.isfinite(loss):
        bar.close()
        raise NonFiniteLoss(f"loss is {loss} at step {step + 1}; stopped. The last good checkpoint "
                            f"(step {last_saved}) is kept in {workdir / 'checkpoints'}")
      tok_s = steps_timed * tokens_per_step / (time.time() - t_loop) if steps_timed else 0.0
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:.0f}")
      bar.update(1)
      done = step + 1
      if done % cfg.log_every == 0 or done == cfg.steps:
        metrics.write({"step": done, "loss": loss, "grad_norm": float(m["grad_norm"]), "tokens_per_s": tok_s,
                       "learning_rate": learning_rate_at(lr, step)})
      if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
        metrics.write({"step": done, "eval_ppl": evaluate_ppl(lm, r.params(state.trainable), held_ids, window)})
      if done % cfg.checkpoint_every == 0 or done == cfg.steps:
        checkpoints.save(mgr, done, state)
        last_saved = done
    bar.close()
    train_s = time.time() - t_loop if t_loop else 0.0
    checkpoints.save_adapters(workdir / "adapters", cfg.steps, state.trainable)

    ppl = evaluate_ppl(lm, r.params(state.trainable), held_ids, window)
    merged = r.merged(state.trainable)
    merged_ppl = evaluate_ppl(lm, merged, held_ids, window)
    metrics.write({"step": cfg.steps, "ppl": ppl, "merged_ppl": merged_ppl})
  if cfg.sample_prompt:
    log(f"sample after training (merged): {cfg.sample_prompt!r} -> {sample(r, merged)!r}")
  requantized = {spec: requantized_ppl(r, state.trainable, spec, held_ids, window) for spec in cfg.requantize}
  result = {
      "base_ppl": base_ppl, "ppl": ppl, "merged_ppl": merged_ppl,
      "trainable_params": nn.count_params(state.trainable),
      "frozen_bytes": nn.tree_nbytes(frozen), "adapter_bytes": nn.tree_nbytes(state.trainable),
      "adapter_checkpoint_bytes": checkpoints.disk_bytes(workdir / "adapters"),
      "checkpoint_bytes": checkpoints.disk_bytes(workdir / "checkpoints" / str(cfg.steps)),
      "merged_bytes": nn.tree_nbytes(merged),
      "tokens_per_s": steps_timed * tokens_per_step / train_s if steps_timed and train_s else 0.0,
      "compile_s": compile_s or 0.0, "wall_s": time.time() - t_start, "steps": cfg.steps,
      **nn.adapter_ranks(r.adapters(state.trainable)),
      "code_version": provenance.code_version(), "machine": hardware.cpu(), "config": _config_json(cfg),
  }
  if requantized:
    result["requantized_ppl"] = requantized
  if primary:
    write_json(workdir / "result.json", result)
  log(f"held-out perplexity: base {base_ppl:.3f} -> trained {ppl:.3f} -> merged {merged_ppl:.3f}")
  return result


class MetricsLog:
  """metrics.jsonl, one JSON line per record ({"step": s, name: value, ...}), mirrored as TensorBoard events
  in WORKDIR/tensorboard/ (tensorboardX): each name a scalar tag with the record's step.

  The events are a copy of metrics.jsonl: opening the log removes the events directory and writes the lines
  already in metrics.jsonl anew (a resumed run's lines, truncated to its checkpoint), so the events hold each
  (tag, step) once, as metrics.jsonl does, whatever a killed run had written or left unflushed; the
  replayed events carry the time of the replay. With `tensorboard` off nothing is written there (an events
  directory of an earlier run is left as it is); with `write` off (the other processes of a multi-host run)
  nothing is written at all."""

  def __init__(self, workdir: Path, tensorboard: bool = True, write: bool = True):
    self.path = Path(workdir) / "metrics.jsonl"
    self.file = open(self.path, "a") if write else None
    self.events = None
    if write and tensorboard:
      from tensorboardX import SummaryWriter

      events_dir = Path(workdir) / TENSORBOARD_DIR
      shutil.rmtree(events_dir, ignore_errors=True)
      self.events = SummaryWriter(str(events_dir), flush_secs=10)
      for line in self.path.read_text().splitlines():
        self._add_events(json.loads(line))

  def _add_events(self, record: dict) -> None:
    for name, value in record.items():
      if name != "step":
        self.events.add_scalar(name, value, global_step=record["step"])

  def write(self, record: dict) -> None:
    """Appends `record` (a "step" and scalars) to metrics.jsonl and to the events."""
    if self.file is None:
      return
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.events is not None:
      self._add_events(record)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()
    if self.events is not None:
      self.events.close()

  def __enter__(self) -> MetricsLog:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def sample(r: Run, params: dict) -> str:
  """Greedy continuation of the config's sample prompt."""
  return models.generate(r.lm, [r.cfg.sample_prompt], r.cfg.sample_tokens, params=params)[0]


def _truncate_metrics(path: Path, step: int) -> None:
  """Drops metric lines logged after `step` and the final evaluation's line (a resumed run logs them again);
  rewrites atomically."""
  keep = lambda record: record.get("step", 0) <= step and not set(FINAL_KEYS) & record.keys()  # noqa: E731
  lines = [line for line in path.read_text().splitlines() if keep(json.loads(line))]
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text("".join(line + "\n" for line in lines))
  tmp.replace(path)
