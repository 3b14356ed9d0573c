"""The robustness evaluation's perturbations beyond attacks.py's PGD and IFGSM.

- autoattack: APGD (CE, DLR, targeted DLR), Square and AutoAttack's standard and fast ensembles.
- noises: white noise and the noises real ECGs carry (baseline wander, power line, muscle).
"""
