"""The datasets: their constants and their documented readers.

- cpsc2018: CPSC2018's classes, leads, sampling rate, SNOMED codes and the readers of its two forms.
- synthetic: synthetic records in CPSC2018's original file format, for the demo and the tests (a command).
"""
