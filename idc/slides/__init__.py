"""Whole-slide images: read a scanner's file at the model's scale, find the tissue, classify it tile
by tile through the edge engine, and put the answers back on the slide.

- `reader`: `SlideReader` opens any format OpenSlide reads and cuts the model's tiles (50 px at the
  bundle's microns per pixel) from the pyramid level nearest that scale, resampled to it.
- `tissue`: Otsu on saturation at low resolution, so glass is never classified.
- `analysis`: `analyse_slide` streams the tissue tiles in batches through a Classifier (bounded
  memory, Ctrl-C safe), and applies the bundle's slide-context rule on the slide's own tile grid.
- `outputs`: the tile CSV, the heatmap and overlay PNGs, QuPath-importable GeoJSON, the summary.

The CLI is `inception_test.py --slide`; the edge server's Slides page is idc.edge.web.slides.
"""
