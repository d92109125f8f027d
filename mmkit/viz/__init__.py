"""Figures and tables for the notebooks (matplotlib; every function returns a Figure).

See ``mmkit.viz.core`` for the list. Later lessons add their own views (attention on the
image, gates over training) on top of the same generic pieces: ``plot_matrix`` draws any
labelled matrix (a similarity, an attention map, an attention mask), ``plot_curves`` any
family of lines, ``plot_bars`` any results (``plot_vqa`` the VQA results of several models).
"""
from mmkit.viz.core import (COLORS, MarkdownTable, md_table, plot_bars, plot_curves, plot_histograms, plot_learning_curves,
                            plot_label_mask, plot_matrix, plot_qformer_masks, plot_similarity, plot_training, plot_vqa,
                            show_patch_grid, show_samples)
from mmkit.viz.boxes import draw_boxes, grounding_panels
from mmkit.viz.diagrams import BRIDGE_FAMILIES, plot_bridge_diagram, save_bridge_diagrams
from mmkit.viz.tiles import draw_tiles, plot_resolution
from mmkit.viz.overlay import heatmap_array, heatmap_image, show_heatmaps, show_images
from mmkit.viz.tokens import image_tokens, plot_token_budgets, token_table

__all__ = [
    "show_samples", "show_patch_grid", "plot_matrix", "plot_similarity", "plot_label_mask", "plot_qformer_masks",
    "plot_training", "plot_bars", "plot_vqa", "plot_curves", "plot_learning_curves", "plot_histograms", "md_table",
    "MarkdownTable", "COLORS",
    "draw_boxes", "grounding_panels", "heatmap_array", "heatmap_image", "show_heatmaps", "show_images",
    "image_tokens", "token_table", "plot_token_budgets", "draw_tiles", "plot_resolution",
    "BRIDGE_FAMILIES", "plot_bridge_diagram", "save_bridge_diagrams",
]
