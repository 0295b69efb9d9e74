"""Structured pruning (issue #20 items 1, 2): python -m efficient_lm.surgery.

Pruning is exact where it must be (zeroed units and an identity layer leave
the logits unchanged; survivors are the original weights), each criterion
equals a brute-force computation written here, a pruned run trains,
evaluates and generates, and bad input is one `error:` line with nothing
written and the source untouched."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efficient_lm import models, runs
from efficient_lm.generate import Generator
from efficient_lm.training import loop
from efficient_lm.surgery import cli, convert, importance, prune
from efficient_lm.surgery import layers as layers_lib
from efficient_lm.surgery.model import Surgery, calibration_loss, per_batch
from tests.helpers import packed_batch, small_config, snapshot, train_cli

# Three layers of different widths (two segments), GQA 4 heads in 2 groups.
TINY = {
  "model.num_layers": 3,
  "model.embed_dim": 32,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.mlp_dim": 16,
  "model.per_layer.mlp_dim": (16, 16, 24),
  "data.seq_len": 16,
  "train.batch_size": 2,
}


def _tiny(seed=0, scale=4.0, **overrides):
  """(config, pure params of a random model; `scale` times the initial
  weights, so that every unit matters to the criteria)."""
  cfg = small_config(**{**TINY, **overrides})
  model = models.build(cfg.model, nnx.Rngs(seed))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree.map(lambda a: np.asarray(a) * scale, params)
  return cfg, params


def _batches(cfg, n=2):
  return [
    jax.tree.map(
      jnp.asarray,
      packed_batch(
        cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size, seed=s
      ),
    )
    for s in range(n)
  ]


def _logits(s: Surgery, batch):
  return per_batch(s.model(), [batch], _model_logits)[0]


def _forward_io(model, batch):
  logits, out = layers_lib.forward(model, batch, capture=("io",))
  return logits, out["io"]


def _model_logits(model, batch):
  return model(batch["inputs"], batch["positions"], batch["segment_ids"])[0]


def test_layerwise_forward_is_the_model():
  cfg, params = _tiny()
  s = Surgery.of(cfg, params)
  jax.tree.map(np.testing.assert_array_equal, s.params(), params)
  [batch] = _batches(cfg, 1)
  [(got, io)] = per_batch(s.model(), [batch], _forward_io)
  want = per_batch(s.model(), [batch], _model_logits)[0]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert len(io) == 3


def _zero(s: Surgery, edit) -> Surgery:
  layers = [jax.tree.map(np.copy, lay) for lay in s.layers]
  for i, lay in enumerate(layers):
    edit(i, lay)
  return Surgery(s.cfg, s.rest, layers)


def test_pruning_neurons_with_zero_down_rows_is_exact():
  cfg, params = _tiny(scale=1.0)
  dead = {0: [1, 5, 6, 15], 1: [0, 2, 3, 9], 2: [4, 7, 8, 10, 11, 20]}

  def edit(i, lay):
    lay["mlp"]["down_FD"][dead[i]] = 0.0

  s = _zero(Surgery.of(cfg, params), edit)
  batches = _batches(cfg)
  scores = importance.ffn_scores(s, batches, "rmax")
  for i, sc in enumerate(scores):  # the zeroed rows score 0, the rest not
    assert np.all(sc[dead[i]] == 0) and np.sum(sc > 0) == len(sc) - len(dead[i])
  kept = prune.ffn_keep(scores, 0.75, per_layer=False)
  pruned = prune.prune_ffn(s, kept)
  assert pruned.cfg.model.per_layer.mlp_dim == (12, 12, 18)
  for b in batches:
    np.testing.assert_allclose(_logits(pruned, b), _logits(s, b), atol=1e-6)
  for i, (a, b) in enumerate(zip(s.layers, pruned.layers, strict=True)):
    k = [h for h in range(a["mlp"]["gate_DF"].shape[1]) if h not in dead[i]]
    np.testing.assert_array_equal(
      b["mlp"]["gate_DF"], a["mlp"]["gate_DF"][:, k]
    )
    np.testing.assert_array_equal(b["mlp"]["up_DF"], a["mlp"]["up_DF"][:, k])
    np.testing.assert_array_equal(b["mlp"]["down_FD"], a["mlp"]["down_FD"][k])
    np.testing.assert_array_equal(b["attn"]["q_DHK"], a["attn"]["q_DHK"])


def test_pruning_heads_with_zero_output_rows_is_exact():
  cfg, params = _tiny(scale=1.0)
  dead = [1, 0, 1]  # one kv group (heads 2g, 2g + 1) per layer

  def edit(i, lay):
    g = dead[i]
    lay["attn"]["o_HKD"][2 * g : 2 * g + 2] = 0.0

  s = _zero(Surgery.of(cfg, params), edit)
  batches = _batches(cfg)
  scores = importance.head_scores(s, batches, "output")
  for i, sc in enumerate(scores):
    assert sc[dead[i]] == 0 and sc[1 - dead[i]] > 0
  kept = prune.heads_keep(s, scores, 2)  # two query heads: one group
  pruned = prune.prune_heads(s, kept)
  m = pruned.cfg.model
  assert (m.num_heads, m.num_kv_heads, m.head_dim) == (2, 1, 8)
  for b in batches:
    np.testing.assert_allclose(_logits(pruned, b), _logits(s, b), atol=1e-6)
  for i, (a, b) in enumerate(zip(s.layers, pruned.layers, strict=True)):
    g = 1 - dead[i]
    heads = [2 * g, 2 * g + 1]
    np.testing.assert_array_equal(
      b["attn"]["q_DHK"], a["attn"]["q_DHK"][:, heads]
    )
    np.testing.assert_array_equal(b["attn"]["o_HKD"], a["attn"]["o_HKD"][heads])
    np.testing.assert_array_equal(
      b["attn"]["k_DGK"], a["attn"]["k_DGK"][:, [g]]
    )
    np.testing.assert_array_equal(
      b["attn"]["v_DGK"], a["attn"]["v_DGK"][:, [g]]
    )


@pytest.mark.parametrize("criterion", ["loss", "cosine"])
def test_dropping_an_identity_layer_is_exact(criterion):
  cfg, params = _tiny(scale=1.0)

  def edit(i, lay):
    if i == 1:
      lay["attn"]["o_HKD"][...] = 0.0
      lay["mlp"]["down_FD"][...] = 0.0

  s = _zero(Surgery.of(cfg, params), edit)
  batches = _batches(cfg)
  scores = importance.layer_scores(s, batches, criterion)
  # Skipping it changes no loss; its output is its input (cosine 1, the
  # lowest score). (Skipping another layer of a random model may lower
  # the loss: a negative score.)
  np.testing.assert_allclose(
    scores[1], 0.0 if criterion == "loss" else -1.0, atol=1e-6
  )
  assert criterion == "loss" or int(np.argmin(scores)) == 1
  assert np.all(np.delete(scores, 1) != scores[1])
  pruned = prune.drop_layers(s, [1])
  assert pruned.cfg.model.num_layers == 2
  assert pruned.cfg.model.per_layer.mlp_dim == (16, 24)
  for b in batches:
    np.testing.assert_allclose(_logits(pruned, b), _logits(s, b), atol=1e-6)
  for a, b in zip([s.layers[0], s.layers[2]], pruned.layers, strict=True):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _layer_inputs(s: Surgery, batch):
  """Each layer's MLP input, by the model's own block calls."""
  model = s.model()
  tok, pos, seg = batch["inputs"], batch["positions"], batch["segment_ids"]
  x = model.embed_tokens(tok)
  out = []
  for block in layers_lib.blocks(model):
    a, _ = block.attend(x, pos, seg)
    out.append(np.asarray(x + a))
    x, _ = block(x, pos, seg)
  return out, model


def test_rmax_and_activation_equal_a_loop_over_tokens():
  cfg, params = _tiny()
  s = Surgery.of(cfg, params)
  batches = _batches(cfg)
  rmax = [np.zeros(lay["mlp"]["gate_DF"].shape[1]) for lay in s.layers]
  total = [np.zeros_like(r) for r in rmax]
  count = 0
  for batch in batches:
    xs, model = _layer_inputs(s, batch)
    blocks = list(layers_lib.blocks(model))
    seg = np.asarray(batch["segment_ids"])
    count += int((seg > 0).sum())
    for i, (x, block, lay) in enumerate(zip(xs, blocks, s.layers, strict=True)):
      n = np.asarray(block.mlp_norm(jnp.asarray(x)), np.float64)
      w_down = lay["mlp"]["down_FD"].astype(np.float64)
      for b, t in zip(*np.nonzero(seg > 0), strict=True):
        g = n[b, t] @ lay["mlp"]["gate_DF"]
        act = g / (1 + np.exp(-g)) * (n[b, t] @ lay["mlp"]["up_DF"])
        for h in range(len(act)):
          rmax[i][h] = max(rmax[i][h], np.linalg.norm(act[h] * w_down[h, :]))
        total[i] += np.abs(act)
  got = importance.ffn_scores(s, batches, "rmax")
  for a, b in zip(got, rmax, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4)
  got = importance.ffn_scores(s, batches, "activation")
  for a, b in zip(got, total, strict=True):
    np.testing.assert_allclose(a, b / count, rtol=1e-4)


def _scaled(s: Surgery, layer: int, units: dict, factor: float) -> Surgery:
  """`s` with the weights of `units` ({(module, name): (axis, indices)})
  in `layer` multiplied by `factor` (masking at factor 0)."""
  layers = [jax.tree.map(np.copy, lay) for lay in s.layers]
  for (module, name), (axis, idx) in units.items():
    w = np.moveaxis(layers[layer][module][name], axis, 0)
    w[idx] = w[idx] * factor
  return Surgery(s.cfg, s.rest, layers)


def _fd(s, batches, layer, units, eps=1e-2):
  """d L / d factor at 1: the finite difference of scaling the units."""
  up = calibration_loss(_scaled(s, layer, units, 1 + eps).model(), batches)
  down = calibration_loss(_scaled(s, layer, units, 1 - eps).model(), batches)
  return (up - down) / (2 * eps)


def test_taylor_equals_finite_differences_of_masking():
  cfg, params = _tiny()
  s = Surgery.of(cfg, params)
  batches = _batches(cfg)
  terms = importance.taylor_terms(s, batches)
  ffn = importance.ffn_scores(s, batches, "taylor")
  heads = importance.head_scores(s, batches, "taylor")
  for layer in (0, 2):
    t = terms[layer]["mlp"]
    signed = t["gate_DF"].sum(0) + t["up_DF"].sum(0) + t["down_FD"].sum(1)
    np.testing.assert_allclose(ffn[layer], np.abs(signed))
    # The neuron set with the largest terms, and one neuron alone.
    for idx in (
      np.argsort(-np.abs(signed))[:4],
      np.argsort(-np.abs(signed))[:1],
    ):
      units = {
        ("mlp", "gate_DF"): (1, idx),
        ("mlp", "up_DF"): (1, idx),
        ("mlp", "down_FD"): (0, idx),
      }
      want = _fd(s, batches, layer, units)
      np.testing.assert_allclose(signed[idx].sum(), want, rtol=0.03, atol=2e-4)
    group = int(np.argmax(heads[layer]))
    units = {
      ("attn", "q_DHK"): (1, [2 * group, 2 * group + 1]),
      ("attn", "o_HKD"): (0, [2 * group, 2 * group + 1]),
      ("attn", "k_DGK"): (1, [group]),
      ("attn", "v_DGK"): (1, [group]),
    }
    want = _fd(s, batches, layer, units)
    np.testing.assert_allclose(
      heads[layer][group], abs(want), rtol=0.03, atol=2e-4
    )


# ------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A run at step 0 of a 3-layer GQA model (random weights)."""
  root = tmp_path_factory.mktemp("surgery")
  cfg = small_config(
    **{"model.num_layers": 3, "train.steps": 2, "train.eval_batches": 1}
  )
  model = models.build(cfg.model, nnx.Rngs(7))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  workdir = runs.write_run(str(root / "src"), cfg, params, {})
  return root, workdir


