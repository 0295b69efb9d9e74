"""Model surgery: structured pruning of a trained run into a new, smaller
run (`python -m efficient_lm.surgery`, cli.py).

  layers.py      parameters per layer (unstack / restack), the decoder run
                 one layer at a time with captures
  model.py       the model under surgery and its measured passes
  importance.py  the criteria (FFN neurons, kv groups, layers)
  prune.py       the operations: slice the kept units out
  pipeline.py    load, calibrate, apply in order, write
"""

# The criteria names (importance.py defines them; the CLI's choices).
FFN_CRITERIA = ("rmax", "activation", "taylor", "magnitude", "random")
HEAD_CRITERIA = ("output", "taylor", "magnitude", "random")
LAYER_CRITERIA = ("loss", "cosine")
