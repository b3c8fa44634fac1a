"""ResNet-4 on CIFAR-10 (paper Tables 1, 2, 4): 350 epochs, lr ÷10 at 150 and 300."""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet4"
    return config.lock()
