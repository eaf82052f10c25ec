"""Everything MLflow: which store (`store`), what goes into a run (`record`), a run's life from
start or resume to FINISHED or FAILED (`run`), equip's tag names and run filters (`schema`),
secrets kept out of it all (`redaction`) and the evaluation artifacts (`reports`). Nothing here
imports torch or Lightning at module top."""
