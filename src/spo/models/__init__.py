"""Models: the offline ``tiny`` base (``tiny``), loading/saving/LoRA (``loading``), and how a
data row becomes model text (``formatting``), shared by SFT, preference training and generation.

Import the submodules directly (``from spo.models.loading import load_causal_lm``); this package
imports nothing heavy on its own.
"""
