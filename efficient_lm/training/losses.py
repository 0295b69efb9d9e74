"""Training objectives: logits, batch and the model's aux -> (loss, metrics).

`train.objective` picks one. Every objective adds the model's `loss/*` aux
entries to its own loss; the step reports the aux dict itself. An objective
with a `corrupt(key, batch)` method (MLM) has the step corrupt each batch
before the model sees it (training/step.py). The distillation objective
reads the teacher's logits from the batch (`teacher_logits`, which the step
adds: training/distill.py).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
Objective = Callable[[jax.Array, dict, Metrics], tuple[jax.Array, Metrics]]


def aux_loss(aux: Metrics) -> jax.Array:
  """Sum of the model's auxiliary losses (`loss/*` entries)."""
  return sum(
    (v for k, v in aux.items() if k.startswith("loss/")),
    jnp.zeros((), jnp.float32),
  )


def _cross_entropy(
  logits_BTV, targets_BT, mask_BT, aux: Metrics, *, z_loss: float
) -> tuple[jax.Array, Metrics]:
  """Mean cross-entropy of `targets_BT` where `mask_BT`, plus PaLM's z-loss
  over the same positions and the aux losses; `tokens` = positions
  counted."""
  mask_BT = mask_BT.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(
    logits_BTV, targets_BT[..., None], axis=-1
  )[..., 0]
  nll_BT = lse_BT - target_logit_BT
  tokens = mask_BT.sum()
  denom = jnp.maximum(tokens, 1.0)
  ce = (nll_BT * mask_BT).sum() / denom
  loss = ce + aux_loss(aux)
  if z_loss:
    # PaLM's z-loss keeps the softmax normaliser near 1 (log Z near 0).
    loss = loss + z_loss * (jnp.square(lse_BT) * mask_BT).sum() / denom
  return loss, {"ce": ce, "tokens": tokens}


def next_token(
  logits_BTV: jax.Array, batch: dict, aux: Metrics, *, z_loss: float
) -> tuple[jax.Array, Metrics]:
  """Cross-entropy of `targets` over non-padding positions (segment > 0),
  plus PaLM's z-loss and the aux losses. `ce` is the mean per token."""
  return _cross_entropy(
    logits_BTV, batch["targets"], batch["segment_ids"] > 0, aux, z_loss=z_loss
  )


class MLM:
  """BERT's masked-LM objective (train.objective='mlm').

  `corrupt(key, batch)` runs inside the step, before the model: each
  non-padding token that is not one of `special_ids` (the tokenizer's
  pad / bos / eos: BERT and Hugging Face's collator never mask them) is
  picked with probability `rate`; a picked token becomes `mask_id` (80%),
  a uniform random id below `mask_id` (10%: the tokenizer's own ids, as
  BERT draws from the whole vocabulary) or stays (10%). The corrupted batch
  has `inputs` = corrupted tokens, `targets` = the original tokens and
  `mlm_mask` = the picked positions. The loss (`__call__`) is the
  cross-entropy over the picked positions only; `tokens` counts them.
  """

  def __init__(
    self,
    *,
    rate: float,
    mask_id: int,
    z_loss: float,
    special_ids: tuple[int, ...] = (),
  ):
    self.rate, self.mask_id, self.z_loss = rate, mask_id, z_loss
    self.special_ids = tuple(special_ids)

  def corrupt(self, key: jax.Array, batch: dict) -> dict:
    tokens_BT = batch["inputs"]
    shape = tokens_BT.shape
    k_pick, k_kind, k_rand = jax.random.split(key, 3)
    ordinary_BT = batch["segment_ids"] > 0
    for i in self.special_ids:
      ordinary_BT &= tokens_BT != i
    picked_BT = ordinary_BT & (jax.random.uniform(k_pick, shape) < self.rate)
    u_BT = jax.random.uniform(k_kind, shape)
    random_BT = jax.random.randint(
      k_rand, shape, 0, self.mask_id, dtype=tokens_BT.dtype
    )
    new_BT = jnp.where(
      u_BT < 0.8,
      jnp.asarray(self.mask_id, tokens_BT.dtype),
      jnp.where(u_BT < 0.9, random_BT, tokens_BT),
    )
    return {
      **batch,
      "inputs": jnp.where(picked_BT, new_BT, tokens_BT),
      "targets": tokens_BT,
      "mlm_mask": picked_BT,
    }

  def __call__(
    self, logits_BTV: jax.Array, batch: dict, aux: Metrics
  ) -> tuple[jax.Array, Metrics]:
    return _cross_entropy(
      logits_BTV, batch["targets"], batch["mlm_mask"], aux, z_loss=self.z_loss
    )


