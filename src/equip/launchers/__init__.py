"""Where a sweep's jobs run besides this process: a Ray cluster (`ray`) or Azure ML command
jobs (`azureml`). Hydra finds the launcher classes through src/hydra_plugins/."""