def _cli(argv, capsys) -> tuple[int | str | None, str, str]:
  """cli.main in this process -> (exit code or message, stdout, stderr)."""
  try:
    cli.main(argv)
    code = None
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  if isinstance(code, str):  # sys.exit("error: ...") prints it at exit
    err += code + "\n"
  return code, out, err


@pytest.mark.parametrize(
  "flags, says",
  [
    (["--ffn=500"], "above the current MLP width"),
    (["--ffn=1.0"], "must lie in (0, 1)"),
    (["--ffn=0.0"], "must lie in (0, 1)"),
    (["--heads=0.2"], "would prune all heads of layer 0"),
    (["--heads=3"], "whole groups"),
    (["--ffn=0.5", "--ffn_criterion=wanda"], "invalid choice: 'wanda'"),
    (["--prune_embeddings=0.5"], "unrecognized arguments"),
    (["--width=64"], "not below the current width"),
    (["--width=1.5"], "must lie in (0, 1)"),
    (["--to_gqa=3"], "expected a divisor of 2"),
    (["--to_mla=65"], "above the model width 64"),
    (["--to_hourglass=2"], "expected 0 <= k < m <= 3"),
    (["--to_mor=2", "--to_hourglass=1"], "give one"),
    (["--to_mor=2"], "num_layers - 2 must be a positive multiple of 2"),
    (["--to_attention=nope"], "nope"),
    (["--ffn=0.5", "--config.model.attention.window=4"], "for --to_attention"),
    (["--to_mor=1", "--config.model.routing.alpha=x"], "expected a float"),
    (["--to_attention=dense", "--config.model.mlp_dim=8"], "only data.*"),
    (["--drop_layers=3"], "expected 1 <= N < 3"),
    (["--drop_layers=0,9"], "distinct layer indices"),
    ([], "no operation given"),
    (["--ffn=0.5", "--config.model.mlp_dim=8"], "only data.* keys"),
    (["--to_moe=4", "--to_mor=1"], "plain decoder's layers only"),
    (["--to_moe=4", "--config.model.moe.top_k=5"], "top_k"),
    (["--ffn=0.5", "--config.model.moe.top_k=1"], "for --to_moe"),
  ],
)
def test_bad_input_is_one_error_line(source, capsys, flags, says):
  root, src = source
  before = snapshot(src)
  dst = root / "dst_bad"
  code, out, err = _cli([f"--workdir={src}", f"--out={dst}", *flags], capsys)
  assert code not in (0, None)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert says in lines[0], lines[0]
  assert out == "" and not dst.exists()
  assert snapshot(src) == before


