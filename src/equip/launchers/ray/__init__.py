"""hydra/launcher=ray: sweep jobs as Ray tasks on a cluster (`launcher`); the cluster and store
checks before any job (`_cluster`) and what runs on a worker (`_worker`)."""
