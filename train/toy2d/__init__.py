"""The 2-D proof of the objective and sampler: flow matching vs Self-E on a conditional mixture (`selfe toy2d`)."""