def test_an_existing_out_is_refused(source, capsys):
  root, src = source
  dst = root / "taken"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  before, theirs = snapshot(src), snapshot(dst)
  code, out, err = _cli(
    [f"--workdir={src}", f"--out={dst}", "--ffn=0.5"], capsys
  )
  assert code not in (0, None) and out == ""
  assert (
    err.count("\n") == 1
    and err.startswith("error: --out=")
    and "not empty" in err
  )
  assert snapshot(src) == before and snapshot(dst) == theirs


def test_pruned_run_trains_evaluates_and_generates(source, capsys):
  root, src = source
  dst = root / "pruned"
  before = snapshot(src)
  code, out, _ = _cli(
    [
      f"--workdir={src}",
      f"--out={dst}",
      "--drop_layers=1",
      "--layer_criterion=cosine",
      "--heads=0.5",
      "--ffn=0.5",
      "--ffn_criterion=activation",
      "--ffn_per_layer",
      "--calibration_tokens=512",
    ],
    capsys,
  )
  assert code in (0, None), out
  lines = out.strip().splitlines()
  assert [line.split(":")[1].strip() for line in lines] == [
    "drop_layers",
    "heads",
    "ffn",
  ]
  assert all(
    "params" in ln and "FLOPs/token" in ln and "KV cache" in ln for ln in lines
  )
  assert snapshot(src) == before
  with open(dst / "provenance.json") as f:
    record = json.load(f)["source"]
  assert record["source_step"] == 0 and record["source_workdir"] == src
  ops = record["operations"]
  assert [op["op"] for op in ops] == ["drop_layers", "heads", "ffn"]
  assert ops[2]["args"]["ffn_criterion"] == "activation"
  assert sum(ops[2]["widths"]) == 128 and len(ops[2]["widths"]) == 2
  assert (
    ops[1]["after"]["kv_bytes_per_token"]
    == ops[1]["before"]["kv_bytes_per_token"] // 2
  )
  assert record["calibration"]["tokens"] == 512
  run = runs.load_run(str(dst))
  m = run.config.model
  assert m.num_layers == 2 and (m.num_heads, m.num_kv_heads) == (2, 1)
  train_cli(
    dst,
    flags=[
      f"--config=configs/run.py:{dst}",
      "--config.train.steps=2",
      "--config.train.log_every=1",
    ],
  )
  run = runs.load_run(str(dst))
  assert run.step == 2
  result = runs.evaluate(run, num_batches=1)
  assert np.isfinite(result["loss"])
  gen = Generator(run.graphdef, run.variables, mesh=run.mesh)
  prompts = [run.tokenizer.encode("def "), run.tokenizer.encode("import o")]
  cached, _ = gen.generate(prompts, max_new_tokens=6, use_cache=True)
  full, _ = gen.generate(prompts, max_new_tokens=6, use_cache=False)
  assert cached == full and all(len(o) == 6 for o in cached)


