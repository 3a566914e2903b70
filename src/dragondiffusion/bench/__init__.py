"""Benchmarks: `quality` compares every edit with the exact expected result of procedural scenes.

The submodules need the `bench` extra (scikit-image for SSIM and histogram matching, OpenCV for
the naive baseline's inpainting); this package itself imports nothing, so the CLI can list the
choices below without them.
"""

EDITS = ("move", "resize", "appearance", "drag", "paste")
"""Edits the quality benchmark runs; resize is a move with a scale, in place."""
ABLATIONS = (
    "no-bank",
    "no-content",
    "no-edit",
    "no-blend",
    "no-match",
    "two-blocks",
    "fewer-steps",
    "no-keep-background",
)
"""Variants of the method: memory bank off, w_content = 0, w_edit = 0, blend_background = 0 (the
same as the method for a model whose defaults do not blend, e.g. SD 1.5), match_statistics = 0
(appearance and paste; the same as the method for the other edits, and for a model whose defaults do
not match), the energies on DragonDiffusion's two decoder blocks (the same as the method for an edit
whose blocks the model's dragondiffusion.json does not name), fewer DDIM steps, and the kept
background off (`EditOptions.keep_background` False: the model's whole re-synthesised image instead
of the input's own pixels beyond the default margin around the edit's region; the same edit, so the
run composites or un-composites one output instead of sampling twice). Where a variant is the same
as the method (or another variant) for an edit, the run makes that output once and gives both rows
its measurements."""
