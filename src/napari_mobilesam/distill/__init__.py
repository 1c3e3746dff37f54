"""Decoupled distillation of a SAM image encoder (``mobilesam-distill``).

Teacher embeddings are computed once (``embed``), a small student encoder learns to
reproduce them with an MSE loss (``train``), and the student is judged by the masks
it gives through the teacher's frozen prompt encoder and mask decoder (``evaluate``).
Submodules are imported on use; importing this package imports nothing heavy.
"""
