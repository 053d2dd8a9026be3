"""What is handed over: the winner and its threshold, ensembles, export (ONNX, TorchScript, the card), the
report and its pictures, swapped into a run's ``best/``."""
