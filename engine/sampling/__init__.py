"""The sampling path: the any-step sampler, the compiled and CUDA-graphed fast path, and the library API
`SelfEPipeline` with the checks of its inputs and the files of a pipeline directory."""
