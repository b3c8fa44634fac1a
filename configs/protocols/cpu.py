"""What two CPU cores allow: ResNet-4 × all five variants × 3 seeds, 15 epochs.

    python reproduce.py --protocol=cpu --workdir=runs/repro

The paper's step schedule compressed to 15 epochs: lr ÷10 at 150/350 and 300/350 of the run
(epochs 6.43 and 12.86), after our one-epoch warm-up; the bundled real CIFAR-10 (data/).
One checkpoint per cell is kept, so that the run directory can be committed as it goes.
"""

import ml_collections

from configs.protocols import paper


def get_config() -> ml_collections.ConfigDict:
    protocol = paper.get_config()
    protocol.name = "cpu"
    protocol.models = ("resnet4",)
    protocol.num_seeds = 3
    protocol.num_epochs = 15
    protocol.training = ml_collections.ConfigDict(
        {"progress_bar": False, "data_source": "bundled", "max_checkpoints_to_keep": 1}
    )
    return protocol
