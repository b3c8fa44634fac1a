"""The model layer (Flax): ODE blocks, models, BatchNorm, max pool, the convolution's dispatch."""