def test_ffn_per_layer_ranks_all_layers_together():
  scores = [np.array([9.0, 8.0, 7.0, 6.0]), np.array([1.0, 0.5, 2.0, 0.1])]
  kept = prune.ffn_keep(scores, 0.5, per_layer=True)
  # The best neuron of each layer, then the best of the rest globally.
  assert [k.tolist() for k in kept] == [[0, 1, 2], [2]]
  assert [k.tolist() for k in prune.ffn_keep(scores, 0.5, False)] == [
    [0, 1],
    [0, 2],
  ]
  assert [len(k) for k in prune.ffn_keep(scores, 3, per_layer=True)] == [4, 2]


# ---------------------------------------------- width and conversions


def _real_close(a: Surgery, b: Surgery, batches, atol):
  """Logits of `a` and `b` agree on the real tokens of `batches`."""
  for batch in batches:
    real = np.asarray(batch["segment_ids"]) > 0
    np.testing.assert_allclose(
      _logits(a, batch)[real], _logits(b, batch)[real], atol=atol, rtol=0
    )


def test_pruning_width_channels_zero_everywhere_is_exact():
  cfg, params = _tiny(scale=1.0)
  dead = [3, 7, 8, 30]  # residual channels no weight writes to

  s = Surgery.of(cfg, params)
  rest = jax.tree.map(np.copy, s.rest)
  rest["embed"]["table_VD"][:, dead] = 0.0

  def edit(i, lay):
    lay["attn"]["o_HKD"][..., dead] = 0.0
    lay["mlp"]["down_FD"][:, dead] = 0.0

  s = _zero(Surgery(cfg, rest, s.layers), edit)
  batches = _batches(cfg)
  scores = importance.width_scores(s, batches)
  assert np.all(scores[dead] == 0) and np.sum(scores > 0) == 32 - len(dead)
  kept = prune.width_keep(scores, prune.check_width(s, 28))
  pruned = prune.prune_width(s, kept)
  assert pruned.cfg.model.embed_dim == 28 and pruned.cfg.model.head_dim == 8
  for b in batches:
    np.testing.assert_allclose(_logits(pruned, b), _logits(s, b), atol=1e-6)
  live = [c for c in range(32) if c not in dead]
  np.testing.assert_array_equal(
    pruned.rest["embed"]["table_VD"], s.rest["embed"]["table_VD"][:, live]
  )
  for a, b in zip(s.layers, pruned.layers, strict=True):
    for name in ("q_DHK", "k_DGK", "v_DGK"):
      np.testing.assert_array_equal(b["attn"][name], a["attn"][name][live])
    np.testing.assert_array_equal(
      b["attn"]["o_HKD"], a["attn"]["o_HKD"][..., live]
    )
    np.testing.assert_array_equal(
      b["mlp"]["gate_DF"], a["mlp"]["gate_DF"][live]
    )
    np.testing.assert_array_equal(
      b["mlp"]["down_FD"], a["mlp"]["down_FD"][:, live]
    )
    np.testing.assert_allclose(  # the norm over fewer channels, rescaled
      b["attn_norm"]["scale"],
      a["attn_norm"]["scale"][live] * np.sqrt(32 / 28),
      rtol=1e-6,
    )


