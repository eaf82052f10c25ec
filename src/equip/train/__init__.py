"""One training run end to end: `run.train(cfg, job)` (CNN or baseline, recorded in MLflow),
the terminal side of train.py (`cli`), the fit itself, Lightning callbacks, checkpoints, ddp
ranks, resume and how a sweep job that failed early is recorded."""
