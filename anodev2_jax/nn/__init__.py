"""The model layer (Flax): ODE blocks, AlexNet, ResNets, BatchNorm, the convolution's dispatch."""