def test_to_gqa_pools_groups_and_is_exact_on_equal_heads():
  cfg, params = _tiny(**{"model.num_kv_heads": 4})
  s = Surgery.of(cfg, params)
  same = convert.to_gqa(s, 4)  # G = H: the identity
  jax.tree.map(np.testing.assert_array_equal, same.layers, s.layers)
  pooled = convert.to_gqa(s, 2)
  assert pooled.cfg.model.num_kv_heads == 2
  for a, b in zip(s.layers, pooled.layers, strict=True):
    k = a["attn"]["k_DGK"]
    np.testing.assert_allclose(
      b["attn"]["k_DGK"], (k[:, 0::2] + k[:, 1::2]) / 2, rtol=1e-6
    )

  # Heads whose keys and values already agree within each group: exact.
  def edit(i, lay):
    for name in ("k_DGK", "v_DGK"):
      lay["attn"][name][:, 1::2] = lay["attn"][name][:, 0::2]

  twins = _zero(s, edit)
  _real_close(convert.to_gqa(twins, 2), twins, _batches(cfg, 1), 2e-5)


def test_to_attention_with_a_window_covering_the_sequence_is_exact():
  cfg, params = _tiny()
  s = Surgery.of(cfg, params)
  batches = _batches(cfg, 1)
  t = cfg.data.seq_len
  for kind in ("sliding_window", "sliding_window,dense,sliding_window"):
    new = convert.to_attention(s, kind, {"window": t})
    assert new.cfg.model.attention.layer_kind(0) == "sliding_window"
    _real_close(new, s, batches, 1e-6)
  local = convert.to_attention(s, "sliding_window", {"window": 4})
  with pytest.raises(AssertionError):  # a real window changes the model
    _real_close(local, s, batches, 1e-6)
  tg = convert.to_attention(s, "tglobal", {"window": t, "tglobal_block": 4})
  for lay in tg.layers:  # summaries start as zero rows
    np.testing.assert_array_equal(lay["attn"]["summary_norm"]["scale"], 0.0)
  assert np.isfinite(calibration_loss(tg.model(), batches))


