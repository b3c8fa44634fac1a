"""A protocol of tiny synthetic cells for tests/training/test_reproduce.py: seconds, not hours.

ResNet-4 baseline and anodev2_conf1, 2 seeds vmapped, 2 epochs of 6 steps on 96 synthetic
images. Loadable by path: python reproduce.py --protocol=tests/tiny_protocol.py
"""

import ml_collections

from configs.protocols import cpu

TRAINING = {
    "conv_impl": "xla",
    "data_source": "synthetic",
    "num_train": 96,
    "num_test": 40,
    "batch_size": 16,
    "eval_batch_size": 32,
    "log_every_steps": 2,
    "learning_rate": 0.02,
    "progress_bar": False,
    "seed_batching": "vmap",  # vmap end to end here; tests/training/test_training.py runs the loop
    "max_checkpoints_to_keep": 2,
}


def get_config() -> ml_collections.ConfigDict:
    protocol = cpu.get_config()
    protocol.name = "tiny"
    protocol.variants = ("baseline", "anodev2_conf1")
    protocol.num_seeds = 2
    protocol.num_epochs = 2
    protocol.training = ml_collections.ConfigDict(TRAINING)
    return protocol
