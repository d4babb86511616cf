"""The parts around the network and their weight formats: the FLUX.1 and space-to-depth autoencoders, the T5 / CLIP
text encoders, their offline snapshots and kept prompt encodings (encoding_cache), checked safetensors loading
(weights) and the FP8 linears (fp8)."""
