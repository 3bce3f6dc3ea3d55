"""The core: EPD, the model and its card, inference, metrics, windowing, volumes, classes.

NumPy everywhere and torch only in the modules that need it (epd_torch, model, model_io,
inference's prediction functions); it imports nothing from io/, cli/ or mrml/.
"""
