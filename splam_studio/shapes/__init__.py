"""The offline Shapes world: caption grammar and renderer, the evaluator, the teacher's tokenizer, recipe, training
stages and build, and the probes that measure it."""