def test_to_mla_at_full_rank_is_exact_for_mqa():
  # Exact up to the RMSNorms' eps (the latent norm divides by the RMS of
  # normed rows, which eps keeps just below 1): a tiny eps here.
  cfg, params = _tiny(**{"model.num_kv_heads": 1, "model.norm_eps": 1e-12})
  s = Surgery.of(cfg, params)
  rng = np.random.default_rng(0)

  def edit(i, lay):  # a trained norm's uneven scale, folded by to_mla
    lay["attn_norm"]["scale"] *= rng.uniform(0.5, 2.0, 32).astype(np.float32)

  s = _zero(s, edit)
  batches = _batches(cfg, 1)
  mla, errors = convert.to_mla(s, 32, batches)
  assert mla.cfg.model.attention.projection == "mla"
  assert all(e["key_error"] == 0 and e["latent_error"] < 1e-12 for e in errors)
  _real_close(mla, s, batches, 1e-4)
  # Below full rank the latent drops energy, and it is reported.
  low, errors = convert.to_mla(s, 4, batches)
  assert all(e["latent_error"] > 0.1 for e in errors)
  assert low.cfg.model.attention.kv_lora_rank == 4


def test_to_hourglass_with_factor_1_is_exact():
  cfg, params = _tiny()
  s = Surgery.of(cfg, params)
  hg = convert.to_hourglass(s, 1, 2, 1)
  assert hg.cfg.model.kind == "hourglass"
  assert hg.cfg.model.funnel.stages == (1, 1, 1)
  _real_close(hg, s, _batches(cfg, 1), 1e-5)


