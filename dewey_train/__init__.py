"""dewey_train: chunk-alignment distillation (data, chunkers, teacher, losses, trainer, eval).

Not built yet: it arrives with its issue. It imports ``runtimes`` for the model definition, the
chunkers and span pooling; ``runtimes`` never imports it.
"""
