"""How one network is trained: the CNN family (``cnn``), the training and evaluation loops (``train``) and
the seeded shift battery it is scored on (``robustness``). Torch, no Ray."""