def distill_kl(
  student_BTV: jax.Array,
  teacher_BTV: jax.Array,
  mask_BT: jax.Array,
  *,
  temperature: float,
) -> jax.Array:
  """Mean over `mask_BT` of KL(p || q), where p and q are the teacher's and
  the student's softmax at `temperature`."""
  mask_BT = mask_BT.astype(jnp.float32)
  t = jnp.float32(temperature)
  logq_BTV = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / t, axis=-1)
  logp_BTV = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / t, axis=-1)
  kl_BT = jnp.sum(jnp.exp(logp_BTV) * (logp_BTV - logq_BTV), axis=-1)
  return (kl_BT * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


class Distill:
  """Knowledge distillation (train.objective='distill'; Hinton et al. 2015):

    loss = alpha * T^2 * KL(teacher || student at temperature T)
           + (1 - alpha) * next-token CE  (+ z-loss and the aux losses)

  over the non-padding positions. `batch["teacher_logits"]` holds the
  teacher's logits (the step adds them, gradient stopped). Both are cut to
  the tokenizer's `vocab_size` ids: two models of one tokenizer may pad
  their vocabularies differently, and the ids past it are never targets.
  The CE is the next-token objective's own, unchanged: alpha = 0 is
  next-token training bit for bit. Metrics: `ce`, `tokens`, `kl`.
  """

  def __init__(
    self, *, alpha: float, temperature: float, vocab_size: int, z_loss: float
  ):
    self.alpha, self.temperature = alpha, temperature
    self.vocab_size, self.z_loss = vocab_size, z_loss

  def __call__(
    self, logits_BTV: jax.Array, batch: dict, aux: Metrics
  ) -> tuple[jax.Array, Metrics]:
    loss, metrics = next_token(logits_BTV, batch, aux, z_loss=self.z_loss)
    v = self.vocab_size
    kl = distill_kl(
      logits_BTV[..., :v],
      batch["teacher_logits"][..., :v],
      batch["segment_ids"] > 0,
      temperature=self.temperature,
    )
    # (1 - a) * ce + a * T^2 * kl, written so that a = 0 adds an exact 0.
    t2 = self.temperature**2
    loss = loss + self.alpha * (t2 * kl - metrics["ce"])
    return loss, {**metrics, "kl": kl}


def make_objective(
  name: str,
  *,
  z_loss: float,
  mlm_rate: float = 0.15,
  mask_id: int | None = None,
  special_ids: tuple[int, ...] = (),
) -> Objective:
  """train.objective's loss. 'distill' gives the student's own next-token
  loss here (what evaluation of a distilled run measures); the trainer
  builds the Distill objective itself, beside its teacher."""
  if name in ("next_token", "distill"):
    return lambda logits, batch, aux: next_token(
      logits, batch, aux, z_loss=z_loss
    )
  if name == "mlm":
    if mask_id is None:
      raise ValueError("train.objective='mlm' needs the tokenizer's mask_id")
    return MLM(
      rate=mlm_rate, mask_id=mask_id, z_loss=z_loss, special_ids=special_ids
    )
  raise ValueError(f"train.objective={name!r} is not supported")
