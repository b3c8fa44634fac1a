"""Residual AlexNet on CIFAR-10 (paper Tables 1, 2, 4): 120 epochs, lr ÷10 at 40, 80, 100."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "alexnet"
    config.num_epochs = 120
    config.lr_decay_epochs = (40, 80, 100)
    return config.lock()
