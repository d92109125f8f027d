"""Data for mmkit: the offline ShapesWorld generator (``mmkit.data.shapes``), the grounding box
text format (``mmkit.data.grounding``) and, next to them, loaders for real LLaVA-format
conversation data. Import the submodules directly, e.g.
``from mmkit.data.shapes import ShapesWorld``."""
