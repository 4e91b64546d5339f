"""A LLaMA-family decoder (LLaMA, Mistral, Qwen2) as Flax NNX modules, and pure functions over its parameter tree.

    model = decoder(config, params)                # Decoder(embed, blocks, final_norm, lm_head): NNX modules
    graphdef, adapters, frozen = nnx.split(model, nn.AdapterParam, ...)
    logits = apply(config, params, tokens)         # the functional form: decoder(config, params)(tokens)
    params = params_of(model)                      # back to the tree

Per block (pre-norm residual):
    h = x + o_proj(attention(rope(q_proj(norm(x))), rope(k_proj(norm(x))), v_proj(norm(x))))
    y = h + down_proj(silu(gate_proj(norm(h))) * up_proj(norm(h)))
and logits = head(norm(y_last_block)), the head being lm_head or the transposed embedding when tied.

Parameter layout (kernels are [in, out]). The block weights come in one of two layouts:
stacked (params["blocks"] a dict whose leaves have a leading layer axis L; run with jax.lax.scan, or unrolled
by slicing when config.scan_layers is False), or per-layer (params["blocks"] = {"0": {...}, ..., "L-1": {...}},
each of the stacked structure without the L axis; run as an unrolled loop). `stack_blocks` and
`unstack_blocks` convert. The stacked layout compiles one block for all layers (fast to compile, the usual
choice for training); the per-layer layout lets XLA read each weight in place, which on CPU makes batch-1
decoding faster than a scan, where every step copies each layer's slice out of the stacked arrays.
Any kernel dict may also hold an "adapter" (see qalora_jax.nn). In the Decoder the stacked layout is one Block
whose Variables carry the L axis, the per-layer one an nnx.List of Blocks; every kernel dict is an nn.Linear
(kernel and bias in nn.Frozen Variables, the adapter a LowRankAdapter), norms and the embedding are Frozen.

    params = {
      "embed":      {"embedding": [V, D]},
      "blocks": {
        "attn_norm": {"scale": [L, D]},
        "attn": {"q_proj": {"kernel": [L, D, H*d], "bias": [L, H*d] (qkv_bias only)},
                 "k_proj": {"kernel": [L, D, K*d], "bias": [L, K*d] (qkv_bias only)},
                 "v_proj": {"kernel": [L, D, K*d], "bias": [L, K*d] (qkv_bias only)},
                 "o_proj": {"kernel": [L, H*d, D], "bias": [L, D]   (o_bias only)}},
        "mlp_norm":  {"scale": [L, D]},
        "mlp":  {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                 "down_proj": {"kernel": [L, F, D]}},
      },
      "final_norm": {"scale": [D]},
      "lm_head":    {"kernel": [D, V]},            # absent when config.tie_embeddings
    }

Any kernel may be a QTensor instead of an array; a QTensor stacked over layers has a leading L axis on each of
its array leaves (its metadata describes one layer), and the scan body sees one layer's slice. Paths are
written "/"-joined: "blocks/attn/q_proj/kernel" (stacked) or "blocks/3/attn/q_proj/kernel" (per-layer); see
`param_paths`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from qalora_jax.kernels import cpu_matmul
from qalora_jax.models import layers
from qalora_jax.models.attention import REMAT_SAVED, Mask, attention
from qalora_jax.models.config import Config, rope_frequencies
from qalora_jax.nn.adapters import REMAT_SAVED as ADAPTER_REMAT_SAVED
from qalora_jax.nn.linear import operand_dtype
from qalora_jax.nn.modules import Frozen, Linear, LowRankAdapter, shared_input
from qalora_jax.quant import QTensor
from qalora_jax.tree_paths import flatten, unflatten

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
# The activations Config.remat_keep can keep in a rematerialised block, by their checkpoint names.
REMAT_KEEP = {"qkv": ("attention_q", "attention_k", "attention_v"), "mlp": ("mlp_gate", "mlp_up")}


def remat_saved(config: Config) -> tuple[str, ...]:
  """The checkpoint names a rematerialised block keeps: attention's output and statistics, the adapters' small
  intermediates (nn.adapters.REMAT_SAVED), and remat_keep's."""
  kept = tuple(n for part in config.remat_keep.split(",") if part for n in REMAT_KEEP[part])
  return REMAT_SAVED + ADAPTER_REMAT_SAVED + kept


