"""Training RTMDet: optimiser and LR schedule, EMA, the training loop, and the `train`/`eval` commands."""
