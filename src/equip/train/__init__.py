"""One training run end to end: `run.train(cfg, job)` (CNN or baseline, recorded in MLflow),
the terminal side of train.py (`cli`), Lightning callbacks, ddp ranks, resume and how a failed
run is recorded."""