def param_shapes(config: Config) -> dict:
  """The parameter tree of `config` with shape tuples as leaves (the layout in the module docstring)."""
  d, f, L, v = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
  q, kv = config.q_size, config.kv_size
  attn = {"q_proj": {"kernel": (L, d, q)}, "k_proj": {"kernel": (L, d, kv)}, "v_proj": {"kernel": (L, d, kv)},
          "o_proj": {"kernel": (L, q, d)}}
  if config.qkv_bias:
    attn["q_proj"]["bias"], attn["k_proj"]["bias"], attn["v_proj"]["bias"] = (L, q), (L, kv), (L, kv)
  if config.o_bias:
    attn["o_proj"]["bias"] = (L, d)
  shapes = {
      "embed": {"embedding": (v, d)},
      "blocks": {
          "attn_norm": {"scale": (L, d)},
          "attn": attn,
          "mlp_norm": {"scale": (L, d)},
          "mlp": {"gate_proj": {"kernel": (L, d, f)}, "up_proj": {"kernel": (L, d, f)},
                  "down_proj": {"kernel": (L, f, d)}},
      },
      "final_norm": {"scale": (d,)},
  }
  if not config.tie_embeddings:
    shapes["lm_head"] = {"kernel": (d, v)}
  return shapes


def init_params(config: Config, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Random parameters: normal(0, std) kernels, embeddings and biases; norm scales of one. Stacked layout,
  or per-layer when config.scan_layers is False."""
  shapes = param_shapes(config)
  paths = list(flatten(shapes, is_leaf=lambda s: isinstance(s, tuple)))
  keys = dict(zip([p for p, _ in paths], jax.random.split(key, len(paths))))
  leaves = {}
  for path, shape in paths:
    if path.endswith("/scale"):
      leaves[path] = jnp.ones(shape, dtype)
    else:
      leaves[path] = (std * jax.random.normal(keys[path], shape, jnp.float32)).astype(dtype)
  params = unflatten(leaves)
  return params if config.scan_layers else unstack_blocks(params)


def param_paths(params: dict) -> list[str]:
  """The "/"-joined paths of the parameter tree's leaves (a QTensor counts as one leaf)."""
  return [path for path, _ in flatten(params)]


def is_per_layer(blocks: dict) -> bool:
  """Whether params["blocks"] is in the per-layer layout (keyed "0".."L-1") rather than stacked."""
  return all(key.isdigit() for key in blocks)


def unstack_blocks(params: dict) -> dict:
  """The per-layer layout: params["blocks"] as {"0": block 0, "1": block 1, ...} (unchanged if already so)."""
  blocks = params["blocks"]
  if is_per_layer(blocks):
    return params
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  return {**params, "blocks": {str(i): jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(num_layers)}}


def stack_blocks(params: dict) -> dict:
  """The stacked layout: params["blocks"] as one dict whose leaves have a leading layer axis."""
  blocks = params["blocks"]
  if not is_per_layer(blocks):
    return params
  return {**params, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[blocks[str(i)] for i in range(len(blocks))])}


def attention_mask(config: Config, key_mask: jax.Array, index) -> Mask:
  """Which key slots each query sees: query slot index + i sees key slot j if j <= index + i, key j is valid,
  and (with a sliding window) index + i - j < window."""
  return Mask(key_mask, index, config.sliding_window)


def default_positions(key_mask: jax.Array) -> jax.Array:
  """Positions counting real tokens only: p = cumsum(mask) - 1 (left padding gets position 0)."""
  return jnp.maximum(jnp.cumsum(key_mask.astype(jnp.int32), axis=-1) - 1, 0)


def forward(config: Config, params: dict, tokens: jax.Array, positions: jax.Array, key_mask: jax.Array,
            cache: dict | None = None, index=0, dropout_rng: jax.Array | None = None):
  """Logits [b, t, V] (float32) and the updated cache; see `Decoder.features` for the arguments."""
  return decoder(config, params).forward(tokens, positions, key_mask, cache, index, dropout_rng)


# ---------------------------------------------------------------------------------------- NNX modules


class RMSNorm(nnx.Module):
  """y = scale * x / sqrt(mean(x^2) + eps), the scale Frozen."""

  def __init__(self, scale, eps: float):
    self.scale = scale if isinstance(scale, nnx.Variable) else Frozen(scale)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.rms_norm(x, self.scale.get_value(), self.eps)


