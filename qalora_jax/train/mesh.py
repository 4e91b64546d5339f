"""Devices as a 2-D mesh ("data", "fsdp") for training: config.mesh.data x config.mesh.fsdp devices.

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    check_batch(cfg.data.batch_size, cfg.optim.accum_steps, mesh)
    frozen = put(frozen, param_shardings(frozen, mesh))
    state = put(state, param_shardings(state, mesh))
    batch = put(batch, batch_sharding(mesh))

Layout:
  - Batches: dimension 0 (examples) is split over both axes, ("data", "fsdp"), so every device computes the
    loss of batch_size / (data * fsdp) examples per micro-batch.
  - The frozen base (QTensor codes, scales and offsets, embeddings, norms), the trainable leaves and the
    optimizer state: each array is split along one dimension over "fsdp" (the largest dimension divisible
    by the fsdp size; for stacked blocks, not the layer axis when another dimension works) and replicated
    over "data". Scalars (step, optimizer counters) and arrays with no divisible dimension are replicated.
  - Everything else (activations, gradients, the all-gathers of the sharded weights, the reduction of
    gradients over the batch) follows from these input shardings: jit (GSPMD) propagates them.

data x fsdp = 1 x 1 is the single-device case. data = N, fsdp = 1 is plain data parallelism (every device
holds the whole model); fsdp = N additionally divides the memory of the model and its optimizer state by N.
An axis given as 0 takes every device the other one leaves: the default, data = 0 and fsdp = 1, is data
parallelism over all devices (one device: 1 x 1); an explicit data x fsdp must equal the number of devices.

Multi-host (several processes, e.g. one per GPU host or TPU VM): every process runs the same command and
calls jax.distributed.initialize() before anything else touches JAX; jax.devices() then lists the devices
of all processes and the mesh spans them. `put` builds each global array from the shards its process
holds, computed from the same global values in every process (batches are pure functions of (seed, step),
parameters come from the same file and seed).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")


def mesh_shape(data: int, fsdp: int, devices: int) -> tuple[int, int]:
  """(data, fsdp) for `devices` devices, an axis given as 0 filled with devices / the other axis. Raises
  ValueError when both are 0, when the given axis does not divide the devices, or when an explicit
  data * fsdp is not the number of devices."""
  plural = "s" if devices != 1 else ""
  if data == 0 and fsdp == 0:
    raise ValueError("config.mesh.data and config.mesh.fsdp are both 0; at most one may be 0 (it takes the devices "
                     "the other leaves)")
  if data == 0 or fsdp == 0:
    name, given = ("fsdp", fsdp) if data == 0 else ("data", data)
    if devices % given:
      raise ValueError(f"config.mesh.{name}={given} does not divide the {devices} available device{plural}; "
                       f"choose a divisor of {devices}")
    return (devices // given, given) if data == 0 else (given, devices // given)
  if data * fsdp != devices:
    raise ValueError(f"config.mesh.data x config.mesh.fsdp = {data} x {fsdp} = {data * fsdp} does not match "
                     f"the {devices} available device{plural}; choose data x fsdp = {devices}")
  return data, fsdp


def make_mesh(data: int = 0, fsdp: int = 1) -> Mesh:
  """A ("data", "fsdp") mesh of shape `mesh_shape(data, fsdp, device count)` over jax.devices(); fsdp is the
  inner axis, so the devices that exchange parameter shards are neighbours."""
  devices = jax.devices()
  return Mesh(np.asarray(devices).reshape(mesh_shape(data, fsdp, len(devices))), AXES)


def check_batch(batch_size: int, accum_steps: int, mesh: Mesh) -> None:
  """Raises ValueError unless each micro-batch (batch_size // accum_steps examples) divides evenly over
  the mesh's data x fsdp devices."""
  size = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = batch_size // accum_steps
  if micro % size == 0:
    return
  mesh_text = f"the mesh's data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {size} devices"
  if accum_steps > 1:
    raise ValueError(f"config.data.batch_size / config.optim.accum_steps = {batch_size} / {accum_steps} = "
                     f"{micro} examples per micro-batch do not split over {mesh_text}; use a micro-batch that "
                     f"is a multiple of {size}")
  raise ValueError(f"config.data.batch_size={batch_size} does not split over {mesh_text}; use a multiple "
                   f"of {size}")


def _is_stacked(path) -> bool:
  """Whether a leaf lies under "blocks" with the layers stacked on its leading axis (not per-layer blocks,
  keyed "0", "1", ... in a parameter tree or 0, 1, ... in an NNX state)."""
  keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
  for i, key in enumerate(keys):
    if key == "blocks":
      following = keys[i + 1] if i + 1 < len(keys) else None
      return not (isinstance(following, int) or (isinstance(following, str) and following.isdigit()))
  return False


def _fsdp_dim(shape: tuple[int, ...], size: int, stacked: bool) -> int | None:
  """The dimension to split over `size` fsdp devices: the largest one divisible by `size` (the first of
  equal ones), avoiding the stacked-layer axis 0 when another works; None: replicate."""
  if size == 1:
    return None
  dims = [d for d, n in enumerate(shape) if n >= size and n % size == 0]
  if stacked and any(d != 0 for d in dims):
    dims = [d for d in dims if d != 0]
  if not dims:
    return None
  return max(dims, key=lambda d: (shape[d], -d))


def param_shardings(tree, mesh: Mesh):
  """A tree of NamedSharding (one per array leaf of `tree`, any pytree: params with QTensor leaves,
  a TrainState with its optimizer state): one dimension over "fsdp", replicated over "data"."""
  size = mesh.shape["fsdp"]

  def sharding(path, x):
    shape = tuple(np.shape(x))
    dim = _fsdp_dim(shape, size, _is_stacked(path))
    spec = [None] * len(shape)
    if dim is not None:
      spec[dim] = "fsdp"
    return NamedSharding(mesh, PartitionSpec(*spec))

  return jax.tree_util.tree_map_with_path(sharding, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples (dimension 0) split over all devices, the "data" and "fsdp" axes together."""
  return NamedSharding(mesh, PartitionSpec(AXES))


def put(tree, shardings):
  """`tree` (numpy arrays, or jax arrays held whole by this process) as global jax arrays with the given
  shardings (a tree like `tree`, or one sharding for every leaf). Each process fills only the shards on its
  own devices, from the same global values, so this works across hosts too."""
  if isinstance(shardings, jax.sharding.Sharding):
    one = shardings
    shardings = jax.tree.map(lambda _: one, tree)

  def place(x, sharding):
    host = np.asarray(x)
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: np.asarray(host[index]))

  return jax.tree.map(place, tree, shardings)
