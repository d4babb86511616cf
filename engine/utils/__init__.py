"""Small utilities every room uses: crash-safe writes (atomic), the device check (devices), the one probe of
optional GPU libraries (optional) and the source checkout's import hygiene (checkout). Imports nothing of selfe."""
