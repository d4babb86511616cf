"""The parts around the network and their weight formats: the FLUX.1 and space-to-depth autoencoders, the T5 / CLIP
text encoders and their offline snapshots, checked safetensors loading (weights) and the FP8 linears (fp8)."""
