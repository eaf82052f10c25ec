"""Azure ML: its settings written once (`settings`), command jobs built from a config (`jobs`),
the workspace's job service (`service`), hydra/launcher=azureml (`launcher`) and
+launch=azureml for one run (`run`)."""
