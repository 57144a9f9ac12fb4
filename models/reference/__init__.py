"""The FLUX reference branch: MOSAIC's reference LoRA, AlignGen's masks and DEM."""
