"""Data for mmkit: the offline ShapesWorld generator (``mmkit.data.shapes``) and, next to it,
loaders for real LLaVA-format conversation data. Import the submodules directly, e.g.
``from mmkit.data.shapes import ShapesWorld``."""
