"""Everything MLflow: which store (`store`), what goes into a run (`record`), equip's tag names
and run filters (`schema`), secrets kept out of it all (`redaction`) and the evaluation
artifacts (`reports`). Nothing here imports torch or Lightning at module top."""
