"""The training commands: ``sft`` and ``grpo`` (thin entry points over :mod:`mirage_rl.trainers`), and the steps
they share (:mod:`.common`). The other commands live beside the concept they run (``evaluation``, ``pipeline``,
``results``, ``data.build``)."""
