"""The Train button's stages, in order: linear -> finetune -> ntsnet -> refit. Each is a ``run(run, ...)`` over one
training.run_state.ProgressiveRun, and returns what the next stage starts from."""
