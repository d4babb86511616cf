"""selfe.train: training loops for Self-E (the 2-D proof now; the FSDP2 trainer later)."""
