"""Where images come from and how they are streamed.

Files, folders, archives and phantoms become a manifest (``sources``); patient keys and splits
(``splits``); decode and cache once (``prepare``); Ray Data streams (``streams``), augmentation and
balanced sampling; ``python -m xray_ray.data inspect``. Importing this package (and ``sources``, ``splits``,
``images``) pulls in neither torch nor Ray: the serve wing reads labelled folders through it.
"""
