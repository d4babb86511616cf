"""The network: the dual-time MMDiT (model), its building blocks (layers), joint attention and RoPE as pure
functions (attention, rope), its hyper-parameters (config) and its analytical FLOPs (flops)."""
