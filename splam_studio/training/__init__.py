"""The distillation trainer: the loop (Algorithm 1), data, device and precision, atomic files, quiet logs."""
