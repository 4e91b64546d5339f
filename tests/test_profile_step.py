"""experiments/profile_step.py: thunks classified from the optimized HLO, matmuls apart from the rest."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from profile_step import thunk_kinds  # noqa: E402


def test_a_dot_is_a_matmul_and_an_elementwise_fusion_is_not():
  f = jax.jit(lambda a, b: (jnp.exp(jnp.dot(a, b)), jnp.tanh(a) * 2.0))
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  kinds = thunk_kinds(f.lower(a, b).compile().as_text())
  assert ("matmul", "f32[64,48]") in kinds.values()  # the dot, alone or fused with its exp
  assert ("other", "f32[64,32]") in kinds.values()  # tanh(a) * 2 has no dot
  assert not any(kind == "matmul" and shape == "f32[64,32]" for kind, shape in kinds.values())


def test_tuple_shaped_instructions_are_counted_and_a_custom_call_is_its_own_kind():
  hlo = """HloModule m

ENTRY %main (p: f32[4,8]) -> (f32[4,8], f32[4]) {
  %p = f32[4,8]{1,0} parameter(0)
  %custom-call.3 = (f32[4,8]{1,0}, f32[4]{0}) custom-call(f32[4,8]{1,0} %p), custom_call_target="attn_fwd"
  %multiply_fusion = (f32[4,8]{1,0}, f32[4,8]{1,0}) fusion(f32[4,8]{1,0} %p), kind=kLoop, calls=%fused
  ROOT %t = (f32[4,8]{1,0}, f32[4]{0}) tuple(%p, %p)
}
"""
  kinds = thunk_kinds(hlo)
  assert kinds["custom-call.3"] == ("custom call", "(f32[4,8], f32[4])")
  assert kinds["multiply_fusion"] == ("other", "(f32[4,8], f32[4,8])")