def test_to_mor_ties_the_mean_and_is_exact_on_equal_layers():
  cfg, params = _tiny(**{"model.num_layers": 4, "model.per_layer.mlp_dim": ()})
  s = Surgery.of(cfg, params)
  mor = convert.to_mor(s, 2, {})
  m = mor.cfg.model.routing
  assert (m.kind, m.sharing, m.num_recursions) == ("mor", "middle_cycle", 2)
  jax.tree.map(
    lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=1e-6),
    mor.layers[1],
    s.layers[1],
    s.layers[2],
  )
  layers = list(s.layers)
  layers[2] = layers[1]
  twins = Surgery(s.cfg, s.rest, layers)
  full = convert.to_mor(twins, 2, {"capacities": (1.0, 1.0)})
  _real_close(full, twins, _batches(cfg, 1), 1e-5)


CONVERSIONS = {
  "gqa": lambda s, b: convert.to_gqa(s, 1),
  "sliding": lambda s, b: convert.to_attention(
    s, "sliding_window", {"window": 8}
  ),
  "hourglass": lambda s, b: convert.to_hourglass(s, 1, 3, 2),
  "mor": lambda s, b: convert.to_mor(s, 2, {}),
  "width": lambda s, b: prune.prune_width(
    s, prune.width_keep(importance.width_scores(s, b), 24)
  ),
}


@pytest.fixture(scope="module")
def converted(source4):
  """{conversion: the run it wrote}: MLA through the CLI (in this
  process), the others written from the conversion functions."""
  root, src = source4
  before = snapshot(src)
  dsts = {"mla": root / "conv_mla"}
  try:
    cli.main([f"--workdir={src}", f"--out={dsts['mla']}", "--to_mla=16"])
  except SystemExit as e:
    raise AssertionError(f"surgery exited {e.code}") from None
  assert snapshot(src) == before
  run = runs.load_run(src)
  s = Surgery.of(run.config, run.params)
  batches = _batches(run.config, 1)
  for name, conv in CONVERSIONS.items():
    new = conv(s, batches)
    dsts[name] = root / f"conv_{name}"
    runs.write_run(str(dsts[name]), new.cfg, new.params(), {})
  return dsts


def test_converted_runs_load_with_their_weights(converted, source4):
  """What each conversion wrote loads back as its model (write_run
  checks the weights fit it), with the provenance of the CLI's run."""
  with open(converted["mla"] / "provenance.json") as f:
    record = json.load(f)["source"]["operations"][0]
  assert record["op"] == "to_mla" and len(record["reconstruction"]) == 4
  assert all(0 < e["key_error"] < 1 for e in record["reconstruction"])
  kinds = {}
  for name, dst in converted.items():
    m = runs.load_run(str(dst)).config.model
    kinds[name] = (m.kind, m.routing.kind, m.attention.projection, m.embed_dim)
  assert kinds == {
    "mla": ("decoder", "none", "mla", 32),
    "gqa": ("decoder", "none", "qkv", 32),
    "sliding": ("decoder", "none", "qkv", 32),
    "hourglass": ("hourglass", "none", "qkv", 32),
    "mor": ("decoder", "mor", "qkv", 32),
    "width": ("decoder", "none", "qkv", 24),
  }


