"""selfe.kernels: the fused ops of the engine.

`reference` holds the pure-PyTorch definition of every op (the CPU path and the test oracle);
`dispatch` picks an implementation per the backend switch. Nothing here imports selfe's engine.
"""
