"""VSP spatial planning (maze navigation): the ``plan`` task and its perception task ``describe``
(:mod:`.task`), with their maps, prompts, scoring, chance levels and training rows in the modules beside it."""
