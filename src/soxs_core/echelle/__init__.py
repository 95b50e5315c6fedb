"""Echelle geometry: order tables and their polynomials, edge tracing, flats, background."""
