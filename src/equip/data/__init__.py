"""Images in, tensors out: decoding and preprocessing photos or drawing the built-in set
(`images`, `synthetic`), the decoded cache on disk (`_imagestore`), the stratified, grouped
train/val/test split and k-fold folds (`split`), and the LightningDataModule (`loaders`).
"""
