"""Images in, tensors out: decoding and preprocessing photos or drawing the built-in set
(`images` is the public face, `synthetic` the drawn classes), the stratified, grouped
train/val/test split and k-fold folds (`split`), the groups it keeps whole (`grouping`), and the
LightningDataModule (`loaders`).
Private: scanning and decoding folders (`_folder`), the drawn set's cache (`_builtin`), the
decoded `.npy` cache, written atomically and checked by CRC-32 (`_imagestore`).
"""
