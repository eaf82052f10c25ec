"""Everything MLflow: which store (`store`), what goes into a run (`record`), a run's life from
start or resume to FINISHED or FAILED (`run`), equip's tag names (`schema`), every search
equip makes, in the dialect an Azure ML workspace supports (`queries`), the registered model's
champion (`champion`), secrets kept out of it all (`redaction`) and the evaluation artifacts
(`reports`). Nothing here imports torch or Lightning at module top."""
