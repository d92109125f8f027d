"""Exercises for the notebooks: a student writes a small function, a check says what is wrong.

Each exercise has a name, the notebook it belongs to, and

    check_<name>(student_fn) -> bool    runs the student's function on real inputs, compares
                                        it with the library (the conv patch embedding,
                                        ``mmkit.zoo.clip_loss``, the Processor's labels,
                                        ``VLM.embed``, ...) and prints a verdict: "✓ correct",
                                        or what is wrong and where.
    solution(name)                      prints a reference answer (only when asked).

A check never raises: an unsolved exercise (``raise NotImplementedError``, ``return None``)
or a crashing attempt prints a message and returns False, so a notebook with open
exercises still runs top to bottom (``pytest --nbmake``).

    from mmkit.exercises import check_patchify, solution
    check_patchify(patchify)        # ✗ ... / ✓ correct
    solution("patchify")            # prints the reference implementation
    check("patchify", patchify)     # the same check, by name (any notebook's exercise)

Build-up exercises ask for a whole module (``MLPProjector``, ``QFormerLayer``,
``PerceiverBlock``, ``GatedXAttnDense``, ``LoRALinear``) or a mechanism's core function
(``positions_2d``, ``patch_rows``, ``ema_update``): the check loads the library's weights into
the student's module and compares outputs. ``progress()`` shows what this user has solved,
``reset(name)`` forgets it.

``core`` holds the framework (``register``, ``check``, ``solution``, the registry); each
notebook's exercises live in a module of their own (``tour`` for 00, ``vision_encoder``
for 01, ``llava`` for 02, ``blip2`` for 03, ..., ``data_eval`` for 09) that calls
``register(Exercise(...), solution_source)``; ``check`` / ``solution`` find them all.
"""
from __future__ import annotations

from mmkit.exercises.core import (EXERCISES, Exercise, _reference, check, list_exercises, progress, register,
                                  reset, solution)
# notebook order (importing a module registers its exercises; EXERCISES keeps that order)
from mmkit.exercises.tour import check_count_image_tokens, check_vqa_accuracy  # 00
from mmkit.exercises.vision_encoder import check_clip_loss, check_patchify  # 01
from mmkit.exercises.llava import check_label_mask, check_merge_image_tokens  # 02
from mmkit.exercises.data_eval import check_dpo_loss, check_fool_chair, check_pope_by_type  # 09

__all__ = [
    "EXERCISES", "Exercise", "check", "solution", "list_exercises", "register", "progress", "reset",
    "check_count_image_tokens", "check_vqa_accuracy", "check_patchify", "check_clip_loss",
    "check_label_mask", "check_merge_image_tokens", "check_dpo_loss", "check_pope_by_type", "check_fool_chair",
]
