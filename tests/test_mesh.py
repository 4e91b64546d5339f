"""Training on a (data, fsdp) device mesh: 8 emulated CPU devices as 4 x 2 give the per-step losses of one
device, with the base, the adapters and the optimizer state split over fsdp; meshes that do not match the
devices and batches that do not split over the mesh are refused before training."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from qalora_jax.train import config as config_lib
from qalora_jax.train import loop
from qalora_jax.train import mesh as mesh_lib

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
OVERRIDES = ["--config.data.batch_size=8", "--config.steps=10", "--config.log_every=1", "--config.checkpoint_every=10",
             "--config.data.eval_tokens=128"]
quiet = lambda message: None

# Runs in a fresh interpreter whose XLA_FLAGS emulate the devices: trains the tiny config on the mesh given in
# argv and prints the losses, the leaves that were split over fsdp (the state as checkpointed, the parameters
# as evaluated) and the errors for batches that do not split over the mesh, as JSON.
CHILD = """
import json, sys
import jax
from qalora_jax.train import checkpoints, config as config_lib, loop

tiny, workdir, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
split = {"state": set(), "params": set()}

def record(kind, tree):
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if len({str(s.index) for s in x.addressable_shards}) == 2 and "fsdp" in x.sharding.spec:
      split[kind].add(jax.tree_util.keystr(path))

real_save, real_eval = checkpoints.save, loop.evaluate_ppl
checkpoints.save = lambda mgr, step, state: (record("state", state), real_save(mgr, step, state))[1]
loop.evaluate_ppl = lambda lm, params, ids, window: (record("params", params), real_eval(lm, params, ids, window))[1]
loop.run(config_lib.load(tiny + ":method=qalora", overrides), workdir, progress=False, log=lambda m: None)
with open(workdir + "/metrics.jsonl") as f:
  losses = [d["loss"] for d in map(json.loads, f) if "loss" in d]
errors = []
for extra in (["--config.data.batch_size=4"], ["--config.optim.accum_steps=2"]):
  try:
    loop.run(config_lib.load(tiny + ":method=qalora", overrides + extra), workdir + "-bad", progress=False,
             log=lambda m: None)
  except ValueError as e:
    errors.append(str(e))
print(json.dumps({"devices": jax.device_count(), "losses": losses, "errors": errors,
                  "split": {k: sorted(v) for k, v in split.items()}}))
"""


def start_child(workdir: Path, overrides: list[str], devices: int) -> subprocess.Popen:
  """CHILD training the tiny config with `overrides` in `workdir`, on `devices` emulated CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, "-c", CHILD, TINY, str(workdir), json.dumps(overrides)], env=env,
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_result(child: subprocess.Popen) -> dict:
  """The JSON a CHILD printed."""
  try:
    out, err = child.communicate(timeout=300)
  finally:
    child.kill()
  assert child.returncode == 0, err[-4000:]
  return json.loads(out.splitlines()[-1])


