"""The classifiers: the config-built CNN as a LightningModule (`cnn`) and the scikit-learn
baseline on hand-made image features (`baseline`)."""
