"""The paper's AlexNet protocol on the lossless CIFAR-10 (Table 1's largest gain).

    python -m anodev2_jax.training fetch-lossless   # once: the lossless copy, sha256-checked
    python reproduce.py --protocol=alexnet --workdir=reproduction/alexnet

configs/alexnet.py unchanged (120 epochs, batch 256, SGD 0.1, momentum 0.9, weight decay 5e-4,
lr ÷10 at 40, 80, 100) but for our one-epoch warm-up; two seeds per cell, baseline first, then
anodev2_conf1, then anode and anodev2_conf2 as time allows. One checkpoint per cell is kept so
that the run directory can be committed as it goes; rerunning the command resumes it.
"""

import ml_collections

from configs.protocols import paper


def get_config() -> ml_collections.ConfigDict:
    protocol = paper.get_config()
    protocol.name = "alexnet"
    protocol.models = ("alexnet",)
    protocol.variants = ("baseline", "anodev2_conf1", "anode", "anodev2_conf2")
    protocol.num_seeds = 2
    protocol.training = ml_collections.ConfigDict(
        {"progress_bar": False, "data_source": "lossless", "max_checkpoints_to_keep": 1}
    )
    return protocol
