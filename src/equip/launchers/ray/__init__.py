"""hydra/launcher=ray: sweep jobs as Ray tasks on a cluster."""