class Embedding(nnx.Module):
  """The token table, Frozen: a float [V, D], or a QTensor of its transpose [D, V] (groups along D; see
  models.quantize); also the output head when embeddings are tied."""

  def __init__(self, table):
    self.embedding = table if isinstance(table, nnx.Variable) else Frozen(table)

  def __call__(self, tokens: jax.Array, dtype) -> jax.Array:
    table = self.embedding.get_value()
    flat = tokens.reshape(-1)
    if isinstance(table, cpu_matmul.Strips):  # laid out for decoding
      columns = table.columns(flat)
    elif isinstance(table, QTensor):
      if not table.column_wise():
        # a format with arrays across columns (double quantization's absmax blocks): the whole table
        return jnp.take(table.dequantize(jnp.float32).T, tokens, axis=0).astype(dtype)
      columns = table.columns(flat)
    else:
      return jnp.take(table, tokens, axis=0).astype(dtype)
    # a quantized table: only the tokens' columns are dequantized
    return columns.dequantize(jnp.float32).T.reshape(*tokens.shape, table.shape[0]).astype(dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE: o_proj(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))."""

  def __init__(self, config: Config, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear):
    self.config = config
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj

  def __call__(self, h, cos, sin, mask, kv, index, rng=None):
    """With a cache `kv` ([b, S, K, d] each), this step's keys and values are written at slot `index` and
    attention runs over all S slots; returns (output, updated kv or None)."""
    c = self.config
    b, t, _ = h.shape
    q, k, v = shared_input(h, [self.q_proj, self.k_proj, self.v_proj], [layers.subkey(rng, i) for i in range(3)])
    q = q.reshape(b, t, c.num_heads, c.head_dim)
    k, v = k.reshape(b, t, c.num_kv_heads, c.head_dim), v.reshape(b, t, c.num_kv_heads, c.head_dim)
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    q, k, v = checkpoint_name(q, "attention_q"), checkpoint_name(k, "attention_k"), checkpoint_name(v, "attention_v")
    if kv is not None:
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
      kv = (k, v)
    a = attention(q, k.astype(h.dtype), v.astype(h.dtype), mask, operand_dtype=operand_dtype(c.matmul_dtype, h.dtype))
    return self.o_proj(a.reshape(b, t, c.q_size), dropout_rng=layers.subkey(rng, 3)), kv


class MLP(nnx.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

  def __init__(self, gate_proj: Linear, up_proj: Linear, down_proj: Linear):
    self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

  def __call__(self, x, rng=None):
    gate, up = shared_input(x, [self.gate_proj, self.up_proj], [layers.subkey(rng, 0), layers.subkey(rng, 1)])
    gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")
    return self.down_proj(layers.silu_mul(gate, up), dropout_rng=layers.subkey(rng, 2))


class Block(nnx.Module):
  """One pre-norm decoder block: h = x + attn(attn_norm(x)); y = h + mlp(mlp_norm(h)). Its Variables may carry
  a leading layer axis (the stacked blocks of a scanned decoder)."""

  def __init__(self, attn_norm: RMSNorm, attn: Attention, mlp_norm: RMSNorm, mlp: MLP):
    self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

  def __call__(self, x, cos, sin, mask, kv, index, rng=None):
    a, kv = self.attn(self.attn_norm(x), cos, sin, mask, kv, index, rng)
    x = x + a
    return x + self.mlp(self.mlp_norm(x), layers.subkey(rng, 4)), kv


class Decoder(nnx.Module):
  """A LLaMA-family decoder: embed, blocks, final_norm, and lm_head unless the embeddings are tied.

  Its state has the parameter tree's layout (see the module docstring): `blocks` is one Block whose Variables
  are stacked over the layers (run with jax.lax.scan when config.scan_layers), or an nnx.List of Blocks.
  Frozen holds the base, nn.AdapterParam the adapters:

      graphdef, adapters, frozen = nnx.split(model, nn.AdapterParam, ...)
  """

  def __init__(self, config: Config, embed: Embedding, blocks, final_norm: RMSNorm, lm_head: Linear | None = None):
    self.config = config
    self.embed, self.blocks, self.final_norm = embed, blocks, final_norm
    self.lm_head = nnx.data(lm_head)

  def head_weight(self):
    """(the output head's weight, whether it is vocab-first [V, D])."""
    if self.config.tie_embeddings:
      table = self.embed.embedding.get_value()
      return table, not isinstance(table, (QTensor, cpu_matmul.Strips))  # a quantized table is stored [D, V]
    return self.lm_head.kernel.get_value(), False

  def features(self, tokens, positions, key_mask, cache=None, index=0, dropout_rng=None):
    """The final-normed hidden states [b, t, D] (the head's input) and the updated cache.

    Args:
      tokens, positions: [b, t] int.
      key_mask: [b, S] bool, which key slots hold real tokens; S = t without a cache, the cache length with one.
      cache: None, or {"k", "v"}: [L, b, S, K, d] each, or lists of L arrays [b, S, K, d] (see `init_cache`);
        this call's keys and values go to slots index..index+t-1.
      dropout_rng: a key for the adapters' dropout (training); None disables dropout.
    """
    config = self.config
    x = self.embed(tokens, config.dtype)
    cos, sin = layers.rope_angles(positions, rope_frequencies(config))
    mask = attention_mask(config, key_mask, index)
    stacked = not isinstance(self.blocks, nnx.List)
    scanned = config.scan_layers and stacked
    if stacked:
      graphdef, state = nnx.split(self.blocks)
      states = None if scanned else [jax.tree.map(lambda a, i=i: a[i], state) for i in range(config.num_layers)]
    else:
      graphdef, states = None, []
      for block in self.blocks:
        graphdef, state = nnx.split(block)
        states.append(state)

    def step(state, x, kv, rng):
      return nnx.merge(graphdef, state)(x, cos, sin, mask, kv, index, rng)

    if config.remat:
      step = jax.checkpoint(step, prevent_cse=not scanned,
                            policy=jax.checkpoint_policies.save_only_these_names(*remat_saved(config)))
    kvs = None if cache is None else (cache["k"], cache["v"])
    if scanned:
      def body(x, layer):
        state, kv, i = layer
        return step(state, x, kv, layers.subkey(dropout_rng, i))

      x, kvs = jax.lax.scan(body, x, (state, kvs, jnp.arange(config.num_layers)))
    else:
      new = []
      for i, state in enumerate(states):
        kv = None if kvs is None else (kvs[0][i], kvs[1][i])
        x, kv = step(state, x, kv, layers.subkey(dropout_rng, i))
        new.append(kv)
      if kvs is not None:
        kvs = ([kv[0] for kv in new], [kv[1] for kv in new])
        if not isinstance(cache["k"], list):
          kvs = (jnp.stack(kvs[0]), jnp.stack(kvs[1]))
    x = self.final_norm(x)
    return x, (None if cache is None else {"k": kvs[0], "v": kvs[1]})

  def forward(self, tokens, positions, key_mask, cache=None, index=0, dropout_rng=None):
    """Logits [b, t, V] (float32) and the updated cache; see `features`."""
    x, cache = self.features(tokens, positions, key_mask, cache, index, dropout_rng)
    weight, vocab_first = self.head_weight()
    return layers.head_logits(x, weight, vocab_first, self.config.matmul_dtype), cache

  def __call__(self, tokens, positions=None, padding_mask=None, dropout_rng=None) -> jax.Array:
    """Logits [batch, seq, vocab] (float32), see `apply`."""
    tokens, positions, key_mask = _inputs(self.config, tokens, positions, padding_mask)
    return self.forward(tokens, positions, key_mask, dropout_rng=dropout_rng)[0]

  def nll(self, tokens, targets, padding_mask=None, dropout_rng=None, chunk: int = 512) -> jax.Array:
    """-log p(targets | tokens) [batch, seq] (float32), the head and the softmax fused; see `nll`."""
    tokens, positions, key_mask = _inputs(self.config, tokens, None, padding_mask)
    x, _ = self.features(tokens, positions, key_mask, dropout_rng=dropout_rng)
    weight, vocab_first = self.head_weight()
    return layers.head_nll(x, weight, targets, vocab_first=vocab_first, matmul_dtype=self.config.matmul_dtype,
                           chunk=chunk)


def _linear(p: dict, matmul_dtype) -> Linear:
  ad = p.get("adapter")
  adapter = None if ad is None else LowRankAdapter(ad.a, ad.b, ad.meta)
  return Linear(p["kernel"], p.get("bias"), adapter=adapter, matmul_dtype=matmul_dtype)


def _block(config: Config, p: dict) -> Block:
  md, a, m = config.matmul_dtype, p["attn"], p["mlp"]
  attn = Attention(config, *(_linear(a[n], md) for n in ATTN_PROJS))
  mlp = MLP(*(_linear(m[n], md) for n in MLP_PROJS))
  return Block(RMSNorm(p["attn_norm"]["scale"], config.rms_eps), attn, RMSNorm(p["mlp_norm"]["scale"], config.rms_eps),
               mlp)


def decoder(config: Config, params: dict) -> Decoder:
  """The NNX decoder around a parameter tree (its arrays, QTensors and Adapters, not copies): what every
  function of this module runs. Kernel dicts holding an "adapter" get a LowRankAdapter."""
  blocks = params["blocks"]
  if is_per_layer(blocks):
    blocks = nnx.List([_block(config, blocks[str(i)]) for i in range(len(blocks))])
  else:
    blocks = _block(config, blocks)
  lm_head = None if config.tie_embeddings else _linear(params["lm_head"], config.matmul_dtype)
  return Decoder(config, Embedding(params["embed"]["embedding"]), blocks,
                 RMSNorm(params["final_norm"]["scale"], config.rms_eps), lm_head)


def params_of(model: Decoder) -> dict:
  """The parameter tree of a Decoder (the inverse of `decoder`): arrays and QTensors, adapters as nn.Adapter."""
  def linear(layer: Linear) -> dict:
    p = {"kernel": layer.kernel.get_value()}
    if layer.bias is not None:
      p["bias"] = layer.bias.get_value()
    if layer.adapter is not None:
      p["adapter"] = layer.adapter.as_pytree()
    return p

  def block(b: Block) -> dict:
    return {"attn_norm": {"scale": b.attn_norm.scale.get_value()},
            "attn": {n: linear(getattr(b.attn, n)) for n in ATTN_PROJS},
            "mlp_norm": {"scale": b.mlp_norm.scale.get_value()},
            "mlp": {n: linear(getattr(b.mlp, n)) for n in MLP_PROJS}}

  blocks = model.blocks
  params = {"embed": {"embedding": model.embed.embedding.get_value()},
            "blocks": ({str(i): block(b) for i, b in enumerate(blocks)} if isinstance(blocks, nnx.List)
                       else block(blocks)),
            "final_norm": {"scale": model.final_norm.scale.get_value()}}
  if model.lm_head is not None:
    params["lm_head"] = linear(model.lm_head)
  return params


def check_tokens(config: Config, tokens) -> None:
  shape = getattr(tokens, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"tokens must be a [batch, seq] integer array, got shape {shape}")
  if shape[1] > config.max_seq_len:
    raise ValueError(f"sequence of {shape[1]} tokens exceeds the context length max_seq_len={config.max_seq_len}")


def apply(config: Config, params: dict, tokens: jax.Array, positions: jax.Array | None = None,
          padding_mask: jax.Array | None = None, dropout_rng: jax.Array | None = None) -> jax.Array:
  """Logits [batch, seq, vocab] (float32) of a causal forward pass.

  padding_mask [batch, seq] (True: a real token) excludes padded keys; positions default to the count of real
  tokens before each one, so a left-padded row is computed as if unpadded. dropout_rng enables the adapters'
  dropout (training).
  """
  return decoder(config, params)(tokens, positions, padding_mask, dropout_rng)


def _inputs(config: Config, tokens, positions, padding_mask):
  """(tokens, positions, key mask) of a cacheless pass: see `apply`."""
  check_tokens(config, tokens)
  tokens = jnp.asarray(tokens, jnp.int32)
  key_mask = jnp.ones(tokens.shape, bool) if padding_mask is None else jnp.asarray(padding_mask, bool)
  return tokens, default_positions(key_mask) if positions is None else positions, key_mask


apply_jit = jax.jit(apply, static_argnums=0)


def nll(config: Config, params: dict, tokens: jax.Array, targets: jax.Array, padding_mask: jax.Array | None = None,
        dropout_rng: jax.Array | None = None, chunk: int = 512) -> jax.Array:
  """-log p(targets | tokens) [batch, seq] (float32): what `apply`'s logits give, with the head and the
  softmax fused (`layers.head_nll`), so the [batch, seq, vocab] logits are never whole. Training and
  perplexity use this."""
  return decoder(config, params).nll(tokens, targets, padding_mask, dropout_rng, chunk)


def init_cache(config: Config, batch: int, length: int, per_layer: bool = False, dtype=None) -> dict:
  """An empty KV cache in the compute dtype: {"k", "v"} of zeros [L, batch, length, K, d], or with
  per_layer=True lists of L arrays [batch, length, K, d] (for the per-layer parameter layout, where a stacked
  cache would be copied at every step)."""
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  dtype = dtype or config.dtype
  if per_layer:
    return {"k": [jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(config.num_layers)]}
  return {"k": jnp.zeros((config.num_layers, *shape), dtype), "v": jnp.zeros((config.num_layers, *shape), dtype)}
