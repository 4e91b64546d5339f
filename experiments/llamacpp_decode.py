"""llama.cpp's decoding peer (shared/bench/peer_llamacpp_decode.py), run as released, and run again without
llama.cpp's extra weight buffer types where the released run crashes.

    python experiments/llamacpp_decode.py PEER_SCRIPT NEW_TOKENS GGUF_FILE THREADS   (llama-cpp-python's python)

The extra buffer types are the layouts llama.cpp repacks its quantized weights into at load time for a faster
CPU kernel (AMX tiles on CPUs with AMX-INT8, interleaved blocks elsewhere). With llama-cpp-python 0.3.36 on
a Xeon with AMX, its AMX matmul (ggml_backend_amx_mul_mat) segfaults on SmolLM2's Q4_1 GGUF at the first
token; what a user does then is turn repacking off (llama-cli's --no-repack, the model parameter
use_extra_bufts = False), which this does. The JSON line says which ran: "extra_buffer_types" true or false,
and the signal the released run died of.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

NO_EXTRA = "QALORA_LLAMACPP_NO_EXTRA_BUFTS"


def run_without_extra_buffer_types(argv: list[str]) -> None:
  """Runs the peer script in this process with llama.cpp's model parameters' use_extra_bufts off."""
  import llama_cpp.llama_cpp as lib

  default = lib.llama_model_default_params

  def params():
    p = default()
    p.use_extra_bufts = False
    return p

  lib.llama_model_default_params = params
  sys.argv = argv
  runpy.run_path(argv[0], run_name="__main__")


def tagged(stdout: str, **fields) -> str:
  """stdout with `fields` added to each JSON line."""
  return "".join((json.dumps({**json.loads(ln), **fields}) if ln.startswith("{") else ln) + "\n"
                 for ln in stdout.splitlines())


def main(argv: list[str]) -> int:
  if os.environ.get(NO_EXTRA) == "1":
    run_without_extra_buffer_types(argv)
    return 0
  released = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
  if released.returncode >= 0:  # ran, or failed on its own terms: pass it on as it is
    sys.stdout.write(tagged(released.stdout, extra_buffer_types=True))
    sys.stderr.write(released.stderr)
    return released.returncode
  print(f"llama.cpp as released died of signal {-released.returncode}; again without extra buffer types",
        file=sys.stderr)
  again = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                         env={**os.environ, NO_EXTRA: "1"})
  sys.stderr.write(again.stderr)
  sys.stdout.write(tagged(again.stdout, extra_buffer_types=False, released_signal=-released.returncode))
  return again.returncode


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
