"""Training SAM-style models on images with instance labels (``mobilesam-train``)."""