def test_mesh_4x2_on_8_devices_matches_one_device(tmp_path):
  child = start_child(tmp_path / "mesh", OVERRIDES + ["--config.mesh.data=4", "--config.mesh.fsdp=2"], 8)
  try:
    if jax.devices() == jax.devices("cpu")[:1]:  # the reference on this process's single device, meanwhile
      loop.run(config_lib.load(f"{TINY}:method=qalora", OVERRIDES), tmp_path / "one", progress=False, log=quiet)
      lines = (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()
      reference = [d["loss"] for d in map(json.loads, lines) if "loss" in d]
    else:  # an accelerator or several devices here: compare with one CPU device
      reference = child_result(start_child(tmp_path / "one", OVERRIDES, 1))["losses"]
  finally:
    sharded = child_result(child)

  assert sharded["devices"] == 8
  assert len(reference) == 10 and reference[-1] < reference[0]
  np.testing.assert_allclose(sharded["losses"], reference, rtol=1e-5)
  # really split over fsdp, not replicated: the optimizer moments, the adapters, the quantized base
  state, params = sharded["split"]["state"], sharded["split"]["params"]
  assert any(".mu[" in p and "adapter" in p for p in state) and any(".nu[" in p for p in state)
  assert any(p.startswith(".trainable[") and "adapter" in p for p in state)
  assert any("q_proj']['kernel']['codes']" in p for p in params)
  assert any("['adapter'].b" in p for p in params)
  # batches that do not split over the 8 devices: refused with the config fields named
  assert sharded["errors"] == [
      "config.data.batch_size=4 does not split over the mesh's data x fsdp = 4 x 2 = 8 devices; use a multiple of 8",
      ("config.data.batch_size / config.optim.accum_steps = 8 / 2 = 4 examples per micro-batch do not split over "
       "the mesh's data x fsdp = 4 x 2 = 8 devices; use a micro-batch that is a multiple of 8"),
  ]


def test_mesh_that_does_not_match_the_devices_is_refused_before_anything_runs(tmp_path):
  n = jax.device_count()
  message = (rf"config.mesh.data x config.mesh.fsdp = 2 x {n} = {2 * n} does not match the {n} available "
             rf"devices?; choose data x fsdp = {n}")
  cfg = config_lib.load(f"{TINY}:method=qalora", ["--config.mesh.data=2", f"--config.mesh.fsdp={n}"])
  with pytest.raises(ValueError, match=message):
    loop.run(cfg, tmp_path, progress=False, log=quiet)
  assert not (tmp_path / "config.json").exists()
  with pytest.raises(ValueError, match=message):
    mesh_lib.make_mesh(2, n)


def test_check_batch():
  mesh = AbstractMesh((4, 2), ("data", "fsdp"))
  mesh_lib.check_batch(16, 2, mesh)
  with pytest.raises(ValueError, match=r"config.data.batch_size=12 does not split over .* 4 x 2 = 8 devices"):
    mesh_lib.check_batch(12, 1, mesh)
  with pytest.raises(ValueError, match=r"config.optim.accum_steps = 16 / 4 = 4 examples per micro-batch"):
    mesh_lib.check_batch(16, 4, mesh)


def test_param_shardings_split_one_dimension_over_fsdp():
  mesh = AbstractMesh((1, 2), ("data", "fsdp"))
  tree = {"blocks": {"a": np.zeros((4, 2, 3)), "norm": np.zeros((2, 3))}, "embed": np.zeros((9, 6)),
          "per_layer": {"blocks": {"0": {"w": np.zeros((4, 2))}}}, "odd": np.zeros((3, 5)), "count": np.zeros(())}
  specs = jax.tree.map(lambda s: tuple(s.spec), mesh_lib.param_shardings(tree, mesh))
  assert specs == {"blocks": {"a": (None, "fsdp", None), "norm": ("fsdp", None)}, "embed": (None, "fsdp"),
                   "per_layer": {"blocks": {"0": {"w": ("fsdp", None)}}}, "odd": (None, None), "count": ()}


def test_mesh_shape_fills_an_axis_given_as_0():
  assert mesh_lib.mesh_shape(0, 1, 8) == (8, 1)
  assert mesh_lib.mesh_shape(0, 2, 8) == (4, 2)
  assert mesh_lib.mesh_shape(2, 0, 8) == (2, 4)
  assert mesh_lib.mesh_shape(4, 2, 8) == (4, 2)
  assert mesh_lib.mesh_shape(0, 1, 1) == (1, 1)
  with pytest.raises(ValueError, match=r"config.mesh.fsdp=3 does not divide the 8 available devices; choose a "
                                       r"divisor of 8"):
    mesh_lib.mesh_shape(0, 3, 8)
  with pytest.raises(ValueError, match="config.mesh.data and config.mesh.fsdp are both 0; at most one may be 0"):
    mesh_lib.mesh_shape(0, 0, 8)
  with pytest.raises(ValueError, match=r"1 x 1 = 1 does not match the 8 available devices; choose data x fsdp = 8"):
    mesh_lib.mesh_shape(1, 1, 8)


def test_mesh_config_values_are_checked():
  assert (config_lib.base_config().mesh.data, config_lib.base_config().mesh.fsdp) == (0, 1)
  with pytest.raises(ValueError, match=r"config.mesh.data=-1 must be at least 0 \(0: the devices the other axis"):
    config_lib.load(f"{TINY}:method=qalora", ["--config.mesh.data=-1"])
  with pytest.raises(ValueError, match="config.mesh.data and config.mesh.fsdp are both 0"):
    config_lib.load(f"{TINY}:method=qalora", ["--config.mesh.fsdp=0"])


DEFAULT_MESH_CHILD = """
import json
from qalora_jax.train import config as config_lib, mesh as mesh_lib
shapes, errors = [], []
for overrides in ([], ["--config.mesh.fsdp=2"], ["--config.mesh.data=1", "--config.mesh.fsdp=1"]):
  cfg = config_lib.load("configs/tiny.py", overrides)
  try:
    shapes.append(dict(mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp).shape))
  except ValueError as e:
    errors.append(str(e))
print(json.dumps({"shapes": shapes, "errors": errors}))
"""


def test_the_default_mesh_uses_every_device_and_an_explicit_one_is_checked():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8")
  done = subprocess.run([sys.executable, "-c", DEFAULT_MESH_CHILD], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  result = json.loads(done.stdout.splitlines()[-1])
  assert result["shapes"] == [{"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2}]
  assert result["errors"] == ["config.mesh.data x config.mesh.fsdp = 1 x 1 = 1 does not match the 8 available "
                              "devices; choose data x fsdp = 8"]
