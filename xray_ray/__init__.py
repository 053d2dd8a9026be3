"""xray_ray: find, on Ray, the best CNN for pediatric chest X-rays (NORMAL vs PNEUMONIA)."""

__version__ = "0.1.0"
CLASSES = ("NORMAL", "PNEUMONIA")  # the binary default: labels 0 and 1
SUBTYPE_CLASSES = ("NORMAL", "BACTERIA", "VIRUS")  # `--labels subtype`: the pneumonia subtype from file names
