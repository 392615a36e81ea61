"""The engine: `Cascade` and what it runs on (DESIGN section 6).

Pure TensorFlow: no files, no training, no commands. Importing this package
imports nothing; its modules bring TensorFlow in.
"""
