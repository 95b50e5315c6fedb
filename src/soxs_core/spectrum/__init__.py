"""One-dimensional spectra: order merging, response function, efficiency, flux calibration."""
