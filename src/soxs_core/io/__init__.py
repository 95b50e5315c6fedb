"""Input and output: the FITS format (``fits``), opening compressed inputs (``compressed``),
the FLUX/QUAL/ERRS image product (``image``) and DFS product headers with atomic writing
(``products``)."""
