"""The Self-E method (docs/method.md): time schedules, the energy-preserving renorms, the self-evaluating
objective, and the text conditions it is trained with."""
