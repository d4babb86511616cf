"""The sampling path: the any-step sampler, the compiled and CUDA-graphed fast path (the text encoders and decoder
compiled too: fast_components; torch.compile's work kept on disk: compile_cache), and the library API
`SelfEPipeline` with the checks of its inputs and the files of a pipeline directory."""
