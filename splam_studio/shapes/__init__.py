"""The offline Shapes world: caption grammar and renderer, the teacher recipe, the evaluator."""
