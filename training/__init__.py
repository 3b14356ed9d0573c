"""What every method script trains with.

- harness: the training loop and a method script's main (flags, run folder, resume, evaluation).
- losses: the defenses' loss terms (NSR, Jacobian, adversarial training, TRADES).
"""
