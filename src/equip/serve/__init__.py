"""Models on raw images: the CNN's and the baseline's MLflow pyfuncs (`pyfunc`,
`baseline_pyfunc`) with their serving limits, and `python -m equip.predict` (`predict`)."""
