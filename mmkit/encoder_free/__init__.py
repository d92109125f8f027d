"""Encoder-free models: the LM reads pixels with no pre-trained vision encoder in front.

    fuyu.py   Fuyu: raw patches -> one Linear -> the LM, a |NEWLINE| token after every
              patch row, any aspect ratio (images padded bottom/right, never resized
              to a square)
    eve.py    EVE: a small Patch Embedding Layer (conv, local and global cross-attention,
              a <CLS> token, a <SPL> token per row) and, during training only, a Patch
              Aligning Layer that pulls the LM's image states towards a frozen CLIP
              encoder's patch features

Both are ``mmkit.vlm.VLM`` subclasses built by ``build_model`` from the recipes
``fuyu-tiny`` / ``eve-tiny`` (families "fuyu" and "eve"). Notebook 06 compares them on
one budget with ``mmkit.recipes.scale_budget`` and ``mmkit.train.train_and_track``.
"""
