"""The SDXL adapter: resamplers, R^3 refiner and router, file formats, regional attention patch."""
