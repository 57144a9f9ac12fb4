"""The FLUX adapter: DynaIP's decoupled image cross-attention and its block patch."""
