"""The numbers the paper reports (paper Tables 1-4 and Appendix C), for comparison.

Accuracies are CIFAR-10 test accuracies in percent over five runs, as (min, max, mean);
parameter counts are Table 3's, in thousands, as printed.
"""

from __future__ import annotations

# (model, variant) -> (min, max, mean) test accuracy in %, five seeds.
ACCURACY: dict[tuple[str, str], tuple[float, float, float]] = {
    ("alexnet", "baseline"): (86.84, 87.15, 87.03),
    ("alexnet", "node"): (74.54, 76.78, 75.67),
    ("alexnet", "anode"): (87.86, 88.14, 88.02),
    ("alexnet", "anodev2_conf1"): (88.59, 88.96, 88.78),
    ("alexnet", "anodev2_conf2"): (88.10, 88.33, 88.26),
    ("resnet4", "baseline"): (76.47, 77.35, 76.95),
    ("resnet4", "node"): (44.73, 49.91, 47.37),
    ("resnet4", "anode"): (76.92, 77.45, 77.30),
    ("resnet4", "anodev2_conf1"): (77.27, 78.58, 78.11),
    ("resnet4", "anodev2_conf2"): (77.23, 78.28, 77.73),
    ("resnet10", "baseline"): (87.79, 88.52, 88.10),
    ("resnet10", "node"): (64.70, 70.06, 67.94),
    ("resnet10", "anode"): (88.48, 88.75, 88.60),
    ("resnet10", "anodev2_conf1"): (88.67, 89.39, 89.04),
    ("resnet10", "anodev2_conf2"): (88.65, 89.19, 88.93),
}

# The tables each variant's row appears in.
TABLES: dict[str, str] = {
    "baseline": "1, 2",
    "node": "4",
    "anode": "4",
    "anodev2_conf1": "1",
    "anodev2_conf2": "2, 4",
}

# Table 3: (model, variant) -> parameters in thousands.
PARAMS_K: dict[tuple[str, str], float] = {
    ("alexnet", "baseline"): 1756.68,
    ("alexnet", "node"): 1757.13,
    ("alexnet", "anode"): 1757.13,
    ("alexnet", "anodev2_conf1"): 1757.51,
    ("alexnet", "anodev2_conf2"): 1757.13,
    ("resnet4", "baseline"): 7.71,
    ("resnet4", "node"): 7.96,
    ("resnet4", "anode"): 7.96,
    ("resnet4", "anodev2_conf1"): 8.23,
    ("resnet4", "anodev2_conf2"): 7.99,
    ("resnet10", "baseline"): 44.19,
    ("resnet10", "node"): 44.95,
    ("resnet10", "anode"): 44.95,
    ("resnet10", "anodev2_conf1"): 45.77,
    ("resnet10", "anodev2_conf2"): 45.05,
}

# Appendix C: training epochs per model (the learning rate ÷10 at 150 and 300, AlexNet at 40,
# 80 and 100), and the number of runs behind each result.
EPOCHS: dict[str, int] = {"alexnet": 120, "resnet4": 350, "resnet10": 350}
NUM_SEEDS = 5

MODEL_NAMES: dict[str, str] = {"alexnet": "AlexNet", "resnet4": "ResNet-4", "resnet10": "ResNet-10"}
