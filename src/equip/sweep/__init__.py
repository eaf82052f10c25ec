"""Multiruns: the Hydra callback that validates a sweep and owns its MLflow parent run
(`callback`), a job's sweep context (`context`), the leaderboard (`leaderboard`) and CV sweeps
read back (`crossval`)."""
