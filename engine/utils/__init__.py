"""Small utilities every room uses: crash-safe writes (atomic), the device check (devices), the one probe of
optional GPU libraries (optional), torch.compile at static shapes per input shape (compiling) and the source
checkout's import hygiene (checkout). Imports nothing of selfe."""
