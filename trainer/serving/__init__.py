"""Using an exported model: offline batch prediction and the REST server.

Owns everything that runs after training: `inference` (loading the SavedModel
and shaping its outputs), `predict` (`python -m trainer.predict`) and `serve`
(`python -m trainer.serve`). It reads only what the export promises (its
signatures and its `metadata`), never the training code (images, models,
data, tasks, train, config), so a model serves the same whatever trained it.
Besides the shared plumbing (cli, files, cluster) it uses trainer.retrieval,
the NumPy-only nearest-neighbour search that evaluation uses too, for
predict's --gallery (`embeddings`).
"""
