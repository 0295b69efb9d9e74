"""Peak host memory of `convert import` against the checkpoint's size.

  python -m benchmarks.import_memory                  # ~1 GB, float32
  python -m benchmarks.import_memory --layers=4       # smaller, quicker

Writes a random Llama-shaped Hugging Face directory (safetensors.numpy, no
torch; several shards and an index, as real checkpoints come), imports it
in a fresh process (python -m efficient_lm.convert's library path) and
prints: the child's peak RSS (getrusage RUSAGE_CHILDREN ru_maxrss), its
RSS just before the import began (JAX runtime and our modules loaded), its
peak up to the moment the parameters are all placed (before runs.write_run
saves them with orbax), the checkpoint's size, and (peak - baseline) / size
and peak / size. The issue's
target is <= 1.3x: the host holds the checkpoint's parameters plus about
one tensor, never a second copy (the importer streams tensor by tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
from safetensors.numpy import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: load the runtime, note the RSS, import, note the peak.
_CHILD = """
import json, resource, sys
import jax
from efficient_lm import runs
from efficient_lm.hf import importer
jax.devices()
def status(key):
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
before, placed = status("VmRSS"), {}
write_run = runs.write_run
def noted(*args, **kwargs):  # the peak so far: reading and placing
  placed["peak"] = status("VmHWM")
  return write_run(*args, **kwargs)
importer.runs.write_run = noted
importer.import_checkpoint(sys.argv[1], sys.argv[2])
print(json.dumps({"baseline": before, "placed_peak": placed["peak"]}))
"""


def llama_config(layers: int) -> dict:
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": layers,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
  }


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  hk = c["num_attention_heads"] * c["head_dim"]
  gk = c["num_key_value_heads"] * c["head_dim"]
  out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update(
      {
        p + "self_attn.q_proj.weight": (hk, d),
        p + "self_attn.k_proj.weight": (gk, d),
        p + "self_attn.v_proj.weight": (gk, d),
        p + "self_attn.o_proj.weight": (d, hk),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
      }
    )
  out["lm_head.weight"] = (v, d)
  return out


def tokenizer_json(vocab: int) -> str:
  """A word-level-free BPE over byte pieces: enough ids for the check
  that the tokenizer fits the model, nothing more is read here."""
  pieces = {f"<0x{b:02X}>": b for b in range(256)}
  pieces["<unk>"] = 256
  return json.dumps(
    {
      "version": "1.0",
      "added_tokens": [],
      "normalizer": None,
      "pre_tokenizer": {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "first",
        "split": False,
      },
      "decoder": {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "first",
        "split": False,
      },
      "model": {
        "type": "BPE",
        "vocab": pieces,
        "merges": [],
        "byte_fallback": True,
        "unk_token": "<unk>",
      },
    }
  )


def write_checkpoint(out: str, layers: int, shard_bytes: int) -> int:
  c = llama_config(layers)
  rng = np.random.default_rng(0)
  weight_map, shard, size, n, total = {}, {}, 0, 0, 0
  names: list[list[str]] = []

  def flush():
    nonlocal shard, size, n
    save_file(shard, os.path.join(out, f"part-{n}"), metadata={"format": "pt"})
    names.append(list(shard))
    shard, size, n = {}, 0, n + 1

  for name, shape in shapes(c).items():
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if shard and size + x.nbytes > shard_bytes:
      flush()
    shard[name] = x
    size += x.nbytes
    total += x.nbytes
  flush()
  for i, keys in enumerate(names):
    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.rename(os.path.join(out, f"part-{i}"), os.path.join(out, final))
    weight_map.update({k: final for k in keys})
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(c, f)
  with open(os.path.join(out, "tokenizer.json"), "w") as f:
    f.write(tokenizer_json(c["vocab_size"]))
  return sum(
    os.path.getsize(os.path.join(out, f))
    for f in os.listdir(out)
    if f.endswith(".safetensors")
  )


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=16, help="16: ~1 GB")
  p.add_argument("--shard_mb", type=int, default=300)
  args = p.parse_args()
  with tempfile.TemporaryDirectory(prefix="import_memory.") as tmp:
    hf = os.path.join(tmp, "hf")
    os.mkdir(hf)
    size = write_checkpoint(hf, args.layers, args.shard_mb * 10**6)
    env = {**os.environ, "PYTHONPATH": REPO}
    env.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run(
      [sys.executable, "-c", _CHILD, hf, os.path.join(tmp, "run")],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      check=False,
    )
    if proc.returncode:
      sys.exit(f"import failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
  base = child["baseline"]
  gb = 1e9
  print(f"checkpoint (safetensors files): {size / gb:.3f} GB")
  print(f"child RSS before the import (JAX runtime): {base / gb:.3f} GB")
  print(
    f"child peak RSS while reading and placing the tensors: "
    f"{child['placed_peak'] / gb:.3f} GB "
    f"({(child['placed_peak'] - base) / size:.2f}x the checkpoint over the "
    "baseline)"
  )
  print(f"child peak RSS (the checkpoint write included): {peak / gb:.3f} GB")
  print(f"(peak - baseline) / checkpoint: {(peak - base) / size:.2f}x")
  print(f"peak / checkpoint: {peak / size:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
  main()
