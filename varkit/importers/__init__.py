"""Importers of foreign checkpoints: a released model's files in, a varkit model out.

One module per release format (``var``: the official VAR release; ``llamagen``:
LlamaGen's class-conditional release). Each reads the
release's state dicts with ``torch.load(weights_only=True)``, gets the plugins it needs
through the registry (a tokenizer plugin reads its own release layout with
``from_release``), converts the transformer's keys, and returns a
`varkit.loading.Loaded`; ``import_release`` writes it as a pretrained directory
(`varkit.pretrained`, with a model card) for ``varkit import``.
"""