@pytest.mark.slow
def test_converted_runs_train_resume_and_generate(converted):
  """Each converted run trains two steps from its step-0 checkpoint (a
  resume: the train state restored from what surgery wrote) and
  generates with cache = recompute."""
  for name, dst in converted.items():
    cfg = runs.load_run(str(dst)).config
    cfg = dataclasses.replace(  # the 8 devices of this process, no eval
      cfg,
      data=dataclasses.replace(cfg.data, eval_fraction=0.0),
      train=dataclasses.replace(cfg.train, steps=2),
      checkpoint=dataclasses.replace(cfg.checkpoint, async_save=False),
      mesh=dataclasses.replace(cfg.mesh, data=8),
    )
    summary = loop.run(cfg, str(dst))
    assert summary["start_step"] == 0 and summary["final_step"] == 2, name
    assert np.isfinite(summary["train_loss"]), name
    run = runs.load_run(str(dst))
    assert run.step == 2, name
    gen = Generator(run.graphdef, run.variables, mesh=run.mesh)
    prompts = [run.tokenizer.encode("def f"), run.tokenizer.encode("x = 1")]
    cached, _ = gen.generate(prompts, max_new_tokens=5, use_cache=True)
    full, _ = gen.generate(prompts, max_new_tokens=5, use_cache=False)
    assert cached == full, name


@pytest.fixture(scope="module")
def source4(tmp_path_factory):
  """A run at step 0 of a 4-layer MHA model (random weights)."""
  root = tmp_path_factory.mktemp("convert")
  cfg = small_config(
    **{
      "model.num_layers": 4,
      "model.embed_dim": 32,
      "model.num_kv_heads": 4,
      "model.mlp_dim": 64,
      "data.seq_len": 16,
      "train.batch_size": 8,
      "train.eval_batches": 1,
      "checkpoint.every_steps": 1,
    }
  )
  model = models.build(cfg.model, nnx.Rngs(3))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  workdir = runs.write_run(str(root / "src"), cfg, params, {})
  return root, workdir


def test_to_moe_upcycles_with_step0_logits_of_the_source(source, capsys):
  """--to_moe (issue #22's upcycling as a surgery operation): a run whose
  routed experts are copies of the source's MLPs, one shared expert
  starting at zero, so its logits at step 0 equal the source's; the run
  records the operation; upcycling it again is one error line."""
  root, src = source
  before = snapshot(src)
  dst = root / "moe"
  code, out, err = _cli(
    [
      f"--workdir={src}",
      f"--out={dst}",
      "--to_moe=4",
      "--config.model.moe.top_k=2",
      "--config.model.moe.num_shared_experts=1",
    ],
    capsys,
  )
  assert code is None, err
  assert "surgery: to_moe: params" in out
  assert snapshot(src) == before
  a, b = runs.load_run(src), runs.load_run(str(dst))
  assert b.config.model.moe.num_experts == 4
  assert b.config.model.moe.num_shared_experts == 1
  batch = _batches(a.config, 1)[0]
  np.testing.assert_allclose(
    _model_logits(b.model(), batch),
    _model_logits(a.model(), batch),
    atol=1e-5,
    rtol=1e-5,
  )
  with open(dst / "provenance.json") as f:
    ops = json.load(f)["source"]["operations"]
  assert [op["op"] for op in ops] == ["to_moe"]
  code, out, err = _cli(
    [f"--workdir={dst}", f"--out={root / 'moe2'}", "--to_moe=2"], capsys
  )
  assert err.startswith("error: --to_moe=2: the model already has experts")
