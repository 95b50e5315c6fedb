"""Parameter declarations shared by several recipes."""

from .framework import Param

MASTER_PARAMS = (
    Param("frame-clipping-sigma", float,
          "Number of sigma from the median frame flux beyond which a pixel is added to the "
          "bad-pixel mask: a master pixel further than this many single-frame sigmas (the raw "
          "read noise) from the local median level is flagged hot (above) or cold (below, "
          "mbias only). Also the sigma of the clipped per-frame level and noise statistics.",
          synonyms=("frame_clipping_sigma",), minimum=0.1),
    Param("frame-clipping-iterations", int,
          "Number of sigma-clipping iterations performed when adding pixels to the bad-pixel "
          "mask (and for the per-frame statistics).",
          synonyms=("clipping-iteration-count", "frame_clipping_iterations"), minimum=0),
    Param("stacked-clipping-sigma", float,
          "Number of sigma deviations from the median pixel flux beyond which a pixel is "
          "excluded from the stack (per-pixel clip across frames; sigma is the MAD scale, "
          "never below the values' own propagated errors).",
          minimum=0.1),
    Param("stacked-clipping-iterations", int,
          "Number of sigma-clipping iterations to perform before stacking.", minimum=0),
    Param("stacking-method", str,
          "How the surviving values of each pixel are combined.", choices=("mean", "median")),
)
