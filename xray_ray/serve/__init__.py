"""How a handed-over model is run: the onnxruntime runtime, predict and evaluate.

Nothing in this wing imports torch or Ray, directly or through any chain of imports (a test proves it).
"""
